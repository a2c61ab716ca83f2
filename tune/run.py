"""Hyper-parameter search on Ray Tune: draft-head transition x training knobs, then beam width at decode time.

    python tune/run.py --config tune/configs/beauty.yaml            # a new search
    python tune/run.py --config tune/configs/beauty.yaml --resume   # continue an interrupted one

Every trial trains with the library's `nezha.training.train` (transition, learning rate and head lr
multiplier from the search space) and reports each validation to Tune, where ASHA stops weak trials at
validation steps. With `trainer: ray` a trial is a Ray Train job instead (train/run.py: DeepSpeed ZeRO over
`workers_per_trial` workers, e.g. one per GPU, with its full-state checkpoints); `trainer: single` (the
default) keeps one process per trial for CPUs. A trial that trains to the end then scores its best
checkpoint on the validation users at every beam width without retraining (tune/trials.py); after the
search the driver times every swept (checkpoint, width) at batch 1, one at a time (tune/timing.py), writes
results.csv, results.md and a quality-vs-latency plot next to Ray's results (tune/report.py) and prints the
(transition, width) to ship: the best NDCG@10, or the best within a latency budget. The config, the step
plan and the scheduler are in tune/search.py. See docs/tuning.md.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.search.basic_variant import BasicVariantGenerator

if __package__ in (None, ""):  # `python tune/run.py`: make the `tune` and `train` packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nezha.config import ConfigError, parse_config  # noqa: E402
from nezha.data.split import Split  # noqa: E402
from nezha.prepared import SPLIT_FILE, require_prepared  # noqa: E402
from tune.report import (  # noqa: E402
    SearchReport,
    choose,
    describe,
    mark_frontier,
    plot_frontier,
    write_csv,
    write_markdown,
)
from tune.search import SCORE, SearchConfig, make_scheduler, param_space, plan_steps  # noqa: E402
from tune.timing import time_finalists  # noqa: E402
from tune.trials import run_distributed_trial, run_trial  # noqa: E402

log = logging.getLogger("nezha.tune")

DRIVER_CPUS = 0.01  # what a trial with trainer ray reserves for itself (its Train workers reserve theirs)


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

def run_search(cfg: SearchConfig) -> SearchReport:
    """Run (or resume) the search on the current Ray cluster and write the results next to Tune's."""
    prepared = require_prepared(cfg.prepared)
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
