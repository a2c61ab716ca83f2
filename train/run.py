"""Distributed fine-tuning on Ray Train: DeepSpeed ZeRO (or torch DDP) around the library's training loop.

    ray job submit --working-dir . -- python train/run.py --config train/configs/quickstart.yaml \\
        --prepared "$PWD/runs/prepared" --storage-path "$PWD/runs/ray"

Every worker runs `nezha.training.train` on its shard (the library shards by rank); this file only picks
the optimiser stepper (a DeepSpeed engine, DDP or plain AdamW), reports validations and checkpoints to
Ray Train, resumes from Ray's latest checkpoint after a failure, and copies the best checkpoint to a
folder that `nezha evaluate --checkpoint` loads. See docs/training.md.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):  # `python train/run.py`: make the `train` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nezha.config import ConfigError, parse_config  # noqa: E402
from nezha.model.checkpoint import WEIGHTS  # noqa: E402
from nezha.model.model import NezhaModel  # noqa: E402
from nezha.training import (  # noqa: E402
    Stepper,
    TorchStepper,
    TrainConfig,
    param_groups,
    steps_per_epoch,
    train,
    warmup_cosine,
)
from train.deepspeed_config import deepspeed_config  # noqa: E402

log = logging.getLogger("nezha.train.ray")

STRATEGIES = ("deepspeed", "ddp", "none")
SCORE = "ndcg@10"


@dataclass
class RayTrainConfig(TrainConfig):
    """Fine-tune a NEZHA model on a Ray cluster (DeepSpeed ZeRO or DDP), keeping the best checkpoints."""

    # Redefined defaults: a tqdm bar in Ray's log stream is noise (the library logs every log_every steps).
    dtype: str = field(default="auto", metadata={"help": "auto: bfloat16 on GPUs, float32 on CPUs"})
    progress: bool = False
    out: str = field(default="", metadata={"help": "the best checkpoint is copied to OUT/best "
                                                    "(default: STORAGE_PATH/NAME when storage is local)"})
    num_workers: int = field(default=2, metadata={"help": "training workers (one per GPU on GPU clusters)"})
    use_gpu: bool | None = field(default=None, metadata={"help": "default: auto (GPU when the cluster has GPUs)"})
    cpus_per_worker: float = field(default=1.0, metadata={"help": "CPUs reserved per worker (= its torch threads on CPU unless --threads)"})
    strategy: str = field(default="deepspeed", metadata={"help": "deepspeed, ddp or none (one worker, plain AdamW)"})
    zero_stage: int = field(default=2, metadata={"help": "DeepSpeed ZeRO stage (0-3)"})
    offload_optimizer: bool = field(default=False, metadata={"help": "ZeRO: optimizer state in CPU memory"})
    gradient_checkpointing: bool = False
    torch_adam: bool = field(default=False, metadata={
        "help": "DeepSpeed: torch's AdamW instead of the fused CUDA Adam (no JIT build of DeepSpeed's ops)"})
    storage_path: str = field(default="runs/ray", metadata={"help": "Ray Train storage: local dir, NFS or s3://"})
    name: str | None = field(default=None, metadata={"help": "run name (default: nezha-TIMESTAMP); reusing a "
                                                              "name resumes that run from its latest checkpoint"})
    max_failures: int = field(default=0, metadata={"help": "restarts from the latest checkpoint (-1: forever)"})
    keep_checkpoints: int = field(default=2, metadata={"help": f"best checkpoints kept by validation {SCORE}"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"strategy: must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.strategy == "none" and self.num_workers != 1:
            raise ConfigError("strategy: none trains without gradient synchronisation: use num_workers 1")


def is_uri(path: str) -> bool:
    return "://" in path


def resolve_config(cfg: RayTrainConfig, cluster_gpus: float) -> RayTrainConfig:
    """The config the workers run: no 'auto' left, absolute local paths, a validation interval every rank knows."""
    from nezha.data.split import Split
    from nezha.prepare import SPLIT_FILE

    prepared = Path(cfg.prepared).expanduser().resolve()
    if not (prepared / SPLIT_FILE).is_file():
        raise ConfigError(
            f"no prepared dataset at {prepared}: run `nezha prepare --out {cfg.prepared}` first. Under "
            "`ray job submit --working-dir .` relative paths point into the uploaded copy of the repository, "
            "which leaves out git-ignored folders such as runs/: pass absolute paths, e.g. "
            '--prepared "$PWD/runs/prepared" --storage-path "$PWD/runs/ray"')
    use_gpu = cluster_gpus > 0 if cfg.use_gpu is None else cfg.use_gpu
    if use_gpu and cluster_gpus < cfg.num_workers:
        raise ConfigError(f"use_gpu with {cfg.num_workers} workers, but the cluster has {cluster_gpus:g} GPUs")
    train_examples = len(Split.load(prepared / SPLIT_FILE).train)
    storage = cfg.storage_path if is_uri(cfg.storage_path) else str(Path(cfg.storage_path).expanduser().resolve())
    name = cfg.name or time.strftime("nezha-%Y%m%d-%H%M%S")
    dtype = ("bfloat16" if use_gpu else "float32") if cfg.dtype == "auto" else cfg.dtype
    out = cfg.out or (str(Path(storage) / name) if not is_uri(storage) else str(Path("runs/ray") / name))
    return dataclasses.replace(
        cfg, prepared=str(prepared), use_gpu=use_gpu, dtype=dtype, storage_path=storage, name=name,
        out=str(Path(out).expanduser().resolve()), device="cuda" if use_gpu else "cpu",
        eval_every=cfg.eval_every or steps_per_epoch(train_examples, cfg.num_workers, cfg.batch_size))


# ---------------------------------------------------------------------------------------------- workers


class DDPStepper(TorchStepper):
    """The library's AdamW stepper with the model wrapped in DistributedDataParallel (gradients all-reduced)."""

    def __init__(self, model: NezhaModel, cfg: RayTrainConfig, total_steps: int) -> None:
        from torch.nn.parallel import DistributedDataParallel

        super().__init__(model, cfg, total_steps)
        device_ids = [torch.cuda.current_device()] if cfg.use_gpu else None
        # Heads outside the configured objectives (e.g. the LM head of a NEZHA-only model) get no gradient.
        self.model = DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=True)


class DeepSpeedStepper:
    """A DeepSpeed engine with the library's parameter groups (lr multipliers) and warm-up + cosine schedule.

    The engine trains a copy of the library's model: DeepSpeed flattens (ZeRO-1/2) or partitions (ZeRO-3)
    the weights it owns, which safetensors cannot save and which rank 0 cannot run forward on alone
    (ZeRO-3 gathers weights with collectives). `sync_eval_model`, called on every rank at the validation
    steps, copies the current weights into the library's model on rank 0, which validates and saves it.
    """

    def __init__(self, model: NezhaModel, cfg: RayTrainConfig, total_steps: int, rank: int, world_size: int) -> None:
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if cfg.use_gpu else "gloo")  # adopts Ray's process group
        self.rank = rank
        self.partitioned = cfg.zero_stage == 3
        self.eval_model = model
        train_model = copy.deepcopy(model)
        if rank != 0:
            model.to("meta")  # never validated there: the library only reads its attributes (layout, heads)
        config = deepspeed_config(batch_size=cfg.batch_size, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  grad_clip=cfg.grad_clip, dtype=cfg.dtype, zero_stage=cfg.zero_stage,
                                  offload_optimizer=cfg.offload_optimizer, use_gpu=bool(cfg.use_gpu),
                                  world_size=world_size, torch_adam=cfg.torch_adam)
        groups = param_groups(train_model, cfg.lr, cfg.embedding_lr_mult, cfg.head_lr_mult, cfg.weight_decay)
        factor = warmup_cosine(total_steps, cfg.warmup_ratio)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=train_model, model_parameters=groups, config=config,
            lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, factor))

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.engine(batch)

    def backward_and_step(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)
        self.engine.step()  # clips, steps the optimizer and the LR schedule, zeroes the gradients

    def current_lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    @torch.no_grad()
    def sync_eval_model(self) -> None:
        import deepspeed

        targets = dict(self.eval_model.named_parameters())
        for name, param in self.engine.module.named_parameters():
            # ZeRO-3: an all-gather per tensor, so every rank takes part; ZeRO-1/2: rank 0 has the weights.
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None, enabled=self.partitioned):
                if self.rank == 0:
                    targets[name].copy_(param)


class ValidationSteps:
    """Runs on every rank after each step. At the steps where rank 0 validates (the library calls
    `on_evaluation` on rank 0 only) it runs `before_validation` (DeepSpeed: copy the engine's weights into
    the model rank 0 validates) and has ranks != 0 call `ray.train.report`, which Ray requires from every
    worker the same number of times."""

    def __init__(self, inner: Stepper, eval_every: int, total_steps: int, rank: int,
                 before_validation: Callable[[], None] | None = None) -> None:
        self.inner = inner
        self.eval_every = eval_every
        self.total_steps = total_steps
        self.rank = rank
        self.before_validation = before_validation
        self.step = 0

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.inner.forward(batch)

    def backward_and_step(self, loss: torch.Tensor) -> None:
        import ray.train

        self.inner.backward_and_step(loss)
        self.step += 1
        if self.step % self.eval_every and self.step != self.total_steps:
            return
        if self.before_validation is not None:
            self.before_validation()
        if self.rank != 0:
            ray.train.report({"step": self.step})  # Ray keeps rank 0's metrics; this is the barrier's other half

    def current_lr(self) -> float:
        return self.inner.current_lr()


def load_resume_weights(model: NezhaModel) -> str | None:
    """Weights of Ray's latest reported checkpoint (set after a worker failure or when a run name is reused)."""
    import ray.train
    from safetensors.torch import load_model

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        load_model(model, str(Path(folder) / WEIGHTS), strict=True, device=str(next(model.parameters()).device))
    return checkpoint.path


def configure_worker_logging() -> None:
    """Ray streams worker stdout/stderr to the driver and the job log; the library logs through `logging`."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # its per-rank config dump drowns the progress


def use_interpreter_tools() -> None:
    """Put this Python's bin/ first on PATH. DeepSpeed JIT-builds its CPU ops (shm comm, Adam) with the first
    `ninja` on PATH, and a system ninja of another version than the venv's invalidates the shared build
    cache: every switch rebuilds them (minutes). Workers inherit the PATH of whoever started Ray."""
    bin_dir = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "")
    if path.split(os.pathsep)[0] != bin_dir:
        os.environ["PATH"] = bin_dir + os.pathsep + path


def train_worker(config: dict[str, Any]) -> dict[str, Any]:
    """The per-worker function: the library's loop with a Ray-aware stepper."""
    import ray.train

    configure_worker_logging()
    use_interpreter_tools()
    cfg = RayTrainConfig(**config)
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    # Local scratch for the library's best/ and last/; what matters is reported to Ray's storage. On CPUs
    # each worker uses the cores Ray reserved for it unless `threads` says otherwise.
    scratch = tempfile.mkdtemp(prefix=f"nezha-rank{rank}-")
    threads = cfg.threads or (0 if cfg.use_gpu else max(1, int(cfg.cpus_per_worker)))
    cfg = dataclasses.replace(cfg, out=scratch, threads=threads)

    resumed: str | None = None

    def stepper_factory(model: NezhaModel, total_steps: int) -> Stepper:
        nonlocal resumed
        resumed = load_resume_weights(model)
        if resumed:
            log.info("rank %d resumed the weights of %s", rank, resumed)
        if cfg.gradient_checkpointing:
            model.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        before_validation = None
        inner: Stepper
        if cfg.strategy == "deepspeed":
            engine = DeepSpeedStepper(model, cfg, total_steps, rank, world_size)
            inner, before_validation = engine, engine.sync_eval_model
        elif cfg.strategy == "ddp":
            inner = DDPStepper(model, cfg, total_steps)
        else:
            inner = TorchStepper(model, cfg, total_steps)
        return ValidationSteps(inner, cfg.eval_every, total_steps, rank, before_validation)

    def on_evaluation(record: dict[str, Any], best_dir: Path | None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(best_dir) if best_dir is not None else None
        ray.train.report({k: float(v) for k, v in record.items()}, checkpoint=checkpoint)

    try:
        result = train(cfg, stepper_factory=stepper_factory, rank=rank, world_size=world_size,
                       on_evaluation=on_evaluation if rank == 0 else None)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)  # reports upload synchronously: Ray's storage has the copies
    return {"steps": result.steps, "seconds": result.seconds, "examples_per_second": result.examples_per_second,
            "best_metrics": result.best_metrics, "history": result.history, "resumed_from": resumed}


# ----------------------------------------------------------------------------------------------- driver


def run(cfg: RayTrainConfig) -> dict[str, Any]:
    """Train on the connected Ray cluster (a local one is started when none is); returns the run summary."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    start = time.perf_counter()
    if not ray.is_initialized():
        ray.init()  # RAY_ADDRESS (set by `ray job submit`) connects to the cluster; else a local instance
    cfg = resolve_config(cfg, float(ray.cluster_resources().get("GPU", 0)))
    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})}
    log.info("training %s with %d workers (%s, %s, %s), storage %s/%s", cfg.backbone, cfg.num_workers,
             "GPU" if cfg.use_gpu else "CPU", cfg.strategy,
             f"ZeRO-{cfg.zero_stage}" if cfg.strategy == "deepspeed" else "-", cfg.storage_path, cfg.name)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=dataclasses.asdict(cfg),
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=bool(cfg.use_gpu),
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=cfg.name, storage_path=cfg.storage_path,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints, checkpoint_score_attribute=SCORE,
                                               checkpoint_score_order="max"),
            failure_config=FailureConfig(max_failures=cfg.max_failures)),
    )
    result = trainer.fit()
    best = result.get_best_checkpoint(SCORE, "max")
    if best is None:
        raise RuntimeError(f"the run {result.path} reported no checkpoint")
    best_metrics = next(m for c, m in result.best_checkpoints if c.path == best.path)
    best_dir = Path(cfg.out) / "best"
    shutil.rmtree(best_dir, ignore_errors=True)
    best.to_directory(str(best_dir))
    worker = result.return_value or {}
    return {"best_checkpoint": str(best_dir), "ray_checkpoint": best.path, "run_path": result.path,
            "best_metrics": {k: v for k, v in best_metrics.items() if k in ("step", "epoch", "loss") or "@" in k},
            "history": worker.get("history", []), "steps": worker.get("steps"), "resumed_from": worker.get("resumed_from"),
            "examples_per_second": worker.get("examples_per_second"), "train_seconds": worker.get("seconds"),
            "wall_seconds": time.perf_counter() - start, "config": dataclasses.asdict(cfg)}


def summary_line(summary: dict[str, Any]) -> str:
    m = summary["best_metrics"]
    return (f"best checkpoint: {summary['best_checkpoint']} (step {int(m['step'])}, validation hit@10 "
            f"{m['hit@10']:.4f} ndcg@10 {m['ndcg@10']:.4f}); {summary['steps']} steps, "
            f"{summary['examples_per_second']:.0f} examples/s, wall time {summary['wall_seconds']:.1f} s")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = parse_config(RayTrainConfig, argv)
    try:
        summary = run(cfg)
    except ConfigError as exc:
        sys.exit(f"error: {exc}")
    print(summary_line(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
