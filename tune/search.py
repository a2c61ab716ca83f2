"""The search: its config (`SearchConfig`), the step plan every trial shares, the search space and the
ASHA scheduler whose rungs fall on validation steps."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ray import tune
from ray.tune.schedulers import ASHAScheduler

from nezha.config import ConfigError
from nezha.model.draft_head import TRANSITIONS
from nezha.training import plan

OBJECTIVES = ("ndcg", "ndcg_within_budget")
TRAINERS = ("single", "ray")
SCORE = "ndcg@10"  # Tune's metric: validation NDCG@10 at eval_beam (ASHA compares trials on it)


@dataclass
class SearchConfig:
    """Search draft-head transitions x learning rates with Ray Tune (ASHA), then beam widths at decode time."""

    prepared: str = field(default="runs/prepared", metadata={"help": "output dir of `nezha prepare`"})
    storage_path: str = field(default="runs/tune", metadata={"help": "Ray Tune storage (a local or shared dir)"})
    name: str = field(default="nezha-tune", metadata={"help": "experiment: results land in STORAGE_PATH/NAME"})
    resume: bool = field(default=False, metadata={"help": "continue the experiment at STORAGE_PATH/NAME"})
    backbone: str = field(default="tiny", metadata={"help": "preset or local HF dir (as `nezha train`)"})
    transitions: list[str] = field(default_factory=lambda: list(TRANSITIONS),
                                   metadata={"help": "grid over draft-head transitions"})
    lr_min: float = field(default=3e-4, metadata={"help": "learning rate, sampled log-uniformly from [min, max]"})
    lr_max: float = 3e-3
    head_lr_mults: list[float] = field(default_factory=lambda: [1.0],
                                       metadata={"help": "draft-head lr multipliers to sample from"})
    num_samples: int = field(default=1, metadata={"help": "random (lr, head lr mult) draws, each tried with "
                                                          "every transition"})
    epochs: float = 1.0
    max_steps: int = field(default=0, metadata={"help": "training steps per trial (0: run the epochs)"})
    batch_size: int = 128
    evaluations: int = field(default=4, metadata={"help": "validations per trial (ASHA's decision points)"})
    eval_users: int = field(default=1000, metadata={"help": "validation users scored (0: all)"})
    eval_beam: int = field(default=20, metadata={"help": "beam width of the validations during training"})
    widths: list[int] = field(default_factory=lambda: [5, 10, 20, 50, 100],
                              metadata={"help": "beam widths swept on each trained trial's best checkpoint"})
    latency_requests: int = field(default=30, metadata={"help": "timed batch-1 requests per width"})
    objective: str = field(default="ndcg", metadata={"help": f"one of {OBJECTIVES}"})
    latency_budget_ms: float = field(default=0.0, metadata={"help": "p50 ms per request at batch 1 "
                                                                    "(ndcg_within_budget; drawn on the plot)"})
    asha_grace_evals: int = field(default=1, metadata={"help": "validations before ASHA may stop a trial"})
    asha_reduction_factor: int = field(default=2, metadata={"help": "ASHA keeps the top 1/N at each rung"})
    trainer: str = field(default="single", metadata={
        "help": "single: one process per trial; ray: each trial a Ray Train DeepSpeed job of workers_per_trial"})
    workers_per_trial: int = field(default=2, metadata={"help": "trainer ray: Ray Train workers per trial"})
    zero_stage: int = field(default=2, metadata={"help": "trainer ray: DeepSpeed ZeRO stage"})
    cpus_per_trial: float = field(default=1.0, metadata={"help": "per trial (trainer ray: per worker)"})
    gpus_per_trial: float = field(default=0.0, metadata={"help": "per trial (trainer ray: > 0 gives each worker "
                                                                 "one GPU)"})
    max_concurrent_trials: int = field(default=0, metadata={"help": "0: as many as the resources allow"})
    seed: int = 0
    docs_img: str = field(default="", metadata={"help": "also copy the plot into this folder (e.g. docs/img)"})

    def __post_init__(self) -> None:
        unknown = sorted(set(self.transitions) - set(TRANSITIONS))
        if unknown or not self.transitions:
            raise ConfigError(f"transitions: must be a non-empty subset of {TRANSITIONS}, got {self.transitions}")
        if self.trainer not in TRAINERS:
            raise ConfigError(f"trainer: must be one of {TRAINERS}, got {self.trainer!r}")
        if self.workers_per_trial < 1:
            raise ConfigError(f"workers_per_trial: must be >= 1, got {self.workers_per_trial}")
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"objective: must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.objective == "ndcg_within_budget" and self.latency_budget_ms <= 0:
            raise ConfigError("latency_budget_ms: objective ndcg_within_budget needs it > 0")
        if not 0 < self.lr_min <= self.lr_max:
            raise ConfigError(f"lr_min, lr_max: need 0 < lr_min <= lr_max, got {self.lr_min} and {self.lr_max}")
        if not self.widths or min(self.widths) < 1 or not self.head_lr_mults:
            raise ConfigError("widths, head_lr_mults: must not be empty (widths each >= 1)")
        if self.asha_reduction_factor < 2 or self.asha_grace_evals < 1 or self.num_samples < 1:
            raise ConfigError("asha_reduction_factor, asha_grace_evals, num_samples: need >= 2, >= 1 and >= 1")


    @property
    def device(self) -> str:
        """Where a trial (and the driver's timing pass) decodes."""
        return "cuda" if self.gpus_per_trial > 0 else "cpu"


def plan_steps(cfg: SearchConfig, num_train_examples: int) -> tuple[int, int]:
    """(training steps per trial, steps between validations), as the library counts them."""
    world = cfg.workers_per_trial if cfg.trainer == "ray" else 1
    total = plan(num_train_examples, batch_size=cfg.batch_size, epochs=cfg.epochs, max_steps=cfg.max_steps,
                 world_size=world).total_steps
    eval_every = max(1, math.ceil(total / max(1, cfg.evaluations)))
    if eval_every * cfg.asha_grace_evals >= total:
        raise ConfigError(f"{total} steps with a validation every {eval_every}: ASHA needs a validation before "
                          "the last step; raise evaluations (or the steps) or lower asha_grace_evals")
    return total, eval_every


def make_scheduler(cfg: SearchConfig, total_steps: int, eval_every: int) -> ASHAScheduler:
    # Rungs fall at grace * rf^k, multiples of eval_every below the last step, so every rung is a validation
    # step and a trial that trained to the end is never stopped before its beam-width sweep.
    return ASHAScheduler(time_attr="step", max_t=total_steps - 1, grace_period=eval_every * cfg.asha_grace_evals,
                         reduction_factor=cfg.asha_reduction_factor, stop_last_trials=False)


def param_space(cfg: SearchConfig) -> dict[str, Any]:
    lr = cfg.lr_min if cfg.lr_min == cfg.lr_max else tune.loguniform(cfg.lr_min, cfg.lr_max)
    return {"transition": tune.grid_search(list(cfg.transitions)), "lr": lr,
            "head_lr_mult": tune.choice(list(cfg.head_lr_mults))}
