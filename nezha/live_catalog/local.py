"""A replica's copy of the catalog: compact item id <-> packed ID maps, a metadata source and the PrefixVerifier.

The request path only reads this copy (metadata aside: see MetaSource): it never needs Redis to decode, so a
Redis outage costs freshness, not availability. `CatalogFollower` (follower.py) keeps it in step with
Redis; `InProcessStore` (memory_store.py) writes it directly when there is no Redis.

Memory: the maps are numpy arrays (nezha/live_catalog/item_table.py, ~40 bytes an item plus the id's
text), the verifier's valid-ID set is a sorted int64 array plus prefix tables; there is no Python object
per item. A change costs O(changes); once per MERGE_AT changes the maps are merged into a new table, O(N)
(seconds at 10M items), in a thread of its own so that no change waits for it. That thread runs at the
lowest OS priority (`lower_thread_priority`): a replica's decodes come first, the merge takes idle time.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from nezha.catalog import Catalog
from nezha.live_catalog.item_table import ItemMap, ItemTable, StringColumn
from nezha.live_catalog.metadata import ItemMeta, MemoryMeta, MetaSource, clean_meta
from nezha.live_catalog.store import FeedEntry
from nezha.verify.codec import unpack
from nezha.verify.verifier import PrefixVerifier


class ItemToId(Mapping[str, int]):
    """item id -> packed ID of one view (read-only; iteration walks the whole catalog)."""

    def __init__(self, items: ItemMap) -> None:
        self._items = items

    def __getitem__(self, item_id: str) -> int:
        packed = self._items.packed_of(item_id) if isinstance(item_id, str) else None
        if packed is None:
            raise KeyError(item_id)
        return packed

    def __iter__(self) -> Iterator[str]:
        for packed in self._items.packed_ids().tolist():
            item = self._items.item_of(packed)
            if item is not None:
                yield item

    def __len__(self) -> int:
        return len(self._items)


class IdToItem(Mapping[int, str]):
    """packed ID -> item id of one view (read-only); its keys are the valid IDs."""

    def __init__(self, items: ItemMap) -> None:
        self._items = items

    def __getitem__(self, packed: int) -> str:
        item = self._items.item_of(int(packed))
        if item is None:
            raise KeyError(packed)
        return item

    def __contains__(self, packed: object) -> bool:
        try:
            return self._items.has_packed(int(packed))  # type: ignore[call-overload]
        except (TypeError, ValueError):
            return False

    def __iter__(self) -> Iterator[int]:
        return iter(self._items.packed_ids().tolist())

    def __len__(self) -> int:
        return len(self._items)


@dataclass(frozen=True)
class CatalogView:
    """The catalog at one version: maps and a verifier pinned to the same version. Never changes.

    A decode takes one view and uses it throughout (search and id mapping), so its answer is exactly the
    catalog of `version`: never a mix of two versions, whatever changes land meanwhile. Metadata is read
    from `meta` (not versioned: an item keeps its metadata until it is removed).
    """

    version: int
    items: ItemMap
    meta: MetaSource
    verifier: PrefixVerifier
    applied_at: float = field(default_factory=time.time)  # when this copy began serving it (epoch seconds)

    @property
    def item_to_id(self) -> ItemToId:
        return ItemToId(self.items)

    @property
    def id_to_item(self) -> IdToItem:
        return IdToItem(self.items)

    def lookup(self, item_ids: Sequence[str]) -> tuple[list[int], list[str]]:
        """(packed IDs of the known items in order, ids that are not in the catalog)."""
        found = [self.items.packed_of(i) for i in item_ids]
        return [p for p in found if p is not None], [i for i, p in zip(item_ids, found, strict=True) if p is None]

    def items_of(self, packed: Iterable[int]) -> list[str | None]:
        """Item id for each packed ID (None: no item holds it)."""
        return [self.items.item_of(int(p)) for p in packed]

    def meta_of(self, item_id: str) -> ItemMeta:
        return self.meta.get_many([item_id])[0]

    def metas_of(self, item_ids: Sequence[str]) -> list[ItemMeta]:
        """Metadata of several items in one read (one Redis round trip where it comes from Redis)."""
        return self.meta.get_many(item_ids)


def lower_thread_priority() -> bool:
    """Give the calling thread the lowest OS scheduling priority (nice 19), for O(N) work that must not slow
    the decodes beside it: on one busy core, a merge at the same priority halved a decode loop's speed for
    its 2.7 s at 10M items; at nice 19 the loop's median did not move (docs/operations.md, "Catalog size").
    Linux only (a thread there has a nice value of its own); elsewhere a no-op. True when lowered."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except OSError:  # e.g. a sandbox that forbids it: the work still runs, at normal priority
        return False
    return True


class _TableMerge:
    """A version's maps merged into one ItemTable in a thread of its own (at the lowest priority); `replay`
    collects the changes applied meanwhile, to be applied again on the merged table."""

    def __init__(self, items: ItemMap, version: int) -> None:
        self.version = version  # the catalog version the merged table holds
        self.replay: list[tuple[str, str, int]] = []
        self._table: ItemTable | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(items,), name="nezha-catalog-merge", daemon=True)
        self._thread.start()

    def _run(self, items: ItemMap) -> None:
        lower_thread_priority()
        try:
            self._table = items.as_table()
        except BaseException as exc:  # raised again by result(), in the thread that applies changes
            self._error = exc

    def result(self) -> ItemTable | None:
        """The merged table once the thread is done (None before that)."""
        if self._thread.is_alive():
            return None
        if self._error is not None:
            raise self._error
        return self._table


def _as_map(items: Mapping[str, int] | ItemTable) -> ItemMap:
    if isinstance(items, ItemTable):
        return ItemMap.of(items)
    return ItemMap.of(ItemTable.of((str(i), int(p)) for i, p in items.items()))


class LocalCatalog:
    """The current `CatalogView`, replaced as a whole (under a lock) by every change.

    Readers take `view()` (one attribute read, no lock) and keep it; writers build the next view from the
    current one. An applied removal is in every view taken after `apply` returns.
    `items`: a mapping item id -> packed ID, or an ItemTable (what a Redis snapshot reads, without Python
    objects per item). `meta`: metadata by item id, or a MetaSource (default: no metadata).
    """

    def __init__(self, items: Mapping[str, int] | ItemTable, sizes: Sequence[int],
                 device: torch.device | str = "cpu", version: int = 0, source: str = "checkpoint",
                 meta: Mapping[str, ItemMeta] | MetaSource | None = None) -> None:
        self.sizes = tuple(int(s) for s in sizes)
        self._lock = threading.Condition()
        item_map = _as_map(items)
        self.verifier = PrefixVerifier(item_map.packed_ids(), self.sizes, device=device)
        self._view = CatalogView(version, item_map, self._meta_source(meta), self.verifier.snapshot())
        self.source = source  # checkpoint | redis | embedded
        self._merge: _TableMerge | None = None  # the maps' merge into a new table, while it runs
        self._merged: tuple[int, ItemTable] | None = None  # the last merge's (version, table) of this catalog

    @staticmethod
    def _meta_source(meta: Mapping[str, ItemMeta] | MetaSource | None) -> MetaSource:
        if meta is None or isinstance(meta, Mapping):
            return MemoryMeta.of(meta or {})
        return meta

    @classmethod
    def from_catalog(cls, catalog: Catalog, device: torch.device | str = "cpu",
                     meta: Mapping[str, ItemMeta] | MetaSource | None = None) -> LocalCatalog:
        """The copy of a checkpoint's catalog; metadata default: its titles."""
        table = ItemTable.build(StringColumn.of(catalog.item_ids), catalog.packed)
        return cls(table, catalog.codebook_sizes, device, meta=MemoryMeta.titles(catalog) if meta is None else meta)

    def view(self) -> CatalogView:
        return self._view

    @property
    def version(self) -> int:
        return self._view.version

    def __len__(self) -> int:
        return len(self._view.items)

    def state(self) -> dict[str, Any]:
        view = self._view
        return {"version": view.version, "size": len(view.items), "source": self.source,
                "applied_at": view.applied_at}

    def lookup(self, item_ids: Sequence[str]) -> tuple[list[int], list[str]]:
        return self._view.lookup(item_ids)

    def items_of(self, packed: Iterable[int]) -> tuple[list[str | None], int]:
        """(item id or None for each packed ID, the catalog version they were mapped at)."""
        view = self._view
        return view.items_of(packed), view.version

    def codes(self, packed: Sequence[int]) -> np.ndarray:
        return unpack(np.asarray(packed, dtype=np.int64), self.sizes)

    def used_ids(self) -> IdToItem:
        """The packed IDs items hold now (a read-only mapping to their items: `packed in used_ids()`)."""
        return self._view.id_to_item

    def id_in_use(self, packed: int) -> bool:
        return self._view.items.has_packed(int(packed))

    def merged(self) -> tuple[int, ItemTable] | None:
        """(version, table) of the last finished merge of the maps: the whole catalog at that version as one
        table, already built (a snapshot blob can be published from it without another O(N) pass)."""
        return self._merged

    def nbytes(self) -> dict[str, int]:
        """Host bytes of the maps (the verifier reports its own)."""
        return {"item_maps": self._view.items.table.nbytes}

    def apply(self, entries: Sequence[FeedEntry]) -> None:
        """Apply consecutive add/remove entries in order, as one verifier update for all of them."""
        if not entries:
            return
        changes = [(e.op, item_id, int(packed)) for e in entries for item_id, packed in e.items]
        added: dict[str, ItemMeta] = {}  # the items' last change wins
        removed: set[str] = set()
        for entry in entries:
            for item_id, _ in entry.items:
                if entry.op == "add":
                    added[item_id] = clean_meta(entry.meta.get(item_id))
                    removed.discard(item_id)
                else:
                    added.pop(item_id, None)
                    removed.add(item_id)
        with self._lock:
            old = self._view
            items, born, died = old.items.changed(changes, merge=False)
            items = self._rebased(items, changes, entries[-1].version)
            self.verifier.update(add=born, remove=died)
            old.meta.changed(added, removed)
            self._view = CatalogView(entries[-1].version, items, old.meta, self.verifier.snapshot())
            self._lock.notify_all()

    def _rebased(self, items: ItemMap, changes: list[tuple[str, str, int]], version: int) -> ItemMap:
        """`items` (the maps at `version`: with `changes` applied) on a finished merge's table, or as they are;
        starts a merge when their bottom layer is full. Called under the lock."""
        merge = self._merge
        if merge is not None:
            table = merge.result()
            if table is None:
                merge.replay += changes
                return items
            self._merge, self._merged = None, (merge.version, table)
            items = ItemMap.of(table).changed(merge.replay + changes, merge=False)[0]
        if items.merge_due:
            self._merge = _TableMerge(items, version)
        return items

    def replace(self, items: Mapping[str, int] | ItemTable, version: int, source: str,
                meta: Mapping[str, ItemMeta] | MetaSource | None = None) -> None:
        """Swap in a whole catalog (a resync); without `meta` the metadata source stays as it was."""
        item_map = _as_map(items)
        with self._lock:
            meta_source = self._view.meta if meta is None else self._meta_source(meta)
            self.verifier.replace(item_map.packed_ids())
            self._merge = None  # a merge still running is of the replaced catalog: its table is dropped
            self._merged = None
            self._view = CatalogView(version, item_map, meta_source, self.verifier.snapshot())
            self.source = source
            self._lock.notify_all()

    def wait_for(self, version: int, timeout: float) -> bool:
        """Block until this copy reached `version` (True) or `timeout` seconds passed (False)."""
        with self._lock:
            return self._lock.wait_for(lambda: self._view.version >= version, timeout)
