"""The HTTP load generator: throughput and latency of a running recommendation service.

Closed-loop clients at fixed concurrency levels, each level bounded in requests and seconds, loopback only;
latency percentiles from `nezha.timing.latency_stats`. `nezha bench serve` runs it against a service that
is already up; `python -m serve.loadtest` starts one per replica count (Ray + Serve) and runs it there.
With `offline_batch` > 0 it first times the same checkpoint's batched decoder in this process on the same
histories (what the service could reach without HTTP), and reports each level's ratio to it.
Histories are real test-split histories of the checkpoint's prepared dataset when it is there, else
windows of the catalog.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import torch

from nezha.catalog import Catalog
from nezha.data.split import Split
from nezha.decoding import decode
from nezha.model.checkpoint import CheckpointError, load_checkpoint, prepared_dir_of
from nezha.timing import latency_stats

log = logging.getLogger(__name__)


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


@dataclass
class ServeBenchConfig:
    """Throughput and p50/p99 latency of a running Serve app at fixed concurrency levels (loopback only)."""

    checkpoint: str = field(default="runs/train/best", metadata={"help": "checkpoint whose catalog gives item ids"})
    url: str = field(default="http://127.0.0.1:8000", metadata={"help": "the app's base URL (loopback)"})
    concurrency: list[int] = field(default_factory=lambda: [1, 16, 64], metadata={"help": "clients in flight"})
    requests: int = field(default=200, metadata={"help": "at most this many requests per concurrency level"})
    max_seconds: float = field(default=30.0, metadata={"help": "and at most this long per level"})
    warmup: int = field(default=5, metadata={"help": "untimed requests before the first level"})
    history: int = 20
    k: int = 10
    decoder: str | None = field(default=None, metadata={"help": "decoder to ask for (default: the app's)"})
    timeout_s: float = field(default=30.0, metadata={"help": "per-request timeout"})
    offline_batch: int = field(default=32, metadata={
        "help": "time the checkpoint's batched decoder offline at this batch size first (0: skip)"})
    beam: int = field(default=20, metadata={"help": "beam of the offline decode (the service's `beam`)"})
    torch_threads: int = field(default=1, metadata={"help": "torch threads of the offline decode (a replica's)"})
    seed: int = 0
    json: str | None = None


def validate_serve_config(cfg: ServeBenchConfig) -> None:
    """Reject what would load something other than a local test server, or run unbounded."""
    parts = urlsplit(cfg.url)
    if parts.scheme != "http":
        raise ValueError(f"url must be http://HOST:PORT on loopback, got {cfg.url!r}")
    host = parts.hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"url host {host!r} is not loopback (127.0.0.1, ::1 or localhost): the bench only "
                         "loads a local app")
    if not cfg.concurrency or min(cfg.concurrency) < 1:
        raise ValueError(f"concurrency levels must be positive, got {cfg.concurrency}")
    if cfg.requests < 1 or cfg.warmup < 0 or cfg.history < 1 or cfg.k < 1:
        raise ValueError("requests, history and k must be at least 1 and warmup at least 0")
    if cfg.max_seconds <= 0 or cfg.timeout_s <= 0:
        raise ValueError("max_seconds and timeout_s must be positive")
    if cfg.offline_batch < 0 or cfg.beam < 1:
        raise ValueError("offline_batch must be >= 0 and beam >= 1")


def catalog_windows(item_ids: Sequence[str], count: int, length: int, rng: np.random.Generator) -> list[list[str]]:
    """`count` runs of `length` consecutive catalog items from random starts (distinct: capped at the catalog)."""
    length, n = min(length, len(item_ids)), len(item_ids)
    return [[item_ids[(s + j) % n] for j in range(length)] for s in rng.integers(0, n, size=count).tolist()]


def _test_split_histories(checkpoint: str | Path, catalog: Catalog) -> list[np.ndarray] | None:
    """The test split's histories (item indices) of the checkpoint's prepared dataset, or None without one."""
    try:
        prepared = prepared_dir_of(checkpoint)
    except CheckpointError:  # a folder with only a catalog/ (enough for the bench)
        return None
    if prepared is None or not (prepared / "split.npz").is_file():
        return None
    histories = [h for h in Split.load(prepared / "split.npz").test.histories if len(h)]
    if not histories or max(int(h.max()) for h in histories) >= catalog.num_items:
        return None  # empty, or not this catalog's items
    return histories


def sample_histories(checkpoint: str | Path, count: int, length: int, rng: np.random.Generator,
                     catalog: Catalog | None = None) -> list[list[str]]:
    """Up to `count` request histories of at most `length` distinct items (the app rejects duplicates).

    Real test-split histories of the checkpoint's prepared dataset (their last items, each item once) when
    the checkpoint names one, else `catalog_windows` of the checkpoint's catalog.
    """
    catalog = catalog or Catalog.load(Path(checkpoint) / "catalog")
    test = _test_split_histories(checkpoint, catalog)
    if test is None:
        return catalog_windows(catalog.item_ids, count, length, rng)
    ids = catalog.item_ids
    rows = rng.choice(len(test), size=min(count, len(test)), replace=False)
    # Each item once, at its last position: a user may interact with an item twice.
    return [list(dict.fromkeys(ids[i] for i in test[r][::-1]))[::-1][-length:] for r in rows.tolist()]


def summarize_level(concurrency: int, latencies_ms: Sequence[float], statuses: Counter[str], wall_s: float,
                    server_ms: Sequence[float] = (), batch_sizes: Sequence[int] = ()) -> dict[str, Any]:
    """One concurrency level's throughput (successful requests / wall time) and latency of the successes.

    `server_ms` and `batch_sizes`: what successful answers reported (`latency_ms`, `batch.size`), if anything.
    """
    ok = len(latencies_ms)
    sent = sum(statuses.values())
    out: dict[str, Any] = {"concurrency": concurrency, "requests": sent, "ok": ok, "errors": sent - ok,
                           "statuses": dict(sorted(statuses.items())), "wall_s": wall_s,
                           "throughput_rps": ok / wall_s if wall_s > 0 else 0.0}
    if ok:
        out.update({f"{k}_ms": v for k, v in latency_stats(latencies_ms).items() if k != "n"})
    if server_ms:
        out["server_p50_ms"] = latency_stats(server_ms)["p50"]
    if batch_sizes:
        out["mean_batch_size"] = float(np.mean(batch_sizes))
    return out


class _Client:
    """One keep-alive HTTP connection; reconnects after a failure."""

    def __init__(self, url: str, timeout_s: float) -> None:
        parts = urlsplit(url)
        self._host, self._port = parts.hostname or "127.0.0.1", parts.port or 80
        self._path = parts.path.rstrip("/") + "/v1/recommend"
        self._timeout = timeout_s
        self._conn: http.client.HTTPConnection | None = None

    def post(self, body: bytes) -> tuple[str, bytes]:
        """(the response's status code as a string, or the exception's name; the response body)."""
        try:
            if self._conn is None:
                self._conn = http.client.HTTPConnection(self._host, self._port, timeout=self._timeout)
            self._conn.request("POST", self._path, body=body, headers={"Content-Type": "application/json"})
            response = self._conn.getresponse()
            return str(response.status), response.read()
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            return type(exc).__name__, b""

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def run_level(url: str, bodies: Sequence[bytes], concurrency: int, max_requests: int, max_seconds: float,
              timeout_s: float) -> dict[str, Any]:
    """`concurrency` closed-loop clients send `bodies` round-robin until `max_requests` or `max_seconds`."""
    lock = threading.Lock()
    sent = 0
    latencies: list[float] = []
    server_ms: list[float] = []
    batch_sizes: list[int] = []
    statuses: Counter[str] = Counter()
    deadline = time.perf_counter() + max_seconds

    def worker() -> None:
        nonlocal sent
        client = _Client(url, timeout_s)
        try:
            while True:
                with lock:
                    if sent >= max_requests or time.perf_counter() >= deadline:
                        return
                    index = sent
                    sent += 1
                start = time.perf_counter()
                status, answer = client.post(bodies[index % len(bodies)])
                elapsed = (time.perf_counter() - start) * 1000.0
                server, batch = _reported(answer) if status == "200" else (None, None)
                with lock:
                    statuses[status] += 1
                    if status == "200":
                        latencies.append(elapsed)
                    if server is not None:
                        server_ms.append(server)
                    if batch is not None:
                        batch_sizes.append(batch)
        finally:
            client.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return summarize_level(concurrency, latencies, statuses, time.perf_counter() - start, server_ms, batch_sizes)


def _reported(answer: bytes) -> tuple[float | None, int | None]:
    """(server-side latency_ms, batch size) that a recommendation answer reports, where it does."""
    try:
        body = json.loads(answer)
        batch = body.get("batch")
        return body.get("latency_ms"), batch.get("size") if isinstance(batch, dict) else None
    except (ValueError, AttributeError):
        return None, None


def run_offline(cfg: ServeBenchConfig, catalog: Catalog, histories: Sequence[Sequence[str]]) -> dict[str, Any]:
    """Requests/s of the checkpoint's batched decoder in this process (CPU), on the bench's histories."""
    if cfg.torch_threads > 0:
        torch.set_num_threads(cfg.torch_threads)
    model = load_checkpoint(cfg.checkpoint, "cpu")
    verifier = catalog.verifier()
    codes = [catalog.codes[catalog.indices_of(h)] for h in histories]
    batches = [codes[i:i + cfg.offline_batch] for i in range(0, len(codes), cfg.offline_batch)]
    decoder = cfg.decoder or "nezha"
    with torch.inference_mode():
        decode(model, decoder, batches[0], verifier, beam=cfg.beam, topk=cfg.beam)  # warm-up
        done, start = 0, time.perf_counter()
        while done < cfg.requests and time.perf_counter() - start < cfg.max_seconds:
            batch = batches[(done // cfg.offline_batch) % len(batches)]
            decode(model, decoder, batch, verifier, beam=cfg.beam, topk=cfg.beam)
            done += len(batch)
        wall = time.perf_counter() - start
    return {"decoder": decoder, "batch": cfg.offline_batch, "beam": cfg.beam, "requests": done, "wall_s": wall,
            "throughput_rps": done / wall, "ms_per_request": wall * 1000 / done}


def run_serve_bench(cfg: ServeBenchConfig) -> dict[str, Any]:
    validate_serve_config(cfg)
    catalog = Catalog.load(Path(cfg.checkpoint) / "catalog")
    rng = np.random.default_rng(cfg.seed)
    request = {"k": cfg.k} if cfg.decoder is None else {"k": cfg.k, "decoder": cfg.decoder}
    histories = sample_histories(cfg.checkpoint, max(cfg.requests, 64), cfg.history, rng, catalog)
    offline = run_offline(cfg, catalog, histories) if cfg.offline_batch else None
    if offline is not None:
        log.info("offline batched decode (batch %d): %.1f req/s", cfg.offline_batch, offline["throughput_rps"])
    bodies = [json.dumps({"history": h, **request}).encode() for h in histories]
    if cfg.warmup:
        warm = run_level(cfg.url, bodies, 1, cfg.warmup, cfg.max_seconds, cfg.timeout_s)
        if warm["ok"] == 0:
            raise ValueError(f"no successful warm-up request to {cfg.url}/v1/recommend (statuses {warm['statuses']}); "
                             "is the app running (`serve run serve.config.yaml`)?")
    levels = []
    for concurrency in cfg.concurrency:
        level = run_level(cfg.url, bodies, concurrency, cfg.requests, cfg.max_seconds, cfg.timeout_s)
        if offline is not None:
            level["ratio_to_offline"] = level["throughput_rps"] / offline["throughput_rps"]
        log.info("concurrency %d: %.1f req/s, p50 %s ms, %d errors", concurrency, level["throughput_rps"],
                 _fmt(level.get("p50_ms")), level["errors"])
        levels.append(level)
    report = {"url": cfg.url, "config": asdict(cfg), "catalog_items": catalog.num_items, "offline": offline,
              "levels": levels}
    if cfg.json:
        Path(cfg.json).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.json).write_text(json.dumps(report, indent=2))
    return report


def format_serve_table(report: dict[str, Any]) -> str:
    lines = [f"{report['url']}/v1/recommend, {report['catalog_items']} catalog items, history "
             f"{report['config']['history']}, k {report['config']['k']}"]
    offline = report.get("offline")
    if offline:
        lines.append(f"offline batched decode ({offline['decoder']}, batch {offline['batch']}, beam {offline['beam']}): "
                     f"{offline['throughput_rps']:.1f} req/s ({offline['ms_per_request']:.2f} ms per request)")
    lines.append(f"{'concurrency':>11}{'requests':>10}{'errors':>8}{'req/s':>9}{'ratio':>7}{'p50 ms':>9}{'p99 ms':>9}"
                 f"{'mean ms':>9}{'batch':>7}")
    for lv in report["levels"]:
        lines.append(f"{lv['concurrency']:>11}{lv['requests']:>10}{lv['errors']:>8}{lv['throughput_rps']:>9.1f}"
                     f"{_fmt(lv.get('ratio_to_offline')):>7}{_fmt(lv.get('p50_ms')):>9}{_fmt(lv.get('p99_ms')):>9}"
                     f"{_fmt(lv.get('mean_ms')):>9}{_fmt(lv.get('mean_batch_size'), '.1f'):>7}")
    return "\n".join(lines)
