"""Hyper-parameter search on Ray Tune: draft-head transition x training knobs, then beam width at decode time.

    python tune/run.py --config tune/configs/beauty.yaml            # a new search
    python tune/run.py --config tune/configs/beauty.yaml --resume   # continue an interrupted one

Every trial trains with the library's `nezha.training.train` (transition, learning rate and head lr
multiplier from the search space) and reports each validation to Tune, where ASHA stops weak trials at
validation steps. With `trainer: ray` a trial is a Ray Train job instead (train/run.py: DeepSpeed ZeRO over
`workers_per_trial` workers, e.g. one per GPU, with its full-state checkpoints); `trainer: single` (the
default) keeps one process per trial for CPUs. A trial that trains to the end then decodes its best checkpoint on the validation users
at every beam width (NEZHA decoder: quality, and latency per request at batch 1) without retraining, and
reports those rows. The driver writes results.csv, results.md and a quality-vs-latency plot next to Ray's
results and prints the (transition, width) to ship: the best NDCG@10, or the best within a latency budget.
See docs/tuning.md.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from nezha.config import ConfigError, parse_config
from nezha.data.split import Split
from nezha.evaluation import measure_latency, rank_examples
from nezha.metrics import hit_ndcg
from nezha.model.checkpoint import load_checkpoint
from nezha.model.draft_head import TRANSITIONS
from nezha.prepared import SPLIT_FILE, load_prepared
from nezha.training import TrainConfig, steps_per_epoch, train, validation_decoder

log = logging.getLogger("nezha.tune")

OBJECTIVES = ("ndcg", "ndcg_within_budget")
TRAINERS = ("single", "ray")
SCORE = "ndcg@10"  # Tune's metric: validation NDCG@10 at eval_beam (ASHA compares trials on it)
ROW_FIELDS = ("trial", "transition", "lr", "head_lr_mult", "width", "hit@10", "ndcg@10", "p50_ms", "p99_ms",
              "within_budget", "frontier", "checkpoint")
LATENCY_ROUNDS = 5
DRIVER_CPUS = 0.01  # what a trial with trainer ray reserves for itself (its Train workers reserve theirs)


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


@dataclass
class SearchReport:
    experiment_dir: Path
    rows: list[dict[str, Any]]  # one per (trained trial, width)
    trials: list[dict[str, Any]]  # one per trial, pruned ones included
    chosen: dict[str, Any] | None  # the row to ship; None when no width meets the budget
    files: dict[str, Path]


# ------------------------------------------------------------------------------------------- planning


def plan_steps(cfg: SearchConfig, num_train_examples: int) -> tuple[int, int]:
    """(training steps per trial, steps between validations), as the library counts them."""
    world = cfg.workers_per_trial if cfg.trainer == "ray" else 1
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch(num_train_examples, world,
                                                                           cfg.batch_size)))
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


# ---------------------------------------------------------------------------------------------- trials


def sweep_quality(checkpoint: str | Path, prepared: str | Path, widths: list[int], max_users: int,
                  device: str = "cpu") -> list[dict[str, float]]:
    """Quality (H/N@10 on the validation users) of one checkpoint at every beam width (no timing: trials
    run side by side, so their latencies would measure each other's load; the driver times the finalists)."""
    model = load_checkpoint(checkpoint, device)
    catalog, split, _ = load_prepared(prepared)
    verifier = catalog.verifier(device)
    examples = split.valid.subset(max_users)  # the users training's validation scores
    targets = catalog.packed[examples.targets]
    decoder = validation_decoder(model)
    rows = []
    for width in widths:
        ranked, _invalid = rank_examples(model, decoder, catalog, verifier, examples, width)
        quality = hit_ndcg(ranked, targets, ks=(10,))  # a width below 10 returns fewer than 10 items
        rows.append({"width": width, **quality})
        log.info("width %d: hit@10 %.4f ndcg@10 %.4f", width, quality["hit@10"], quality["ndcg@10"])
    return rows


def time_finalists(rows: list[dict[str, Any]], cfg: SearchConfig) -> None:
    """Batch-1 p50/p99 of every swept (checkpoint, width), in one pass after the search, one at a time.

    Nothing else of the search runs then, so every row is timed under the same conditions (the benchmark's
    protocol: warm-up, synchronised, interleaved). Each checkpoint's widths are timed in rounds, so a burst
    of outside load spreads over its widths instead of landing on one: median of round p50s, max of p99s.
    """
    device = "cuda" if cfg.gpus_per_trial > 0 else "cpu"
    torch.set_num_threads(max(1, int(cfg.cpus_per_trial)))  # what one trial had
    catalog, split, _ = load_prepared(cfg.prepared)
    examples = split.valid.subset(cfg.eval_users)
    per_round = max(1, math.ceil(cfg.latency_requests / LATENCY_ROUNDS))
    by_checkpoint: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_checkpoint.setdefault(row["checkpoint"], []).append(row)
    for checkpoint, ckpt_rows in by_checkpoint.items():
        model = load_checkpoint(checkpoint, device)
        verifier = catalog.verifier(device)
        decoder = validation_decoder(model)
        rounds = [[measure_latency(model, decoder, catalog, verifier, examples, row["width"], batch_size=1,
                                   repeats=per_round, warmup=3 if r == 0 else 1) for row in ckpt_rows]
                  for r in range(LATENCY_ROUNDS)]
        for i, row in enumerate(ckpt_rows):
            row["p50_ms"] = float(np.median([lat[i]["p50"] for lat in rounds]))
            row["p99_ms"] = max(lat[i]["p99"] for lat in rounds)
            row["within_budget"] = cfg.objective != "ndcg_within_budget" or row["p50_ms"] <= cfg.latency_budget_ms
    log.info("timed %d rows of %d checkpoints after the search (load average %.1f)", len(rows),
             len(by_checkpoint), os.getloadavg()[0])


def run_trial(config: dict[str, Any], settings: SearchConfig, total_steps: int, eval_every: int,
              scratch: str) -> None:
    """One trial: train with the sampled knobs (validations to Tune), then sweep beam widths on the best."""
    # One intra-op thread per reserved CPU: concurrent trials with oversubscribed OpenMP threads slow every op.
    torch.set_num_threads(max(1, int(settings.cpus_per_trial)))
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")  # the library's progress lines
    device = "cuda" if settings.gpus_per_trial > 0 else "cpu"
    out = Path(scratch) / tune.get_context().get_trial_id()
    shutil.rmtree(out, ignore_errors=True)  # a restored trial starts over: `train` has no resume entry point
    train_cfg = TrainConfig(
        prepared=settings.prepared, out=str(out), backbone=settings.backbone, transition=config["transition"],
        objectives=["nezha"], max_steps=total_steps, batch_size=settings.batch_size, lr=config["lr"],
        head_lr_mult=config["head_lr_mult"], eval_every=eval_every, eval_users=settings.eval_users,
        eval_beam=settings.eval_beam, seed=settings.seed, device=device, progress=False)

    def on_evaluation(record: dict[str, Any], best_dir: Path | None) -> None:
        # Only improvements carry a checkpoint, so the one Tune keeps (num_to_keep=1) is the trial's best.
        checkpoint = tune.Checkpoint.from_directory(str(best_dir)) if best_dir is not None else None
        tune.report(record, checkpoint=checkpoint)

    result = train(train_cfg, on_evaluation=on_evaluation)
    rows = sweep_quality(result.best_checkpoint, settings.prepared, settings.widths, settings.eval_users, device)
    shutil.rmtree(out, ignore_errors=True)
    # Tune wants its metric in every result: here the best checkpoint's validation score.
    tune.report({"step": result.steps, SCORE: result.best_metrics[SCORE],
                 "sweep": {str(row["width"]): row for row in rows}})


def run_distributed_trial(config: dict[str, Any], settings: SearchConfig, total_steps: int, eval_every: int,
                          scratch: str) -> None:
    """One trial as a Ray Train job (train/run.py's DeepSpeed trainer); its validations reach Tune through
    Ray Train's report callback. A restored trial continues its Train run from its latest full state."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from train.run import RayTrainConfig, run

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    trial = tune.get_context().get_trial_id()
    train_cfg = RayTrainConfig(
        prepared=settings.prepared, storage_path=str(Path(settings.storage_path) / settings.name / "train"),
        name=trial, out=str(Path(scratch) / trial), backbone=settings.backbone, transition=config["transition"],
        objectives=["nezha"], max_steps=total_steps, batch_size=settings.batch_size, lr=config["lr"],
        head_lr_mult=config["head_lr_mult"], eval_every=eval_every, checkpoint_every=eval_every,
        eval_users=settings.eval_users, eval_beam=settings.eval_beam, seed=settings.seed,
        num_workers=settings.workers_per_trial, cpus_per_worker=settings.cpus_per_trial,
        use_gpu=settings.gpus_per_trial > 0, zero_stage=settings.zero_stage, keep_checkpoints=1)
    summary = run(train_cfg, callbacks=[TuneReportCallback()])
    device = "cuda" if settings.gpus_per_trial > 0 else "cpu"
    rows = sweep_quality(summary["best_checkpoint"], settings.prepared, settings.widths, settings.eval_users, device)
    tune.report({"step": summary["steps"], SCORE: summary["best_metrics"][SCORE],
                 "sweep": {str(row["width"]): row for row in rows}},
                checkpoint=tune.Checkpoint.from_directory(summary["best_checkpoint"]))


# ---------------------------------------------------------------------------------------------- driver


def make_tuner(cfg: SearchConfig, total_steps: int, eval_every: int, scratch: str) -> tune.Tuner:
    experiment = Path(cfg.storage_path) / cfg.name
    trial_fn = run_distributed_trial if cfg.trainer == "ray" else run_trial
    # A distributed trial only drives its Train job; the job's workers reserve the CPUs/GPUs themselves. The
    # driver still asks for a sliver of a CPU: Tune builds a placement group from it, and Ray refuses an empty one.
    resources = {"cpu": DRIVER_CPUS} if cfg.trainer == "ray" else {"cpu": cfg.cpus_per_trial, "gpu": cfg.gpus_per_trial}
    trainable = tune.with_resources(
        tune.with_parameters(trial_fn, settings=cfg, total_steps=total_steps, eval_every=eval_every,
                             scratch=scratch),
        resources)
    if tune.Tuner.can_restore(experiment):
        if not cfg.resume:
            raise ConfigError(f"{experiment} already holds a search: pass --resume to continue it, "
                              "or choose another --name")
        log.info("resuming %s (finished trials are kept; unfinished ones train again)", experiment)
        return tune.Tuner.restore(str(experiment), trainable, resume_errored=True)
    return tune.Tuner(
        trainable,
        param_space=param_space(cfg),
        tune_config=tune.TuneConfig(
            metric=SCORE, mode="max", num_samples=cfg.num_samples,
            # Each random (lr, head lr mult) draw is shared by every transition of the grid, so transitions
            # are compared at equal knobs; a seeded draw makes the search reproducible.
            search_alg=BasicVariantGenerator(constant_grid_search=True, random_state=cfg.seed),
            scheduler=make_scheduler(cfg, total_steps, eval_every),
            max_concurrent_trials=cfg.max_concurrent_trials or None),
        run_config=tune.RunConfig(storage_path=cfg.storage_path, name=cfg.name,
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=1)))


def collect(grid: tune.ResultGrid, cfg: SearchConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(sweep rows, trial summaries) from Tune's results."""
    rows, trials = [], []
    for result in grid:
        metrics = result.metrics or {}
        history = result.metrics_dataframe
        knobs = {"trial": metrics.get("trial_id", Path(result.path).name),
                 "transition": result.config["transition"], "lr": float(result.config["lr"]),
                 "head_lr_mult": float(result.config["head_lr_mult"])}
        sweep = metrics.get("sweep") or {}
        status = "error" if result.error else "swept" if sweep else "stopped by ASHA"
        checkpoint = result.checkpoint.path if result.checkpoint else ""
        best = float(history[SCORE].max()) if history is not None and SCORE in history else float("nan")
        trials.append({**knobs, "status": status, "steps": int(metrics.get("step", 0)), "best_val_ndcg@10": best,
                       "checkpoint": checkpoint})
        for row in sweep.values():
            rows.append({**knobs, "width": int(row["width"]), "hit@10": row["hit@10"], "ndcg@10": row["ndcg@10"],
                         "checkpoint": checkpoint})
    time_finalists(rows, cfg)
    mark_frontier(rows)
    rows.sort(key=lambda r: (r["transition"], r["lr"], r["head_lr_mult"], r["width"]))
    trials.sort(key=lambda t: (t["transition"], t["lr"], t["head_lr_mult"]))
    return rows, trials


def mark_frontier(rows: list[dict[str, Any]]) -> None:
    """Flag rows no other row beats on both NDCG@10 (higher) and p50 latency (lower)."""
    for row in rows:
        row["frontier"] = not any(
            o["ndcg@10"] >= row["ndcg@10"] and o["p50_ms"] <= row["p50_ms"]
            and (o["ndcg@10"] > row["ndcg@10"] or o["p50_ms"] < row["p50_ms"]) for o in rows)


def choose(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The best NDCG@10 among rows within the budget (all rows without one); ties go to the faster row."""
    return max((r for r in rows if r["within_budget"]), key=lambda r: (r["ndcg@10"], -r["p50_ms"]), default=None)


def describe(row: dict[str, Any]) -> str:
    return (f"transition {row['transition']}, beam width {row['width']} (lr {row['lr']:.2e}, head lr x"
            f"{row['head_lr_mult']:g}): validation N@10 {row['ndcg@10']:.4f}, H@10 {row['hit@10']:.4f}, "
            f"p50 {row['p50_ms']:.2f} ms per request at batch 1")


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=ROW_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def write_markdown(report: SearchReport, cfg: SearchConfig, total_steps: int, path: Path) -> None:
    budget = f" within {cfg.latency_budget_ms:g} ms p50" if cfg.objective == "ndcg_within_budget" else ""
    lines = [f"# Tune results: {cfg.name}", "",
             f"Backbone `{cfg.backbone}`, {total_steps} training steps per trial (batch {cfg.batch_size}), "
             f"{len(report.trials)} trials; validation on {cfg.eval_users or 'all'} users; latency = p50/p99 of "
             f"{cfg.latency_requests} requests at batch 1, measured after the search in one pass over the "
             f"finalists, one at a time. Objective: best N@10{budget}.", ""]
    lines.append(f"**Ship:** {describe(report.chosen)}." if report.chosen else
                 f"**No (transition, width) meets the {cfg.latency_budget_ms:g} ms budget.**")
    lines += ["", "| transition | lr | head lr x | width | H@10 | N@10 | p50 ms | p99 ms | frontier |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in report.rows:
        mark = " **ship**" if r is report.chosen else ""
        lines.append(f"| {r['transition']} | {r['lr']:.2e} | {r['head_lr_mult']:g} | {r['width']}{mark} | "
                     f"{r['hit@10']:.4f} | {r['ndcg@10']:.4f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
                     f"{'yes' if r['frontier'] else ''} |")
    lines += ["", "## Trials", "", f"| trial | transition | lr | head lr x | status | steps | best val N@10 "
              f"(beam {cfg.eval_beam}) |", "|---|---|---|---|---|---|---|"]
    for t in report.trials:
        lines.append(f"| {t['trial']} | {t['transition']} | {t['lr']:.2e} | {t['head_lr_mult']:g} | {t['status']} "
                     f"| {t['steps']} | {t['best_val_ndcg@10']:.4f} |")
    path.write_text("\n".join(lines) + "\n")


def plot_frontier(report: SearchReport, cfg: SearchConfig, path: Path) -> None:
    """N@10 vs p50 latency: one line per trained trial (coloured by transition), one point per width."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    colours = {t: plt.cm.tab10(i) for i, t in enumerate(sorted({r["transition"] for r in report.rows}))}
    labelled: set[str] = set()
    for trial in report.trials:
        points = sorted((r for r in report.rows if r["trial"] == trial["trial"]), key=lambda r: r["width"])
        if not points:
            continue
        transition = trial["transition"]
        label = None if transition in labelled else transition
        labelled.add(transition)
        ax.plot([p["p50_ms"] for p in points], [p["ndcg@10"] for p in points], "o-", color=colours[transition],
                label=label, alpha=0.9)
        for p in points:
            ax.annotate(str(p["width"]), (p["p50_ms"], p["ndcg@10"]), textcoords="offset points", xytext=(3, 3),
                        fontsize=7, color=colours[transition])
    frontier = sorted((r for r in report.rows if r["frontier"]), key=lambda r: r["p50_ms"])
    ax.step([r["p50_ms"] for r in frontier], [r["ndcg@10"] for r in frontier], "k--", where="post",
            linewidth=0.8, label="frontier")
    if cfg.objective == "ndcg_within_budget":
        ax.axvline(cfg.latency_budget_ms, color="grey", linestyle=":", label=f"budget {cfg.latency_budget_ms:g} ms")
    if report.chosen:
        ax.plot(report.chosen["p50_ms"], report.chosen["ndcg@10"], "*", color="black", markersize=14,
                label=f"ship: {report.chosen['transition']} w={report.chosen['width']}")
    ax.set_xscale("log")
    ax.set_xlabel("p50 latency per request at batch 1 (ms, log scale)")
    ax.set_ylabel("validation NDCG@10")
    ax.set_title(f"{cfg.name}: quality vs latency by transition (labels: beam width)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_search(cfg: SearchConfig) -> SearchReport:
    """Run (or resume) the search on the current Ray cluster and write the results next to Tune's."""
    prepared = Path(cfg.prepared).expanduser().resolve()
    if not (prepared / SPLIT_FILE).is_file():
        raise ConfigError(f"no prepared dataset at {prepared}: run `nezha prepare --out {cfg.prepared}` first")
    # Absolute paths: trials run in their own working directories.
    storage = Path(cfg.storage_path).expanduser().resolve()
    cfg = dataclasses.replace(cfg, prepared=str(prepared), storage_path=str(storage))
    total_steps, eval_every = plan_steps(cfg, len(Split.load(prepared / SPLIT_FILE).train))
    log.info("%d transitions x %d samples, %d steps per trial, validation every %d steps, widths %s",
             len(cfg.transitions), cfg.num_samples, total_steps, eval_every, cfg.widths)
    # Training outputs of trials live here; Tune keeps the best checkpoints. Trials ASHA stops are killed
    # mid-training and cannot clean up after themselves, so the driver does.
    scratch = tempfile.mkdtemp(prefix="nezha-tune-")
    try:
        grid = make_tuner(cfg, total_steps, eval_every, scratch).fit()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    rows, trials = collect(grid, cfg)
    experiment = storage / cfg.name
    files = {"csv": experiment / "results.csv", "md": experiment / "results.md",
             "png": experiment / f"tune_{cfg.name}.png"}
    report = SearchReport(experiment, rows, trials, choose(rows), files)
    write_csv(rows, files["csv"])
    write_markdown(report, cfg, total_steps, files["md"])
    plot_frontier(report, cfg, files["png"])
    if cfg.docs_img:
        Path(cfg.docs_img).mkdir(parents=True, exist_ok=True)
        files["docs_png"] = Path(shutil.copy2(files["png"], Path(cfg.docs_img) / files["png"].name))
    errors = [t["trial"] for t in trials if t["status"] == "error"]
    if errors:
        log.warning("trials %s failed; see their error.txt under %s", errors, experiment)
    return report


def main(argv: list[str] | None = None) -> None:
    import ray

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = parse_config(SearchConfig, argv)
    if not ray.is_initialized():
        ray.init(include_dashboard=False)  # RAY_ADDRESS, when set, joins that cluster instead
    try:
        report = run_search(cfg)
    except ConfigError as exc:
        sys.exit(f"error: {exc}")
    swept = sum(t["status"] == "swept" for t in report.trials)
    print(f"\n{len(report.trials)} trials ({swept} trained to the end and swept), {len(report.rows)} rows")
    for name, path in report.files.items():
        print(f"{name}: {path}")
    if report.chosen:
        print(f"ship: {describe(report.chosen)}\n      checkpoint {report.chosen['checkpoint']}")
    else:
        fastest = min(report.rows, key=lambda r: r["p50_ms"], default=None)
        print(f"no (transition, width) meets the {cfg.latency_budget_ms:g} ms budget"
              + (f"; the fastest is {describe(fastest)}" if fastest else ""))


if __name__ == "__main__":
    main()
