"""Distributed fine-tuning on Ray Train: DeepSpeed ZeRO (or torch DDP) around the library's training loop.

    ray job submit --working-dir . -- python train/run.py --config train/configs/quickstart.yaml \\
        --prepared "$PWD/runs/prepared" --storage-path "$PWD/runs/ray"

Every worker runs `nezha.training.train` on its shard (the library shards by rank); this file picks the
optimiser stepper (a DeepSpeed engine, DDP or plain AdamW), writes a full-state checkpoint every
`checkpoint_every` steps (DeepSpeed's weights, optimiser and LR schedule, plus each rank's loop position
and RNG) and reports it to Ray Train, continues from Ray's latest one after a failure at the same step,
LR and next batch, and keeps the best-by-validation model apart (STORAGE/NAME/best, what `nezha evaluate`
and Serve load). See docs/training.md.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import logging
import math
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

if __package__ in (None, ""):  # `python train/run.py`: make the `train` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nezha.config import ConfigError, parse_config  # noqa: E402
from nezha.model.checkpoint import read_meta  # noqa: E402
from nezha.model.model import NezhaModel  # noqa: E402
from nezha.training import (  # noqa: E402
    LoopState,
    Stepper,
    TorchStepper,
    TrainConfig,
    param_groups,
    steps_per_epoch,
    train,
)
from train.deepspeed_config import (  # noqa: E402
    ZERO_STAGES,
    deepspeed_config,
    get_path,
    merge_user_config,
)

log = logging.getLogger("nezha.train.ray")

STRATEGIES = ("deepspeed", "ddp", "none")
SCORE = "ndcg@10"


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


def is_uri(path: str) -> bool:
    return "://" in path


def total_steps_of(cfg: TrainConfig, num_train_examples: int, world_size: int) -> int:
    """The loop's step budget, as `nezha.training.train` computes it."""
    return cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch(num_train_examples, world_size,
                                                                           cfg.batch_size)))


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
            return generated
        optimizer_steps = optimizer_steps_of(cfg, total_steps)
        # DeepSpeed's WarmupLR / WarmupDecayLR / WarmupCosineLR parameter names.
        schedule = {"warmup_num_steps": warmup_steps_of(cfg, optimizer_steps), "total_num_steps": optimizer_steps,
                    "warmup_max_lr": cfg.lr, "warmup_min_lr": 0.0, "warmup_min_ratio": 0.0, "cos_min_ratio": 0.0}
        return merge_user_config(user, generated, schedule)
    except ValueError as exc:  # DeepSpeedConfigError is one
        raise ConfigError(f"deepspeed_config: {exc}") from None


def optimizer_steps_of(cfg: RayTrainConfig, total_steps: int) -> int:
    return max(1, math.ceil(total_steps / cfg.gradient_accumulation_steps))


def warmup_steps_of(cfg: RayTrainConfig, optimizer_steps: int) -> int:
    return max(1, int(optimizer_steps * cfg.warmup_ratio))


def resolve_config(cfg: RayTrainConfig, cluster_gpus: float) -> RayTrainConfig:
    """The config the workers run: no 'auto' left, absolute local paths, validation and checkpoint intervals
    every rank knows, the ZeRO stage of a deepspeed_config file (its errors raised here, not in the workers)."""
    from nezha.data.split import Split
    from nezha.prepared import SPLIT_FILE

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
    eval_every = cfg.eval_every or steps_per_epoch(train_examples, cfg.num_workers, cfg.batch_size)
    resolved = dataclasses.replace(
        cfg, prepared=str(prepared), use_gpu=use_gpu, dtype=dtype, storage_path=storage, name=name,
        out=str(Path(out).expanduser().resolve()), device="cuda" if use_gpu else "cpu", eval_every=eval_every,
        checkpoint_every=cfg.checkpoint_every or eval_every)
    if resolved.checkpoint_every % resolved.gradient_accumulation_steps:
        raise ConfigError(f"checkpoint_every: the validation interval {eval_every} it defaults to is not a "
                          f"multiple of gradient_accumulation_steps {resolved.gradient_accumulation_steps}")
    if cfg.strategy == "deepspeed":
        user = read_user_deepspeed_config(cfg.deepspeed_config) if cfg.deepspeed_config else None
        ds = build_deepspeed_config(resolved, cfg.num_workers, total_steps_of(resolved, train_examples,
                                                                              cfg.num_workers), user)
        stage = ds.get("zero_optimization", {}).get("stage", 0)
        resolved = dataclasses.replace(resolved, zero_stage=int(stage))
    return resolved


# ---------------------------------------------------------------------------------------------- workers


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
        from torch.nn.parallel import DistributedDataParallel

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
        import deepspeed
        from transformers import get_cosine_schedule_with_warmup

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
                                         num_warmup_steps=warmup_steps_of(cfg, steps))
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

    def __init__(self, inner: Stepper, eval_every: int, total_steps: int,
                 before_validation: Callable[[], None]) -> None:
        self.inner = inner
        self.eval_every = eval_every
        self.total_steps = total_steps
        self.before_validation = before_validation
        self.step = 0

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.inner.forward(batch)

    def backward_and_step(self, loss: torch.Tensor) -> None:
        self.inner.backward_and_step(loss)
        self.step += 1
        if self.step % self.eval_every == 0 or self.step == self.total_steps:
            self.before_validation()

    def current_lr(self) -> float:
        return self.inner.current_lr()


# ------------------------------------------------------------------------------------ full-state checkpoints


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def loop_file(rank: int) -> str:
    return f"loop_rank{rank}.pt"


def save_full_state(stepper: TorchStateStepper | DeepSpeedStepper, folder: Path, rank: int, state: LoopState) -> None:
    """This rank's share of a full-state checkpoint: the stepper's state plus its loop position and RNG."""
    folder.mkdir(parents=True, exist_ok=True)
    stepper.save_state(folder)
    torch.save({"loop": dataclasses.asdict(state), "rng": rng_state()}, folder / loop_file(rank))


def load_full_state(stepper: TorchStateStepper | DeepSpeedStepper, folder: Path, rank: int) -> LoopState:
    own = folder / loop_file(rank)
    if not own.is_file():
        raise ConfigError(f"{folder} has no {own.name}: a run resumes with the number of workers it was saved with")
    stepper.load_state(folder)
    # Our own file (RNG states are tuples and arrays, which weights_only refuses).
    saved = torch.load(own, weights_only=False)
    set_rng_state(saved["rng"])
    return LoopState(**saved["loop"])


def storage_filesystem(storage_path: str) -> tuple[Any, str]:
    """(pyarrow filesystem, root path in it) of Ray's storage: a local folder or a URI (s3://, gs://)."""
    import pyarrow.fs

    if is_uri(storage_path):
        return pyarrow.fs.FileSystem.from_uri(storage_path)
    return pyarrow.fs.LocalFileSystem(), storage_path


def upload_folder(local: Path, storage_path: str, relative: str) -> None:
    """Replace STORAGE/relative with a copy of `local` (written beside it first, then moved over)."""
    import pyarrow.fs

    fs, root = storage_filesystem(storage_path)
    dest, staging = f"{root}/{relative}", f"{root}/{relative}.uploading"
    fs.delete_dir_contents(staging, missing_dir_ok=True)
    pyarrow.fs.copy_files(str(local), staging, destination_filesystem=fs)
    if fs.get_file_info(dest).type != pyarrow.fs.FileType.NotFound:
        fs.delete_dir(dest)
    fs.move(staging, dest)


def download_folder(storage_path: str, relative: str, local: Path) -> Path | None:
    """Copy STORAGE/relative to `local` (nothing to do when they are the same folder); None if it is absent."""
    import pyarrow.fs

    fs, root = storage_filesystem(storage_path)
    source = f"{root}/{relative}"
    if fs.get_file_info(source).type == pyarrow.fs.FileType.NotFound:
        return None
    if not is_uri(storage_path) and Path(source).resolve() == local.resolve():
        return local
    shutil.rmtree(local, ignore_errors=True)
    pyarrow.fs.copy_files(source, str(local), source_filesystem=fs)
    return local


class InjectedFailure(RuntimeError):
    """Raised by `fail_at_step` (tests of the restart path)."""


class Checkpoints:
    """One worker's side of checkpointing and reporting to Ray Train.

    After every step that validates or is a multiple of `checkpoint_every`, each rank calls
    `ray.train.report` once (Ray requires the same number of calls from every worker): with rank 0's
    validation metrics, and at checkpoint steps with this rank's share of the full-state checkpoint, which
    Ray merges into one folder. Rank 0 also uploads each new best model to STORAGE/NAME/best.
    """

    def __init__(self, cfg: RayTrainConfig, rank: int, world_size: int) -> None:
        self.cfg = cfg
        self.rank = rank
        self.world_size = world_size
        self.total_steps = 0  # set with the stepper, once the loop knows its budget
        self.stepper: TorchStateStepper | DeepSpeedStepper | None = None
        self.resumed_from: str | None = None
        self.resumed_step: int | None = None
        self.validation_wait = 0.0  # seconds this rank waited for the others at validation steps

    def resume(self) -> LoopState | None:
        import ray.train

        assert self.stepper is not None, "the loop asks to resume once the stepper exists"
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as folder:
            state = load_full_state(self.stepper, Path(folder), self.rank)
        self.resumed_from, self.resumed_step = checkpoint.path, state.step
        log.info("rank %d resumed from %s at step %d (epoch %d, batch %d), lr %.3e", self.rank, checkpoint.path,
                 state.step, state.epoch, state.batch_in_epoch, self.stepper.current_lr())
        return state

    def on_step(self, state: LoopState) -> None:
        import ray.train

        cfg = self.cfg
        if cfg.fail_at_step == state.step and self.rank == self.world_size - 1 and self.resumed_from is None:
            raise InjectedFailure(f"rank {self.rank}: injected failure after step {state.step} (fail_at_step)")
        validated = state.step % cfg.eval_every == 0 or state.step == self.total_steps
        checkpointing = state.step % cfg.checkpoint_every == 0 or state.step == self.total_steps
        if not (validated or checkpointing):
            return
        if validated and self.world_size > 1:
            started = time.perf_counter()
            torch.distributed.barrier()  # how long this rank waits for the slowest validation
            self.validation_wait += time.perf_counter() - started
        metrics: dict[str, Any] = {"step": state.step, "loss": state.running_loss}
        if validated and self.rank == 0:
            metrics.update({k: v for k, v in state.history[-1].items() if k != "decoder"})
        if not checkpointing:
            ray.train.report(metrics)
            return
        assert self.stepper is not None
        with tempfile.TemporaryDirectory(prefix=f"nezha-state-rank{self.rank}-") as folder:
            save_full_state(self.stepper, Path(folder), self.rank, state)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                             checkpoint_dir_name=f"state_step{state.step:08d}")

    def on_evaluation(self, record: dict[str, Any], best_dir: Path | None) -> None:
        if best_dir is not None:
            upload_folder(best_dir, self.cfg.storage_path, f"{self.cfg.name}/best")


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


def train_worker(loop_config: dict[str, Any]) -> dict[str, Any]:
    """The per-worker function: the library's loop with a Ray-aware stepper, checkpoints and reports.

    `loop_config` is {"config": RayTrainConfig fields, "deepspeed_user_config": dict or None}.
    """
    import ray
    import ray.train

    configure_worker_logging()
    use_interpreter_tools()
    cfg = RayTrainConfig(**loop_config["config"])
    user_ds = loop_config.get("deepspeed_user_config")
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    node_id = ray.get_runtime_context().get_node_id()
    log.info("rank %d of %d on node %s", rank, world_size, node_id)
    # Local scratch for the library's best/ and last/; what matters is uploaded to Ray's storage. On CPUs
    # each worker uses the cores Ray reserved for it unless `threads` says otherwise.
    scratch = tempfile.mkdtemp(prefix=f"nezha-rank{rank}-")
    threads = cfg.threads or (0 if cfg.use_gpu else max(1, int(cfg.cpus_per_worker)))
    cfg = dataclasses.replace(cfg, out=scratch, threads=threads)
    shard = cfg.shard_validation and world_size > 1
    checkpoints = Checkpoints(cfg, rank, world_size)
    sync: ValidationSync | None = None

    def stepper_factory(model: NezhaModel, total_steps: int) -> Stepper:
        nonlocal sync
        checkpoints.total_steps = total_steps
        if cfg.gradient_checkpointing:
            model.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.strategy == "deepspeed":
            engine = DeepSpeedStepper(model, cfg, total_steps, rank, world_size, user_ds,
                                      validates=rank == 0 or shard)
            checkpoints.stepper = engine
            sync = ValidationSync(engine, cfg.eval_every, total_steps, engine.sync_eval_model)
            return sync
        stepper = DDPStepper(model, cfg, total_steps, rank) if cfg.strategy == "ddp" else \
            TorchStateStepper(model, cfg, total_steps, rank)
        checkpoints.stepper = stepper
        return stepper

    def resume() -> LoopState | None:
        state = checkpoints.resume()
        if state is not None and sync is not None:
            sync.step = state.step  # the validation schedule counts the steps before the restart
        return state

    try:
        result = train(cfg, stepper_factory=stepper_factory, rank=rank, world_size=world_size,
                       on_evaluation=checkpoints.on_evaluation if rank == 0 else None, resume=resume,
                       on_step=checkpoints.on_step, shard_validation=shard)
        if rank == 0:
            upload_folder(result.last_checkpoint, cfg.storage_path, f"{cfg.name}/last")
        per_rank = [(node_id, checkpoints.validation_wait)]
        if world_size > 1:
            per_rank = [None] * world_size
            torch.distributed.all_gather_object(per_rank, (node_id, checkpoints.validation_wait))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)  # uploads are synchronous: Ray's storage has the copies
    return {"steps": result.steps, "seconds": result.seconds, "examples_per_second": result.examples_per_second,
            "best_metrics": result.best_metrics, "history": result.history, "resumed_from": checkpoints.resumed_from,
            "resumed_step": checkpoints.resumed_step, "node_ids": [n for n, _ in per_rank],
            "validation_wait_s": [round(w, 3) for _, w in per_rank]}


# ----------------------------------------------------------------------------------------------- driver


def run(cfg: RayTrainConfig, callbacks: list[Any] | None = None) -> dict[str, Any]:
    """Train on the connected Ray cluster (a local one is started when none is); returns the run summary.

    `callbacks` go to Ray Train's RunConfig (Ray Tune passes its report callback).
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    start = time.perf_counter()
    # Relative paths mean the directory the command started in; under `ray job submit` that is the unpacked
    # working_dir, which need not outlive the driver's own view of it: make them absolute before Ray starts.
    cfg = dataclasses.replace(cfg, **{name: str(Path(value).expanduser().resolve())
                                      for name in ("prepared", "out", "storage_path", "deepspeed_config")
                                      if (value := getattr(cfg, name)) and not is_uri(value)})
    if not ray.is_initialized():
        ray.init()  # RAY_ADDRESS (set by `ray job submit`) connects to the cluster; else a local instance
    cfg = resolve_config(cfg, float(ray.cluster_resources().get("GPU", 0)))
    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})}
    log.info("training %s with %d workers (%s, %s, %s), checkpoint every %d steps, storage %s/%s", cfg.backbone,
             cfg.num_workers, "GPU" if cfg.use_gpu else "CPU", cfg.strategy,
             f"ZeRO-{cfg.zero_stage}" if cfg.strategy == "deepspeed" else "-", cfg.checkpoint_every,
             cfg.storage_path, cfg.name)
    user_ds = read_user_deepspeed_config(cfg.deepspeed_config) if cfg.deepspeed_config else None
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"config": dataclasses.asdict(cfg), "deepspeed_user_config": user_ds},
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=bool(cfg.use_gpu),
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=cfg.name, storage_path=cfg.storage_path, callbacks=callbacks,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),  # the latest ones
            failure_config=FailureConfig(max_failures=cfg.max_failures)),
    )
    result = trainer.fit()
    best_dir = download_folder(cfg.storage_path, f"{cfg.name}/best", Path(cfg.out) / "best")
    last_dir = download_folder(cfg.storage_path, f"{cfg.name}/last", Path(cfg.out) / "last")
    if best_dir is None or last_dir is None:
        raise RuntimeError(f"the run {result.path} wrote no best or last model")
    best_metrics = read_meta(best_dir)["extra"]["validation"]
    worker = result.return_value or {}
    summary = {"best_checkpoint": str(best_dir), "last_checkpoint": str(last_dir),
               "latest_state": result.checkpoint.path if result.checkpoint else None, "run_path": result.path,
               "best_metrics": {k: v for k, v in best_metrics.items() if k in ("step", "epoch", "loss") or "@" in k},
               "wall_seconds": time.perf_counter() - start, "config": dataclasses.asdict(cfg)}
    summary.update({k: worker.get(k) for k in ("history", "steps", "resumed_from", "resumed_step", "node_ids",
                                               "validation_wait_s", "examples_per_second")})
    summary["train_seconds"] = worker.get("seconds")
    return summary


def summary_line(summary: dict[str, Any]) -> str:
    m = summary["best_metrics"]
    return (f"best checkpoint: {summary['best_checkpoint']} (step {int(m['step'])}, validation hit@10 "
            f"{m['hit@10']:.4f} ndcg@10 {m['ndcg@10']:.4f}); {summary['steps']} steps, "
            f"{summary['examples_per_second']:.0f} examples/s, wall time {summary['wall_seconds']:.1f} s; "
            f"workers on nodes {', '.join(summary['node_ids'] or [])}"
            + (f"; resumed at step {summary['resumed_step']}" if summary["resumed_step"] is not None else ""))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = parse_config(RayTrainConfig, argv)
    try:
        summary = run(cfg)
    except ConfigError as exc:
        sys.exit(f"error: {exc}")
    print(summary_line(summary), flush=True)
    if cfg.summary_json:
        Path(cfg.summary_json).write_text(json.dumps(summary, indent=2, default=str))
    return summary


if __name__ == "__main__":
    main()
