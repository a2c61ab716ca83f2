"""The live catalog's large-catalog paths against a real redis-server, at test sizes: chunked push and swap,
chunked snapshots that stay exact while changes land, a follower that overruns the feed and resyncs once,
the snapshot blob (written by push, read with the feed since its version, republished by a follower when
the feed no longer reaches back to it), HEXISTS-based new-item IDs, and the compact maps (checked against a
dict model by hypothesis)."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from redis_fixtures import RedisServer, redis_server  # noqa: F401

import nezha.live_catalog.item_table as item_table
import nezha.live_catalog.redis_store as redis_store
from nezha.catalog import Catalog
from nezha.live_catalog import (
    CatalogFollower,
    FeedEntry,
    ItemMap,
    ItemTable,
    LocalCatalog,
    NewItem,
    RedisCatalog,
    add_new_items,
)
from nezha.semantic_ids.quantizer import ResidualQuantizer, assign_new_item
from nezha.verify.codec import pack, unpack

SIZES = (32, 32, 32)


def synthetic_catalog(n: int, seed: int = 0, prefix: str = "SKU") -> Catalog:
    rng = np.random.default_rng(seed)
    packed = rng.choice(int(np.prod(SIZES)), size=n, replace=False)
    return Catalog([f"{prefix}-{i:06d}" for i in range(n)], unpack(packed, SIZES), SIZES,
                   [f"{prefix} item {i}" for i in range(n)])


def redis_items(store: RedisCatalog) -> dict[str, int]:
    return {item: int(p) for key in store.map_keys("item2id") for item, p in store.client.hgetall(key).items()}


@pytest.fixture(autouse=True)
def small_shards(monkeypatch: pytest.MonkeyPatch) -> None:
    """Shard the maps at test sizes (every push here of more than 400 items spreads over several hashes),
    so every path below runs on the layout that 10M-item catalogs get."""
    monkeypatch.setattr(redis_store, "SHARD_FIELDS", 400)


def local_items(local: LocalCatalog) -> dict[str, int]:
    return dict(local.view().item_to_id.items())


@pytest.fixture
def store(redis_server: RedisServer) -> Iterator[RedisCatalog]:  # noqa: F811
    s = RedisCatalog(redis_server.url, feed_maxlen=50)
    yield s
    s.close()


def test_push_swaps_whole_catalogs_and_leaves_no_staging_keys(store: RedisCatalog) -> None:
    first, second = synthetic_catalog(3000, seed=1, prefix="A"), synthetic_catalog(2000, seed=2, prefix="B")
    store.push(first, chunk=250)
    seen: list[int] = []
    stop = threading.Event()

    def read() -> None:  # a reader sees one catalog or the other, never a half-written one
        while not stop.is_set():
            seen.append(store.status()["size"])

    reader = threading.Thread(target=read)
    reader.start()
    try:
        version = store.push(second, chunk=250)
    finally:
        stop.set()
        reader.join()
    assert set(seen) <= {3000, 2000} and seen
    assert redis_items(store) == dict(zip(second.item_ids, second.packed.tolist(), strict=True))
    assert store.layout() == 8 and len(store.map_keys("item2id")) == 8  # 2000 items, <= 400 per hash
    for name in redis_store.MAPS:
        assert sum(store.client.hlen(k) for k in store.map_keys(name)) == 2000
        assert all(store.client.ttl(k) == -1 for k in store.map_keys(name))  # the staging TTL stays behind
    assert not set(store.client.keys(f"{store.tag}:item2id:*")) - set(store.map_keys("item2id"))  # 3000's 8 gone
    assert store.client.keys(f"{store.tag}:staging:*") == []
    assert store.read_feed(version - 1, None)[-1].op == "reset"
    assert store.push(first, if_empty=True) is None and store.client.keys(f"{store.tag}:staging:*") == []


@pytest.mark.parametrize("use_blob", [True, False])
def test_chunked_snapshots_are_exact_while_changes_land(redis_server: RedisServer,  # noqa: F811
                                                        monkeypatch: pytest.MonkeyPatch, use_blob: bool) -> None:
    store = RedisCatalog(redis_server.url)  # the default feed: it holds what lands during a read
    catalog = synthetic_catalog(1500)
    store.push(catalog, shards=2)  # ~750 fields per hash: HSCAN steps of ~50 (a small listpack comes whole)
    base_version = store.remote_state().version
    state = dict(zip(catalog.item_ids, catalog.packed.tolist(), strict=True))
    history: dict[int, dict[str, int]] = {base_version: dict(state)}  # the catalog at each version
    free = [p for p in range(int(np.prod(SIZES))) if p not in set(state.values())]
    stop = threading.Event()

    def write() -> None:
        rng = np.random.default_rng(5)
        n = 0
        while not stop.is_set():
            if rng.random() < 0.5:
                item, packed = f"NEW-{n}", free.pop()
                version = store.add([(item, packed)])
                state[item] = packed
            else:
                item = sorted(state)[int(rng.integers(len(state)))]
                version = store.remove([item])
                free.append(state.pop(item))
            history[version] = dict(state)
            n += 1
            time.sleep(0.002)  # a steady stream, not a GIL-hogging loop

    replays = []
    real_replay = store._replay
    monkeypatch.setattr(store, "_replay", lambda *a: replays.append(a[1:3]) or real_replay(*a))
    writer = threading.Thread(target=write)
    writer.start()
    try:
        snapshots = [store.snapshot(count=50, use_blob=use_blob) for _ in range(4)]
    finally:
        stop.set()
        writer.join()
    assert replays, "no change landed during a snapshot: the test did not exercise the replay"
    for snapshot in snapshots:
        assert snapshot is not None and dict(snapshot.table.pairs()) == history[snapshot.version]
        assert snapshot.blob_version == (base_version if use_blob else None)


def test_a_replica_starts_from_the_blob_and_follows_the_feed(redis_server: RedisServer,  # noqa: F811
                                                             store: RedisCatalog,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(redis_store, "BLOB_ROWS", 700)  # several blob keys, the last one partial
    catalog = synthetic_catalog(2000)
    version = store.push(catalog)
    assert store.blob_state() == (store.remote_state().epoch, version)
    assert len(store.client.keys(f"{store.blob_key}:*")) == 3
    odd = [("é-ü/☃", 5), ("x" * 200, 9)]  # ids of other lengths and multi-byte UTF-8
    free = [p for p in range(int(np.prod(SIZES))) if p not in set(catalog.packed.tolist())]
    store.remove([catalog.item_ids[0]])
    store.add([(item, free[k]) for item, k in odd])
    reader = RedisCatalog(redis_server.url, feed_maxlen=50)
    monkeypatch.setattr(reader, "_read_snapshot", lambda count: pytest.fail("scanned instead of reading the blob"))
    follower = CatalogFollower(reader, LocalCatalog({}, SIZES), block_ms=100, max_backoff_s=0.2)
    follower.sync_once()
    assert local_items(follower.local) == redis_items(store) and follower.local.version == version + 2
    follower.start()
    try:
        last = store.add([("AFTER", free[20])])
        assert follower.local.wait_for(last, timeout=10.0)
        assert local_items(follower.local) == redis_items(store)
        assert follower.health.resyncs == 1
    finally:
        follower.stop()
        follower.join(timeout=5)
    # a second push replaces the blob and leaves none of the first one's keys
    second = synthetic_catalog(800, seed=3, prefix="B")
    version = store.push(second)
    assert store.blob_state()[1] == version and len(store.client.keys(f"{store.blob_key}:*")) == 2
    snapshot = store.snapshot()
    assert snapshot is not None and snapshot.blob_version == version
    assert dict(snapshot.table.pairs()) == dict(zip(second.item_ids, second.packed.tolist(), strict=True))


def test_a_blob_older_than_the_feed_is_scanned_past_and_republished(redis_server: RedisServer,  # noqa: F811
                                                                    store: RedisCatalog) -> None:
    catalog = synthetic_catalog(1000)
    pushed = store.push(catalog)
    free = iter(p for p in range(int(np.prod(SIZES))) if p not in set(catalog.packed.tolist()))
    for n in range(120):  # more changes than the 50-entry feed holds: the blob is out of its reach
        store.add([(f"LATE-{n}", next(free))])
    snapshot = store.snapshot()
    assert snapshot is not None and snapshot.blob_version is None  # scanned
    assert dict(snapshot.table.pairs()) == redis_items(store)
    follower = CatalogFollower(RedisCatalog(redis_server.url, feed_maxlen=50), LocalCatalog({}, SIZES),
                               block_ms=100, max_backoff_s=0.2)
    follower.sync_once()  # scans too, then publishes its copy as the blob
    assert follower._publisher is not None
    follower._publisher.join(timeout=10)
    now = store.remote_state()
    assert store.blob_state() == (now.epoch, now.version) and now.version == pushed + 120
    store.remove(["LATE-3"])
    snapshot = store.snapshot()
    assert snapshot is not None and snapshot.blob_version == now.version  # the new blob plus one feed entry
    assert dict(snapshot.table.pairs()) == redis_items(store)
    # publishing refuses what would not help: an older or equal version, another epoch, a concurrent publisher
    assert store.publish_snapshot(snapshot.table, now.version, now.epoch) == "older"
    assert store.publish_snapshot(snapshot.table, now.version + 1, "another-epoch") == "stale"
    store.client.set(f"{store.blob_key}:lock", "someone", ex=60)
    assert store.publish_snapshot(snapshot.table, now.version + 1, now.epoch) == "busy"
    assert store.blob_state()[1] == now.version
    assert not [k for k in store.client.keys(f"{store.blob_key}:*")
                if k != f"{store.blob_key}:lock" and store.client.ttl(k) != -1]  # no staged keys left behind


def test_a_follower_publishes_its_last_merged_table_as_the_blob(redis_server: RedisServer,  # noqa: F811
                                                                 store: RedisCatalog,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Once the blob is half a feed behind, a follower whose maps merged recently publishes that merge's table
    at its version (no second O(N) pass), and a replica starting then reads it plus the feed since."""
    monkeypatch.setattr(item_table, "MERGE_AT", 6)
    monkeypatch.setattr(item_table, "MIDDLE_AT", 3)
    monkeypatch.setattr(item_table, "RECENT_AT", 2)
    catalog = synthetic_catalog(500)
    pushed = store.push(catalog)
    local = LocalCatalog({}, SIZES)
    follower = CatalogFollower(RedisCatalog(redis_server.url, feed_maxlen=40), local, block_ms=100,
                               max_backoff_s=0.2, batch_ms=0)
    follower.sync_once()
    assert follower._blob_version == pushed and follower._publisher is None  # the push's blob is current
    free = iter(p for p in range(int(np.prod(SIZES))) if p not in set(catalog.packed.tolist()))
    as_table = ItemMap.as_table
    monkeypatch.setattr(ItemMap, "as_table", lambda self: pytest.fail("a second O(N) pass") if threading.current_thread()
                        .name == "nezha-catalog-blob" else as_table(self))
    publish, priorities = follower.store.publish_snapshot, []

    def observed_publish(*args: object) -> str:  # the real publish, noting the priority of the thread it runs in
        priorities.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        return publish(*args)

    monkeypatch.setattr(follower.store, "publish_snapshot", observed_publish)
    for n in range(25):  # one change a read; past 20 (half the feed) ahead of the push's blob, it publishes
        store.add([(f"LATE-{n}", next(free))])
        if local._merge is not None:
            local._merge._thread.join(10)  # so each merge is swapped in by the next change
        follower._step()
        if follower._publisher is not None:
            break
    assert follower._publisher is not None and local.version == pushed + 21
    follower._publisher.join(10)
    merged = local.merged()
    assert merged is not None and pushed < merged[0] < local.version
    assert store.blob_state()[1] == merged[0] == follower._blob_version
    if sys.platform.startswith("linux"):
        assert priorities == [19]  # published at the lowest priority
    store.add([("LATER", next(free))])
    snapshot = store.snapshot()
    assert snapshot is not None and snapshot.blob_version == merged[0]  # the blob plus the feed since it
    follower._step()
    assert dict(snapshot.table.pairs()) == redis_items(store) == local_items(local)


def test_a_follower_that_overruns_the_feed_resyncs_once_and_catches_up(redis_server: RedisServer,  # noqa: F811
                                                                       store: RedisCatalog) -> None:
    catalog = synthetic_catalog(2000)
    store.push(catalog)
    follower = CatalogFollower(RedisCatalog(redis_server.url, feed_maxlen=50), LocalCatalog.from_catalog(catalog),
                               block_ms=100, max_backoff_s=0.2)
    follower.sync_once()  # in step; paused (not started) while a burst overruns the 50-entry feed
    free = iter(p for p in range(int(np.prod(SIZES))) if p not in set(catalog.packed.tolist()))
    for n in range(400):
        store.add([(f"BURST-{n}", next(free))])
    assert int(store.client.xinfo_stream(store.feed)["first-entry"][0].split("-")[0]) > follower.local.version + 1

    stop = threading.Event()

    def keep_writing() -> None:  # changes keep coming while it resyncs and catches up
        n = 0
        while not stop.is_set() and n < 300:
            store.add([(f"LIVE-{n}", next(free))])
            if n % 3 == 2:
                store.remove([f"LIVE-{n - 1}"])
            n += 1

    writer = threading.Thread(target=keep_writing)
    follower.start()
    writer.start()
    try:
        writer.join(timeout=30)
        stop.set()
        target = store.remote_state().version
        assert follower.local.wait_for(target, timeout=10.0)
        assert follower.health.resyncs == 2  # start-up + the one overrun
        assert local_items(follower.local) == redis_items(store)
        valid = np.sort(np.fromiter(redis_items(store).values(), dtype=np.int64))
        assert np.array_equal(follower.local.view().verifier.contains(torch.from_numpy(valid)).numpy(),
                              np.ones(valid.size, dtype=bool))
        assert follower.degraded() == []
    finally:
        stop.set()
        follower.stop()
        follower.join(timeout=5)


def test_shard_counts_keep_each_hash_under_the_cap() -> None:
    assert redis_store.shards_for(0) == redis_store.shards_for(400) == 1
    assert redis_store.shards_for(401) == 2 and redis_store.shards_for(3000) == 8
    redis_store.SHARD_FIELDS = 131_072  # the autouse fixture restores the test value, then the real one
    assert redis_store.shards_for(10_000_000) == 128 and redis_store.shards_for(100_000_000) == 1024


def test_a_push_with_another_layout_is_noticed_by_every_client(redis_server: RedisServer) -> None:  # noqa: F811
    writer, reader = RedisCatalog(redis_server.url), RedisCatalog(redis_server.url)
    try:
        catalog = synthetic_catalog(300, prefix="A")
        writer.push(catalog)
        assert reader.layout() == 1 and reader.item_metas(["A-000001"])[0]["title"] == "A item 1"
        writer.push(catalog, shards=4)  # the reader still caches the 1-hash layout
        assert [m and m["title"] for m in reader.item_metas(["A-000001", "nope"])] == ["A item 1", None]
        free = next(p for p in range(int(np.prod(SIZES))) if p not in set(catalog.packed.tolist()))
        reader._shards = 1
        reader.add([("NEW", free)])  # the script refuses the old layout's keys; the client reads it again
        assert reader.layout() == 4 and reader.id_in_use(free) and "NEW" in redis_items(writer)
        writer.push(catalog, shards=2)  # NEW is gone with the catalog it was added to
        version = reader.remove(["A-000002"])  # its ID is read under the cached 4-hash layout first
        snapshot = reader.snapshot(use_blob=False)
        assert snapshot is not None and snapshot.version == version
        expected = dict(zip(catalog.item_ids, catalog.packed.tolist(), strict=True))
        del expected["A-000002"]
        assert dict(snapshot.table.pairs()) == expected == redis_items(reader)
        assert reader.status()["size"] == 299 and not reader.id_in_use(free)
    finally:
        writer.close()
        reader.close()


def test_a_catalog_pushed_before_sharding_is_read_and_replaced(redis_server: RedisServer) -> None:  # noqa: F811
    """Keys as a push before sharding wrote them (one unsuffixed hash per map, no `shards` in meta)."""
    store = RedisCatalog(redis_server.url)
    try:
        catalog = synthetic_catalog(50)
        tag, client = store.tag, store.client
        pairs = dict(zip(catalog.item_ids, (str(p) for p in catalog.packed.tolist()), strict=True))
        client.hset(f"{tag}:item2id", mapping=pairs)
        client.hset(f"{tag}:id2item", mapping={p: i for i, p in pairs.items()})
        client.hset(f"{tag}:itemmeta", mapping={i: '{"title": "old"}' for i in pairs})
        client.hset(f"{tag}:meta", mapping={"codebook_sizes": "[32, 32, 32]", "epoch": "e0"})
        client.set(f"{tag}:version", 1)
        assert store.layout() == 0 and store.status()["size"] == 50
        assert store.item_metas([catalog.item_ids[0]])[0]["title"] == "old"
        store.remove([catalog.item_ids[0]])
        snapshot = store.snapshot(use_blob=False)
        assert snapshot is not None and len(snapshot.table) == 49
        store.push(synthetic_catalog(900, prefix="B"))  # the push moves it to the sharded layout
        assert store.layout() == 4 and store.status()["size"] == 900
        assert not client.exists(f"{tag}:item2id", f"{tag}:id2item", f"{tag}:itemmeta")
    finally:
        store.close()


def test_add_by_text_checks_ids_with_hexists_never_hkeys(store: RedisCatalog, tiny_prepared) -> None:
    catalog = Catalog.load(tiny_prepared / "catalog")
    quantizer = ResidualQuantizer.load(tiny_prepared / "quantizer.safetensors")
    store.push(catalog)
    store.client.config_resetstat()
    x = np.random.default_rng(0).normal(size=quantizer.dim).astype(np.float32)
    used = set(catalog.packed.tolist())
    expected = int(pack(assign_new_item(x, quantizer, used), catalog.codebook_sizes))
    version, pairs = add_new_items(store, [NewItem("BY-TEXT", text="t")], catalog.codebook_sizes,
                                   lambda: quantizer, lambda texts: x[None])
    assert pairs == [("BY-TEXT", expected)] and version == store.remote_state().version
    stats = store.client.info("commandstats")
    assert "cmdstat_hkeys" not in stats and "cmdstat_hgetall" not in stats and stats["cmdstat_hexists"]["calls"] >= 1


def test_the_local_copy_holds_no_python_object_per_item() -> None:
    n = 100_000
    rng = np.random.default_rng(0)
    packed = rng.choice(1 << 24, size=n, replace=False)
    local = LocalCatalog(ItemTable.of((f"B0{i:08d}", int(p)) for i, p in enumerate(packed)), (256, 256, 256))
    per_item = local.nbytes()["item_maps"] / n
    assert per_item < 64, per_item  # ~40 bytes of arrays + the 10-byte id
    assert local.lookup(["B000000007", "NOPE"]) == ([int(packed[7])], ["NOPE"])
    assert local.items_of([int(packed[99_999])])[0] == ["B000099999"]
    local.apply([FeedEntry(1, "remove", [("B000000007", int(packed[7]))]),
                 FeedEntry(2, "add", [("NEW", int(packed[7]))])])
    assert local.items_of([int(packed[7])]) == (["NEW"], 2) and len(local) == n


pairs_ops = st.lists(st.tuples(st.booleans(), st.integers(0, 40), st.integers(0, 60)), max_size=120)


@settings(max_examples=60, deadline=None)
@given(initial=st.dictionaries(st.integers(0, 60), st.integers(0, 40), max_size=30), ops=pairs_ops,
       merge_at=st.sampled_from([1, 3, 8, 1000]))
def test_item_map_matches_a_dict_after_any_changes(initial: dict[int, int], ops: list[tuple[bool, int, int]],
                                                   merge_at: int) -> None:
    """Adds and removes as Redis allows them (an add of a free id and packed ID, a removal of a held pair),
    merged into new tables at any point: the map answers like a pair of dicts, and reports born/died IDs."""
    old = item_table.MERGE_AT, item_table.MIDDLE_AT, item_table.RECENT_AT
    item_table.MERGE_AT, item_table.MIDDLE_AT, item_table.RECENT_AT = merge_at, max(1, merge_at // 2), max(1, merge_at // 4)
    try:
        by_item: dict[str, int] = {}  # item id -> packed ID, one-to-one
        for packed, item_n in initial.items():
            by_item.setdefault(f"i{item_n}-é", packed)
        items = ItemMap.of(ItemTable.of(by_item.items()))
        for is_add, item_n, packed in ops:
            item = f"i{item_n}-é"
            holder = {p: i for i, p in by_item.items()}
            if is_add and item not in by_item and packed not in holder:
                change, by_item[item] = ("add", item, packed), packed
            elif not is_add and item in by_item:
                change = ("remove", item, by_item.pop(item))
            else:
                continue
            items, born, died = items.changed([change])
            assert (born.tolist(), died.tolist()) == (([change[2]], []) if change[0] == "add" else ([], [change[2]]))
        holder = {p: i for i, p in by_item.items()}
        assert len(items) == len(by_item)
        assert items.packed_ids().tolist() == sorted(holder)
        packed, ids = items.as_table().sorted_rows()  # what a published blob holds
        assert packed.tolist() == sorted(holder) and [ids.text(r) for r in range(len(ids))] == \
            [holder[p] for p in sorted(holder)]
        for n in range(41):
            assert items.packed_of(f"i{n}-é") == by_item.get(f"i{n}-é")
        for p in range(61):
            assert items.item_of(p) == holder.get(p) and items.has_packed(p) == (p in holder)
    finally:
        item_table.MERGE_AT, item_table.MIDDLE_AT, item_table.RECENT_AT = old


def test_the_maps_merge_in_a_thread_of_their_own_while_changes_go_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """A full bottom layer is merged into a new table off the apply path: changes applied while the merge
    runs answer at once and are replayed on the merged table, which then replaces the layers."""
    monkeypatch.setattr(item_table, "MERGE_AT", 6)
    monkeypatch.setattr(item_table, "MIDDLE_AT", 3)
    monkeypatch.setattr(item_table, "RECENT_AT", 2)
    release, started = threading.Event(), threading.Event()
    as_table = ItemMap.as_table

    priorities: list[int] = []

    def slow_as_table(self: ItemMap) -> ItemTable:  # the merge thread waits until the test lets it finish
        priorities.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        started.set()
        assert release.wait(10)
        return as_table(self)

    monkeypatch.setattr(ItemMap, "as_table", slow_as_table)
    local = LocalCatalog({f"I{i}": i for i in range(20)}, (8, 8, 8))
    first_table = local.view().items.table
    by_item = {f"I{i}": i for i in range(20)}
    version = 0

    def change(op: str, item: str, packed: int) -> None:
        nonlocal version
        version += 1
        local.apply([FeedEntry(version, op, [(item, packed)])])
        if op == "add":
            by_item[item] = packed
        else:
            by_item.pop(item)
        view = local.view()
        assert {i: view.items.packed_of(i) for i in by_item} == by_item and len(view.items) == len(by_item)
        assert sorted(view.verifier.ids) == sorted(by_item.values()) == view.items.packed_ids().tolist()

    for n in range(14):  # past MERGE_AT in the bottom layer: the merge starts, and waits
        change("add", f"N{n}", 100 + n)
    assert started.wait(10) and local._merge is not None
    for n in range(5):  # applied at once while the merge is held
        change("remove", f"I{n}", n)
    merging = local._merge
    assert merging is not None and merging.replay[-5:] == [("remove", f"I{n}", n) for n in range(5)]
    release.set()
    merging._thread.join(10)
    change("add", "LAST", 200)  # the next change swaps in the merged table, with the held changes on it
    table = local.view().items.table  # the catalog as the merge began (the adds); the later changes layered on it
    assert local._merge is not merging and table is not first_table and table.has_packed(105) and table.has_packed(0)
    assert local.view().items.packed_of("I0") is None
    # the merged table is kept with its version (what a follower publishes as the snapshot blob)
    assert local.merged() == (merging.version, table) and merging.version == 12
    assert dict(table.pairs()) == {**{f"I{i}": i for i in range(20)}, **{f"N{n}": 100 + n for n in range(12)}}
    if sys.platform.startswith("linux"):  # the merge ran at the lowest priority, the applying thread did not
        assert priorities[0] == 19 and os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) < 19
    local.replace({"ONLY": 7}, version + 1, source="redis")  # a resync drops any merge in flight
    assert local._merge is None and local.lookup(["ONLY", "I9"]) == ([7], ["I9"])
