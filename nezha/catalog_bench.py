"""What the PrefixVerifier costs as the catalog grows (`nezha bench catalog`).

For each ID shape and catalog size, a synthetic catalog (distinct random packed IDs, shuffled) and
  build     the constructor's wall time, and memory: RSS growth after it, its peak (sampled every 5 ms)
            while building and while changing, plus the verifier's own account (`nbytes()`, where it has one);
  change    one `update(add=[new], remove=[old])`, no snapshot held: p50/p99 over `reps`;
  served    the same followed by `snapshot()`, the previous snapshot dropped (what `LocalCatalog.apply`
            does for every change: its views pin snapshots);
  pinned    the same while the previous two snapshots are still held (a decode in flight on an old view);
  batch     one `update` of `batch` changes (half adds of new IDs, half removals);
  snapshot  `snapshot()` alone.
Every change adds IDs not in the catalog and removes IDs in it, so the catalog keeps its size. Each
measurement stops after `budget_s` seconds (with at least 3 repeats), so a slow verifier still finishes.
On CPU each (shape, size) runs in a forked process: memory freed by the previous one would otherwise be
reused and hide RSS growth.
"""

from __future__ import annotations

import gc
import json
import math
import multiprocessing
import os
import platform
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nezha.config import ConfigError
from nezha.device import cpu_model, device_name, resolve_device
from nezha.live_catalog_bench import bench_size as bench_redis_size
from nezha.live_catalog_bench import check_decode_busy, pin_split
from nezha.timing import latency_stats, synchronize
from nezha.verify import PrefixVerifier
from nezha.verify.codec import random_packed_ids

MIN_REPS = 3
# nbytes() keys that grow with the catalog, and those sized by the prefix spaces.
PER_ITEM = ("ids", "sparse_counts", "sorted_tables")
PER_SPACE = ("dense_counts", "dense_tables", "spare_tables")


@dataclass
class CatalogBenchConfig:
    """Verifier build, change and snapshot cost against catalog size, on synthetic catalogs."""

    sizes: list[int] = field(default_factory=lambda: [100_000, 1_000_000, 10_000_000],
                             metadata={"help": "catalog sizes (items), comma list"})
    shapes: list[str] = field(default_factory=lambda: ["256x256x256", "256x256x256x256"],
                              metadata={"help": "codebook sizes per level, e.g. 256x256x256; comma list"})
    reps: int = field(default=200, metadata={"help": "timed single changes (and snapshots) per measurement"})
    batch: int = field(default=1000, metadata={"help": "changes in one batched update"})
    batch_reps: int = field(default=20, metadata={"help": "timed batched updates"})
    sustained: int = field(default=200_000, metadata={
        "help": "changes of fresh IDs applied in batches of `batch`, to time the amortised cost of a change "
                "(the verifier merges its pending changes every 65,536 IDs; 0: not measured)"})
    budget_s: float = field(default=60.0, metadata={"help": "stop a measurement after this many seconds"})
    device: str = "cpu"
    isolate: bool = field(default=True, metadata={"help": "each shape and size in a forked process (CPU only)"})
    threads: int = field(default=1, metadata={"help": "torch CPU threads (a serving replica's default is 1; 0: torch's)"})
    seed: int = 0
    redis: bool = field(default=False, metadata={"help": "also measure Redis and a replica per size (first shape): "
                                                          "push, longest Redis block, cold start, RSS, apply lag"})
    rate: int = field(default=1000, metadata={"help": "with redis: catalog changes per second streamed"})
    stream_s: float = field(default=30.0, metadata={"help": "with redis: seconds of streamed changes"})
    decode_backbone: str = field(default="", metadata={
        "help": "with redis: time NEZHA decodes (batch 1 and 32) in the replica, idle and during the stream, "
                "with this random-init preset (e.g. small; empty: not timed)"})
    pin_replica: bool = field(default=False, metadata={
        "help": "with redis: the replica process alone on the last CPU, Redis and the writer on the others (as on "
                "separate machines)"})
    decode_busy: float = field(default=1.0, metadata={
        "help": "with redis and decode_backbone: the decode thread's share of busy time (1: back to back, a saturated "
                "replica; 0.7: idle time left for the replica's background work)"})
    json: str | None = field(default=None, metadata={"help": "write the report here"})

    def __post_init__(self) -> None:
        if not self.sizes or min(self.sizes) < 1 or min(self.reps, self.batch, self.batch_reps) < 1:
            raise ConfigError("sizes, reps, batch, batch_reps: need positive values")
        if self.sustained < 0:
            raise ConfigError(f"sustained: must be >= 0, got {self.sustained}")
        for shape in self.shapes:
            parse_shape(shape)
        try:
            check_decode_busy(self.decode_busy)
        except ValueError as exc:
            raise ConfigError(f"decode_busy: {exc}") from None
        if self.pin_replica and not self.redis:
            raise ConfigError("pin_replica: pins the Redis run's processes; add --redis true")
        if self.pin_replica:
            try:
                pin_split()
            except ValueError as exc:
                raise ConfigError(f"pin_replica: {exc}") from None


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(s) for s in text.lower().split("x"))
    except ValueError:
        raise ConfigError(f"shapes: expected codebook sizes like 256x256x256, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise ConfigError(f"shapes: codebook sizes must be positive, got {text!r}")
    return sizes


def _rss_bytes() -> int | None:
    """Resident memory of this process (Linux), None where /proc is not there."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class _PeakRss:
    """The highest RSS seen while the block runs, sampled from a thread every 5 ms."""

    def __init__(self) -> None:
        self.peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            rss = _rss_bytes()
            if rss is not None and self.peak is not None:
                self.peak = max(self.peak, rss)

    def __enter__(self) -> _PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _load() -> float:
    return os.getloadavg()[0]


def _timed(step: Callable[[int], None], reps: int, budget_s: float, device: torch.device) -> dict[str, float]:
    """Latency stats (ms) of step(0), step(1), ...: `reps` calls, or fewer once `budget_s` is spent."""
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    for rep in range(reps):
        synchronize(device)
        start = time.perf_counter()
        step(rep)
        synchronize(device)
        times.append((time.perf_counter() - start) * 1000.0)
        if rep + 1 >= MIN_REPS and time.perf_counter() > deadline:
            break
    return latency_stats(times)


def _absent_ids(packed: np.ndarray, space: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` distinct IDs in 0..space-1 that are not in `packed`."""
    found = np.empty(0, dtype=np.int64)
    in_catalog = np.sort(packed)
    while found.size < count:
        draw = rng.integers(0, space, size=2 * count, dtype=np.int64)
        at = np.minimum(np.searchsorted(in_catalog, draw), in_catalog.size - 1)
        found = np.unique(np.concatenate([found, draw[in_catalog[at] != draw]]))
    return rng.permutation(found)[:count]


def _forked(fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """fn(*args) in a forked child process (its memory starts as this one's); its exception is raised here."""
    ctx = multiprocessing.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)

    def child() -> None:
        try:
            send.send((True, fn(*args)))
        except BaseException as exc:  # whatever failed is raised again in the parent
            send.send((False, exc))

    process = ctx.Process(target=child)
    process.start()
    try:
        ok, value = receive.recv()
    except EOFError:
        ok, value = False, None
    process.join()
    if value is None:
        raise RuntimeError(f"the benchmark process died (exit code {process.exitcode})")
    if not ok:
        raise value
    return value


class _Churn:
    """Changes that keep the catalog's size: each adds an ID not in it and removes one in it. Two pools of
    the same size hold such IDs; a change swaps what it took between them, so every change is a real one."""

    def __init__(self, packed: np.ndarray, space: int, pool: int, rng: np.random.Generator) -> None:
        pool = min(pool, space - packed.size, packed.size)
        self.absent = _absent_ids(packed, space, pool, rng)
        self.present = rng.choice(packed, size=pool, replace=False)
        self.cursor = 0

    def take(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(IDs to add, IDs to remove), `count` of each (at most the pool size)."""
        at = (self.cursor + np.arange(min(count, self.present.size))) % self.present.size
        self.cursor += at.size
        add, remove = self.absent[at], self.present[at]
        self.absent[at], self.present[at] = remove, add
        return add, remove


def bench_one(verifier_cls: Callable[..., Any], sizes: Sequence[int], items: int, reps: int, batch: int,
              batch_reps: int, budget_s: float, device: torch.device, rng: np.random.Generator,
              sustained: int = 0) -> dict[str, Any]:
    """Every measurement for one shape and catalog size."""
    space = math.prod(sizes)
    load_start = _load()
    packed = rng.permutation(random_packed_ids(items, sizes, rng))  # real catalogs arrive unsorted
    churn = _Churn(packed, space, 2 * max(reps, batch), rng)
    gc.collect()
    rss_before = _rss_bytes()
    with _PeakRss() as peak:
        start = time.perf_counter()
        verifier = verifier_cls(packed, sizes, device=device)
        synchronize(device)
        build_s = time.perf_counter() - start
    gc.collect()
    rss_after = _rss_bytes()
    row: dict[str, Any] = {"shape": list(sizes), "items": items, "build_s": build_s,
                           "verifier": f"{verifier_cls.__module__}.{verifier_cls.__qualname__}"}
    if rss_before is not None and rss_after is not None and peak.peak is not None:
        row["rss_growth_bytes_per_item"] = (rss_after - rss_before) / items
        row["rss_peak_growth_bytes_per_item"] = (peak.peak - rss_before) / items
    if hasattr(verifier, "nbytes"):
        nbytes = verifier.nbytes()
        row["nbytes"] = nbytes
        row["per_item_bytes_per_item"] = sum(nbytes[k] for k in PER_ITEM) / items
        row["per_space_bytes"] = sum(nbytes[k] for k in PER_SPACE)

    held: list[Any] = []
    half = min(max(1, batch // 2), churn.present.size)

    def change(_rep: int) -> None:
        add, remove = churn.take(1)
        verifier.update(add=add, remove=remove)

    def served(_rep: int) -> None:
        change(_rep)
        held[:] = [verifier.snapshot()]  # the new view replaces the old one

    def pinned(_rep: int) -> None:
        change(_rep)
        held[:] = [*held[-1:], verifier.snapshot()]  # the view before the last is still decoding

    def batched(_rep: int) -> None:
        add, remove = churn.take(half)
        verifier.update(add=add, remove=remove)

    with _PeakRss() as changing:
        row["change_ms"] = _timed(change, reps, budget_s, device)
        held[:] = [verifier.snapshot()]
        row["served_ms"] = _timed(served, reps, budget_s, device)
        held[:] = [verifier.snapshot()]
        row["pinned_ms"] = _timed(pinned, reps, budget_s, device)
        held.clear()
        row["batch"] = 2 * half
        row["batch_ms"] = _timed(batched, batch_reps, budget_s, device)
    if rss_before is not None and changing.peak is not None:
        row["rss_peak_changing_bytes_per_item"] = (changing.peak - rss_before) / items
    row["snapshot_ms"] = _timed(lambda _rep: held.append(verifier.snapshot()), reps, budget_s, device)
    held.clear()
    if sustained:
        row["sustained"] = _sustained(verifier, packed, space, sustained, half, budget_s, device, rng)
    row["load_average_1m"] = {"start": load_start, "end": _load()}
    return row


def _sustained(verifier: Any, packed: np.ndarray, space: int, changes: int, half: int, budget_s: float,
               device: torch.device, rng: np.random.Generator) -> dict[str, Any]:
    """Catalog churn as it comes (new listings in, other items out, no ID twice) in batches of 2 x `half`
    changes: per-change cost amortised over every batch, the occasional merge of pending changes included."""
    fresh = _Churn(packed, space, changes // 2, rng)  # the pools are never cycled: every ID is new to the verifier
    batches = max(1, fresh.present.size // half)

    def batched(_rep: int) -> None:
        add, remove = fresh.take(half)
        verifier.update(add=add, remove=remove)

    stats = _timed(batched, batches, budget_s, device)
    return {"changes": 2 * half * stats["n"], "batch": 2 * half, "batch_ms": stats,
            "amortised_change_us": stats["mean"] * 1000.0 / (2 * half)}


def run_catalog_bench(sizes: Sequence[int] = (100_000, 1_000_000, 10_000_000),
                      shapes: Sequence[Sequence[int]] = ((256, 256, 256), (256, 256, 256, 256)),
                      reps: int = 200, batch: int = 1000, batch_reps: int = 20, budget_s: float = 60.0,
                      device: str = "cpu", isolate: bool = True, threads: int = 1, seed: int = 0,
                      sustained: int = 0,
                      json_path: str | None = None,
                      verifier_cls: Callable[..., Any] = PrefixVerifier) -> dict[str, Any]:
    """Build, change, batch and snapshot costs per (shape, size); `verifier_cls` lets the same bench time
    another implementation with PrefixVerifier's constructor, `update` and `snapshot`."""
    for shape in shapes:
        space = math.prod(shape)
        if max(sizes) >= space:
            raise ConfigError(f"{max(sizes)} items leave no free ID in {'x'.join(map(str, shape))} "
                              f"(need fewer than {space})")
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run(sizes, shapes, reps, batch, batch_reps, budget_s, resolve_device(device), isolate, seed,
                    json_path, verifier_cls, sustained)
    finally:
        torch.set_num_threads(before)  # a process-wide setting: leave the caller's as it was


def _run(sizes: Sequence[int], shapes: Sequence[Sequence[int]], reps: int, batch: int, batch_reps: int,
         budget_s: float, dev: torch.device, isolate: bool, seed: int, json_path: str | None,
         verifier_cls: Callable[..., Any], sustained: int) -> dict[str, Any]:
    report: dict[str, Any] = {
        "device": device_name(dev),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "host": {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        # The machine may be shared: the 1-minute load average says how busy it was around each row.
        "load_average_1m": {"start": _load()},
        "config": {"sizes": list(sizes), "shapes": [list(s) for s in shapes], "reps": reps, "batch": batch,
                   "batch_reps": batch_reps, "sustained": sustained, "budget_s": budget_s, "device": str(dev), "seed": seed,
                   "isolated": isolate and dev.type == "cpu"},
        "results": [],
    }
    run = _forked if report["config"]["isolated"] else lambda fn, *args: fn(*args)  # no fork under CUDA
    for i, shape in enumerate(shapes):
        for j, items in enumerate(sizes):
            rng = np.random.default_rng([seed, i, j])  # the same catalog whichever rows run
            report["results"].append(run(bench_one, verifier_cls, tuple(shape), items, reps, batch, batch_reps,
                                         budget_s, dev, rng, sustained))
    report["load_average_1m"]["end"] = _load()
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(report, indent=2))
    return report


def bench_catalog(cfg: CatalogBenchConfig) -> dict[str, Any]:
    """`run_catalog_bench` from a config (the CLI's entry)."""
    values = asdict(cfg)
    for key in ("redis", "rate", "stream_s", "decode_backbone", "pin_replica", "decode_busy"):
        values.pop(key)
    values["shapes"] = [parse_shape(s) for s in cfg.shapes]
    values["json_path"] = values.pop("json")
    report = run_catalog_bench(**values)
    if cfg.redis:  # a real redis-server on a free port and a replica process per size (nezha.live_catalog_bench)
        report["redis"] = [bench_redis_size(n, values["shapes"][0], cfg.rate, cfg.stream_s, cfg.decode_backbone,
                                            pin_replica=cfg.pin_replica, decode_busy=cfg.decode_busy)
                          for n in cfg.sizes]
        if cfg.json:
            Path(cfg.json).write_text(json.dumps(report, indent=2) + "\n")
    return report


def format_catalog_table(report: dict[str, Any]) -> str:
    """One row per (shape, size): build, memory and p50/p99 of each kind of change."""
    load = report["load_average_1m"]
    lines = [f"device {report['device']}, {report['host']['cpu_count']} cores, load average "
             f"{load['start']:.1f} -> {load.get('end', float('nan')):.1f}",
             f"{'shape':<16}{'items':>11}{'build s':>9}{'RSS B/it':>9}{'build pk':>9}{'chg pk':>8}{'own B/it':>9}"
             f"{'space MB':>9}{'change ms':>14}{'served ms':>14}{'pinned ms':>14}{'batch ms':>14}"
             f"{'snap us':>9}{'amort us':>9}{'load':>11}"]

    def ms(value: float) -> str:
        return f"{value:.3g}" if value < 1000 else f"{value:.0f}"

    def pair(stats: dict[str, float]) -> str:
        return f"{ms(stats['p50'])}/{ms(stats['p99'])}"

    for row in report["results"]:
        shape = "x".join(map(str, row["shape"]))
        own = row.get("per_item_bytes_per_item")
        space = row.get("per_space_bytes")
        lines.append(
            f"{shape:<16}{row['items']:>11,}{row['build_s']:>9.2f}{row.get('rss_growth_bytes_per_item', 0):>9.0f}"
            f"{row.get('rss_peak_growth_bytes_per_item', 0):>9.0f}{row.get('rss_peak_changing_bytes_per_item', 0):>8.0f}"
            f"{'-' if own is None else f'{own:.1f}':>9}"
            f"{'-' if space is None else f'{space / 2**20:.1f}':>9}{pair(row['change_ms']):>14}"
            f"{pair(row['served_ms']):>14}{pair(row['pinned_ms']):>14}{pair(row['batch_ms']):>14}"
            f"{row['snapshot_ms']['p50'] * 1000:>9.1f}"
            f"{row['sustained']['amortised_change_us'] if 'sustained' in row else float('nan'):>9.1f}  "
            f"{row['load_average_1m']['start']:>5.1f}->{row['load_average_1m']['end']:.1f}")
    lines.append(f"ms columns: p50/p99; batch: one update of {report['config']['batch']} changes; B/it: bytes "
                 "per item (RSS growth after the build, its peak while building / changing; own: nbytes()); "
                 f"amort: per change over {report['config'].get('sustained', 0):,} changes of fresh IDs in batches, "
                 "merges included")
    for row in report.get("redis", []):
        lines.append(f"redis {row['shape']} {row['items']:,} items: " + json.dumps(
            {k: v for k, v in row.items() if k not in ("items", "shape")}, default=str))
    return "\n".join(lines)
