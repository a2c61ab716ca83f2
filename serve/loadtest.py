"""Bounded load test of the recommendation service over loopback HTTP: requests/s and latency percentiles.

Against a running service:

    python -m serve.loadtest --url http://127.0.0.1:8000 --requests 1000 --concurrency 16

Or start the service here for each replica count (local Ray; a throwaway redis-server on a free loopback
port serves the catalog when there is more than one replica, so all replicas share it):

    python -m serve.loadtest --checkpoint runs/quickstart/train/best --replicas 1 2 --requests 1000

The load itself is `nezha.loadgen` (the generator of `nezha bench serve`): real test-split histories of the
checkpoint's prepared dataset when it is there, else catalog windows; each run capped by --requests and
--max-seconds; loopback URLs only. This file only adds what needs Ray/Serve.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nezha.config import ConfigError, parse_config
from nezha.loadgen import ServeBenchConfig, run_serve_bench, validate_serve_config

log = logging.getLogger("serve.loadtest")


@dataclass
class LoadTestConfig:
    """Bounded loopback load test of the recommendation service (a running one, or one per replica count)."""

    url: str | None = field(default=None, metadata={"help": "a running service (loopback only)"})
    checkpoint: str = field(default="runs/quickstart/train/best", metadata={
        "help": "checkpoint: its histories, and the model when the service is started here"})
    replicas: list[int] = field(default_factory=lambda: [1, 2], metadata={
        "help": "replica counts (without --url), e.g. --replicas 1 2"})
    requests: int = 1000
    concurrency: int = 16
    max_seconds: float = field(default=120.0, metadata={"help": "cap per run"})
    k: int = 10
    beam: int = 20
    batch_wait_timeout_s: float = 0.005
    history_len: int = 20
    warmup: int = field(default=20, metadata={"help": "untimed requests before each run"})
    json: str | None = field(default=None, metadata={"help": "write the results here"})

    def __post_init__(self) -> None:
        if not self.replicas or min(self.replicas) < 1:
            raise ConfigError(f"replicas: replica counts must be positive, got {self.replicas}")
        try:  # the generator's own checks: loopback URL, bounded runs
            validate_serve_config(self.bench(self.url or "http://127.0.0.1:8000"))
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    def bench(self, url: str) -> ServeBenchConfig:
        """The generator's config for one run against `url` (it checks the bounds and the loopback URL)."""
        return ServeBenchConfig(checkpoint=self.checkpoint, url=url, concurrency=[self.concurrency],
                                requests=self.requests, max_seconds=self.max_seconds, warmup=self.warmup,
                                history=self.history_len, k=self.k, offline_batch=0)


def free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_load(cfg: LoadTestConfig, url: str, replicas: int | None = None) -> dict[str, Any]:
    """One bounded run of the generator against `url`: its concurrency level, with the replica count."""
    (level,) = run_serve_bench(cfg.bench(url))["levels"]
    return {"replicas": replicas, **level}


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


def run_with_local_service(cfg: LoadTestConfig) -> list[dict[str, Any]]:
    import ray
    from ray import serve

    from nezha.catalog import Catalog
    from nezha.live_catalog import REDIS_URL_ENV, RedisCatalog
    from serve.app import ServeConfig, build_app

    cpus = os.cpu_count() or 2
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    port = free_loopback_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    results = []
    redis_proc = None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            redis_url = os.environ.get(REDIS_URL_ENV)
            if max(cfg.replicas) > 1 and not redis_url:
                redis_proc, redis_url = _start_redis(tmp)
            if redis_url:
                RedisCatalog(redis_url, prefix="nezha:loadtest").push(Catalog.load(Path(cfg.checkpoint) / "catalog"))
            for replicas in cfg.replicas:
                # Fit every replica next to the ingress on this machine's CPUs.
                num_cpus = max(0.1, min(1.0, (cpus - 0.2) / replicas))
                serve_cfg = ServeConfig(checkpoint=cfg.checkpoint, redis_url=redis_url, redis_prefix="nezha:loadtest",
                                        beam=cfg.beam, max_k=cfg.k)
                options = {"Recommender": {"num_replicas": replicas, "ray_actor_options": {"num_cpus": num_cpus},
                                           "user_config": {"batch_wait_timeout_s": cfg.batch_wait_timeout_s}}}
                serve.run(build_app(serve_cfg, options), name="loadtest", route_prefix="/")
                result = run_load(cfg, f"http://127.0.0.1:{port}", replicas)
                log.info("%s", json.dumps(result))
                results.append(result)
                serve.delete("loadtest")
        finally:
            serve.shutdown()
            ray.shutdown()
            if redis_proc is not None:
                redis_proc.kill()
                redis_proc.wait()
    return results


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_result(r: dict[str, Any]) -> str:
    return (f"replicas {r['replicas'] or '?'}: {r['ok']}/{r['requests']} ok in {r['wall_s']:.2f} s at concurrency "
            f"{r['concurrency']}: {r['throughput_rps']:.1f} req/s, p50 {_fmt(r.get('p50_ms'), '.1f')} ms, "
            f"p90 {_fmt(r.get('p90_ms'), '.1f')} ms, p99 {_fmt(r.get('p99_ms'), '.1f')} ms (server p50 "
            f"{_fmt(r.get('server_p50_ms'), '.1f')} ms, mean batch {_fmt(r.get('mean_batch_size'), '.2f')})")


def _joined_lists(argv: list[str], flags: tuple[str, ...] = ("--replicas",)) -> list[str]:
    """`--replicas 1 2` as the config parser takes it, `--replicas 1,2` (both spellings work)."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        out.append(argv[i])
        if argv[i] in flags:
            values = []
            while i + 1 < len(argv) and not argv[i + 1].startswith("-"):
                values.append(argv[i + 1])
                i += 1
            out.append(",".join(values))
        i += 1
    return out


def main(argv: list[str] | None = None) -> None:
    import sys

    cfg = parse_config(LoadTestConfig, _joined_lists(list(sys.argv[1:] if argv is None else argv)))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        results = [run_load(cfg, cfg.url)] if cfg.url else run_with_local_service(cfg)
    except ValueError as exc:  # e.g. no warm-up request answered: say so, without a stack trace
        raise SystemExit(f"serve.loadtest: error: {exc}") from None
    for r in results:
        print(format_result(r))
    if cfg.json:
        Path(cfg.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
