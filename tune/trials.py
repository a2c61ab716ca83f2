"""A trial: train with the sampled knobs (each validation reported to Tune, where ASHA may stop it), then
score the best checkpoint's quality at every beam width. One process per trial (`trainer: single`) or a
Ray Train job of train/'s DeepSpeed trainer (`trainer: ray`)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any, TypeVar

import torch
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from nezha.evaluation import sweep_widths
from nezha.model.checkpoint import load_checkpoint
from nezha.prepared import load_prepared
from nezha.training import TrainConfig, train, validation_decoder
from train.config import RayTrainConfig
from train.run import run as run_on_ray
from tune.search import SCORE, SearchConfig

log = logging.getLogger("nezha.tune")

Config = TypeVar("Config", bound=TrainConfig)


def trial_config(config_class: type[Config], settings: SearchConfig, config: dict[str, Any], total_steps: int,
                 eval_every: int, **trainer_fields: Any) -> Config:
    """A trial's training config, whichever trainer runs it: the sampled knobs, the search's budget and
    validations, plus the trainer's own fields."""
    return config_class(
        prepared=settings.prepared, backbone=settings.backbone, transition=config["transition"],
        objectives=["nezha"], max_steps=total_steps, batch_size=settings.batch_size, lr=config["lr"],
        head_lr_mult=config["head_lr_mult"], eval_every=eval_every, eval_users=settings.eval_users,
        eval_beam=settings.eval_beam, seed=settings.seed, **trainer_fields)


def sweep_quality(checkpoint: str | Path, prepared: str | Path, widths: list[int], max_users: int,
                  device: str = "cpu") -> list[dict[str, float]]:
    """Quality (H/N@10 on the validation users) of one checkpoint at every beam width (no timing: trials
    run side by side, so their latencies would measure each other's load; the driver times the finalists)."""
    model = load_checkpoint(checkpoint, device)
    catalog, split, _ = load_prepared(prepared)
    examples = split.valid.subset(max_users)  # the users training's validation scores
    # A width below 10 returns fewer than 10 items.
    rows = sweep_widths(model, validation_decoder(model), catalog, catalog.verifier(device), examples, widths,
                        ks=(10,))
    for row in rows:
        log.info("width %d: hit@10 %.4f ndcg@10 %.4f", row["width"], row["hit@10"], row["ndcg@10"])
    return rows


def run_trial(config: dict[str, Any], settings: SearchConfig, total_steps: int, eval_every: int,
              scratch: str) -> None:
    """One trial: train with the sampled knobs (validations to Tune), then sweep beam widths on the best."""
    # One intra-op thread per reserved CPU: concurrent trials with oversubscribed OpenMP threads slow every op.
    torch.set_num_threads(max(1, int(settings.cpus_per_trial)))
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")  # the library's progress lines
    out = Path(scratch) / tune.get_context().get_trial_id()
    shutil.rmtree(out, ignore_errors=True)  # a restored trial starts over: `train` has no resume entry point
    train_cfg = trial_config(TrainConfig, settings, config, total_steps, eval_every, out=str(out),
                             device=settings.device, progress=False)

    def on_evaluation(record: dict[str, Any], best_dir: Path | None) -> None:
        # Only improvements carry a checkpoint, so the one Tune keeps (num_to_keep=1) is the trial's best.
        checkpoint = tune.Checkpoint.from_directory(str(best_dir)) if best_dir is not None else None
        tune.report(record, checkpoint=checkpoint)

    result = train(train_cfg, on_evaluation=on_evaluation)
    rows = sweep_quality(result.best_checkpoint, settings.prepared, settings.widths, settings.eval_users,
                         settings.device)
    shutil.rmtree(out, ignore_errors=True)
    # Tune wants its metric in every result: here the best checkpoint's validation score.
    tune.report({"step": result.steps, SCORE: result.best_metrics[SCORE],
                 "sweep": {str(row["width"]): row for row in rows}})


def run_distributed_trial(config: dict[str, Any], settings: SearchConfig, total_steps: int, eval_every: int,
                          scratch: str) -> None:
    """One trial as a Ray Train job (train/run.py's DeepSpeed trainer); its validations reach Tune through
    Ray Train's report callback. A restored trial continues its Train run from its latest full state."""
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    trial = tune.get_context().get_trial_id()
    train_cfg = trial_config(
        RayTrainConfig, settings, config, total_steps, eval_every,
        storage_path=str(Path(settings.storage_path) / settings.name / "train"), name=trial,
        out=str(Path(scratch) / trial), checkpoint_every=eval_every, num_workers=settings.workers_per_trial,
        cpus_per_worker=settings.cpus_per_trial, use_gpu=settings.gpus_per_trial > 0,
        zero_stage=settings.zero_stage, keep_checkpoints=1)
    summary = run_on_ray(train_cfg, callbacks=[TuneReportCallback()])
    rows = sweep_quality(summary["best_checkpoint"], settings.prepared, settings.widths, settings.eval_users,
                         settings.device)
    tune.report({"step": summary["steps"], SCORE: summary["best_metrics"][SCORE],
                 "sweep": {str(row["width"]): row for row in rows}},
                checkpoint=tune.Checkpoint.from_directory(summary["best_checkpoint"]))
