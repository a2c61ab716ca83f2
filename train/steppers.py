"""How a Ray Train worker takes an optimiser step: the library's AdamW (alone or under DDP) or a DeepSpeed
ZeRO engine, each able to save and load its state for a full-state checkpoint (train/state.py)."""

from __future__ import annotations

import copy
import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from transformers import get_cosine_schedule_with_warmup

from nezha.model.model import NezhaModel
from nezha.training import Plan, Stepper, TorchStepper, param_groups, warmup_steps
from train.config import RayTrainConfig, build_deepspeed_config, optimizer_steps_of


class TorchStateStepper(TorchStepper):
    """The library's AdamW stepper (strategy none) with a full-state checkpoint: rank 0 writes the model,
    optimiser and LR schedule (DDP replicas are identical), every rank reads it."""

    FILE = "torch_state.pt"

    def __init__(self, model: NezhaModel, cfg: RayTrainConfig, total_steps: int, rank: int) -> None:
        super().__init__(model, cfg, total_steps)
        self.rank = rank
        self.module = model

    def save_state(self, folder: Path) -> None:
        if self.rank == 0:
            torch.save({"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict()}, folder / self.FILE)

    def load_state(self, folder: Path) -> None:
        state = torch.load(folder / self.FILE, map_location=next(self.module.parameters()).device, weights_only=True)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


class DDPStepper(TorchStateStepper):
    """The library's AdamW stepper with the model wrapped in DistributedDataParallel (gradients all-reduced)."""

    def __init__(self, model: NezhaModel, cfg: RayTrainConfig, total_steps: int, rank: int) -> None:
        super().__init__(model, cfg, total_steps, rank)
        device_ids = [torch.cuda.current_device()] if cfg.use_gpu else None
        # Heads outside the configured objectives (e.g. the LM head of a NEZHA-only model) get no gradient.
        self.model = DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=True)


class DeepSpeedStepper:
    """A DeepSpeed engine with the library's parameter groups (lr multipliers) and a library LR schedule:
    transformers' warm-up + cosine, or the scheduler section of a user's deepspeed_config.

    The engine trains a copy of the library's model: DeepSpeed flattens (ZeRO-1/2) or partitions (ZeRO-3)
    the weights it owns, which safetensors cannot save and which one rank cannot run forward on alone
    (ZeRO-3 gathers weights with collectives). `sync_eval_model`, called on every rank at the validation
    steps, copies the current weights into the library's model on the ranks that validate (all of them when
    validation is sharded, else rank 0).
    """

    TAG = "state"  # the DeepSpeed checkpoint tag inside each full-state checkpoint folder

    def __init__(self, model: NezhaModel, cfg: RayTrainConfig, total_steps: int, rank: int, world_size: int,
                 user_config: dict[str, Any] | None = None, validates: bool | None = None) -> None:
        # Local, here and in sync_eval_model: importing DeepSpeed probes for accelerators (seconds, and a
        # warning), which the driver and the other strategies' workers do not need.
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if cfg.use_gpu else "gloo")  # adopts Ray's process group
        config = build_deepspeed_config(cfg, world_size, total_steps, user_config)
        self.partitioned = config.get("zero_optimization", {}).get("stage", 0) == 3
        self.validates = rank == 0 if validates is None else validates
        self.eval_model = model
        train_model = copy.deepcopy(model)
        if not self.validates:
            model.to("meta")  # never validated here: the library only reads its attributes (layout, heads)
        groups = param_groups(train_model, cfg.lr, cfg.embedding_lr_mult, cfg.head_lr_mult, cfg.weight_decay)
        schedule = None  # a scheduler section of the user's file: DeepSpeed builds that one
        if "scheduler" not in config:
            steps = optimizer_steps_of(cfg, total_steps)
            schedule = functools.partial(get_cosine_schedule_with_warmup, num_training_steps=steps,
                                         num_warmup_steps=warmup_steps(steps, cfg.warmup_ratio))
        self.engine, _, _, _ = deepspeed.initialize(model=train_model, model_parameters=groups, config=config,
                                                    lr_scheduler=schedule)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.engine(batch)

    def backward_and_step(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)
        # At the end of an accumulation: clips, steps the optimizer and the LR schedule, zeroes the gradients.
        self.engine.step()

    def current_lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def save_state(self, folder: Path) -> None:
        # Every rank writes its part (ZeRO partitions of the optimiser state; rank 0 the module state).
        self.engine.save_checkpoint(str(folder), tag=self.TAG)

    def load_state(self, folder: Path) -> None:
        path, _ = self.engine.load_checkpoint(str(folder), tag=self.TAG, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint {self.TAG!r} in {folder}")

    @torch.no_grad()
    def sync_eval_model(self) -> None:
        import deepspeed

        targets = dict(self.eval_model.named_parameters())
        for name, param in self.engine.module.named_parameters():
            # ZeRO-3: an all-gather per tensor, so every rank takes part; ZeRO-1/2: every rank has the weights.
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None, enabled=self.partitioned):
                if self.validates:
                    targets[name].copy_(param)


class ValidationSync:
    """Runs `before_validation` on every rank after the steps that end in a validation (DeepSpeed: copy the
    engine's weights into the model that validates)."""

    def __init__(self, inner: Stepper, plan: Plan, before_validation: Callable[[], None]) -> None:
        self.inner = inner
        self.plan = plan
        self.before_validation = before_validation
        self.step = 0

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.inner.forward(batch)

    def backward_and_step(self, loss: torch.Tensor) -> None:
        self.inner.backward_and_step(loss)
        self.step += 1
        if self.plan.is_validation_step(self.step):
            self.before_validation()

    def current_lr(self) -> float:
        return self.inner.current_lr()


def use_interpreter_tools() -> None:
    """Put this Python's bin/ first on PATH. DeepSpeed JIT-builds its CPU ops (shm comm, Adam) with the first
    `ninja` on PATH, and a system ninja of another version than the venv's invalidates the shared build
    cache: every switch rebuilds them (minutes). Workers inherit the PATH of whoever started Ray."""
    bin_dir = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "")
    if path.split(os.pathsep)[0] != bin_dir:
        os.environ["PATH"] = bin_dir + os.pathsep + path
