"""A replica's copy of the catalog: item id <-> packed ID maps, item metadata and the PrefixVerifier.

The request path only reads this copy: it never calls Redis, so a Redis outage costs freshness, not
availability. `CatalogFollower` (follower.py) keeps it in step with Redis; `InProcessStore`
(memory_store.py) writes it directly when there is no Redis.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from nezha.catalog import Catalog
from nezha.live_catalog.metadata import ItemMeta, clean_meta
from nezha.live_catalog.store import FeedEntry
from nezha.verify.codec import unpack
from nezha.verify.verifier import PrefixVerifier


@dataclass(frozen=True)
class CatalogView:
    """The catalog at one version: maps, metadata and a verifier pinned to the same version. Never changes.

    A decode takes one view and uses it throughout (search and id mapping), so its answer is exactly the
    catalog of `version`: never a mix of two versions, whatever changes land meanwhile.
    """

    version: int
    item_to_id: Mapping[str, int]
    id_to_item: Mapping[int, str]
    meta: Mapping[str, ItemMeta]
    verifier: PrefixVerifier
    applied_at: float = field(default_factory=time.time)  # when this copy began serving it (epoch seconds)

    def lookup(self, item_ids: Sequence[str]) -> tuple[list[int], list[str]]:
        """(packed IDs of the known items in order, ids that are not in the catalog)."""
        found = [self.item_to_id.get(i) for i in item_ids]
        return [p for p in found if p is not None], [i for i, p in zip(item_ids, found, strict=True) if p is None]

    def items_of(self, packed: Iterable[int]) -> list[str | None]:
        """Item id for each packed ID (None: no item holds it)."""
        return [self.id_to_item.get(int(p)) for p in packed]

    def meta_of(self, item_id: str) -> ItemMeta:
        return self.meta.get(item_id) or clean_meta(None)


class LocalCatalog:
    """The current `CatalogView`, replaced as a whole (under a lock) by every change.

    Readers take `view()` (one attribute read, no lock) and keep it; writers build the next view from the
    current one. An applied removal is in every view taken after `apply` returns.
    """

    def __init__(self, items: Mapping[str, int], sizes: Sequence[int], device: torch.device | str = "cpu",
                 version: int = 0, source: str = "checkpoint", meta: Mapping[str, ItemMeta] | None = None) -> None:
        self.sizes = tuple(int(s) for s in sizes)
        self._lock = threading.Condition()
        item_to_id = {str(i): int(p) for i, p in items.items()}
        id_to_item = {p: i for i, p in item_to_id.items()}
        self.verifier = PrefixVerifier(np.fromiter(id_to_item, dtype=np.int64, count=len(id_to_item)),
                                       self.sizes, device=device)
        self._view = CatalogView(version, item_to_id, id_to_item, dict(meta or {}), self.verifier.snapshot())
        self.source = source  # checkpoint | redis | embedded

    @classmethod
    def from_catalog(cls, catalog: Catalog, device: torch.device | str = "cpu",
                     meta: Mapping[str, ItemMeta] | None = None) -> LocalCatalog:
        items = dict(zip(catalog.item_ids, catalog.packed.tolist(), strict=True))
        if meta is None:
            meta = {item: clean_meta({"title": title}) for item, title in zip(catalog.item_ids, catalog.titles,
                                                                               strict=True)}
        return cls(items, catalog.codebook_sizes, device, meta=meta)

    def view(self) -> CatalogView:
        return self._view

    @property
    def version(self) -> int:
        return self._view.version

    def __len__(self) -> int:
        return len(self._view.item_to_id)

    def state(self) -> dict[str, Any]:
        view = self._view
        return {"version": view.version, "size": len(view.item_to_id), "source": self.source,
                "applied_at": view.applied_at}

    def lookup(self, item_ids: Sequence[str]) -> tuple[list[int], list[str]]:
        return self._view.lookup(item_ids)

    def items_of(self, packed: Iterable[int]) -> tuple[list[str | None], int]:
        """(item id or None for each packed ID, the catalog version they were mapped at)."""
        view = self._view
        return view.items_of(packed), view.version

    def codes(self, packed: Sequence[int]) -> np.ndarray:
        return unpack(np.asarray(packed, dtype=np.int64), self.sizes)

    def used_ids(self) -> set[int]:
        return set(self._view.id_to_item)

    def apply(self, entries: Sequence[FeedEntry]) -> None:
        """Apply consecutive add/remove entries in order (one verifier rebuild for all of them)."""
        if not entries:
            return
        with self._lock:
            old = self._view
            item_to_id, id_to_item, meta = dict(old.item_to_id), dict(old.id_to_item), dict(old.meta)
            touched = {p for e in entries for _, p in e.items}
            before = {p for p in touched if p in id_to_item}
            for entry in entries:
                for item_id, packed in entry.items:
                    if entry.op == "add":
                        item_to_id[item_id] = packed
                        id_to_item[packed] = item_id
                        meta[item_id] = clean_meta(entry.meta.get(item_id))
                    else:
                        if item_to_id.get(item_id) == packed:
                            del item_to_id[item_id]
                            meta.pop(item_id, None)
                        if id_to_item.get(packed) == item_id:
                            del id_to_item[packed]
            after = {p for p in touched if p in id_to_item}
            self.verifier.update(add=list(after - before), remove=list(before - after))
            self._view = CatalogView(entries[-1].version, item_to_id, id_to_item, meta, self.verifier.snapshot())
            self._lock.notify_all()

    def replace(self, items: Mapping[str, int], version: int, source: str,
                meta: Mapping[str, ItemMeta] | None = None) -> None:
        """Swap in a whole catalog (a resync); items without metadata keep what this copy had for them."""
        item_to_id = {str(i): int(p) for i, p in items.items()}
        id_to_item = {p: i for i, p in item_to_id.items()}
        with self._lock:
            known = self._view.meta
            merged = {i: clean_meta(meta[i]) if meta and i in meta else known.get(i) or clean_meta(None)
                      for i in item_to_id}
            self.verifier.replace(list(id_to_item))
            self._view = CatalogView(version, item_to_id, id_to_item, merged, self.verifier.snapshot())
            self.source = source
            self._lock.notify_all()

    def wait_for(self, version: int, timeout: float) -> bool:
        """Block until this copy reached `version` (True) or `timeout` seconds passed (False)."""
        with self._lock:
            return self._lock.wait_for(lambda: self._view.version >= version, timeout)
