"""A real recommendation service for tests: Ray Serve over HTTP on 127.0.0.1, 2 decoder replicas, a redis-server."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from redis_fixtures import RedisServer, free_port

from nezha.catalog import Catalog
from nezha.live_catalog import RedisCatalog, codes_of, load_item_metadata

ADMIN = {"Authorization": "Bearer test-admin-token"}
HISTORY = ["I010", "I011", "I012"]  # the tiny dataset's users walk forward through the catalog


@dataclass
class Service:
    client: httpx.Client
    redis: RedisServer
    catalog: Catalog
    port: int
    checkpoint: Path

    def recommend(self, **body: Any) -> httpx.Response:
        return self.client.post("/v1/recommend", json={"history": HISTORY, "k": 5, **body})

    def burst(self, n: int = 12, **body: Any) -> list[dict[str, Any]]:
        with ThreadPoolExecutor(n) as pool:
            responses = list(pool.map(lambda _: self.recommend(**body), range(n)))
        assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
        return [r.json() for r in responses]

    def wait_replicas(self, predicate: Callable[[dict[str, Any]], bool], replicas: int = 2,
                      timeout: float = 20.0) -> dict[str, dict[str, Any]]:
        """Poll with bursts until `replicas` distinct replicas answered with a body satisfying `predicate`."""
        good: dict[str, dict[str, Any]] = {}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for body in self.burst():
                if predicate(body):
                    good[body["replica"]] = body
            if len(good) >= replicas:
                return good
            time.sleep(0.1)
        raise AssertionError(f"only {len(good)} of {replicas} replicas satisfied the condition in {timeout} s")

    def free_codes(self) -> list[int]:
        """Codes of a semantic ID no item holds now (read from Redis, the source of truth)."""
        return free_codes(self.redis.url, self.catalog.codebook_sizes)[0]


def redis_items(redis_url: str) -> dict[str, int]:
    """Item id -> packed ID, as Redis (the source of truth) holds them now."""
    snapshot = RedisCatalog(redis_url).snapshot()
    assert snapshot is not None
    return dict(snapshot.table.pairs())


def free_codes(redis_url: str, sizes: tuple[int, ...], n: int = 1) -> list[list[int]]:
    """Codes of `n` semantic IDs no item in Redis holds now."""
    used = set(redis_items(redis_url).values())
    free = (p for p in range(sizes[0] * sizes[1] * sizes[2]) if p not in used)
    return [codes_of(next(free), sizes) for _ in range(n)]


# The decoder deployment of the test service: 2 replicas, batches that wait long enough to fill.
RECOMMENDER_OPTIONS: dict[str, Any] = {"num_replicas": 2, "ray_actor_options": {"num_cpus": 0.5},
                                       "user_config": {"batch_wait_timeout_s": 0.05}}


def service_settings(checkpoint: Path, redis_url: str) -> dict[str, Any]:
    """The ServeConfig fields (application args) of the test service."""
    return dict(checkpoint=str(checkpoint), redis_url=redis_url, admin_token="test-admin-token", beam=10,
                decoders=["nezha", "mtp", "beam"], max_history_items=50, max_exclude=20, max_batch_users=8,
                max_body_bytes=16384, feed_block_ms=200,
                request_timeout_s=30)  # a first text add loads the embedding model: slow on a busy machine


@contextmanager
def running_service(checkpoint: Path, redis_dir: Path, options: dict[str, dict[str, Any]] | None = None,
                    **overrides: Any) -> Iterator[Service]:
    """Serve (own HTTP port) + redis-server + the app; needs a running Ray. Tears everything down.

    `options`: Serve deployment options by deployment name (default: RECOMMENDER_OPTIONS for the Recommender).
    """
    from ray import serve

    from serve.app import ServeConfig, build_app

    redis = RedisServer(redis_dir)
    redis.start()
    try:
        catalog = Catalog.load(checkpoint / "catalog")
        RedisCatalog(redis.url).push(catalog, source=str(checkpoint), item_meta=load_item_metadata(checkpoint, catalog))
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 60})
        cfg = ServeConfig(**{**service_settings(checkpoint, redis.url), **overrides})
        serve.run(build_app(cfg, options or {"Recommender": RECOMMENDER_OPTIONS}), name="nezha", route_prefix="/")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            yield Service(client, redis, catalog, port, checkpoint)
    finally:
        serve.shutdown()
        redis.kill()
