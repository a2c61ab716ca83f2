"""A serving replica's start with Redis configured: it builds its copy from Redis's snapshot alone (not the
checkpoint's catalog too: at millions of items that copy costs seconds and gigabytes), and falls back to
the checkpoint's catalog when Redis is unreachable or holds none. The Recommender is built outside Serve."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import pytest
from redis_fixtures import RedisServer, free_port, redis_server  # noqa: F401

from nezha.catalog import Catalog
from nezha.live_catalog import LocalCatalog, RedisCatalog
from serve.config import ServeConfig
from serve.replica import Recommender


@pytest.fixture
def own_copies(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the checkpoint catalog copies the replica builds."""
    built: list[int] = []
    real = LocalCatalog.from_catalog

    def counted(*args: Any, **kwargs: Any) -> LocalCatalog:
        built.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(LocalCatalog, "from_catalog", counted)
    return built


def start(checkpoint: Path, url: str) -> Recommender:
    return Recommender(ServeConfig(checkpoint=str(checkpoint), redis_url=url, device="cpu", feed_block_ms=100))


def test_a_replica_starts_from_redis_alone(tiny_checkpoint: Path, redis_server: RedisServer,  # noqa: F811
                                          own_copies: list[int]) -> None:
    catalog = Catalog.load(tiny_checkpoint / "catalog")
    store = RedisCatalog(redis_server.url)
    store.push(catalog)
    version = store.remove([catalog.item_ids[-1]])
    replica = start(tiny_checkpoint, redis_server.url)
    try:
        assert own_copies == []
        assert (replica.local.source, replica.local.version, len(replica.local)) == ("redis", version,
                                                                                    catalog.num_items - 1)
        assert replica.item(catalog.item_ids[0]).title == catalog.titles[0]  # metadata read from Redis
    finally:
        replica.follower.stop()


def test_a_replica_without_redis_at_start_serves_the_checkpoints_catalog(tiny_checkpoint: Path,
                                                                        own_copies: list[int]) -> None:
    catalog = Catalog.load(tiny_checkpoint / "catalog")
    replica = start(tiny_checkpoint, f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    try:
        assert own_copies == [1]
        assert (replica.local.source, len(replica.local)) == ("checkpoint", catalog.num_items)
        assert replica.item(catalog.item_ids[0]).title == catalog.titles[0]
        assert replica.follower.degraded()
    finally:
        replica.follower.stop()


def test_a_started_replica_has_frozen_its_model_out_of_the_gc(tiny_checkpoint: Path,
                                                            redis_server: RedisServer) -> None:  # noqa: F811
    """The follower's allocations trigger full collections; the model and catalog loaded at start must not be
    walked by them (each one holds the GIL for ~0.25 s at 1M items: a stall for the decodes then)."""
    RedisCatalog(redis_server.url).push(Catalog.load(tiny_checkpoint / "catalog"))
    gc.unfreeze()  # whatever an earlier test froze
    replica = start(tiny_checkpoint, redis_server.url)
    try:
        assert gc.get_freeze_count() > 0
        model_id = id(replica.model)
        assert all(id(o) != model_id for o in gc.get_objects())  # only the unfrozen generations
    finally:
        replica.follower.stop()
        gc.unfreeze()
