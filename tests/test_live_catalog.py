"""nezha.live_catalog against a real redis-server: atomic changes, the local copy, the follower (gaps, restarts,
outages), the in-process store and new items. The `nezha catalog` command is tests/test_cli_catalog.py."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from redis_fixtures import RedisServer, redis_server, wait_until  # noqa: F401

from nezha.catalog import Catalog
from nezha.live_catalog import (
    CatalogFollower,
    CatalogStore,
    FeedEntry,
    IdTakenError,
    InProcessStore,
    InvalidItemError,
    ItemExistsError,
    ItemNotFoundError,
    LocalCatalog,
    NewItem,
    NoCatalogError,
    RedisCatalog,
    Snapshot,
    StoreUnavailableError,
    add_new_items,
    redact_url,
)
from nezha.semantic_ids.quantizer import ResidualQuantizer, assign_new_item
from nezha.verify.codec import pack


@pytest.fixture(scope="module")
def catalog(tiny_prepared: Path) -> Catalog:
    return Catalog.load(tiny_prepared / "catalog")


@pytest.fixture(scope="module")
def quantizer(tiny_prepared: Path) -> ResidualQuantizer:
    return ResidualQuantizer.load(tiny_prepared / "quantizer.safetensors")


def free_ids(used: set[int], sizes: tuple[int, ...], n: int) -> list[int]:
    return [p for p in range(int(np.prod(sizes))) if p not in used][:n]


@pytest.fixture
def store(redis_server: RedisServer, catalog: Catalog) -> Iterator[RedisCatalog]:  # noqa: F811
    s = RedisCatalog(redis_server.url)
    s.push(catalog, source="test")
    yield s
    s.close()


@pytest.fixture
def follower(redis_server: RedisServer, store: RedisCatalog, catalog: Catalog) -> Iterator[CatalogFollower]:  # noqa: F811
    f = CatalogFollower(RedisCatalog(redis_server.url), LocalCatalog.from_catalog(catalog), block_ms=100,
                        max_backoff_s=0.2)
    f.sync_once()
    f.start()
    yield f
    f.stop()
    f.join(timeout=5)


def items_of(snapshot: Snapshot | None) -> dict[str, int]:
    assert snapshot is not None
    return dict(snapshot.table.pairs())


def used_ids(store: RedisCatalog) -> set[int]:
    return set(items_of(store.snapshot()).values())


def test_push_is_idempotent_and_bumps_version(store: RedisCatalog, catalog: Catalog) -> None:
    first = store.snapshot()
    assert first is not None and items_of(first) == dict(zip(catalog.item_ids, catalog.packed.tolist(), strict=True))
    assert store.push(catalog) == first.version + 1
    second = store.snapshot()
    assert items_of(second) == items_of(first) and second.epoch != first.epoch
    assert store.push(catalog, if_empty=True) is None  # a catalog is there: left alone
    status = store.status()
    assert status["size"] == catalog.num_items and status["durability"] == "aof-always"
    assert status["codebook_sizes"] == list(catalog.codebook_sizes)


def test_changes_are_atomic_all_or_nothing(store: RedisCatalog, catalog: Catalog) -> None:
    version = store.snapshot().version
    new_ids = free_ids(set(catalog.packed.tolist()), catalog.codebook_sizes, 2)
    with pytest.raises(ItemExistsError, match=catalog.item_ids[0]):
        store.add([("NEW-A", new_ids[0]), (catalog.item_ids[0], new_ids[1])])
    with pytest.raises(IdTakenError, match=catalog.item_ids[1]):
        store.add([("NEW-A", int(catalog.packed[1]))])
    with pytest.raises(ItemNotFoundError):
        store.remove([catalog.item_ids[0], "NO-SUCH-ITEM"])
    with pytest.raises(InvalidItemError, match="duplicate"):
        store.add([("NEW-A", new_ids[0]), ("NEW-A", new_ids[1])])
    after = store.snapshot()
    assert after.version == version and "NEW-A" not in items_of(after) and catalog.item_ids[0] in items_of(after)

    assert store.add([("NEW-A", new_ids[0])]) == version + 1
    assert store.remove(["NEW-A", catalog.item_ids[0]]) == version + 2
    entries = store.read_feed(version, None)
    assert [(e.version, e.op) for e in entries] == [(version + 1, "add"), (version + 2, "remove")]
    assert entries[1].items == [("NEW-A", new_ids[0]), (catalog.item_ids[0], int(catalog.packed[0]))]


def test_follower_applies_changes_within_a_second(store: RedisCatalog, follower: CatalogFollower,
                                                  catalog: Catalog) -> None:
    local = follower.local
    new_id = free_ids(local.used_ids(), catalog.codebook_sizes, 1)[0]
    start = time.monotonic()
    version = store.add([("NEW-B", new_id)])
    assert local.wait_for(version, timeout=1.0), "add not applied within 1 s"
    assert local.lookup(["NEW-B"]) == ([new_id], [])
    assert bool(local.verifier.contains(torch.tensor([new_id]))[0])
    version = store.remove(["NEW-B"])
    assert local.wait_for(version, timeout=1.0)
    assert time.monotonic() - start < 2.0
    assert local.lookup(["NEW-B"]) == ([], ["NEW-B"]) and local.items_of([new_id])[0] == [None]
    assert not bool(local.verifier.contains(torch.tensor([new_id]))[0])
    assert follower.degraded() == []


@pytest.mark.parametrize("batch_ms", [1000, 0])
def test_follower_applies_a_stream_of_changes_in_batches_and_a_lone_change_at_once(
        redis_server: RedisServer, store: RedisCatalog, catalog: Catalog, batch_ms: int) -> None:  # noqa: F811
    """Under a stream of changes the follower reads the feed every batch_ms at most, so each read is a batch
    (0: a read and an apply for every change or two); a change after a quiet spell is applied at once."""
    local = LocalCatalog.from_catalog(catalog)
    applied: list[int] = []
    apply = local.apply
    local.apply = lambda entries: (applied.append(len(entries)), apply(entries))[1]  # type: ignore[method-assign]
    follower = CatalogFollower(RedisCatalog(redis_server.url), local, block_ms=100, batch_ms=batch_ms)
    follower.sync_once()
    follower.start()
    try:
        ids = free_ids(local.used_ids(), catalog.codebook_sizes, 41)
        for n, packed in enumerate(ids[:40]):  # ~1 s of changes, one every 25 ms
            version = store.add([(f"STREAM-{n}", packed)])
            time.sleep(0.025)
        assert local.wait_for(version, timeout=5.0) and sum(applied) == 40
        if batch_ms:
            assert len([a for a in applied if a]) <= 4, applied  # ~1 s of changes / 1 s between reads
        else:
            assert len([a for a in applied if a]) >= 20, applied
        time.sleep(1.5)  # quiet for longer than batch_ms: the next change is read as soon as it lands
        start = time.monotonic()
        version = store.add([("LONE", ids[40])])
        assert local.wait_for(version, timeout=5.0)
        assert time.monotonic() - start < 0.5
    finally:
        follower.stop()
        follower.join(timeout=5)


def test_follower_resyncs_after_a_push(store: RedisCatalog, follower: CatalogFollower, catalog: Catalog) -> None:
    resyncs = follower.health.resyncs
    version = store.push(catalog)
    assert follower.local.wait_for(version, 2.0) and follower.health.resyncs == resyncs + 1


@pytest.mark.parametrize("keep", [1, 0], ids=["feed-gap", "feed-emptied"])
def test_follower_resyncs_when_the_feed_was_trimmed_past_it(redis_server: RedisServer, store: RedisCatalog,  # noqa: F811
                                                            catalog: Catalog, keep: int) -> None:
    follower = CatalogFollower(RedisCatalog(redis_server.url), LocalCatalog.from_catalog(catalog), block_ms=100)
    follower.sync_once()  # in step, but not following yet: it misses the entries below
    version = follower.local.version
    for n, packed in enumerate(free_ids(follower.local.used_ids(), catalog.codebook_sizes, 3)):
        store.add([(f"GAP-{n}", packed)])
    store.client.xtrim(store.feed, maxlen=keep, approximate=False)
    follower.start()
    try:
        assert follower.local.wait_for(version + 3, 2.0)
        assert follower.local.lookup(["GAP-0", "GAP-1", "GAP-2"])[1] == []
        assert follower.health.resyncs == 2  # start-up + the gap
    finally:
        follower.stop()


def test_outage_refuses_writes_and_keeps_acknowledged_ones(redis_server: RedisServer, store: RedisCatalog,  # noqa: F811
                                                           follower: CatalogFollower, catalog: Catalog) -> None:
    local = follower.local
    a, b, c = free_ids(local.used_ids(), catalog.codebook_sizes, 3)
    acked = store.add([("ACK-A", a)])
    assert local.wait_for(acked, 1.0)

    redis_server.kill()
    with pytest.raises(StoreUnavailableError, match="refused"):
        store.add([("LOST-B", b)])
    assert wait_until(lambda: bool(follower.degraded()))
    assert "catalog store unavailable" in follower.degraded()[0]
    assert local.lookup(["ACK-A", catalog.item_ids[0]])[1] == []  # still serving its copy

    redis_server.start()  # same AOF directory: acknowledged writes come back
    assert wait_until(lambda: follower.degraded() == [], timeout=5)
    version = store.add([("ACK-C", c)])
    assert local.wait_for(version, 1.0)
    snapshot = store.snapshot()
    assert "ACK-A" in items_of(snapshot) and "ACK-C" in items_of(snapshot) and "LOST-B" not in items_of(snapshot)
    assert local.lookup(["ACK-A", "ACK-C", "LOST-B"])[1] == ["LOST-B"]


def test_restart_without_persistence_is_detected(tmp_path: Path, catalog: Catalog) -> None:
    server = RedisServer(tmp_path / "volatile", persistent=False)
    server.start()
    try:
        store = RedisCatalog(server.url)
        store.push(catalog)
        new_id = free_ids(set(catalog.packed.tolist()), catalog.codebook_sizes, 1)[0]
        store.add([("KEPT-LOCALLY", new_id)])
        follower = CatalogFollower(RedisCatalog(server.url), LocalCatalog.from_catalog(catalog), block_ms=100,
                                   max_backoff_s=0.2)
        follower.sync_once()
        follower.start()
        assert follower.local.version == 2
        server.restart()  # empty: the catalog is gone
        assert wait_until(lambda: "holds no catalog" in " ".join(follower.degraded()))
        assert follower.local.lookup(["KEPT-LOCALLY"])[1] == []  # replicas keep serving their copy
        with pytest.raises(NoCatalogError):
            store.add([("X", new_id)])
        version = store.push(catalog)  # version 1 < the follower's 2, new epoch: full resync
        assert version == 1
        assert wait_until(lambda: follower.degraded() == [] and follower.local.version == 1)
        assert follower.local.lookup(["KEPT-LOCALLY"])[1] == ["KEPT-LOCALLY"]
        follower.stop()
    finally:
        server.kill()


def test_text_items_get_nearest_free_ids_and_retry_a_lost_race(store: RedisCatalog, catalog: Catalog,
                                                               quantizer: ResidualQuantizer) -> None:
    sizes = catalog.codebook_sizes
    rng = np.random.default_rng(0)
    x = rng.normal(size=quantizer.dim).astype(np.float32)
    x /= np.linalg.norm(x)
    used = used_ids(store)
    expected_first = int(pack(assign_new_item(x, quantizer, used), sizes))

    class Racing:
        """A store where another writer takes the chosen ID between choosing it and add()."""

        def __init__(self) -> None:
            self.raced = False

        def id_in_use(self, packed: int) -> bool:
            return store.id_in_use(packed)

        def add(self, pairs: list[tuple[str, int]], meta: dict[str, dict] | None = None) -> int:
            if not self.raced:
                self.raced = True
                store.add([("RIVAL", expected_first)])
            return store.add(pairs, meta)

    version, pairs = add_new_items(Racing(), [NewItem("TEXT-1", text="a"), NewItem("TEXT-2", text="b")], sizes,
                                   lambda: quantizer, lambda texts: np.stack([x] * len(texts)))
    got = dict(pairs)
    assert expected_first not in got.values() and len(set(got.values())) == 2
    snapshot = store.snapshot()
    assert snapshot.version == version and items_of(snapshot)["TEXT-1"] == got["TEXT-1"]
    assert items_of(snapshot)["RIVAL"] == expected_first
    with pytest.raises(InvalidItemError, match="exactly one"):
        add_new_items(store, [NewItem("BOTH", codes=[0, 0, 0], text="x")], sizes, None, lambda t: x)
    with pytest.raises(InvalidItemError, match="do not fit"):
        add_new_items(store, [NewItem("BAD", codes=[99, 0, 0])], sizes, None, lambda t: x)
    with pytest.raises(InvalidItemError, match="quantizer"):
        add_new_items(store, [NewItem("NOQ", text="x")], sizes, None, lambda t: x)


def test_concurrent_writers_never_share_an_id(store: RedisCatalog, catalog: Catalog) -> None:
    target = free_ids(used_ids(store), catalog.codebook_sizes, 1)[0]
    results: list[str] = []

    def writer(name: str) -> None:
        try:
            store.add([(name, target)])
            results.append("ok")
        except IdTakenError:
            results.append("taken")

    threads = [threading.Thread(target=writer, args=(f"W{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["ok"] + ["taken"] * 7


def test_in_process_store(catalog: Catalog) -> None:
    local = LocalCatalog.from_catalog(catalog)
    store = InProcessStore(local)
    new_id = free_ids(local.used_ids(), catalog.codebook_sizes, 1)[0]
    assert store.add([("LOCAL-1", new_id)]) == 1 and local.lookup(["LOCAL-1"]) == ([new_id], [])
    with pytest.raises(ItemExistsError):
        store.add([("LOCAL-1", new_id)])
    with pytest.raises(IdTakenError):
        store.add([("LOCAL-2", new_id)])
    assert store.remove(["LOCAL-1"]) == 2 and local.items_of([new_id]) == ([None], 2)
    with pytest.raises(ItemNotFoundError):
        store.remove(["LOCAL-1"])


def test_local_catalog_applies_entries_in_order_and_drops_removed_ids(catalog: Catalog) -> None:
    local = LocalCatalog.from_catalog(catalog)
    old_item, packed = catalog.item_ids[0], int(catalog.packed[0])
    before = local.verifier.contains(torch.tensor([packed]))  # a decode that began before the change...
    local.apply([FeedEntry(1, "remove", [(old_item, packed)]), FeedEntry(2, "add", [("HEIR", packed)])])
    assert bool(before[0]) and local.items_of([packed]) == (["HEIR"], 2)  # ...maps to the new owner
    assert local.lookup([old_item, "HEIR"]) == ([packed], [old_item])
    local.apply([FeedEntry(3, "remove", [("HEIR", packed)])])
    assert local.items_of([packed]) == ([None], 3) and not bool(local.verifier.contains(torch.tensor([packed]))[0])
    assert len(local) == catalog.num_items - 1


def test_redact_url() -> None:
    assert redact_url("rediss://default:hunter2@cache.example:6380/0") == "rediss://default:***@cache.example:6380/0"
    assert redact_url("redis://:pw@localhost/1") == "redis://:***@localhost/1"
    assert redact_url("redis://127.0.0.1:7000/0") == "redis://127.0.0.1:7000/0"
    assert redact_url("rediss://h:6380/0?password=pw&ssl_ca_certs=/ca.pem") == \
        "rediss://h:6380/0?password=***&ssl_ca_certs=/ca.pem"


def test_both_stores_satisfy_the_protocol_and_word_errors_alike(store: RedisCatalog, catalog: Catalog) -> None:
    local = LocalCatalog.from_catalog(catalog)
    memory = InProcessStore(local)
    assert isinstance(store, CatalogStore) and isinstance(memory, CatalogStore)
    item, packed = catalog.item_ids[0], int(catalog.packed[0])
    new_id = free_ids(set(catalog.packed.tolist()), catalog.codebook_sizes, 1)[0]
    for attempt, expected in [(lambda s: s.add([(item, new_id)]), ItemExistsError),
                              (lambda s: s.add([("NEW-Z", packed)]), IdTakenError),
                              (lambda s: s.remove(["NO-SUCH-ITEM"]), ItemNotFoundError)]:
        messages = []
        for s in (store, memory):
            with pytest.raises(expected) as caught:
                attempt(s)
            messages.append(str(caught.value))
        assert messages[0] == messages[1]  # one wording, whichever store refused
    assert "remove it first" in str(ItemExistsError(item, packed)) and item in str(IdTakenError("X", packed, item))


def test_store_errors_keep_their_fields_across_processes() -> None:
    import pickle

    for error in (ItemExistsError("A", 3), IdTakenError("A", 3, "B"), ItemNotFoundError("Z"),
                  NoCatalogError("redis://127.0.0.1:1/0", "p"), InvalidItemError("bad codes"),
                  StoreUnavailableError("redis://127.0.0.1:1/0", "ConnectionError: refused", "the add was refused")):
        copy = pickle.loads(pickle.dumps(error))  # Ray pickles errors raised in a replica
        assert type(copy) is type(error) and str(copy) == str(error) and copy.args == error.args
    assert pickle.loads(pickle.dumps(IdTakenError("A", 3, "B"))).holder == "B"
    assert "holds no catalog under 'p'" in str(NoCatalogError("redis://h/0", "p"))


def test_load_quantizer_for_finds_the_checkpoints_prepared_dataset(tiny_prepared: Path, tmp_path: Path) -> None:
    import json

    from nezha.live_catalog import load_quantizer_for

    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "model.safetensors").write_bytes(b"")
    (checkpoint / "nezha.json").write_text(json.dumps({"extra": {"prepared": str(tiny_prepared)}}))
    loader = load_quantizer_for(checkpoint, None)
    assert loader is not None and loader().codebook_sizes == Catalog.load(tiny_prepared / "catalog").codebook_sizes
    assert load_quantizer_for(None, None) is None and load_quantizer_for(None, tmp_path / "missing") is None
    (checkpoint / "nezha.json").write_text(json.dumps({"extra": {}}))
    assert load_quantizer_for(checkpoint, None) is None


def test_item_metadata_travels_through_push_add_feed_and_remove(store: RedisCatalog, follower: CatalogFollower,
                                                                catalog: Catalog, tiny_prepared: Path) -> None:
    meta = {item: {"title": title, "brand": "B-" + item, "categories": ["Beauty"]}
            for item, title in zip(catalog.item_ids, catalog.titles, strict=True)}
    store.push(catalog, item_meta=meta)
    assert store.item_metas(["I003", "NOPE"]) == [meta["I003"], None]
    assert wait_until(lambda: follower.local.view().meta_of("I003")["brand"] == "B-I003")
    packed = free_ids(used_ids(store), catalog.codebook_sizes, 1)[0]
    version = store.add([("META-1", packed)], {"META-1": {"title": " New ", "brand": "", "categories": "Hair"}})
    assert wait_until(lambda: follower.local.version >= version)
    assert follower.local.view().meta_of("META-1") == {"title": "New", "brand": None, "categories": ["Hair"]}
    version = store.remove(["META-1"])
    assert wait_until(lambda: follower.local.version >= version)
    assert follower.local.view().meta_of("META-1") == {"title": None, "brand": None, "categories": []}
    assert store.item_metas(["META-1"]) == [None]
    # Without a pushed item_meta, push keeps the catalog's titles.
    store.push(catalog)
    assert store.item_metas(["I003"]) == [{"title": catalog.titles[3], "brand": None, "categories": []}]


def test_load_item_metadata_reads_the_source_items_jsonl(tiny_checkpoint: Path) -> None:
    from nezha.live_catalog import load_item_metadata

    meta = load_item_metadata(tiny_checkpoint)
    assert meta["I007"] == {"title": "Bloom cream no. 7", "brand": "Bloom", "categories": ["Beauty", "Cream"]}


def test_item_metadata_is_found_when_the_dataset_was_prepared_by_name(tiny_checkpoint: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """`nezha prepare --dataset amazon-beauty` records a name in its config; the path is `dataset_dir`."""
    import json

    import nezha.model.checkpoint
    from nezha.live_catalog import load_item_metadata
    from nezha.model.checkpoint import prepared_dir_of
    from nezha.prepared import SUMMARY_FILE

    summary = json.loads((prepared_dir_of(tiny_checkpoint) / SUMMARY_FILE).read_text())
    dataset_dir = summary.get("dataset_dir") or summary["config"]["dataset"]
    by_name = tmp_path / "prepared"
    by_name.mkdir()
    (by_name / SUMMARY_FILE).write_text(json.dumps({"config": {"dataset": "tiny"}, "dataset_dir": dataset_dir}))
    monkeypatch.setattr(nezha.model.checkpoint, "prepared_dir_of", lambda checkpoint: by_name)
    meta = load_item_metadata(tiny_checkpoint)
    assert meta["I007"] == {"title": "Bloom cream no. 7", "brand": "Bloom", "categories": ["Beauty", "Cream"]}


def test_a_verifier_snapshot_keeps_its_catalog_while_the_live_one_changes() -> None:
    from nezha.verify.verifier import PrefixVerifier

    verifier = PrefixVerifier([0, 1, 2], (3, 3))
    pinned = verifier.snapshot()
    verifier.update(add=[8], remove=[0])
    assert 0 in pinned and 8 not in pinned and pinned.ids == {0, 1, 2}
    assert 8 in verifier and 0 not in verifier
    assert pinned.contains(torch.tensor([0, 8])).tolist() == [True, False]
    # Children of prefix 2: code 0 (ID 2) in both, code 2 (ID 8 = 2 + 2*3) only in the live verifier.
    assert pinned.child_mask(torch.tensor([2]), 1).tolist() == [[True, False, False]]
    assert verifier.child_mask(torch.tensor([2]), 1).tolist() == [[True, False, True]]


def test_each_decode_sees_exactly_one_catalog_version_while_changes_race(tiny_checkpoint: Path) -> None:
    """Two disjoint catalogs swapped in back and forth while decodes run: every call's IDs are all items of the
    version it reports, and none is invalid (a mix of two versions' tables inside one search breaks both)."""
    from nezha.decoding import decode
    from nezha.model.checkpoint import load_checkpoint

    model = load_checkpoint(tiny_checkpoint, "cpu")
    sizes = tuple(model.layout.sizes)
    space = int(np.prod(sizes))
    # Level 0 is the least significant digit: the catalogs share no level-0 code, so no prefix either.
    catalogs = [{f"A{p}": p for p in range(space) if p % sizes[0] < sizes[0] // 2},
                {f"B{p}": p for p in range(space) if p % sizes[0] >= sizes[0] // 2}]
    local = LocalCatalog(catalogs[0], sizes)
    histories = [local.codes([3, 40, 77]), local.codes([100, 5]), local.codes([150])]
    stop = threading.Event()

    def churn() -> None:
        version = 0
        while not stop.is_set():
            version += 1
            local.replace(catalogs[version % 2], version, source="test")

    changer = threading.Thread(target=churn)
    changer.start()
    raced = 0
    try:
        for _ in range(40):
            view = local.view()
            with torch.inference_mode():
                out = decode(model, "nezha", histories, view.verifier, beam=5, topk=5)
            raced += local.version != view.version  # a change landed while this call decoded
            valid = set(catalogs[view.version % 2].values())
            ids = out.ids.numpy()
            assert int(out.invalid.sum()) == 0 and (ids[:, 0] >= 0).all()
            assert {int(p) for p in ids.reshape(-1) if p >= 0} <= valid
            assert all(item is not None for item in view.items_of(p for p in ids.reshape(-1) if p >= 0))
    finally:
        stop.set()
        changer.join()
    assert raced > 0
