"""The Ray trainer's config: `RayTrainConfig` (every `nezha train` field plus the cluster's) and its
resolution before the workers start (no "auto" left, absolute paths, the intervals every rank uses), with
the DeepSpeed config a run trains with (generated, or the user's file with its "auto" values filled)."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nezha.config import ConfigError
from nezha.prepared import require_prepared
from nezha.training import TrainConfig, warmup_steps
from train.data import count_examples
from train.deepspeed_config import ZERO_STAGES, deepspeed_config, get_path, merge_user_config
from train.storage import is_uri

STRATEGIES = ("deepspeed", "ddp", "none")
DATA_SOURCES = ("in_memory", "stream")
# Said when the prepared dataset is missing: the usual cause under `ray job submit`.
PREPARED_HINT = (". Under `ray job submit --working-dir .` relative paths point into the uploaded copy of the "
                 "repository, which leaves out git-ignored folders such as runs/: pass absolute paths, e.g. "
                 '--prepared "$PWD/runs/prepared" --storage-path "$PWD/runs/ray"')


@dataclass
class RayTrainConfig(TrainConfig):
    """Fine-tune a NEZHA model on a Ray cluster (DeepSpeed ZeRO or DDP) with full-state checkpoints."""

    # Redefined defaults: a tqdm bar in Ray's log stream is noise (the library logs every log_every steps).
    dtype: str = field(default="auto", metadata={"help": "auto: bfloat16 on GPUs, float32 on CPUs"})
    progress: bool = False
    out: str = field(default="", metadata={"help": "the best and last models are copied to OUT/best, OUT/last "
                                                    "(default: STORAGE_PATH/NAME when storage is local)"})
    num_workers: int = field(default=2, metadata={"help": "training workers (one per GPU on GPU clusters)"})
    use_gpu: bool | None = field(default=None, metadata={"help": "default: auto (GPU when the cluster has GPUs)"})
    cpus_per_worker: float = field(default=1.0, metadata={"help": "CPUs reserved per worker (= its torch threads on CPU unless --threads)"})
    strategy: str = field(default="deepspeed", metadata={"help": "deepspeed, ddp or none (one worker, plain AdamW)"})
    zero_stage: int = field(default=2, metadata={"help": "DeepSpeed ZeRO stage (0-3); a deepspeed_config file's wins"})
    offload_optimizer: bool = field(default=False, metadata={"help": "ZeRO: optimizer state in CPU memory"})
    offload_param: bool = field(default=False, metadata={"help": "ZeRO-3: weight partitions in CPU memory"})
    gradient_accumulation_steps: int = field(default=1, metadata={
        "help": "micro-batches per optimiser step (steps count micro-batches; global batch = "
                "batch_size x workers x this)"})
    deepspeed_config: str = field(default="", metadata={
        "help": "a ds_config.json to use instead of the generated one; its \"auto\" values are filled from "
                "this config"})
    gradient_checkpointing: bool = False
    torch_adam: bool = field(default=False, metadata={
        "help": "DeepSpeed: torch's AdamW instead of the fused CUDA Adam (no JIT build of DeepSpeed's ops)"})
    data: str = field(default="in_memory", metadata={
        "help": "in_memory: every worker loads the prepared split; stream: Ray Data reads it in chunks and "
                "feeds each worker its shard (for splits larger than a worker's memory; see docs/training.md)"})
    shuffle_buffer: int = field(default=20_000, metadata={
        "help": "data stream: rows each worker shuffles within per epoch, rounded up to whole buckets of 50 batches "
                "(more: better mixed, more memory)"})
    shard_validation: bool = field(default=True, metadata={
        "help": "every worker scores a slice of the validation users (false: rank 0 scores all, others wait)"})
    storage_path: str = field(default="runs/ray", metadata={"help": "Ray Train storage: local dir, NFS or s3://"})
    name: str | None = field(default=None, metadata={"help": "run name (default: nezha-TIMESTAMP); reusing a "
                                                              "name continues that run from its latest checkpoint"})
    checkpoint_every: int = field(default=0, metadata={
        "help": "full-state checkpoint every N steps (0: at every validation)"})
    keep_checkpoints: int = field(default=2, metadata={"help": "latest full-state checkpoints kept"})
    max_failures: int = field(default=0, metadata={"help": "restarts from the latest checkpoint (-1: forever)"})
    summary_json: str = field(default="", metadata={"help": "also write the run summary as JSON to this file"})
    fail_at_step: int = field(default=0, metadata={
        "help": "testing: the last worker raises after this step unless the run resumed from a checkpoint"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"strategy: must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.data not in DATA_SOURCES:
            raise ConfigError(f"data: must be one of {DATA_SOURCES}, got {self.data!r}")
        if self.shuffle_buffer < 0:
            raise ConfigError(f"shuffle_buffer: may not be negative, got {self.shuffle_buffer}")
        if self.strategy == "none" and self.num_workers != 1:
            raise ConfigError("strategy: none trains without gradient synchronisation: use num_workers 1")
        for name in ("num_workers", "gradient_accumulation_steps", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("checkpoint_every", "fail_at_step"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: may not be negative, got {getattr(self, name)}")
        if self.gradient_accumulation_steps > 1 and self.strategy != "deepspeed":
            raise ConfigError("gradient_accumulation_steps: only the deepspeed strategy accumulates gradients")
        if self.checkpoint_every % self.gradient_accumulation_steps:
            # A checkpoint in the middle of an accumulation would lose the gradients summed so far.
            raise ConfigError(f"checkpoint_every: must be a multiple of gradient_accumulation_steps "
                              f"({self.gradient_accumulation_steps}), got {self.checkpoint_every}")


def read_user_deepspeed_config(path: str) -> dict[str, Any]:
    try:
        user = json.loads(Path(path).expanduser().read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"deepspeed_config: cannot read {path}: {exc}") from None
    if not isinstance(user, dict):
        raise ConfigError(f"deepspeed_config: {path} must hold a JSON object")
    return user


def build_deepspeed_config(cfg: RayTrainConfig, world_size: int, total_steps: int,
                           user: dict[str, Any] | None) -> dict[str, Any]:
    """The generated DeepSpeed config, or the user's with its "auto" values filled from `cfg`."""
    # A file's ZeRO stage wins, so its "auto" values are those of that stage.
    stage = get_path(user, "zero_optimization.stage") if user else None
    zero_stage = stage if stage in ZERO_STAGES else cfg.zero_stage
    try:
        generated = deepspeed_config(
            batch_size=cfg.batch_size, lr=cfg.lr, weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip,
            dtype=cfg.dtype, zero_stage=zero_stage, offload_optimizer=cfg.offload_optimizer,
            offload_param=cfg.offload_param, use_gpu=bool(cfg.use_gpu), world_size=world_size,
            torch_adam=cfg.torch_adam, gradient_accumulation_steps=cfg.gradient_accumulation_steps)
        if user is None:
            return check_model_fits(cfg, generated)
        optimizer_steps = optimizer_steps_of(cfg, total_steps)
        # DeepSpeed's WarmupLR / WarmupDecayLR / WarmupCosineLR parameter names.
        schedule = {"warmup_num_steps": warmup_steps(optimizer_steps, cfg.warmup_ratio),
                    "total_num_steps": optimizer_steps,
                    "warmup_max_lr": cfg.lr, "warmup_min_lr": 0.0, "warmup_min_ratio": 0.0, "cos_min_ratio": 0.0}
        return check_model_fits(cfg, merge_user_config(user, generated, schedule))
    except ValueError as exc:  # DeepSpeedConfigError is one
        raise ConfigError(f"deepspeed_config: {exc}") from None


def check_model_fits(cfg: RayTrainConfig, ds: dict[str, Any]) -> dict[str, Any]:
    """`ds` unchanged, after refusing what it would silently break in the training config."""
    if "scheduler" in ds and (cfg.embedding_lr_mult != 1 or cfg.head_lr_mult != 1):
        # DeepSpeed's schedulers set one rate for every parameter group; transformers' schedule (used when
        # the file has no scheduler) scales each group's own rate.
        raise ConfigError("deepspeed_config: its scheduler section sets one learning rate for every parameter "
                          "group, which would drop embedding_lr_mult / head_lr_mult; remove the section (the "
                          "generated warm-up + cosine keeps them) or set both multipliers to 1")
    if get_path(ds, "zero_optimization.stage") == 3 and (cfg.tie_draft_embeddings or cfg.tie_draft_heads):
        # ZeRO-3 gathers a weight only inside its own module's forward; a tied head reads the embedding outside.
        raise ConfigError("tie_draft_embeddings / tie_draft_heads do not work under ZeRO stage 3; use "
                          "zero_stage 2 (or strategy ddp), or leave them false")
    return ds


def optimizer_steps_of(cfg: RayTrainConfig, total_steps: int) -> int:
    """Optimiser steps of a run of `total_steps` micro-batch steps (the LR schedule's length)."""
    return max(1, math.ceil(total_steps / cfg.gradient_accumulation_steps))


def resolve_config(cfg: RayTrainConfig, cluster_gpus: float) -> RayTrainConfig:
    """The config the workers run: no 'auto' left, absolute local paths, validation and checkpoint intervals
    every rank knows, the ZeRO stage of a deepspeed_config file (its errors raised here, not in the workers)."""
    prepared = require_prepared(cfg.prepared, hint=PREPARED_HINT)
    use_gpu = cluster_gpus > 0 if cfg.use_gpu is None else cfg.use_gpu
    if use_gpu and cluster_gpus < cfg.num_workers:
        raise ConfigError(f"use_gpu with {cfg.num_workers} workers, but the cluster has {cluster_gpus:g} GPUs")
    run_plan = cfg.plan(count_examples(prepared), cfg.num_workers)  # from the split's header, not loading it
    storage = cfg.storage_path if is_uri(cfg.storage_path) else str(Path(cfg.storage_path).expanduser().resolve())
    name = cfg.name or time.strftime("nezha-%Y%m%d-%H%M%S")
    dtype = ("bfloat16" if use_gpu else "float32") if cfg.dtype == "auto" else cfg.dtype
    out = cfg.out or (str(Path(storage) / name) if not is_uri(storage) else str(Path("runs/ray") / name))
    eval_every = run_plan.eval_every
    resolved = dataclasses.replace(
        cfg, prepared=str(prepared), use_gpu=use_gpu, dtype=dtype, storage_path=storage, name=name,
        out=str(Path(out).expanduser().resolve()), device="cuda" if use_gpu else "cpu", eval_every=eval_every,
        checkpoint_every=cfg.checkpoint_every or eval_every)
    if resolved.checkpoint_every % resolved.gradient_accumulation_steps:
        raise ConfigError(f"checkpoint_every: the validation interval {eval_every} it defaults to is not a "
                          f"multiple of gradient_accumulation_steps {resolved.gradient_accumulation_steps}")
    if cfg.strategy == "deepspeed":
        user = read_user_deepspeed_config(cfg.deepspeed_config) if cfg.deepspeed_config else None
        ds = build_deepspeed_config(resolved, cfg.num_workers, run_plan.total_steps, user)
        stage = ds.get("zero_optimization", {}).get("stage", 0)
        resolved = dataclasses.replace(resolved, zero_stage=int(stage))
    return resolved
