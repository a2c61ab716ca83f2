"""Distributed fine-tuning on Ray Train: DeepSpeed ZeRO (or torch DDP) around the library's training loop.

    ray job submit --working-dir . -- python train/run.py --config train/configs/quickstart.yaml \\
        --prepared "$PWD/runs/prepared" --storage-path "$PWD/runs/ray"

Every worker runs `nezha.training.train` on its shard (the library shards by rank); this file is the Ray
side: the driver (config resolved against the cluster, the TorchTrainer, the summary) and the worker, which
picks the optimiser stepper (a DeepSpeed engine, DDP or plain AdamW: train/steppers.py) and its data (the
split in memory, or with `data: stream` its shard of a Ray Data stream: train/data.py), writes a
full-state checkpoint every `checkpoint_every` steps (train/state.py) and reports it to Ray Train,
continues from Ray's latest one after a failure at the same step, LR and next batch, and keeps the
best-by-validation model apart (STORAGE/NAME/best, what `nezha evaluate` and Serve load; train/storage.py).
The config and its resolution are in train/config.py. See docs/training.md.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

if __package__ in (None, ""):  # `python train/run.py`: make the `train` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nezha.config import ConfigError, parse_config  # noqa: E402
from nezha.model.checkpoint import read_meta  # noqa: E402
from nezha.model.model import NezhaModel  # noqa: E402
from nezha.training import LoopState, Plan, Stepper, TrainingData, train  # noqa: E402
from train.config import RayTrainConfig, read_user_deepspeed_config, resolve_config  # noqa: E402
from train.data import StreamData, count_examples, train_dataset, valid_examples  # noqa: E402
from train.state import load_full_state, save_full_state  # noqa: E402
from train.steppers import (  # noqa: E402
    DDPStepper,
    DeepSpeedStepper,
    TorchStateStepper,
    ValidationSync,
    use_interpreter_tools,
)
from train.storage import download_folder, is_uri, upload_folder  # noqa: E402

log = logging.getLogger("nezha.train.ray")


# ---------------------------------------------------------------------------------------------- workers


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
        self.plan: Plan | None = None  # set with the stepper, once the loop knows its budget
        self.stepper: TorchStateStepper | DeepSpeedStepper | None = None
        self.resumed_from: str | None = None
        self.resumed_step: int | None = None
        self.validation_wait = 0.0  # seconds this rank waited for the others at validation steps

    def resume(self) -> LoopState | None:
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
        cfg = self.cfg
        if cfg.fail_at_step == state.step and self.rank == self.world_size - 1 and self.resumed_from is None:
            raise InjectedFailure(f"rank {self.rank}: injected failure after step {state.step} (fail_at_step)")
        assert self.plan is not None, "the loop steps once the stepper exists"
        validated = self.plan.is_validation_step(state.step)
        checkpointing = state.step % cfg.checkpoint_every == 0 or state.step == self.plan.total_steps
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


def peak_rss_mb() -> float:
    """This process's peak resident memory (Linux: ru_maxrss is in KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def train_worker(loop_config: dict[str, Any]) -> dict[str, Any]:
    """The per-worker function: the library's loop with a Ray-aware stepper, checkpoints and reports.

    `loop_config` is {"config": RayTrainConfig fields, "deepspeed_user_config": dict or None}.
    """
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
    data: TrainingData | None = None  # in_memory: the library loads the split
    if cfg.data == "stream":
        num_examples = count_examples(cfg.prepared)
        plan = cfg.plan(num_examples, world_size)  # the stream reads no epoch the run will not train on
        data = StreamData(ray.train.get_dataset_shard("train"), valid_examples(cfg.prepared, cfg.eval_users),
                          num_examples, cfg.batch_size, cfg.shuffle_buffer, cfg.seed, rank, world_size,
                          epochs=-(-plan.total_steps // plan.steps_per_epoch))
    checkpoints = Checkpoints(cfg, rank, world_size)
    sync: ValidationSync | None = None

    def stepper_factory(model: NezhaModel, plan: Plan) -> Stepper:
        nonlocal sync
        checkpoints.plan = plan
        if cfg.gradient_checkpointing:
            model.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.strategy == "deepspeed":
            engine = DeepSpeedStepper(model, cfg, plan.total_steps, rank, world_size, user_ds,
                                      validates=rank == 0 or shard)
            checkpoints.stepper = engine
            sync = ValidationSync(engine, plan, engine.sync_eval_model)
            return sync
        stepper = DDPStepper(model, cfg, plan.total_steps, rank) if cfg.strategy == "ddp" else \
            TorchStateStepper(model, cfg, plan.total_steps, rank)
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
                       on_step=checkpoints.on_step, shard_validation=shard, data=data)
        if rank == 0:
            upload_folder(result.last_checkpoint, cfg.storage_path, f"{cfg.name}/last")
        mine = (node_id, checkpoints.validation_wait, peak_rss_mb())
        per_rank = [mine]
        if world_size > 1:
            per_rank = [None] * world_size
            torch.distributed.all_gather_object(per_rank, mine)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)  # uploads are synchronous: Ray's storage has the copies
    return {"steps": result.steps, "seconds": result.seconds, "examples_per_second": result.examples_per_second,
            "best_metrics": result.best_metrics, "history": result.history, "resumed_from": checkpoints.resumed_from,
            "resumed_step": checkpoints.resumed_step, "node_ids": [n for n, _, _ in per_rank],
            "validation_wait_s": [round(w, 3) for _, w, _ in per_rank],
            "worker_peak_rss_mb": [rss for _, _, rss in per_rank]}


# ----------------------------------------------------------------------------------------------- driver


def run(cfg: RayTrainConfig, callbacks: list[Any] | None = None) -> dict[str, Any]:
    """Train on the connected Ray cluster (a local one is started when none is); returns the run summary.

    `callbacks` go to Ray Train's RunConfig (Ray Tune passes its report callback).
    """
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
    log.info("training %s with %d workers (%s, %s, %s, data %s), checkpoint every %d steps, storage %s/%s",
             cfg.backbone, cfg.num_workers, "GPU" if cfg.use_gpu else "CPU", cfg.strategy,
             f"ZeRO-{cfg.zero_stage}" if cfg.strategy == "deepspeed" else "-", cfg.data, cfg.checkpoint_every,
             cfg.storage_path, cfg.name)
    user_ds = read_user_deepspeed_config(cfg.deepspeed_config) if cfg.deepspeed_config else None
    # stream: the driver only describes the dataset; Ray Data tasks read it while the workers train
    datasets = {"train": train_dataset(cfg.prepared, cfg.seed)} if cfg.data == "stream" else None
    trainer = TorchTrainer(
        train_worker, datasets=datasets,
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
                                               "validation_wait_s", "examples_per_second",
                                               "worker_peak_rss_mb")})
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
