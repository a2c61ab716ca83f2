"""Bounded load test of the recommendation service over loopback HTTP: requests/s and latency percentiles.

Against a running service:

    python -m serve.loadtest --url http://127.0.0.1:8000 --requests 1000 --concurrency 16

Or start the service here for each replica count (local Ray; a throwaway redis-server on a free loopback
port serves the catalog when there is more than one replica, so all replicas share it):

    python -m serve.loadtest --checkpoint runs/quickstart/train/best --replicas 1 2 --requests 1000

Histories are real test-split histories of the checkpoint's prepared dataset when it is there, else
windows of the catalog. Each run is capped by --requests and --max-seconds; only loopback URLs are accepted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import socket
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np

from nezha.catalog import Catalog
from nezha.model.checkpoint import read_meta

log = logging.getLogger("serve.loadtest")

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@dataclass
class LoadResult:
    replicas: int | None
    requests: int
    ok: int
    errors: int
    concurrency: int
    seconds: float
    requests_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    server_p50_ms: float
    mean_batch_size: float


def free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def histories_for(checkpoint: str | Path, count: int, max_len: int, seed: int = 0) -> list[list[str]]:
    """Test-split histories of the checkpoint's prepared dataset (as item ids), else catalog windows."""
    catalog = Catalog.load(Path(checkpoint) / "catalog")
    rng = np.random.default_rng(seed)
    prepared = read_meta(checkpoint).get("extra", {}).get("prepared")
    if prepared and (Path(prepared) / "split.npz").is_file():
        from nezha.data.split import Split

        test = Split.load(Path(prepared) / "split.npz").test
        rows = rng.choice(len(test.histories), size=min(count, len(test.histories)), replace=False)
        ids = catalog.item_ids
        return [[ids[i] for i in test.histories[r][-max_len:]] for r in rows]
    starts = rng.integers(0, catalog.num_items, size=count)
    return [[catalog.item_ids[(s + j) % catalog.num_items] for j in range(min(5, max_len))] for s in starts.tolist()]


async def run_load(url: str, histories: list[list[str]], requests: int, concurrency: int, k: int,
                   max_seconds: float, warmup: int = 20) -> LoadResult:
    host = urlsplit(url).hostname
    if host not in LOOPBACK:
        raise ValueError(f"load tests only target loopback addresses ({sorted(LOOPBACK)}), not {host!r}")
    latencies: list[float] = []
    server: list[float] = []
    batch_sizes: list[int] = []
    errors = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
        for i in range(warmup):  # first calls pay for connection set-up and lazy initialisation
            await client.post("/v1/recommend", json={"history": histories[i % len(histories)], "k": k})
        next_index = 0
        deadline = time.monotonic() + max_seconds

        async def worker() -> None:
            nonlocal next_index, errors
            while next_index < requests and time.monotonic() < deadline:
                history = histories[next_index % len(histories)]
                next_index += 1
                start = time.perf_counter()
                r = await client.post("/v1/recommend", json={"history": history, "k": k})
                if r.status_code != 200:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - start)
                body = r.json()
                server.append(body["latency_ms"])
                batch_sizes.append(body["batch"]["size"])

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - start
    ms = np.asarray(latencies) * 1000 if latencies else np.zeros(1)
    return LoadResult(None, len(latencies) + errors, len(latencies), errors, concurrency, round(seconds, 2),
                      round(len(latencies) / seconds, 1), *(round(float(np.percentile(ms, q)), 1) for q in (50, 90, 99)),
                      round(float(np.median(server)) if server else 0.0, 1),
                      round(float(np.mean(batch_sizes)) if batch_sizes else 0.0, 2))


def _start_redis(directory: str) -> tuple[subprocess.Popen[bytes], str]:
    import redis

    port = free_loopback_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", directory], stdout=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    return proc, f"redis://127.0.0.1:{port}/0"


def run_with_local_service(args: argparse.Namespace, histories: list[list[str]]) -> list[LoadResult]:
    import ray
    from ray import serve

    from nezha.catalog_cli import RedisCatalog
    from serve.app import ServeConfig, build_app

    cpus = os.cpu_count() or 2
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    port = free_loopback_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    results = []
    redis_proc = None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            redis_url = os.environ.get("NEZHA_REDIS_URL")
            if max(args.replicas) > 1 and not redis_url:
                redis_proc, redis_url = _start_redis(tmp)
            if redis_url:
                RedisCatalog(redis_url, prefix="nezha:loadtest").push(Catalog.load(Path(args.checkpoint) / "catalog"))
            for replicas in args.replicas:
                # Fit every replica next to the ingress on this machine's CPUs.
                num_cpus = max(0.1, min(1.0, (cpus - 0.2) / replicas))
                cfg = ServeConfig(checkpoint=args.checkpoint, redis_url=redis_url, redis_prefix="nezha:loadtest",
                                  beam=args.beam, max_k=args.k, batch_wait_timeout_s=args.batch_wait_timeout_s,
                                  autoscaling_config={"min_replicas": replicas, "max_replicas": replicas},
                                  ray_actor_options={"num_cpus": num_cpus})
                serve.run(build_app(cfg), name="loadtest", route_prefix="/")
                result = asyncio.run(run_load(f"http://127.0.0.1:{port}", histories, args.requests, args.concurrency,
                                              args.k, args.max_seconds))
                result.replicas = replicas
                log.info("%s", json.dumps(asdict(result)))
                results.append(result)
                serve.delete("loadtest")
        finally:
            serve.shutdown()
            ray.shutdown()
            if redis_proc is not None:
                redis_proc.kill()
                redis_proc.wait()
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running service (loopback only)")
    parser.add_argument("--checkpoint", default="runs/quickstart/train/best",
                        help="checkpoint: its histories, and the model when the service is started here")
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2], help="replica counts (without --url)")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-seconds", type=float, default=120.0, help="cap per run")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--beam", type=int, default=20)
    parser.add_argument("--batch-wait-timeout-s", type=float, default=0.005)
    parser.add_argument("--history-len", type=int, default=20)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    histories = histories_for(args.checkpoint, 2000, args.history_len)
    if args.url:
        results = [asyncio.run(run_load(args.url, histories, args.requests, args.concurrency, args.k,
                                        args.max_seconds))]
    else:
        results = run_with_local_service(args, histories)
    for r in results:
        print(f"replicas {r.replicas or '?'}: {r.ok}/{r.requests} ok in {r.seconds} s at concurrency {r.concurrency}: "
              f"{r.requests_per_s} req/s, p50 {r.p50_ms} ms, p90 {r.p90_ms} ms, p99 {r.p99_ms} ms "
              f"(server p50 {r.server_p50_ms} ms, mean batch {r.mean_batch_size})")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=2))


if __name__ == "__main__":
    main()
