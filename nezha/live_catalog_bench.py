"""The live catalog against a real redis-server at catalog sizes of millions (the Redis/replica rows of
`nezha bench catalog`; the verifier rows are nezha/catalog_bench.py).

For each size, on a fresh redis-server (no persistence, a free loopback port) and a synthetic catalog
(random unique packed IDs, 10-character item ids, titles of ~80 characters):
  push        `RedisCatalog.push` wall time; the longest command in SLOWLOG, and the longest PING seen by
              a separate process pinging every 2 ms while it ran (what other clients wait);
  replica     a new process that starts a LocalCatalog from Redis alone (CatalogFollower.sync_once): time to
              ready and its RSS growth;
  stream      `stream_rate` changes per second for `stream_s` seconds (an add of a new item and a removal of
              an old one, alternately) while the replica follows: apply lag = when the replica's copy reached
              the version - when the writer had its answer, p50/p99 (one clock: same machine), and resyncs;
  add_by_text `add_new_items` of one item by text (its nearest free ID), a random quantizer.
  decode      with --decode-backbone (a random-init preset): in the replica process, NEZHA decodes of
              random histories at batch 1 and 32 (beam 10, one torch thread, the replica's current view)
              timed while the follower is idle and again while the stream lands: p50/p99 of each. Like a
              serving replica, the process first freezes its heap out of the cyclic GC (freeze_heap;
              --no-gc-freeze: not, as before that existed). Back to back by default (a saturated replica,
              no idle time for its background work); --decode-busy 0.7 pauses 3/7 of each decode's length
              after it. The replica reports the version of its last maps merge and of the blob it published.
With --local-only, no Redis: a replica's copy built from the arrays a snapshot yields (ItemTable) and
changed through LocalCatalog.apply, in this process: build time, RSS growth, bytes per item of the maps
and of the verifier's valid-ID set, and one change / a batch of 1,000 changes applied (p50/p99), then
--rate changes/s applied as the follower does, a batch every 0.1 s, for --seconds: apply time and lag
(due -> applied) p50/p99/max. This needs a checkout with ItemTable (it measures where Redis at that size
does not fit the machine).

Run with `python -m nezha.live_catalog_bench --sizes 100000,1000000 --json out.json`. It uses only the
API that older versions also had, so the same file measures an older checkout on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

import numpy as np
import redis

from nezha.live_catalog import (
    DEFAULT_FEED_MAXLEN,
    CatalogFollower,
    LocalCatalog,
    NewItem,
    RedisCatalog,
    add_new_items,
)
from nezha.semantic_ids.quantizer import ResidualQuantizer

log = logging.getLogger(__name__)

_WORDS = ("hydrating", "gentle", "daily", "organic", "repair", "volume", "matte", "silk", "argan", "vitamin",
          "charcoal", "rose", "citrus", "mineral", "night", "travel", "sensitive", "glow", "clarifying", "shea")


class _Titles(Sequence[str]):
    """Titles of ~80 characters made on demand (10M stored strings would cost the bench gigabytes)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    @overload
    def __getitem__(self, i: int) -> str: ...

    @overload
    def __getitem__(self, i: slice) -> list[str]: ...

    def __getitem__(self, i: int | slice) -> str | list[str]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.n))]
        w = _WORDS
        return (f"Acme {w[i % 20]} {w[i // 20 % 20]} cream with {w[i // 400 % 20]} extract, "
                f"{50 + i % 450} ml, pack of {1 + i % 6}")

    def __iter__(self) -> Iterator[str]:
        return (self[i] for i in range(self.n))


@dataclass
class SyntheticCatalog:
    """What `RedisCatalog.push` reads of a Catalog, without Catalog's validation (a dict of every item id)."""

    item_ids: list[str]
    packed: np.ndarray
    codebook_sizes: tuple[int, ...]
    titles: Sequence[str]

    @property
    def num_items(self) -> int:
        return len(self.item_ids)


def synthetic_catalog(n: int, sizes: Sequence[int], seed: int = 0) -> SyntheticCatalog:
    rng = np.random.default_rng(seed)
    space = int(np.prod(sizes))
    packed = rng.choice(space, size=n, replace=False) if n * 4 > space else \
        np.unique(rng.integers(0, space, size=int(n * 1.2)))[:n]
    rng.shuffle(packed)
    return SyntheticCatalog([f"B{i:09d}" for i in range(n)], packed.astype(np.int64), tuple(sizes), _Titles(n))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_redis(directory: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    proc = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind",
                             "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(directory)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    for _ in range(200):
        try:
            client.ping()
            return proc, f"redis://127.0.0.1:{port}/0"
        except redis.ConnectionError:
            time.sleep(0.05)
    raise RuntimeError("redis-server did not start")


def _ping_probe(url: str, started: Any, stop: Any, result: Any) -> None:
    """In its own process: PING every 2 ms until `stop`; the longest answer and how many took > 50 ms."""
    client = redis.Redis.from_url(url, socket_timeout=120)
    longest, slow, count = 0.0, 0, 0
    started.set()
    while not stop.is_set():
        start = time.perf_counter()
        client.ping()
        took = time.perf_counter() - start
        longest, slow, count = max(longest, took), slow + (took > 0.05), count + 1
        time.sleep(0.002)
    result.put({"longest_ping_ms": round(longest * 1e3, 1), "pings_over_50ms": slow, "pings": count})


def _pct(values: Sequence[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)) * 1e3, 1) if len(values) else None


def bench_push(url: str, catalog: SyntheticCatalog, feed_maxlen: int = DEFAULT_FEED_MAXLEN) -> dict[str, Any]:
    admin = redis.Redis.from_url(url, decode_responses=True)
    admin.config_set("slowlog-log-slower-than", 1000)
    admin.config_set("slowlog-max-len", 100_000)
    admin.slowlog_reset()
    ctx = multiprocessing.get_context("spawn")
    started, stop, result = ctx.Event(), ctx.Event(), ctx.Queue()
    probe = ctx.Process(target=_ping_probe, args=(url, started, stop, result))
    probe.start()
    started.wait(timeout=120)
    store = RedisCatalog(url, feed_maxlen=feed_maxlen, socket_timeout=600)
    start = time.perf_counter()
    store.push(catalog, source="bench")  # type: ignore[arg-type]
    push_s = time.perf_counter() - start
    stop.set()
    pings = result.get(timeout=30)
    probe.join()
    slow = admin.slowlog_get(100_000)
    worst = max(slow, key=lambda e: e["duration"], default=None)
    store.close()
    return {"push_s": round(push_s, 2), "slowlog_longest_ms": round(worst["duration"] / 1e3, 1) if worst else 0.0,
            "slowlog_longest_command": (worst["command"][:60] if isinstance(worst["command"], str)
                                        else str(worst["command"])[:60]) if worst else None,
            "slowlog_over_1ms": len(slow), "slowlog_over_50ms": sum(e["duration"] > 50_000 for e in slow),
            "slowlog_p99_ms": round(float(np.percentile([e["duration"] for e in slow], 99)) / 1e3, 1) if slow else 0.0,
            **pings,
            "redis_used_memory_mb": round(admin.info("memory")["used_memory"] / 2**20)}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def check_decode_busy(busy: float) -> float:
    """`busy` as a decode thread's share of busy time; ValueError unless in (0, 1]."""
    if not 0 < busy <= 1:
        raise ValueError(f"a share in (0, 1], got {busy}")
    return busy


class _Decodes:
    """NEZHA decodes against a replica's current catalog view, as a serving replica runs them (one thread).
    `busy`: the share of the time spent decoding (1.0: back to back, a saturated replica; 0.7: each decode
    followed by a pause of 3/7 of its length, a replica with idle time for its background work)."""

    batches = (1, 32)

    def __init__(self, backbone: str, sizes: Sequence[int], local: LocalCatalog, beam: int = 10,
                 busy: float = 1.0) -> None:
        import torch

        from nezha.model.checkpoint import create_model
        from nezha.model.model import ModelConfig

        torch.set_num_threads(1)
        self.model = create_model(ModelConfig(backbone=backbone, codebook_sizes=list(sizes),
                                              objectives=["nezha", "lm", "mtp"]), seed=0).eval()
        self.local, self.beam, self.busy = local, beam, busy
        self.rng = np.random.default_rng(3)
        self.known = local.view().items.packed_ids()  # history items (a later removal does not matter)
        self.times: dict[int, list[float]] = {b: [] for b in self.batches}
        for batch in self.batches:  # warm-up: first-call allocations
            self.one(batch)

    def one(self, batch: int) -> None:
        import torch

        from nezha.decoding import decode

        view = self.local.view()
        histories = [self.local.codes(self.rng.choice(self.known, size=20)) for _ in range(batch)]
        start = time.perf_counter()
        with torch.inference_mode():
            decode(self.model, "nezha", histories, view.verifier, beam=self.beam)
        took = time.perf_counter() - start
        self.times[batch].append(took)
        if self.busy < 1:
            time.sleep(took * (1 - self.busy) / self.busy)

    def run(self, until: threading.Event | None = None, least: int = 20) -> dict[str, Any]:
        """Alternate batch sizes until `until` is set (None: at once) and at least `least` of each; p50/p99 (ms)
        per batch."""
        self.times = {b: [] for b in self.batches}
        while (until is not None and not until.is_set()) or min(len(t) for t in self.times.values()) < least:
            for batch in self.batches:
                self.one(batch)
        return {f"batch{b}": {"p50_ms": _pct(t, 50), "p99_ms": _pct(t, 99), "n": len(t)} for b, t in self.times.items()}


def _freeze_heap() -> None:
    try:  # older checkouts this file also measures have no freeze_heap
        from nezha.live_catalog import freeze_heap
    except ImportError:
        log.warning("this checkout has no freeze_heap: the heap is not frozen")
        return
    freeze_heap()


def replica_main(url: str, sizes: Sequence[int], decode_backbone: str = "", gc_freeze: bool = True,
                 cpus: Sequence[int] = (), feed_maxlen: int = DEFAULT_FEED_MAXLEN, decode_busy: float = 1.0) -> None:
    """A replica process: ready from Redis alone, then follow; prints JSON lines (ready, then applied times).
    With `decode_backbone`, also times decodes idle (before reading the stream's target) and during the stream.
    `gc_freeze`: freeze the heap once loaded (after the decoder's warm-up), as serve/replica.py does. `cpus`:
    run on these CPUs only (set before any thread starts, so every thread keeps them). `decode_busy`: the
    decode thread's share of busy time (`_Decodes`)."""
    if cpus:
        os.sched_setaffinity(0, set(cpus))
    # the follower's lines (resyncs, snapshot blobs published) on this process's stderr, the bench's log
    logging.basicConfig(level=logging.INFO, format="%(asctime)s replica %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    baseline = _rss_mb()
    applied: list[tuple[int, float]] = []
    start = time.perf_counter()
    local = LocalCatalog({}, sizes)
    follower = CatalogFollower(RedisCatalog(url, feed_maxlen=feed_maxlen, socket_timeout=60), local, block_ms=200)
    follower.sync_once()
    ready_s = time.perf_counter() - start
    apply, replace = local.apply, local.replace

    def timed_apply(entries: Any) -> None:
        apply(entries)
        if entries:
            applied.append((entries[-1].version, time.time()))

    def timed_replace(*args: Any, **kwargs: Any) -> None:
        replace(*args, **kwargs)
        applied.append((local.version, time.time()))

    local.apply, local.replace = timed_apply, timed_replace  # type: ignore[method-assign]
    print(json.dumps({"ready_s": round(ready_s, 2), "items": len(local), "version": local.version,
                      "rss_growth_mb": round(_rss_mb() - baseline), "rss_mb": round(_rss_mb()),
                      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                      "replica_ran_on_cpus": sorted(os.sched_getaffinity(0))}), flush=True)
    follower.start()
    decodes: dict[str, Any] = {}
    if decode_backbone:
        decoder = _Decodes(decode_backbone, sizes, local, busy=decode_busy)
    if gc_freeze:
        _freeze_heap()
    if decode_backbone:
        decodes["decode_idle"] = decoder.run(least=100)  # a p99 needs more than 20
        print(json.dumps(decodes), flush=True)  # the stream starts once the idle figures are in
        done = threading.Event()
        streaming = threading.Thread(target=lambda: decodes.update(decode_streaming=decoder.run(done)))
        streaming.start()
    target = int(sys.stdin.readline())  # the last version written: follow until it is applied (or 120 s)
    if decode_backbone:
        done.set()
        streaming.join()
    local.wait_for(target, timeout=120)
    follower.stop()
    merged = local.merged() if hasattr(local, "merged") else None  # older checkouts keep no merged table
    print(json.dumps({"applied": applied, "resyncs": follower.health.resyncs, **decodes,
                      "last_merge_version": merged[0] if merged else None,
                      "blob_version": follower._blob_version}), flush=True)


def bench_stream(url: str, catalog: SyntheticCatalog, rate: int, seconds: float,
                 decode_backbone: str = "", gc_freeze: bool = True, replica_cpus: Sequence[int] = (),
                 feed_maxlen: int = DEFAULT_FEED_MAXLEN, decode_busy: float = 1.0) -> dict[str, Any]:
    replica = subprocess.Popen([sys.executable, "-c", "import sys, json; from nezha.live_catalog_bench import "
                                "replica_main; replica_main(sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], "
                                "sys.argv[4] == '1', json.loads(sys.argv[5]), int(sys.argv[6]), float(sys.argv[7]))",
                                url, json.dumps(list(catalog.codebook_sizes)), decode_backbone,
                                "1" if gc_freeze else "0", json.dumps(list(replica_cpus)), str(feed_maxlen),
                                str(decode_busy)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=os.environ.copy())
    assert replica.stdin is not None and replica.stdout is not None
    ready = json.loads(replica.stdout.readline())
    if decode_backbone:
        ready.update(json.loads(replica.stdout.readline()))  # idle decode figures
    store = RedisCatalog(url, feed_maxlen=feed_maxlen, socket_timeout=60)
    rng = np.random.default_rng(1)
    space = int(np.prod(catalog.codebook_sizes))
    wanted = int((rate * seconds + 1000) / max(1 - catalog.num_items / space, 0.05) * 1.5)  # enough free IDs
    candidates = rng.permutation(space)[:wanted]
    free = iter(candidates[~np.isin(candidates, catalog.packed)].tolist())
    answered: list[tuple[int, float]] = []
    start = time.perf_counter()
    n = 0
    while (now := time.perf_counter() - start) < seconds:
        if now < n / rate:
            time.sleep(n / rate - now)
        if n % 2 == 0:
            version = store.add([(f"NEW{n:09d}", next(free))])
        else:
            version = store.remove([catalog.item_ids[n // 2]])
        answered.append((version, time.time()))
        n += 1
    achieved = n / (time.perf_counter() - start)
    replica.stdin.write(f"{answered[-1][0]}\n")
    replica.stdin.flush()
    record = json.loads(replica.stdout.readline())
    replica.wait(timeout=30)
    feed_mb = store.client.memory_usage(store.feed, samples=0) / 2**20  # what the feed's cap costs Redis
    store.close()
    applied = sorted(record["applied"])
    versions = np.array([v for v, _ in applied])
    times = np.array([t for _, t in applied])
    lags = []
    for version, t in answered:
        at = int(np.searchsorted(versions, version))
        if at < versions.size:
            lags.append(times[at] - t)
    return {**ready, "changes": n, "changes_per_s": round(achieved), "lag_p50_ms": _pct(lags, 50),
            "lag_p99_ms": _pct(lags, 99), "lag_max_ms": _pct(lags, 100), "unapplied": n - len(lags),
            "resyncs_during_stream": record["resyncs"] - 1, "feed_entries_mb": round(feed_mb, 1),
            "replica_last_merge_version": record.get("last_merge_version"),
            "replica_blob_version": record.get("blob_version"),
            **({"decode_streaming": record["decode_streaming"]} if "decode_streaming" in record else {})}


def bench_add_by_text(url: str, sizes: Sequence[int], reps: int = 3) -> dict[str, Any]:
    quantizer = ResidualQuantizer(levels=len(sizes), codebook_size=list(sizes))
    rng = np.random.default_rng(2)
    quantizer.centroids = [rng.normal(size=(s, 32)).astype(np.float32) for s in sizes]
    store = RedisCatalog(url, socket_timeout=60)
    times = []
    for rep in range(reps):
        x = rng.normal(size=(1, 32)).astype(np.float32)
        start = time.perf_counter()
        add_new_items(store, [NewItem(f"TEXT-{rep}", text="a new cream")], sizes, lambda: quantizer,
                      lambda texts, x=x: x)
        times.append(time.perf_counter() - start)
    store.close()
    return {"add_by_text_ms": round(float(np.median(times)) * 1e3, 1)}


class SyntheticChanges:
    """Feed entries for a synthetic catalog whose first `n` of `packed` are items B000000000, B000000001, ...:
    alternately an add of the next unused ID (item N<version>) and a removal of the next original item,
    versions counted from 1. `changes(count)` gives the next `count` entries."""

    def __init__(self, packed: np.ndarray, n: int) -> None:
        self.packed, self.fresh = packed, iter(packed[n:].tolist())
        self.version = self.gone = 0

    def __call__(self, count: int) -> list[Any]:
        from nezha.live_catalog import FeedEntry

        entries = []
        for j in range(count):
            self.version += 1
            if j % 2 == 0:
                entries.append(FeedEntry(self.version, "add", [(f"N{self.version:09d}", next(self.fresh))]))
            else:
                entries.append(FeedEntry(self.version, "remove", [(f"B{self.gone:09d}", int(self.packed[self.gone]))]))
                self.gone += 1
        return entries


def bench_local_copy(n: int, sizes: Sequence[int], reps: int = 200, rate: int = 0,
                     seconds: float = 0.0, decode_backbone: str = "", gc_freeze: bool = True) -> dict[str, Any]:
    """The replica's copy alone: build, memory, one change and 1,000 at once; with `rate` and `seconds`, also
    `rate` changes/s applied as a follower does (a batch every 0.1 s) for `seconds`: each batch's apply time
    and its lag (from when the batch was due to when it was applied, so falling behind counts). With
    `decode_backbone`, a thread also decodes against the copy, idle and then during the stream: the replica's
    own cost of following the catalog, without Redis and a writer on the same cores. `gc_freeze`: the heap is
    frozen before the stream (after the decoder's warm-up), as a serving replica does."""
    # Imported here: the older checkouts this file also measures have no ItemTable.
    from nezha.live_catalog import ItemTable
    from nezha.live_catalog.item_table import StringColumn

    rng = np.random.default_rng(0)
    space = int(np.prod(sizes))
    extra = reps * 600 + int(rate * seconds)
    packed = rng.choice(space, size=n + extra, replace=False) if n * 4 > space else \
        np.unique(rng.integers(0, space, size=int((n + extra) * 1.2)))[:n + extra]
    rng.shuffle(packed)
    ids = StringColumn.from_encoded(b"".join(f"B{i:09d}".encode() for i in range(n)), np.full(n, 10, dtype=np.int64))
    base = _rss_mb()
    start = time.perf_counter()
    local = LocalCatalog(ItemTable.build(ids, packed[:n]), sizes)
    build_s = time.perf_counter() - start
    del ids
    growth = _rss_mb() - base
    verifier = local.verifier.nbytes() if hasattr(local.verifier, "nbytes") else {}
    changes = SyntheticChanges(packed, n)

    one, batch = [], []
    for _ in range(reps):
        entries = changes(1)
        t = time.perf_counter()
        local.apply(entries)
        one.append(time.perf_counter() - t)
    for _ in range(max(3, reps // 40)):
        entries = changes(1000)
        t = time.perf_counter()
        local.apply(entries)
        batch.append(time.perf_counter() - t)
    stream: dict[str, Any] = {"gc_freeze": gc_freeze}
    if rate and seconds:
        per_batch, applies, lags = max(1, rate // 10), [], []
        decoding, stop_decoding = threading.Thread(), threading.Event()
        if decode_backbone:
            decoder = _Decodes(decode_backbone, sizes, local)
        if gc_freeze:
            _freeze_heap()
        if decode_backbone:
            stream["decode_idle"] = decoder.run(least=100)  # a p99 needs more than 20
            decoding = threading.Thread(target=lambda: stream.update(decode_streaming=decoder.run(stop_decoding)))
            decoding.start()
        start = time.perf_counter()
        for k in range(int(seconds * 10)):
            due = start + k * 0.1
            time.sleep(max(0.0, due - time.perf_counter()))
            entries = changes(per_batch)
            t = time.perf_counter()
            local.apply(entries)
            finished = time.perf_counter()
            applies.append(finished - t)
            lags.append(finished - due)
        if decoding.is_alive():
            stop_decoding.set()
            decoding.join()
        stream |= {"stream_rate": rate, "stream_seconds": seconds, "stream_batches": len(applies),
                  "stream_apply_p50_ms": _pct(applies, 50), "stream_apply_p99_ms": _pct(applies, 99),
                  "stream_apply_max_ms": round(max(applies) * 1000, 2), "stream_lag_p50_ms": _pct(lags, 50),
                  "stream_lag_p99_ms": _pct(lags, 99), "stream_lag_max_ms": round(max(lags) * 1000, 2)}
    return {"items": n, "shape": "x".join(map(str, sizes)), "build_s": round(build_s, 2),
            "rss_growth_mb": round(growth), "maps_bytes_per_item": round(local.nbytes()["item_maps"] / n, 1),
            "valid_id_set_bytes_per_item": round(sum(verifier.get(k, 0) for k in ("ids", "sparse_counts",
                                                                                  "sorted_tables")) / n, 1),
            "verifier_bytes": verifier, "change_p50_ms": _pct(one, 50), "change_p99_ms": _pct(one, 99),
            "batch1000_p50_ms": _pct(batch, 50), "batch1000_p99_ms": _pct(batch, 99), **stream}


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def pin_split() -> tuple[set[int], set[int]]:
    """(CPUs for Redis and the writer, CPUs for the replica): the last CPU this process may use for the replica,
    the others for the rest, as when Redis and the admin client run on other machines than the replica."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise ValueError(f"pinning the replica apart needs at least 2 CPUs, this process may use {len(cpus)}")
    return set(cpus[:-1]), {cpus[-1]}


def _pin_process(pid: int, cpus: set[int]) -> None:
    """Every thread of `pid` on `cpus` (redis-server starts its background threads before we can pin it)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        os.sched_setaffinity(int(task.name), cpus)


def bench_size(n: int, sizes: Sequence[int], rate: int, seconds: float, decode_backbone: str = "",
               gc_freeze: bool = True, pin_replica: bool = False,
               feed_maxlen: int = DEFAULT_FEED_MAXLEN, decode_busy: float = 1.0) -> dict[str, Any]:
    """Push, stream and add-by-text against a fresh redis-server. `pin_replica`: the replica process alone on
    one CPU, Redis and this process (the writer) on the others (`pin_split`). `feed_maxlen`: the change feed's
    cap (the replica republishes the snapshot blob once it is half a feed ahead of it). `decode_busy`: the
    replica's decode thread's share of busy time."""
    row: dict[str, Any] = {"items": n, "shape": "x".join(map(str, sizes)), "gc_freeze": gc_freeze,
                           "feed_maxlen": feed_maxlen, "decode_busy": decode_busy, "load_before": _load()}
    catalog = synthetic_catalog(n, sizes)
    mine = os.sched_getaffinity(0)
    others, replica_cpus = pin_split() if pin_replica else (mine, set())
    if pin_replica:
        row["pinned"] = {"redis_and_writer_cpus": sorted(others), "replica_cpus": sorted(replica_cpus)}
    with tempfile.TemporaryDirectory() as directory:
        proc, url = _start_redis(Path(directory))
        try:
            if pin_replica:
                _pin_process(proc.pid, others)
                os.sched_setaffinity(0, others)
            row.update(bench_push(url, catalog, feed_maxlen))
            log.info("%d items: push %s", n, row)
            row.update(bench_stream(url, catalog, rate, seconds, decode_backbone, gc_freeze, sorted(replica_cpus),
                                    feed_maxlen, decode_busy))
            row.update(bench_add_by_text(url, sizes))
        finally:
            os.sched_setaffinity(0, mine)
            proc.kill()
            proc.wait()
    row["load_after"] = _load()
    return row


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--shape", default="256x256x256")
    parser.add_argument("--rate", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--label", default="")
    parser.add_argument("--local-only", action="store_true", help="no Redis: the replica's copy alone (its "
                        "applies of --rate changes/s for --seconds timed in the process; 0: not streamed)")
    parser.add_argument("--decode-backbone", default="", help="time decodes in the replica with this random-init "
                                                              "preset (e.g. small), idle and during the stream (also with --local-only)")
    parser.add_argument("--no-gc-freeze", dest="gc_freeze", action="store_false",
                        help="the replica (or, with --local-only, the bench process) does not freeze its heap out of the cyclic GC")
    parser.add_argument("--pin-replica", action="store_true",
                        help="the replica process alone on the last CPU, Redis and the writer on the others, as on "
                             "separate machines (not with --local-only)")
    parser.add_argument("--feed-maxlen", type=int, default=DEFAULT_FEED_MAXLEN,
                        help="the change feed's cap (Redis runs)")
    parser.add_argument("--decode-busy", type=float, default=1.0,
                        help="the replica's decode thread's share of busy time: 1 back to back (a saturated replica), "
                             "0.7 a pause of 3/7 of each decode's length after it (Redis runs)")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    try:
        check_decode_busy(args.decode_busy)
    except ValueError as exc:
        parser.error(f"--decode-busy: {exc}")
    if args.pin_replica and args.local_only:
        parser.error("--pin-replica pins the Redis run's processes; --local-only has none")
    if args.pin_replica:
        try:
            pin_split()
        except ValueError as exc:
            parser.error(str(exc))
    sizes = tuple(int(s) for s in args.shape.split("x"))
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        rows.append({"load_before": _load(), **bench_local_copy(n, sizes, rate=args.rate, seconds=args.seconds,
                                                                  decode_backbone=args.decode_backbone,
                                                                  gc_freeze=args.gc_freeze),
                     "load_after": _load()}
                    if args.local_only else bench_size(n, sizes, args.rate, args.seconds, args.decode_backbone,
                                                       args.gc_freeze, args.pin_replica, args.feed_maxlen,
                                                       args.decode_busy))
        log.info("%s", json.dumps(rows[-1]))  # each size's row as it lands (the JSON file gets them all)
    report = {"label": args.label, "code": os.environ.get("PYTHONPATH") or "this checkout",
              "cpus": os.cpu_count(), "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
              "rows": rows}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    main()
