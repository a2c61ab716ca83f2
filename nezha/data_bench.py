"""`nezha bench data`: wall time and peak RSS of prepare's data steps on synthetic sets of growing size.

For each size (`interactions:items`, e.g. `10M:1M`) a synthetic dataset is written once (`nezha synth`,
Parquet parts) under `work_dir`, then each measurement runs in a child process of its own, so that its
peak RSS is its own: the steps are timed one by one and the peak RSS of each is read from
/proc/self/status (VmHWM, reset before every step through /proc/self/clear_refs). The parent watches the
child's RSS and stops it above `memory_limit_gb`, recording the step it was in.

Steps (today's code): items (read the catalog), read (interactions -> integer columns), filter
(`k_core`-core), group (per-user sequences), split (leave-one-out), write (sequences.npz + split.npz).
With `--measure prepare` (or `steps,prepare`) each set is also prepared whole, `nezha prepare
--embeddings FILE.npy` (random clustered float32 vectors, `embedding_dim` wide, written once beside the
set) in one child: its wall time and peak RSS, prepare's own timings (load, embed, kmeans, collisions,
split, write), and where the memory went: the child's RSS and peak at each of prepare's log lines
(`trace`) and the RSS the parent saw every 5 s (`rss_timeline`, [seconds, GB]).

`before` measures an older checkout (`git worktree add /tmp/before 87ca025`) on the same data, converted
to the one form it reads (items.jsonl + interactions.csv): its load_dataset (items + read + group in
one), leave_one_out and the same writes. `csv` measures today's code on that CSV form too (same sizes).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nezha.config import ConfigError
from nezha.synth import SynthConfig, synthesize

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
_SUFFIX = {"k": 1_000, "M": 1_000_000, "G": 1_000_000_000}

# Shared by every child: `step(name)` times a block and records its peak RSS; results go to stdout as
# JSON lines (one when a step starts, so the parent knows where a killed child was).
_STEP_CODE = '''
import json, os, sys, time
from contextlib import contextmanager
from pathlib import Path

def _status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

@contextmanager
def step(name):
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := current RSS
    print(json.dumps({"start": name}), flush=True)
    t = time.perf_counter()
    yield
    print(json.dumps({"step": name, "wall_s": round(time.perf_counter() - t, 2),
                      "peak_rss_gb": round(_status("VmHWM") / 2**30, 3),
                      "rss_after_gb": round(_status("VmRSS") / 2**30, 3)}), flush=True)

ARGS = json.loads(sys.argv[1])
sys.path.insert(0, ARGS["root"])
OUT = Path(ARGS["out"])
OUT.mkdir(parents=True, exist_ok=True)
'''

_AFTER_CODE = _STEP_CODE + '''
from nezha.data.columnar import group_by_user, k_core_filter
from nezha.data.datasets import dataset_files, load_catalog, read_interactions
from nezha.data.split import leave_one_out, save_sequences

data = Path(ARGS["data"])
with step("items"):
    items = load_catalog(data)[0]
with step("read"):
    inter = read_interactions(dataset_files(data)[1], items["item_id"].tolist(), "items")
with step("filter"):
    inter = k_core_filter(inter, ARGS["k_core"], len(items))
with step("group"):
    sequences, user_ids = group_by_user(inter)
    del inter
with step("split"):
    split = leave_one_out(sequences, max_history=ARGS["max_history"])
with step("write"):
    save_sequences(OUT / "sequences.npz", sequences, user_ids)
    split.save(OUT / "split.npz")
print(json.dumps({"sizes": split.sizes(), "users": len(user_ids)}), flush=True)
'''

_BEFORE_CODE = _STEP_CODE + '''
from nezha.data.datasets import load_dataset
from nezha.data.split import leave_one_out, save_sequences

with step("read"):  # items + interactions + per-user sequences: one function in that code
    ds = load_dataset(ARGS["data"])
with step("split"):
    split = leave_one_out(ds.sequences, max_history=ARGS["max_history"])
with step("write"):
    save_sequences(OUT / "sequences.npz", ds.sequences, ds.user_ids)
    split.save(OUT / "split.npz")
print(json.dumps({"sizes": split.sizes(), "users": len(ds.user_ids)}), flush=True)
'''

_PREPARE_CODE = _STEP_CODE + '''
import logging

T0 = time.perf_counter()

class Trace(logging.Handler):  # RSS and peak at every log line of prepare: where the memory goes
    def emit(self, record):
        print(json.dumps({"trace": [round(time.perf_counter() - T0, 1), round(_status("VmRSS") / 2**30, 3),
                                    round(_status("VmHWM") / 2**30, 3), record.getMessage()[:200]]}), flush=True)

logging.getLogger("nezha").addHandler(Trace())  # prepare's lines, not its libraries' (faiss's loader)
logging.getLogger("nezha").setLevel(logging.INFO)
from nezha.prepare import PrepareConfig, prepare

with step("prepare"):
    result = prepare(PrepareConfig(dataset=ARGS["data"], out=str(OUT / "prepared"), embeddings=ARGS["embeddings"],
                                   k_core=ARGS["k_core"], max_history=ARGS["max_history"]))
summary = result.summary
print(json.dumps({"timings": summary["timings"], "sizes": summary["split_sizes"], "users": summary["num_users"],
                  "items": summary["num_items"],
                  "raw_collision_rate": summary["semantic_ids"]["raw_collision_rate"]}), flush=True)
'''

_CONVERT_CODE = _STEP_CODE + '''
from nezha.data.datasets import load_dataset, write_dataset

with step("convert"):
    write_dataset(load_dataset(ARGS["data"]), OUT)
'''


MEASURES = ("steps", "prepare")


def parse_count(text: str) -> int:
    """`100k`, `10M`, `1.5M`, `2000` -> an int."""
    text = text.strip()
    try:
        if text and text[-1] in _SUFFIX:
            return int(float(text[:-1]) * _SUFFIX[text[-1]])
        return int(text)
    except ValueError:
        raise ConfigError(f"sizes: {text!r} is not a count like 100k, 10M or 2000") from None


@dataclass
class DataBenchConfig:
    """Time and peak RSS of prepare's data steps (read, filter, split, write) on synthetic sets."""

    sizes: list[str] = field(default_factory=lambda: ["1M:100k", "10M:1M", "100M:1M"], metadata={
        "help": "interactions:items per synthetic set, e.g. 1M:100k,10M:1M,100M:1M"})
    work_dir: str = field(default="/tmp/nezha-data-bench", metadata={"help": "synthetic sets and outputs"})
    json: str | None = field(default="docs/measurements/data-bench/data-bench.json", metadata={
        "help": "where to write the results (none: do not)"})
    k_core: int = field(default=2, metadata={"help": "the filter step's k (2: the full work, few rows removed)"})
    max_history: int = field(default=20, metadata={"help": "items of history per example"})
    seed: int = field(default=0, metadata={"help": "seed of the synthetic sets"})
    csv: bool = field(default=False, metadata={"help": "also measure today's code on the CSV form of the before_sizes sets"})
    before: str | None = field(default=None, metadata={
        "help": "a checkout of older code to measure on the CSV form (git worktree add /tmp/before 87ca025)"})
    before_sizes: list[str] = field(default_factory=lambda: ["1M:100k", "10M:1M"], metadata={
        "help": "the sizes measured with --before"})
    measure: list[str] = field(default_factory=lambda: ["steps"], metadata={
        "help": "steps: prepare's data steps one by one; prepare: the whole `nezha prepare --embeddings` in one "
                "child (random embeddings, embedding_dim wide); e.g. steps,prepare"})
    embedding_dim: int = field(default=384, metadata={"help": "--measure prepare: width of the embeddings"})
    memory_limit_gb: float = field(default=16.0, metadata={"help": "a child above this RSS is stopped"})
    timeout_s: int = field(default=3600, metadata={"help": "a child running longer is stopped"})

    def __post_init__(self) -> None:
        if not self.measure or set(self.measure) - set(MEASURES):
            raise ConfigError(f"measure: choose from {', '.join(MEASURES)}, got {self.measure}")
        if self.embedding_dim < 1:
            raise ConfigError(f"embedding_dim: must be >= 1, got {self.embedding_dim}")
        for size in [*self.sizes, *self.before_sizes]:
            if size.count(":") != 1:
                raise ConfigError(f"sizes: {size!r} is not interactions:items, e.g. 10M:1M")
            for part in size.split(":"):
                if parse_count(part) < 1:
                    raise ConfigError(f"sizes: {size!r} needs positive counts")
        if self.before is not None and not (Path(self.before) / "nezha" / "data" / "datasets.py").is_file():
            raise ConfigError(f"before: {self.before} is not a nezha checkout (git worktree add {self.before} COMMIT)")


def _run_child(code: str, args: dict[str, Any], cfg: DataBenchConfig) -> dict[str, Any]:
    """Run one measurement in a child process; its steps, its peak RSS as the parent saw it, the load."""
    load_before = os.getloadavg()
    started = time.perf_counter()
    err_path = Path(cfg.work_dir) / "child.err"  # a file, not a pipe: a chatty child must not block on it
    err_path.parent.mkdir(parents=True, exist_ok=True)
    with err_path.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(args)], stdout=subprocess.PIPE,
                                stderr=err, text=True)
    result: dict[str, Any] = {"steps": {}, "status": "ok"}
    current = {"step": None}
    seen = {"max_rss_gb": 0.0}
    timeline: list[list[float]] = []  # [seconds, highest RSS GB of each 5 s]
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.1):  # often: a small child must not finish between two looks
            try:
                with open(f"/proc/{proc.pid}/status") as f:
                    rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 2**20
            except (OSError, StopIteration):
                return
            seen["max_rss_gb"] = max(seen["max_rss_gb"], rss)
            bucket = 5 * int((time.perf_counter() - started) // 5)
            if timeline and timeline[-1][0] == bucket:
                timeline[-1][1] = max(timeline[-1][1], round(rss, 3))
            else:
                timeline.append([bucket, round(rss, 3)])
            if rss > cfg.memory_limit_gb:
                result["status"] = f"stopped: RSS above {cfg.memory_limit_gb} GB in step {current['step']}"
                proc.kill()
                return
            if time.perf_counter() - started > cfg.timeout_s:
                result["status"] = f"stopped: over {cfg.timeout_s} s in step {current['step']}"
                proc.kill()
                return

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    assert proc.stdout is not None
    for line in proc.stdout:
        record = json.loads(line)
        if "start" in record:
            current["step"] = record["start"]
            log.info("  %s ...", record["start"])
        elif "step" in record:
            result["steps"][record.pop("step")] = record
        elif "trace" in record:
            result.setdefault("trace", []).append(record["trace"])
        else:
            result.update(record)
    proc.wait()
    stderr = err_path.read_text()
    stop.set()
    watcher.join()
    if proc.returncode and result["status"] == "ok":
        last = stderr.strip().splitlines()[-1] if stderr.strip() else f"exit code {proc.returncode}"
        result["status"] = f"failed in step {current['step']}: {last}"
    result["wall_s"] = round(time.perf_counter() - started, 1)
    result["max_rss_gb_seen"] = round(seen["max_rss_gb"], 3)
    if "trace" in result:  # a whole prepare: how its memory went
        result["rss_timeline"] = timeline
    result["peak_rss_gb"] = max((s["peak_rss_gb"] for s in result["steps"].values()), default=None)
    result["load_average"] = {"before": [round(x, 2) for x in load_before],
                              "after": [round(x, 2) for x in os.getloadavg()]}
    return result


def _synthetic(cfg: DataBenchConfig, size: str) -> Path:
    interactions, items = (parse_count(p) for p in size.split(":"))
    path = Path(cfg.work_dir) / f"synth-{size.replace(':', '-')}-seed{cfg.seed}"
    stamp = path / "synth.json"
    synth = SynthConfig(out=str(path), items=items, interactions=interactions, seed=cfg.seed)
    if not (stamp.is_file() and json.loads(stamp.read_text()).get("config") == asdict(synth)):
        log.info("writing the synthetic set %s", path)
        stats = synthesize(synth)
        stamp.write_text(json.dumps({"config": asdict(synth), "stats": stats}))
    return path


def _embeddings_file(cfg: DataBenchConfig, size: str) -> Path:
    """Item-like random embeddings, one row per item (random, so the catalog's order does not matter), written
    in chunks to a .npy once per items x dim x seed: those of docs/measurements/rq-bench/compare_kmeans.py
    (100 topics > 5,000 sub-topics > items spread in a 48-d subspace, as text embeddings have a low
    intrinsic dimension, a little isotropic noise; L2-normalised), whose 1M x 384 RQ-KMeans gives ~6% raw
    collisions. Isotropic noise in all dimensions would instead leave almost every item colliding."""
    items = parse_count(size.split(":")[1])
    path = Path(cfg.work_dir) / f"emb-{items}x{cfg.embedding_dim}-seed{cfg.seed}.npy"
    if path.is_file():
        return path
    log.info("writing random embeddings %s", path)
    dim = cfg.embedding_dim
    rng = np.random.default_rng(cfg.seed)
    top = rng.standard_normal((100, dim), dtype=np.float32)
    sub = top[rng.integers(0, 100, 5000)] + 0.5 * rng.standard_normal((5000, dim), dtype=np.float32)
    basis = rng.standard_normal((48, dim), dtype=np.float32) / np.sqrt(48)
    tmp = path.with_suffix(".tmp.npy")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(items, dim))
    for start in range(0, items, 65536):
        rows = min(items, start + 65536) - start
        x = (sub[rng.integers(0, len(sub), rows)] + rng.standard_normal((rows, 48), dtype=np.float32) @ basis
             + 0.05 * rng.standard_normal((rows, dim), dtype=np.float32))
        out[start:start + rows] = x / np.linalg.norm(x, axis=1, keepdims=True)
    out.flush()
    del out
    tmp.replace(path)
    return path


def _csv_form(cfg: DataBenchConfig, data: Path) -> Path:
    path = data.with_name(data.name + "-csv")
    if not (path / "interactions.csv").is_file():
        log.info("writing its CSV form %s", path)
        result = _run_child(_CONVERT_CODE, {"root": str(REPO), "data": str(data), "out": str(path)}, cfg)
        if result["status"] != "ok":
            raise RuntimeError(f"converting {data} to CSV: {result['status']}")
    return path


def run_data_bench(cfg: DataBenchConfig) -> dict[str, Any]:
    runs = []
    common = {"k_core": cfg.k_core, "max_history": cfg.max_history}
    for size in cfg.sizes:
        data = _synthetic(cfg, size)
        out = Path(cfg.work_dir) / "out"
        plans = [("after", "parquet", data)] if "steps" in cfg.measure else []
        if size in cfg.before_sizes and (cfg.csv or cfg.before):
            csv = _csv_form(cfg, data)
            if cfg.csv:
                plans.append(("after", "csv", csv))
            if cfg.before:
                plans.append(("before", "csv", csv))
        for code, fmt, path in plans:
            log.info("%s: %s code on %s", size, code, fmt)
            root = cfg.before if code == "before" else str(REPO)
            result = _run_child(_BEFORE_CODE if code == "before" else _AFTER_CODE,
                                {"root": root, "data": str(path), "out": str(out), **common}, cfg)
            runs.append({"size": size, "code": code, "input": fmt, **result})
            log.info("%s", format_run(runs[-1]))
            shutil.rmtree(out, ignore_errors=True)
        if "prepare" in cfg.measure:
            log.info("%s: the whole prepare with --embeddings", size)
            result = _run_child(_PREPARE_CODE, {"root": str(REPO), "data": str(data), "out": str(out),
                                                "embeddings": str(_embeddings_file(cfg, size)), **common}, cfg)
            runs.append({"size": size, "code": "prepare", "input": "parquet+npy", **result})
            log.info("%s", format_run(runs[-1]))
            shutil.rmtree(out, ignore_errors=True)
    report = {"config": asdict(cfg), "machine": {"cpus": os.cpu_count(), "memory_gb": round(
        os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}, "runs": runs}
    if cfg.json:
        Path(cfg.json).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.json).write_text(json.dumps(report, indent=2))
    return report


_STEPS = ("items", "read", "filter", "group", "split", "write")


_PREPARE_STEPS = ("load", "embed", "kmeans", "collisions", "split", "write")


def format_run(run: dict[str, Any]) -> str:
    if run["code"] == "prepare":  # one child, prepare's own timings; the peak is the whole run's
        timings = run.get("timings", {})
        cells = [f"{name} {timings[name + '_s']:.1f} s" for name in _PREPARE_STEPS if name + "_s" in timings]
        peak = f"{run['peak_rss_gb']:.2f}" if run["peak_rss_gb"] is not None else "-"
        load = "/".join(f"{x:.1f}" for x in run["load_average"]["after"])
        return (f"{run['size']:>9} prepare {run['input']}: {', '.join(cells) or '-'}; total {run['wall_s']:.1f} s, "
                f"peak {peak} GB  load {load}  {run['status']}")
    cells = []
    for name in _STEPS:
        s = run["steps"].get(name)
        cells.append(f"{s['wall_s']:7.1f} s {s['peak_rss_gb']:5.2f} GB" if s else f"{'-':>18}")
    total = sum(s["wall_s"] for s in run["steps"].values())
    peak = f"{run['peak_rss_gb']:.2f}" if run["peak_rss_gb"] is not None else "-"
    load = "/".join(f"{x:.1f}" for x in run["load_average"]["after"])
    return (f"{run['size']:>9} {run['code']:>6} {run['input']:>7} " + " ".join(cells)
            + f" {total:7.1f} s {peak:>5} GB  load {load}  {run['status']}")


def format_data_table(report: dict[str, Any]) -> str:
    header = (f"{'size':>9} {'code':>6} {'input':>7} " + " ".join(f"{n:>18}" for n in _STEPS)
              + f" {'total':>9} {'peak':>8}  load (1/5/15 min)  status")
    return "\n".join([header, *(format_run(r) for r in report["runs"])])
