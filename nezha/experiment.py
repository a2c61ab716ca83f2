"""`nezha experiment`: a grid of independent trainings + test evaluations, resumable, with a summary.

A grid is dataset × method × seed. Every run is its own model: trained with the method's objectives,
its checkpoint picked by the method's own validation NDCG@10 (early stopping on a validation plateau),
then scored on every test user. Layout of `out`:

    runs/<dataset>__<method>__s<seed>/
        train/            best/ and last/ checkpoints, history.json (validation curve)
        ranks.npz         per evaluation row: the 0-based rank of each test user's item (-1: not returned)
        result.json       written last: a run with this file is finished and is never repeated
    runs/<dataset>__<method>__s<seed>.claim   while a process trains the run: its host and pid
    summary.json          mean ± std per (dataset, row) over seeds, paired tests against each baseline
    results.md            the same as Markdown tables
    curves.png            validation NDCG@10 per epoch, one line per run

Prepared datasets are shared between experiments under `prepared_root` (`nezha prepare` caches by content).
A finished run whose method now lists an evaluation row it lacks is not trained again: its best checkpoint
scores just the missing rows (so a new decoder can join a finished grid).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nezha.catalog import Catalog
from nezha.config import ConfigError, from_dict
from nezha.data.split import Examples
from nezha.evaluation import LATENCY_ROUNDS, latency_rounds, rank_examples, sweep_widths
from nezha.metrics import (
    USER_COVERS,
    metrics_from_ranks,
    paired_difference,
    seed_level_difference,
    target_ranks,
)
from nezha.model.checkpoint import load_checkpoint
from nezha.model.model import NezhaModel
from nezha.prepare import PrepareConfig, prepare
from nezha.prepared import load_prepared
from nezha.training import TrainConfig, train

log = logging.getLogger(__name__)

METRICS = ("hit@5", "hit@10", "ndcg@5", "ndcg@10")
RESULT_FILE = "result.json"
RANKS_FILE = "ranks.npz"


@dataclass
class ExperimentConfig:
    """Run a grid of trainings + test evaluations (dataset × method × seed); finished runs are skipped."""

    out: str = field(default="runs/exp/default", metadata={"help": "result directory"})
    datasets: dict = field(default_factory=lambda: {"beauty": {"dataset": "amazon-beauty"}}, metadata={
        "help": "name -> `nezha prepare` fields (dataset, codebook_size, levels, ...)"})
    methods: dict = field(default_factory=lambda: {
        "nezha": {"train": {"objectives": ["nezha"]}},
        "beam": {"train": {"objectives": ["lm"]}},
        "mtp": {"train": {"objectives": ["mtp"]}},
    }, metadata={"help": "name -> {train: TrainConfig fields, select_by: decoder, evals: {row: {decoder, verify}}, "
                         "seeds: [...] (default: the grid's; a method's own seeds are not changed by --seeds)}"})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    train: dict = field(default_factory=dict, metadata={"help": "TrainConfig fields shared by every run"})
    beam: int = field(default=10, metadata={"help": "beam width of the test evaluation (top-10 returned)"})
    topk: int = 10
    eval_users: int = field(default=0, metadata={"help": "test users scored (0: all)"})
    baselines: list[str] = field(default_factory=lambda: ["beam"], metadata={
        "help": "rows every other row is paired against (e.g. beam for the comparison, nezha for ablations)"})
    resamples: int = field(default=10000, metadata={"help": "bootstrap / sign-flip resamples of a paired test"})
    parallel: int = field(default=1, metadata={"help": "runs at once (each gets train.threads torch threads)"})
    prepared_root: str = field(default="runs/exp/prepared", metadata={"help": "where prepared datasets are kept"})
    data_dir: str | None = field(default=None, metadata={"help": "data root (else $NEZHA_DATA_DIR, else ../shared/data)"})
    only: list[str] = field(default_factory=list, metadata={"help": "run only runs whose name contains one of these"})
    width_sweep: dict = field(default_factory=dict, metadata={
        "help": "after the grid: {methods: [...], seed: 0, widths: [5, 10, 20, 50], batches: [1, 32], "
                "latency_requests: 50} re-scores those runs' checkpoints at each beam width and times them"})

    def __post_init__(self) -> None:
        if not self.datasets or not self.methods or not self.seeds:
            raise ConfigError("datasets, methods and seeds must each name at least one entry")
        if self.parallel < 1:
            raise ConfigError(f"parallel: must be >= 1, got {self.parallel}")
        for name, spec in self.methods.items():
            unknown = set(spec) - {"train", "select_by", "evals", "seeds"}
            if unknown:
                raise ConfigError(f"methods.{name}: unknown key(s) {sorted(unknown)}; "
                                  "known: train, select_by, evals, seeds")
        unknown = set(self.width_sweep) - {"methods", "seed", "widths", "batches", "latency_requests"}
        if unknown:
            raise ConfigError(f"width_sweep: unknown key(s) {sorted(unknown)}")
        missing = [m for m in self.width_sweep.get("methods", []) if m not in self.methods]
        if missing:
            raise ConfigError(f"width_sweep.methods: {missing} are not methods of this grid")


@dataclass(frozen=True)
class Run:
    dataset: str
    method: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.dataset}__{self.method}__s{self.seed}"


def method_decoder(spec: dict[str, Any]) -> str:
    """The decoder that selects (and by default scores) a method's checkpoint."""
    if spec.get("select_by"):
        return str(spec["select_by"])
    objectives = spec.get("train", {}).get("objectives", ["nezha"])
    objectives = objectives.split(",") if isinstance(objectives, str) else objectives
    return next(d for d, o in (("nezha", "nezha"), ("nezha", "joint"), ("mtp", "mtp"), ("beam", "lm"))
                if o in objectives)


def method_evals(name: str, spec: dict[str, Any]) -> dict[str, dict[str, str]]:
    """Evaluation rows of a method: {row: {decoder, verify}}; default one row named like the method."""
    evals = spec.get("evals") or {name: {"decoder": method_decoder(spec)}}
    return {row: {"decoder": e.get("decoder", method_decoder(spec)), "verify": e.get("verify", "prefix")}
            for row, e in evals.items()}


def grid(cfg: ExperimentConfig) -> list[Run]:
    """Every run, in the order they start: methods on the grid's seeds first, seed-major (all of seed 0,
    then seed 1, ...), so early results cover every main method; then methods with their own `seeds`."""
    main = [m for m, spec in cfg.methods.items() if "seeds" not in spec]
    extra = [m for m in cfg.methods if m not in main]
    runs = [Run(d, m, s) for s in cfg.seeds for d in cfg.datasets for m in main]
    runs += [Run(d, m, s) for m in extra for s in cfg.methods[m]["seeds"] for d in cfg.datasets]
    return [r for r in runs if not cfg.only or any(o in r.name for o in cfg.only)]


def own_seed_warning(cfg: ExperimentConfig, runs: Sequence[Run]) -> str | None:
    """What to say when `only` picks methods with their own `seeds`: the grid's `seeds` (e.g. `--seeds 1,2`)
    do not apply to them, which a command selecting them with other seeds most likely did not mean."""
    own = {r.method: cfg.methods[r.method]["seeds"] for r in runs if "seeds" in cfg.methods[r.method]}
    ignored = {m: seeds for m, seeds in own.items() if sorted(seeds) != sorted(cfg.seeds)}
    if not cfg.only or not ignored:
        return None
    return ("; ".join(f"{m} runs its own seeds {seeds}" for m, seeds in sorted(ignored.items())) +
            f", not the grid's {cfg.seeds}: to run other seeds of it, set methods.<name>.seeds in the config")


def prepared_dir(cfg: ExperimentConfig, dataset: str) -> Path:
    spec = cfg.datasets[dataset]
    return Path(cfg.prepared_root) / f"{spec.get('dataset', dataset)}-{spec.get('levels', 3)}x{spec.get('codebook_size', 256)}"


def prepare_datasets(cfg: ExperimentConfig) -> None:
    for name, spec in cfg.datasets.items():
        values = {"data_dir": cfg.data_dir, **spec, "out": str(prepared_dir(cfg, name))}
        prepare(from_dict(PrepareConfig, values, source=f"datasets.{name}"))


def claim_run(cfg: ExperimentConfig, run: Run) -> Path | None:
    """The claim file that makes this process the one that trains `run`, or None when another live process
    holds it or the run has finished meanwhile: two `nezha experiment` processes on one `out` never train the
    same run. A claim left by a process that died (same host, pid gone) is taken over."""
    runs_dir = Path(cfg.out) / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    claim = runs_dir / f"{run.name}.claim"
    me = f"{socket.gethostname()} {os.getpid()}"
    for _ in range(2):
        try:
            fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            if _claim_alive(claim):
                log.info("%s: trained by another process (%s), skipped here", run.name, claim.read_text().strip())
                return None
            claim.unlink(missing_ok=True)  # its owner died: take it over
            continue
        with os.fdopen(fd, "w") as f:
            f.write(me)
        if (runs_dir / run.name / RESULT_FILE).is_file():
            claim.unlink()
            return None
        return claim
    return None


def _claim_alive(claim: Path) -> bool:
    try:
        host, pid = claim.read_text().split()
    except (OSError, ValueError):
        return False  # vanished, or half-written by a process that died between create and write
    if host != socket.gethostname():
        return True  # another machine's process: cannot tell, so never steal it
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's process
    return True


def run_one(cfg: ExperimentConfig, run: Run) -> dict[str, Any] | None:
    """Train one run and score its evaluation rows on the test split; writes result.json last. None when
    another process has claimed the run (or finished it) meanwhile."""
    claim = claim_run(cfg, run)
    if claim is None:
        return None
    try:
        return _train_and_score(cfg, run)
    finally:
        claim.unlink(missing_ok=True)


def _train_and_score(cfg: ExperimentConfig, run: Run) -> dict[str, Any]:
    run_dir = Path(cfg.out) / "runs" / run.name
    if run_dir.exists():
        shutil.rmtree(run_dir)  # an unfinished run (no result.json): start it again from scratch
    run_dir.mkdir(parents=True)
    handler = logging.FileHandler(run_dir / "log.txt")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.INFO)
    spec = cfg.methods[run.method]
    prepared = prepared_dir(cfg, run.dataset)
    train_values = {**cfg.train, **spec.get("train", {}), "seed": run.seed, "prepared": str(prepared),
                    "out": str(run_dir / "train"), "select_by": method_decoder(spec), "progress": False}
    train_cfg = from_dict(TrainConfig, train_values, source=f"methods.{run.method}")
    start = time.perf_counter()
    trained = train(train_cfg)
    train_seconds = time.perf_counter() - start

    catalog, split, _ = load_prepared(prepared)
    examples = split.test.subset(cfg.eval_users)
    model = load_checkpoint(trained.best_checkpoint, train_cfg.device if train_cfg.device != "auto" else "cpu")
    rows, ranks_out = score_rows(cfg, model, catalog, examples, method_evals(run.method, spec))
    np.savez_compressed(run_dir / RANKS_FILE, **ranks_out)
    result = {"run": run.name, "dataset": run.dataset, "method": run.method, "seed": run.seed,
              "test_users": len(examples), "beam": cfg.beam, "rows": rows,
              "selected_by": train_cfg.select_by, "best_validation": trained.best_metrics,
              "validations": trained.history, "steps": trained.steps, "train_seconds": train_seconds,
              "examples_per_second": trained.examples_per_second, "train_config": asdict(train_cfg),
              "code": code_version(), "finished_at": time.strftime("%Y-%m-%d %H:%M:%S")}
    (run_dir / (RESULT_FILE + ".tmp")).write_text(json.dumps(result, indent=2))
    os.replace(run_dir / (RESULT_FILE + ".tmp"), run_dir / RESULT_FILE)
    logging.getLogger().removeHandler(handler)
    return result


def code_version() -> dict[str, Any]:
    """Which code scored a run: the git commit of this package's checkout and whether tracked files differed
    from it ({} outside a git checkout)."""
    try:
        return {"commit": _git("rev-parse", "HEAD"),
                "uncommitted_changes": bool(_git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return {}


def _git(*args: str) -> str:
    repo = Path(__file__).resolve().parents[1]
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True, timeout=30).stdout.strip()


def score_rows(cfg: ExperimentConfig, model: NezhaModel, catalog: Catalog, examples: Examples,
               evals: dict[str, dict[str, str]]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """({row: metrics}, {row: int16 ranks}) of a checkpoint's evaluation rows on `examples`."""
    device = next(model.parameters()).device
    verifier = catalog.verifier(device)
    targets = catalog.packed[examples.targets]
    rows: dict[str, Any] = {}
    ranks_out: dict[str, np.ndarray] = {}
    for row, e in evals.items():
        start = time.perf_counter()
        with torch.inference_mode():
            ranked, invalid = rank_examples(model, e["decoder"], catalog, verifier, examples, cfg.beam, cfg.topk,
                                            verify=e["verify"])
        ranks = target_ranks(ranked, targets)
        ranks_out[row] = ranks.astype(np.int16)
        rows[row] = {**e, **metrics_from_ranks(ranks), "invalid_rate": float(invalid.sum() / (len(examples) * cfg.beam)),
                     "eval_seconds": time.perf_counter() - start}
    return rows, ranks_out


def missing_rows(cfg: ExperimentConfig, result: dict[str, Any]) -> dict[str, dict[str, str]]:
    """The evaluation rows the run's method lists today that its result.json does not have."""
    evals = method_evals(result["method"], cfg.methods[result["method"]])
    return {row: e for row, e in evals.items() if row not in result["rows"]}


def add_missing_rows(cfg: ExperimentConfig, run: Run) -> dict[str, Any]:
    """Score a finished run's missing evaluation rows with its best checkpoint, on the same test users and
    beam as its other rows; ranks.npz, then result.json, are replaced whole (a crash in between leaves the
    rows missing from result.json, so they are scored again next time)."""
    run_dir = Path(cfg.out) / "runs" / run.name
    result = json.loads((run_dir / RESULT_FILE).read_text())
    missing = missing_rows(cfg, result)
    if not missing:
        return result
    spec = cfg.methods[run.method]
    catalog, split, _ = load_prepared(prepared_dir(cfg, run.dataset))
    examples = split.test.subset(cfg.eval_users)
    if (len(examples), cfg.beam) != (result["test_users"], result["beam"]):
        raise ConfigError(f"{run.name}: its rows were scored on {result['test_users']} users at beam {result['beam']}, "
                          f"this config asks for {len(examples)} users at beam {cfg.beam}; restore eval_users and "
                          "beam, or delete the run's result.json to run it again")
    checkpoint = run_dir / "train" / "best"
    if not checkpoint.is_dir():
        raise ConfigError(f"{run.name}: rows {sorted(missing)} are missing and {checkpoint} is gone; delete the "
                          "run's result.json to train it again")
    device = {**cfg.train, **spec.get("train", {})}.get("device", "auto")
    model = load_checkpoint(checkpoint, device if device != "auto" else "cpu")
    log.info("%s: scoring the missing rows %s with its best checkpoint", run.name, ", ".join(missing))
    rows, new_ranks = score_rows(cfg, model, catalog, examples, missing)
    with np.load(run_dir / RANKS_FILE) as stored:
        ranks = {row: stored[row] for row in stored.files}
    tmp = run_dir / "ranks.tmp.npz"  # ends in .npz: savez would add it to another name
    np.savez_compressed(tmp, **{**ranks, **new_ranks})
    os.replace(tmp, run_dir / RANKS_FILE)
    result["rows"].update(rows)
    result.setdefault("rows_added", []).append({"rows": sorted(rows), "code": code_version(),
                                                "at": time.strftime("%Y-%m-%d %H:%M:%S")})
    (run_dir / (RESULT_FILE + ".tmp")).write_text(json.dumps(result, indent=2))
    os.replace(run_dir / (RESULT_FILE + ".tmp"), run_dir / RESULT_FILE)
    return result


def _run_in_worker(cfg: ExperimentConfig, run: Run) -> dict[str, Any] | None:
    logging.basicConfig(level=logging.INFO)
    return run_one(cfg, run)


def run_experiment(cfg: ExperimentConfig) -> dict[str, Any]:
    """Prepare the datasets, run every unfinished run (`parallel` at a time), then summarise."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "experiment.json").write_text(json.dumps(asdict(cfg), indent=2))
    runs = grid(cfg)
    warning = own_seed_warning(cfg, runs)
    if warning:
        log.warning("%s", warning)
    todo = [r for r in runs if not (out / "runs" / r.name / RESULT_FILE).is_file()]
    log.info("%d runs, %d finished before, %d to run (%d at a time)%s", len(runs), len(runs) - len(todo), len(todo),
             cfg.parallel, f": {', '.join(r.name for r in todo)}" if len(todo) <= 10 else "")
    prepare_datasets(cfg)
    for run in runs:
        if run not in todo:
            add_missing_rows(cfg, run)
    start = time.perf_counter()
    done = 0
    if cfg.parallel == 1:
        for run in todo:
            _report(run_one(cfg, run), done := done + 1, len(todo), start)
    else:
        with ProcessPoolExecutor(max_workers=cfg.parallel, mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(_run_in_worker, cfg, run): run for run in todo}
            for future in as_completed(futures):
                _report(future.result(), done := done + 1, len(todo), start)
    if cfg.width_sweep:
        waiting = [r.name for r in sweep_runs(cfg) if not (out / "runs" / r.name / RESULT_FILE).is_file()]
        if waiting:
            log.warning("width sweep skipped: runs %s have not finished (run the grid without `only`)", waiting)
        else:
            run_width_sweep(cfg)
    return summarize(cfg)


def _report(result: dict[str, Any] | None, done: int, total: int, start: float) -> None:
    if result is None:
        return
    rows = " | ".join(f"{row} H@10 {r['hit@10']:.4f} N@10 {r['ndcg@10']:.4f}" for row, r in result["rows"].items())
    log.info("[%d/%d] %s: %s (trained %d steps in %.1f min; %.1f min elapsed)", done, total, result["run"], rows,
             result["steps"], result["train_seconds"] / 60, (time.perf_counter() - start) / 60)


SWEEP_FILE = "width_sweep.json"


def sweep_spec(cfg: ExperimentConfig) -> dict[str, Any]:
    return {"methods": ["nezha", "beam"], "seed": cfg.seeds[0], "widths": [5, 10, 20, 50], "batches": [1, 32],
            "latency_requests": 50, **cfg.width_sweep}


def sweep_runs(cfg: ExperimentConfig) -> list[Run]:
    spec = sweep_spec(cfg)
    return [Run(dataset, method, spec["seed"]) for dataset in cfg.datasets for method in spec["methods"]]


def run_width_sweep(cfg: ExperimentConfig) -> dict[str, Any]:
    """Quality and latency of the chosen methods' checkpoints at every beam width, once the grid is done.

    Quality on the same test users as the grid; latency at each batch size in rounds over every
    (width, method) pair, so load from outside hits them alike (median of round p50s, max of p99s), all in
    this one process after every training has finished (a quiet pass). Finished sweeps are not repeated.
    """
    path = Path(cfg.out) / SWEEP_FILE
    if path.is_file():
        return json.loads(path.read_text())
    spec = sweep_spec(cfg)
    threads = int(cfg.train.get("threads", 0))
    if threads:
        torch.set_num_threads(threads)  # what each grid run decoded with
    sweep: dict[str, Any] = {"spec": spec, "load_average_1m": {"start": os.getloadavg()[0]}, "datasets": {}}
    for dataset in cfg.datasets:
        catalog, split, _ = load_prepared(prepared_dir(cfg, dataset))
        examples = split.test.subset(cfg.eval_users)
        verifier = catalog.verifier()
        models = {run.method: load_checkpoint(Path(cfg.out) / "runs" / run.name / "train" / "best")
                  for run in sweep_runs(cfg) if run.dataset == dataset}
        rows: dict[str, dict[str, Any]] = {}
        for method, model in models.items():
            decoder = method_decoder(cfg.methods[method])
            for quality in sweep_widths(model, decoder, catalog, verifier, examples, spec["widths"], cfg.topk):
                key = f"{method}@{quality['width']}"
                rows[key] = {"method": method, "decoder": decoder, **quality, "latency_ms": {}}
                log.info("width sweep %s %s width %d: N@10 %.4f", dataset, method, quality["width"],
                         quality["ndcg@10"])
        settings = [(models[row["method"]], row["decoder"], row["width"]) for row in rows.values()]
        for batch in spec["batches"]:
            repeats = max(1, spec["latency_requests"] // (LATENCY_ROUNDS * (1 if batch == 1 else 5)))
            timed = latency_rounds(settings, catalog, verifier, examples, batch, repeats)
            for row, latency in zip(rows.values(), timed, strict=True):
                row["latency_ms"][str(batch)] = latency
        sweep["datasets"][dataset] = rows
    sweep["load_average_1m"]["end"] = os.getloadavg()[0]
    path.write_text(json.dumps(sweep, indent=2))
    return sweep


def load_results(out: str | Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(Path(out).glob(f"runs/*/{RESULT_FILE}"))]


def load_experiment_dir(path: str | Path) -> ExperimentConfig:
    """The config of an experiment directory (a grid's `out`, or its copy under results/ made by
    experiments/collect.sh) from its experiment.json, with `out` pointed at `path`."""
    path = Path(path)
    source = path / "experiment.json"
    if not source.is_file():
        raise ConfigError(f"{path}: no experiment.json; give a `nezha experiment` out directory or its copy in results/")
    values = json.loads(source.read_text())
    if "baseline" in values:  # grids run before `baselines` took a list wrote one name under this key
        values.setdefault("baselines", [values["baseline"]])
        del values["baseline"]
    values["out"] = str(path)
    return from_dict(ExperimentConfig, values, source=str(source))


def summarize_dir(path: str | Path) -> dict[str, Any]:
    """Recompute summary.json, results.md and curves.png of an experiment directory from its files alone:
    experiment.json, runs/*/result.json + ranks.npz and width_sweep.json (no checkpoint, no dataset)."""
    cfg = load_experiment_dir(path)
    if not load_results(cfg.out):
        raise ConfigError(f"{path}: no runs/*/{RESULT_FILE}; collect them with experiments/collect.sh first")
    return summarize(cfg)


def summarize(cfg: ExperimentConfig) -> dict[str, Any]:
    """summary.json, results.md and curves.png from every finished run under `cfg.out`."""
    out = Path(cfg.out)
    # Rows in the grid's order (methods as the config lists them, then seeds), not by directory name.
    order = {name: i for i, name in enumerate(cfg.methods)}
    results = sorted(load_results(out), key=lambda r: (order.get(r["method"], len(order)), r["seed"]))
    table: dict[str, dict[str, Any]] = {}
    ranks: dict[tuple[str, str], dict[int, np.ndarray]] = {}
    for result in results:
        with np.load(out / "runs" / result["run"] / RANKS_FILE) as stored:
            for row, r in result["rows"].items():
                entry = table.setdefault(result["dataset"], {}).setdefault(row, {"seeds": [], "runs": []})
                entry["seeds"].append(result["seed"])
                entry["runs"].append({"seed": result["seed"], **{m: r[m] for m in (*METRICS, "invalid_rate")},
                                      "steps": result["steps"], "train_minutes": result["train_seconds"] / 60,
                                      "best_epoch": result["best_validation"].get("epoch")})
                ranks.setdefault((result["dataset"], row), {})[result["seed"]] = stored[row]
    for dataset, rows in table.items():
        for row, entry in rows.items():
            for metric in (*METRICS, "invalid_rate", "train_minutes", "best_epoch"):
                values = np.asarray([r[metric] for r in entry["runs"]], dtype=float)
                entry[metric] = {"mean": float(values.mean()),
                                 "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0}
            for baseline in cfg.baselines:
                base = ranks.get((dataset, baseline))
                if row != baseline and base:
                    entry["vs_" + baseline] = _paired(ranks[(dataset, row)], base, cfg.resamples)
    summary = {"experiment": out.name, "beam": cfg.beam, "baselines": cfg.baselines, "runs": len(results),
               "datasets": table}
    if (out / SWEEP_FILE).is_file():
        summary["width_sweep"] = json.loads((out / SWEEP_FILE).read_text())
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "results.md").write_text(format_markdown(summary))
    plot_curves(results, out / "curves.png")
    return summary


def _paired(ranks: dict[int, np.ndarray], base: dict[int, np.ndarray], resamples: int) -> dict[str, Any]:
    """Row − baseline over the seeds both have: the user-level test (per-user metrics averaged over those
    seeds) and, with two seeds or more, the seed-level ones (`seed_level_difference`). Each test carries
    what it covers and its lower CI bound as % of the baseline's mean of that metric."""
    seeds = sorted(set(ranks) & set(base))
    if not seeds:
        return {}
    out: dict[str, Any] = {"seeds": seeds}
    for metric in ("hit@10", "ndcg@10"):
        a = np.stack([per_user(ranks[s], metric) for s in seeds])
        b = np.stack([per_user(base[s], metric) for s in seeds])
        base_mean = float(b.mean())
        out[metric] = {"covers": USER_COVERS,
                       **_with_low_pct(paired_difference(a.mean(axis=0), b.mean(axis=0), resamples=resamples),
                                       base_mean)}
        if len(seeds) >= 2:
            seed_level = seed_level_difference(a, b, resamples=resamples)
            for test in ("t", "bootstrap"):
                seed_level[test] = _with_low_pct(seed_level[test], base_mean)
            out.setdefault("seed_level", {})[metric] = seed_level
    return out


def _with_low_pct(test: dict[str, Any], base_mean: float) -> dict[str, Any]:
    """The test plus its lower 95% bound as % of the baseline's mean (e.g. −2.0: rules out a loss above 2%)."""
    return {**test, "ci_low_pct_of_baseline": 100 * test["ci_low"] / base_mean if base_mean else None}


def per_user(ranks: np.ndarray, metric: str) -> np.ndarray:
    """Per-user hit@k or ndcg@k from 0-based ranks (-1 = not returned)."""
    name, k = metric.split("@")
    inside = (ranks >= 0) & (ranks < int(k))
    if name == "hit":
        return inside.astype(float)
    return np.where(inside, 1.0 / np.log2(np.where(inside, ranks, 0) + 2.0), 0.0)


def format_markdown(summary: dict[str, Any]) -> str:
    lines = [f"# {summary['experiment']}", "",
             f"{summary['runs']} runs; beam {summary['beam']}, top-10 over the test users; mean ± std over seeds.",
             "",
             "Δ vs a baseline, each test labelled with what it covers (* = p < 0.05; \"low %\": the lower 95% bound "
             "as % of the baseline's mean, e.g. −2.0 rules out a loss above 2%):",
             "- **users**: paired over the same test users, the models fixed (per-user metric averaged over the "
             "seeds both rows have); bootstrap CI over users, two-sided sign-flip p-value. Ignores seed-to-seed "
             "variance.",
             "- **seeds (t)**: paired over seeds, the mean of the per-seed differences with a t-based 95% CI "
             "(S − 1 degrees of freedom) and the paired t-test p-value.",
             "- **seeds + users (bootstrap)**: a two-level bootstrap, seeds resampled and then the users within "
             "each drawn seed; 95% percentile CI.", ""]
    for dataset, rows in summary["datasets"].items():
        lines += [f"## {dataset}", "", "| row | seeds | H@5 | H@10 | N@5 | N@10 | invalid | best epoch | train min |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for row, e in rows.items():
            cells = [f"{e[m]['mean']:.4f} ± {e[m]['std']:.4f}" for m in METRICS]
            lines.append(f"| {row} | {len(e['seeds'])} | " + " | ".join(cells) +
                         f" | {e['invalid_rate']['mean']:.4f} | {e['best_epoch']['mean']:.1f} | "
                         f"{e['train_minutes']['mean']:.1f} |")
        lines.append("")
        for base in summary["baselines"]:
            paired_rows = [(row, e["vs_" + base]) for row, e in rows.items() if e.get("vs_" + base)]
            if not paired_rows:
                continue
            lines += [f"Paired against {base} ({dataset}):", "",
                      "| row | seeds paired | test (covers) | Δ H@10 [95% CI] | p | low % | Δ N@10 [95% CI] | p | low % |",
                      "|---|---|---|---:|---:|---:|---:|---:|---:|"]
            for row, paired in paired_rows:
                seeds = ",".join(map(str, paired["seeds"]))
                tests = [("users", {m: paired[m] for m in ("hit@10", "ndcg@10")})]
                if "seed_level" in paired:
                    tests += [(label, {m: paired["seed_level"][m][key] for m in ("hit@10", "ndcg@10")})
                              for label, key in (("seeds (t)", "t"), ("seeds + users (bootstrap)", "bootstrap"))]
                for label, by_metric in tests:
                    cells = []
                    for metric in ("hit@10", "ndcg@10"):
                        d = by_metric[metric]
                        p = d.get("p_value")
                        star = "*" if p is not None and p < 0.05 else ""
                        low = d.get("ci_low_pct_of_baseline")
                        cells += [f"{d['diff']:+.4f}{star} [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}]",
                                  "–" if p is None else f"{p:.3f}", "–" if low is None else f"{low:+.1f}%"]
                    lines.append(f"| {row} | {seeds} | {label} | " + " | ".join(cells) + " |")
            lines.append("")
    sweep = summary.get("width_sweep")
    if sweep:
        batches = sweep["spec"]["batches"]
        lines += ["## Beam width sweep", "",
                  f"Seed-{sweep['spec']['seed']} checkpoints re-scored at each width (top-10 returned; a width below "
                  "10 returns fewer items) and timed after the grid in one pass, in rounds over every row: "
                  f"p50 ms per call (load average {sweep['load_average_1m']['start']:.1f} → "
                  f"{sweep['load_average_1m']['end']:.1f}).", ""]
        for dataset, rows in sweep["datasets"].items():
            lines += [f"### {dataset}", "", "| method | width | H@10 | N@10 | " +
                      " | ".join(f"p50 ms b{b} | p99 ms b{b}" for b in batches) + " |",
                      "|---|---:|---:|---:|" + "---:|---:|" * len(batches)]
            for row in rows.values():
                lat = " | ".join(f"{row['latency_ms'][str(b)]['p50']:.2f} | {row['latency_ms'][str(b)]['p99']:.2f}"
                                 for b in batches)
                lines.append(f"| {row['method']} | {row['width']} | {row['hit@10']:.4f} | {row['ndcg@10']:.4f} | "
                             f"{lat} |")
            lines.append("")
    return "\n".join(lines)


def plot_curves(results: list[dict[str, Any]], path: Path) -> None:
    """Validation NDCG@10 against epoch, one panel per dataset, one colour per method."""
    if not results:
        return
    # Local: only the summary plots need matplotlib, and its backend must be chosen before pyplot loads.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({r["dataset"] for r in results})
    methods = sorted({r["method"] for r in results})
    colours = {m: plt.cm.tab10(i % 10) for i, m in enumerate(methods)}
    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4), squeeze=False)
    for ax, dataset in zip(axes[0], datasets, strict=True):
        labelled = set()
        for r in (r for r in results if r["dataset"] == dataset):
            curve = r["validations"]
            label = None if r["method"] in labelled else r["method"]
            labelled.add(r["method"])
            ax.plot([v["epoch"] for v in curve], [v["ndcg@10"] for v in curve], marker="o", ms=3,
                    color=colours[r["method"]], label=label, alpha=0.8)
        ax.set(title=f"{dataset}: validation NDCG@10 (own decoder)", xlabel="epoch", ylabel="NDCG@10")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
