"""The live catalog through a Redis failover: catalog URLs, writes confirmed by a replica (WAIT), a follower
that meets a forked history, a primary killed under a stream of admin changes while Sentinel promotes its
replica, and the same deployment TLS only through a `rediss+sentinel://` URL (real redis-server and
redis-server --sentinel processes on loopback, tests/redis_fixtures.py).

The failover test prints one `FAILOVER ...` line with its figures (run with `-s`; docs/operations.md quotes them).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from redis.crc import key_slot
from redis_fixtures import RedisServer, SentinelSet, sentinel_set, tls_sentinel_set, wait_until  # noqa: F401

from nezha.catalog import Catalog
from nezha.config import ConfigError
from nezha.live_catalog import (
    CatalogFollower,
    ItemExistsError,
    ItemNotFoundError,
    LocalCatalog,
    RedisCatalog,
    StoreUnavailableError,
    WriteNotConfirmedError,
    redact_url,
)
from nezha.live_catalog.connection import online_replicas, parse_redis_url
from serve.errors import StoreUnavailable, from_store_error


@pytest.fixture(scope="module")
def catalog(tiny_prepared: Path) -> Catalog:
    return Catalog.load(tiny_prepared / "catalog")


def free_ids(catalog: Catalog, n: int) -> list[int]:
    used = set(catalog.packed.tolist())
    return [p for p in range(int(np.prod(catalog.codebook_sizes))) if p not in used][:n]


def test_catalog_urls_parse_and_a_malformed_one_is_one_clear_line() -> None:
    sentinel = parse_redis_url("redis+sentinel://u:pw@10.0.0.1:26379,10.0.0.2/mymaster?db=2&sentinel_password=s2")
    assert (sentinel.kind, sentinel.hosts, sentinel.service, sentinel.db, sentinel.username, sentinel.password) == \
        ("sentinel", (("10.0.0.1", 26379), ("10.0.0.2", 26379)), "mymaster", 2, "u", "pw")
    cluster = parse_redis_url("rediss+cluster://h1:7000,h2:7001?ssl_ca_certs=/ca.pem&min_replicas=1&wait_timeout_ms=250")
    assert (cluster.kind, cluster.tls, cluster.hosts, cluster.min_replicas, cluster.wait_timeout_ms) == \
        ("cluster", True, (("h1", 7000), ("h2", 7001)), 1, 250)
    single = parse_redis_url("redis://:pw@127.0.0.1:6390/0?min_replicas=0")
    assert single.kind == "single" and single.min_replicas == 0 and "min_replicas" not in single.url
    assert redact_url("redis+sentinel://u:pw@h1:1,h2:2/svc?sentinel_password=s2") == \
        "redis+sentinel://u:***@h1:1,h2:2/svc?sentinel_password=***"
    for url, says in [("http://h:1", "scheme"), ("redis+sentinel://h:26379", "service"),
                      ("redis+sentinel://h:x/svc", "host:port"), ("redis+cluster://h:1/2", "database 0"),
                      ("redis+cluster://:secret@h:1?bogus=1", "unknown option"),
                      ("redis://h:1/0?min_replicas=one", "min_replicas")]:
        with pytest.raises(ConfigError, match=says) as caught:
            RedisCatalog(url)
        assert "\n" not in str(caught.value) and "secret" not in str(caught.value)


def test_keys_of_one_catalog_share_a_hash_tag(catalog: Catalog, tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "r")
    server.start()
    try:
        store = RedisCatalog(server.url, prefix="shop:catalog")
        store.push(catalog)
        store.add([("TAGGED", free_ids(catalog, 1)[0])])
        keys = server.client().keys("*")
        assert keys and all(k.startswith("{shop:catalog}:") for k in keys), keys
        assert len({key_slot(k.encode()) for k in keys}) == 1
    finally:
        server.kill()


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[RedisServer, RedisServer]]:
    """Two servers, each its own primary for now."""
    a, b = RedisServer(tmp_path / "a"), RedisServer(tmp_path / "b")
    a.start()
    b.start()
    yield a, b
    a.kill()
    b.kill()


def copy_of(source: RedisServer, target: RedisServer) -> None:
    """`target` becomes a replica of `source`, syncs, and is promoted again: a copy as of now."""
    source.client().config_set("repl-diskless-sync-delay", 0)
    target.client().execute_command("REPLICAOF", "127.0.0.1", source.port)
    assert wait_until(lambda: target.client().info("replication").get("master_link_status") == "up")
    assert wait_until(lambda: target.client().info("replication").get("slave_repl_offset")
                      == source.client().info("replication").get("master_repl_offset"))
    target.client().execute_command("REPLICAOF", "NO", "ONE")


def demote(old: RedisServer, new: RedisServer, version: int) -> None:
    """`old` becomes a replica of `new` (what Sentinel does to a primary that comes back) and holds `version`."""
    new.client().config_set("repl-diskless-sync-delay", 0)
    old.client().execute_command("REPLICAOF", "127.0.0.1", new.port)
    store = RedisCatalog(old.url)
    assert wait_until(lambda: old.client().info("replication").get("master_link_status") == "up"
                      and store.remote_state().version == version)


@pytest.mark.parametrize("after", ["behind", "went-on"])
def test_a_follower_that_meets_a_forked_history_resyncs_to_the_store(pair: tuple[RedisServer, RedisServer],
                                                                      catalog: Catalog, after: str) -> None:
    """The follower applied a change (LOST) that the promoted replica never had: whether the new primary is
    behind it or went on under the same version numbers, it resyncs to the store's state, counts a fork, and
    never serves LOST together with the new history."""
    a, b = pair
    lost, kept, more = free_ids(catalog, 3)
    RedisCatalog(a.url).push(catalog)
    follower = CatalogFollower(RedisCatalog(a.url), LocalCatalog.from_catalog(catalog), block_ms=50)
    follower.sync_once()
    copy_of(a, b)  # b: the replica, up to date as of version 1
    assert RedisCatalog(a.url).add([("LOST", lost)]) == 2  # acknowledged by a alone
    follower._step()
    assert follower.local.version == 2 and follower.local.lookup(["LOST"])[1] == []
    new_primary = RedisCatalog(b.url)
    if after == "went-on":
        assert new_primary.add([("KEPT", kept)]) == 2 and new_primary.add([("MORE", more)]) == 3
    demote(a, b, 3 if after == "went-on" else 1)  # the follower still reads a, now a replica of b
    follower._step()
    if after == "behind":
        follower._step()  # an empty feed read first, then the version check
    assert follower.health.forks == 1
    expected = 3 if after == "went-on" else 1
    assert follower.local.version == expected
    assert follower.local.lookup(["LOST"])[1] == ["LOST"]
    if after == "went-on":
        assert follower.local.lookup(["KEPT", "MORE"])[1] == []


def test_a_write_no_replica_acknowledges_is_a_retryable_error(tmp_path: Path, catalog: Catalog) -> None:
    primary = RedisServer(tmp_path / "p", extra_args=["--repl-diskless-sync-delay", "0"])
    primary.start()
    replica = RedisServer(tmp_path / "r", extra_args=["--replicaof", "127.0.0.1", str(primary.port)])
    replica.start()
    try:
        assert wait_until(lambda: replica.client().info("replication").get("master_link_status") == "up")
        # ...and online as the primary sees it (the store's default waits for 1 replica only then; a loaded
        # machine can still show it syncing, and the store would then ask for no acknowledgement at all)
        assert wait_until(lambda: online_replicas(primary.client().info("replication")) == 1)
        patient = RedisCatalog(primary.url + "?wait_timeout_ms=10000")  # a loaded machine may ack slowly
        patient.push(catalog)
        first, second = free_ids(catalog, 2)
        assert patient.add([("CONFIRMED", first)]) == 2  # the replica acknowledged it
        store = RedisCatalog(primary.url + "?wait_timeout_ms=300")  # the write below must time out: quickly
        assert replica.proc is not None
        os.kill(replica.proc.pid, signal.SIGSTOP)  # connected, but acknowledges nothing
        try:
            with pytest.raises(WriteNotConfirmedError, match="0 of 1 replica") as caught:
                store.add([("UNCONFIRMED", second)])
            service = from_store_error(caught.value)
            assert isinstance(service, StoreUnavailable) and service.retry_after_s >= 1
            assert service.body()["retryable"] is True
        finally:
            os.kill(replica.proc.pid, signal.SIGCONT)
        # The retry finds the first attempt kept (the primary did not fail over): said as a conflict on the same ID.
        with pytest.raises(ItemExistsError) as exists:
            store.add([("UNCONFIRMED", second)])
        assert exists.value.packed == second
        assert RedisCatalog(primary.url + "?min_replicas=0").remove(["UNCONFIRMED"]) == 4
    finally:
        replica.kill()
        primary.kill()


class Writer(threading.Thread):
    """Admin changes one after another (adds, and removes of earlier adds), each retried on the retryable errors
    (503: not confirmed, or Redis unreachable, e.g. a remove's read of the item's ID when the primary dies) until
    answered; records what was answered and when."""

    def __init__(self, url: str, ids: list[int], pause_s: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.store = RedisCatalog(url)
        self.ids, self.pause_s = ids, pause_s
        self.present: dict[str, int] = {}  # what the answers say the catalog holds (of this writer's items)
        self.sent = self.ok = self.ok_after_retry = self.retryable = self.landed_before = 0
        self.ok_times: list[float] = []
        self.refused_times: list[float] = []
        self.stop_event = threading.Event()

    def change(self, apply: Callable[[], int], landed: type[Exception]) -> None:
        self.sent += 1
        refused = False
        while True:
            try:
                apply()
                self.ok += 1
                self.ok_after_retry += refused
                self.ok_times.append(time.monotonic())
                return
            except StoreUnavailableError:  # WriteNotConfirmedError too
                self.retryable += 1
                self.refused_times.append(time.monotonic())
                refused = True
                time.sleep(0.1)
            except landed:
                assert refused, "a conflict on a change that was never refused"
                self.landed_before += 1  # the refused attempt had been applied and kept
                return

    def run(self) -> None:
        for n, packed in enumerate(self.ids):
            if self.stop_event.is_set():
                return
            item = f"FO-{n}"
            self.change(lambda item=item, packed=packed: self.store.add([(item, packed)]), ItemExistsError)
            self.present[item] = packed
            if n % 3 == 2:  # remove an earlier add
                gone = f"FO-{n - 2}"
                self.change(lambda gone=gone: self.store.remove([gone]), ItemNotFoundError)
                del self.present[gone]
            time.sleep(self.pause_s)


@pytest.mark.slow
def test_a_primary_killed_under_admin_writes_loses_no_acknowledged_change(sentinel_set: SentinelSet,  # noqa: F811
                                                                          catalog: Catalog) -> None:
    url = sentinel_set.url
    RedisCatalog(url).push(catalog)
    followers = [CatalogFollower(RedisCatalog(url), LocalCatalog.from_catalog(catalog), block_ms=100,
                                 max_backoff_s=0.2) for _ in range(2)]
    for f in followers:
        f.sync_once()
        f.start()
    writer = Writer(url, free_ids(catalog, 150))
    writer.start()
    try:
        assert wait_until(lambda: writer.ok >= 30, timeout=30)
        old_port = sentinel_set.kill_primary().port
        killed_at = time.monotonic()  # the process is gone (waited for): nothing after this reached it
        assert wait_until(lambda: any(t > killed_at for t in writer.ok_times), timeout=30), "writes never recovered"
        recovered_at = min(t for t in writer.ok_times if t > killed_at)
        new_port = sentinel_set.primary_port()
        assert new_port is not None and new_port != old_port
        # A change written on the new primary, then every follower serving it.
        marker = writer.sent
        assert wait_until(lambda: writer.sent >= marker + 30 or not writer.is_alive(), timeout=30)
        version = RedisCatalog(url).remote_state().version
        assert version is not None
        assert wait_until(lambda: all(f.local.version >= version for f in followers), timeout=30)
        converged_at = time.monotonic()
        writer.stop_event.set()
        writer.join(timeout=60)
        assert not writer.is_alive()
        final = RedisCatalog(url).snapshot()
        assert final is not None
        items = dict(final.table.pairs())
        ours = {i: p for i, p in items.items() if i.startswith("FO-")}
        assert ours == writer.present  # every answered change is there, and nothing else of the writer's
        assert wait_until(lambda: all(f.local.version == final.version for f in followers), timeout=30)
        for f in followers:
            assert dict(f.local.view().item_to_id) == items  # exactly the store's catalog, no mix
        print(f"\nFAILOVER changes sent {writer.sent}, answered ok {writer.ok} ({writer.ok_after_retry} of them on a "
              f"retry), answers retryable {writer.retryable} (retried changes found already applied: "
              f"{writer.landed_before}), present afterwards "
              f"{len(ours)} of {len(writer.present)} expected; kill -> writes ok again {recovered_at - killed_at:.2f} s; "
              f"kill -> every follower serving a post-failover version {converged_at - killed_at:.2f} s; "
              f"resyncs {[f.health.resyncs for f in followers]}, forks {[f.health.forks for f in followers]}")
    finally:
        writer.stop_event.set()
        for f in followers:
            f.stop()


@pytest.mark.slow
def test_a_tls_sentinel_url_as_documented_confirms_writes_and_follows_a_failover(
        tls_sentinel_set: SentinelSet, catalog: Catalog) -> None:  # noqa: F811
    """`rediss+sentinel://s1,s2,s3/SERVICE?ssl_ca_certs=/ca.pem` as docs/operations.md writes it, against a primary,
    a replica and three Sentinels that listen on TLS only (plain ports closed) and replicate and talk to each
    other over TLS: push, add and remove confirmed by the replica (WAIT, min_replicas=1), a follower applying
    them, and a failover that the store and the follower find through the Sentinels."""
    url = tls_sentinel_set.url
    assert url.startswith("rediss+sentinel://") and url.endswith(f"/nezha?ssl_ca_certs={tls_sentinel_set.tls_files[0]}")
    replica = tls_sentinel_set.replica
    assert replica is not None and replica.proc is not None
    store = RedisCatalog(url + "&min_replicas=1&wait_timeout_ms=2000")
    assert store.min_replicas == 1 and store.deployment.target.tls
    assert store.push(catalog, source="tls-sentinel") == 1
    follower = CatalogFollower(RedisCatalog(url), LocalCatalog.from_catalog(catalog), block_ms=100,
                               max_backoff_s=0.2)
    follower.sync_once()
    follower.start()
    on_replica = RedisCatalog(replica.url)  # the replica itself, read over TLS
    try:
        a, b, c, d = free_ids(catalog, 4)
        assert store.add([("TLS-A", a), ("TLS-B", b)], {"TLS-A": {"title": "over TLS"}}) == 2
        assert on_replica.remote_state().version == 2  # answered after WAIT: the replica has it already
        assert store.remove(["TLS-B"]) == 3
        assert on_replica.remote_state().version == 3
        assert follower.local.wait_for(3, timeout=5.0)
        assert follower.local.lookup(["TLS-A", "TLS-B"])[1] == ["TLS-B"]
        assert follower.local.view().meta_of("TLS-A")["title"] == "over TLS"
        # WAIT counts the replica's acknowledgements over its TLS link: a replica that sends none (stopped)
        # leaves the write unconfirmed.
        os.kill(replica.proc.pid, signal.SIGSTOP)
        try:
            with pytest.raises(WriteNotConfirmedError, match="0 of 1 replica"):
                RedisCatalog(url + "&min_replicas=1&wait_timeout_ms=200").add([("TLS-C", c)])
        finally:
            os.kill(replica.proc.pid, signal.SIGCONT)
        assert wait_until(lambda: on_replica.remote_state().version == 4)
        # Failover: the Sentinels promote the replica over TLS; a write finds the new primary through them.
        primary = tls_sentinel_set.kill_primary()
        assert wait_until(lambda: tls_sentinel_set.primary_port() == replica.port, timeout=20.0)
        after = RedisCatalog(url)  # default min_replicas: 0 for the promoted primary alone
        assert wait_until(lambda: _answered(lambda: after.add([("TLS-D", d)])), timeout=10.0)
        assert primary.port != replica.port and after.remote_state().version == 5
        assert follower.local.wait_for(5, timeout=10.0)
        assert follower.local.lookup(["TLS-A", "TLS-C", "TLS-D"])[1] == []
    finally:
        follower.stop()
        follower.join(timeout=5)


def _answered(write: Callable[[], int]) -> bool:
    """True once `write` is answered; False on the retryable errors a failover in progress gives (503: not
    confirmed, or Redis unreachable when the write reads the catalog's layout first)."""
    try:
        write()
    except StoreUnavailableError:  # WriteNotConfirmedError too
        return False
    return True


@pytest.mark.slow
def test_admin_writes_through_the_service_survive_a_failover(ray_session, tiny_checkpoint: Path,  # noqa: ANN001
                                                             sentinel_set: SentinelSet) -> None:  # noqa: F811
    """The same failover through Ray Serve over HTTP (2 replicas following the Sentinel URL): every 200 is in the
    catalog afterwards and served by both replicas; writes during the failover get 503 store_unavailable with
    Retry-After, and are answered when retried."""
    import httpx
    from ray import serve
    from redis_fixtures import free_port
    from serve_fixtures import ADMIN, RECOMMENDER_OPTIONS, Service, service_settings

    from nezha.live_catalog import codes_of, load_item_metadata
    from serve.app import ServeConfig, build_app

    catalog = Catalog.load(tiny_checkpoint / "catalog")
    url = sentinel_set.url
    RedisCatalog(url).push(catalog, item_meta=load_item_metadata(tiny_checkpoint, catalog))
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 60})
    try:
        serve.run(build_app(ServeConfig(**service_settings(tiny_checkpoint, url)), {"Recommender": RECOMMENDER_OPTIONS}),
                  name="nezha", route_prefix="/")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            service = Service(client, sentinel_set.primary, catalog, port, tiny_checkpoint)
            ids = free_ids(catalog, 40)
            present: dict[str, int] = {}
            counts = {"sent": 0, "ok": 0, "retryable": 0, "landed": 0}
            ok_times: list[float] = []
            killed_at: list[float] = []

            def send(request: Callable[[], httpx.Response], landed: int) -> None:
                counts["sent"] += 1
                refused = False
                while True:
                    r = request()
                    if r.status_code == 200:
                        counts["ok"] += 1
                        ok_times.append(time.monotonic())
                        return
                    if refused and r.status_code == landed:
                        counts["landed"] += 1
                        return
                    assert r.status_code == 503 and r.json()["error"] == "store_unavailable", r.text
                    assert r.json()["retryable"] is True and int(r.headers["Retry-After"]) >= 1
                    counts["retryable"] += 1
                    refused = True
                    time.sleep(0.1)

            for n, packed in enumerate(ids):
                if n == 10:
                    sentinel_set.kill_primary()
                    killed_at.append(time.monotonic())
                item = f"HTTP-{n}"
                send(lambda item=item, packed=packed: client.post(
                    "/v1/catalog/items", headers=ADMIN,
                    json={"items": [{"item_id": item, "codes": codes_of(packed, catalog.codebook_sizes)}]}), 409)
                present[item] = packed
                if n % 4 == 3:
                    gone = f"HTTP-{n - 3}"
                    send(lambda gone=gone: client.delete(f"/v1/catalog/items/{gone}", headers=ADMIN), 404)
                    del present[gone]
            recovered = min(t for t in ok_times if t > killed_at[0]) - killed_at[0]
            items = dict(RedisCatalog(url).snapshot().table.pairs())
            assert {i: p for i, p in items.items() if i.startswith("HTTP-")} == present
            final = RedisCatalog(url).remote_state().version
            start = time.monotonic()
            replicas = service.wait_replicas(lambda b: b["catalog_version"] >= final, timeout=60)
            converged = time.monotonic() - start
            assert {b["catalog_version"] for b in replicas.values()} == {final}
            for item in present:  # each replica knows every item the answers said is there
                answers = {client.get(f"/v1/items/{item}").json().get("replica") for _ in range(6)}
                assert None not in answers
            print(f"\nFAILOVER-HTTP changes sent {counts['sent']}, answered 200 {counts['ok']}, answers 503 "
                  f"retryable {counts['retryable']} (retried changes found already applied: {counts['landed']}), "
                  f"present afterwards {len(present)} of {len(present)}; kill -> writes 200 again {recovered:.2f} s; "
                  f"last write -> both replicas serving its version {converged:.2f} s")
    finally:
        serve.shutdown()


@pytest.mark.slow
def test_a_cluster_primary_killed_under_admin_writes_loses_no_acknowledged_change(tmp_path: Path,
                                                                                  catalog: Catalog) -> None:
    """A Redis Cluster of 3 primaries with a replica each: the primary of the catalog's slot is killed under a
    stream of changes; its replica takes the slot over and the writes and the follower move with it."""
    from redis_fixtures import RedisClusterSet

    cluster = RedisClusterSet(tmp_path / "cluster", replicas=1, node_timeout_ms=1000)
    cluster.start()
    try:
        url = cluster.url
        store = RedisCatalog(url)
        store.push(catalog)
        follower = CatalogFollower(RedisCatalog(url), LocalCatalog.from_catalog(catalog), block_ms=100,
                                   max_backoff_s=0.2)
        follower.sync_once()
        follower.start()
        writer = Writer(url, free_ids(catalog, 150))
        writer.start()
        try:
            assert wait_until(lambda: writer.ok >= 30, timeout=30)
            victim = cluster.primary_of(store.version_key)
            assert online_replicas(victim.client().info("replication")) == 1  # so writes waited for it
            victim.kill()
            killed_at = time.monotonic()
            assert wait_until(lambda: any(t > killed_at for t in writer.ok_times), timeout=30), "writes never recovered"
            recovered_at = min(t for t in writer.ok_times if t > killed_at)
            assert cluster.primary_of(store.version_key).port != victim.port
            marker = writer.sent
            assert wait_until(lambda: writer.sent >= marker + 30 or not writer.is_alive(), timeout=30)
            version = RedisCatalog(url).remote_state().version
            assert version is not None and wait_until(lambda: follower.local.version >= version, timeout=30)
            converged_at = time.monotonic()
            writer.stop_event.set()
            writer.join(timeout=60)
            final = RedisCatalog(url).snapshot()
            assert final is not None
            items = dict(final.table.pairs())
            assert {i: p for i, p in items.items() if i.startswith("FO-")} == writer.present
            assert wait_until(lambda: follower.local.version == final.version, timeout=30)
            assert dict(follower.local.view().item_to_id) == items
            print(f"\nFAILOVER-CLUSTER changes sent {writer.sent}, answered ok {writer.ok} ({writer.ok_after_retry} "
                  f"on a retry), answers retryable {writer.retryable} (found already applied: {writer.landed_before}), "
                  f"present afterwards {len(writer.present)} of {len(writer.present)}; kill -> writes ok again "
                  f"{recovered_at - killed_at:.2f} s; kill -> follower serving a post-failover version "
                  f"{converged_at - killed_at:.2f} s; resyncs {follower.health.resyncs}, forks {follower.health.forks}")
        finally:
            writer.stop_event.set()
            follower.stop()
    finally:
        cluster.stop()
