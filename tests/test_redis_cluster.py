"""The live catalog on a Redis Cluster (three masters on loopback, `redis-cli --cluster create`): push, add,
remove and a follower, through a `redis+cluster://` URL, and the same on a TLS-only cluster (TLS cluster bus)
through `rediss+cluster://...?ssl_ca_certs=` as docs/operations.md writes it. The catalog's keys share one hash
tag, so they live on one node and its scripts run there as on a single server."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from redis_fixtures import RedisClusterSet, redis_cluster, tls_redis_cluster, wait_until  # noqa: F401

from nezha.catalog import Catalog
from nezha.live_catalog import CatalogFollower, ItemExistsError, LocalCatalog, RedisCatalog

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("deployment", ["redis_cluster", "tls_redis_cluster"])
def test_push_add_remove_and_follow_on_a_three_master_cluster(deployment: str, tiny_prepared: Path,
                                                              request: pytest.FixtureRequest) -> None:
    cluster: RedisClusterSet = request.getfixturevalue(deployment)
    tls = deployment.startswith("tls")
    assert cluster.url.startswith("rediss+cluster://" if tls else "redis+cluster://")
    catalog = Catalog.load(tiny_prepared / "catalog")
    used = set(catalog.packed.tolist())
    a, b = [p for p in range(int(np.prod(catalog.codebook_sizes))) if p not in used][:2]
    store = RedisCatalog(cluster.url)
    assert store.deployment.target.tls == tls
    assert store.push(catalog, source="cluster") == 1
    follower = CatalogFollower(RedisCatalog(cluster.url), LocalCatalog.from_catalog(catalog), block_ms=100,
                               max_backoff_s=0.2)
    follower.sync_once()
    follower.start()
    try:
        assert follower.local.version == 1 and follower.degraded() == []
        assert store.add([("CLUSTER-A", a), ("CLUSTER-B", b)], {"CLUSTER-A": {"title": "on a cluster"}}) == 2
        with pytest.raises(ItemExistsError):
            store.add([("CLUSTER-A", a)])
        assert store.remove(["CLUSTER-B", catalog.item_ids[0]]) == 3
        assert follower.local.wait_for(3, timeout=5.0)
        view = follower.local.view()
        assert view.lookup(["CLUSTER-A", "CLUSTER-B", catalog.item_ids[0]])[1] == ["CLUSTER-B", catalog.item_ids[0]]
        assert view.meta_of("CLUSTER-A")["title"] == "on a cluster"
        snapshot = store.snapshot()
        assert snapshot is not None and snapshot.version == 3
        assert dict(snapshot.table.pairs()) == dict(view.item_to_id)
        status = store.status()
        assert status["size"] == catalog.num_items and status["version"] == 3  # +2 added, -2 removed
        # Every key of the catalog on one node (one slot), none elsewhere.
        holders = [n.port for n in cluster.nodes if n.client().keys(f"{store.tag}:*")]
        assert len(holders) == 1, holders
        assert store.push(catalog) == 4  # a push again: the follower resyncs to it
        assert wait_until(lambda: follower.local.version == 4 and "CLUSTER-A" not in dict(follower.local.view().item_to_id))
    finally:
        follower.stop()
        follower.join(timeout=5)
