"""A replica's copy of the catalog: item id <-> packed ID maps and the PrefixVerifier, changed together.

The request path only reads this copy (dicts + a PrefixVerifier on the decoding device): it never calls
Redis, so a Redis outage costs freshness, not availability. `CatalogFollower` (follower.py) keeps it in
step with Redis; `InProcessStore` (memory_store.py) writes it directly when there is no Redis.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from nezha.catalog import Catalog
from nezha.live_catalog.store import FeedEntry
from nezha.verify.codec import unpack
from nezha.verify.verifier import PrefixVerifier


class LocalCatalog:
    """item id <-> packed ID maps, the verifier and the version, changed together under one lock.

    A decode reads the verifier without the lock, but its answer is mapped from IDs to items afterwards,
    under the lock: a decode that saw the old verifier is mapped with the new maps once a change is in
    (an item removed meanwhile maps to nothing and is dropped), and one that saw the new verifier waits
    for the change to finish before mapping. So an applied removal is never returned by this replica.
    """

    def __init__(self, items: Mapping[str, int], sizes: Sequence[int], device: torch.device | str = "cpu",
                 version: int = 0, source: str = "checkpoint") -> None:
        self.sizes = tuple(int(s) for s in sizes)
        self._lock = threading.Condition()
        self._item_to_id = {str(i): int(p) for i, p in items.items()}
        self._id_to_item = {p: i for i, p in self._item_to_id.items()}
        self.verifier = PrefixVerifier(np.fromiter(self._id_to_item, dtype=np.int64, count=len(self._id_to_item)),
                                       self.sizes, device=device)
        self.version = version
        self.source = source  # checkpoint | redis | embedded

    @classmethod
    def from_catalog(cls, catalog: Catalog, device: torch.device | str = "cpu") -> LocalCatalog:
        items = dict(zip(catalog.item_ids, catalog.packed.tolist(), strict=True))
        return cls(items, catalog.codebook_sizes, device)

    def __len__(self) -> int:
        return len(self._item_to_id)

    def state(self) -> dict[str, Any]:
        with self._lock:
            return {"version": self.version, "size": len(self._item_to_id), "source": self.source}

    def lookup(self, item_ids: Sequence[str]) -> tuple[list[int], list[str]]:
        """(packed IDs of the known items in order, ids that are not in the catalog)."""
        with self._lock:
            found = [self._item_to_id.get(i) for i in item_ids]
        return [p for p in found if p is not None], [i for i, p in zip(item_ids, found, strict=True) if p is None]

    def items_of(self, packed: Iterable[int]) -> tuple[list[str | None], int]:
        """(item id or None for each packed ID, the catalog version they were mapped at)."""
        with self._lock:
            return [self._id_to_item.get(int(p)) for p in packed], self.version

    def codes(self, packed: Sequence[int]) -> np.ndarray:
        return unpack(np.asarray(packed, dtype=np.int64), self.sizes)

    def used_ids(self) -> set[int]:
        with self._lock:
            return set(self._id_to_item)

    def apply(self, entries: Sequence[FeedEntry]) -> None:
        """Apply consecutive add/remove entries in order (one verifier rebuild for all of them)."""
        if not entries:
            return
        with self._lock:
            touched = {p for e in entries for _, p in e.items}
            before = {p for p in touched if p in self._id_to_item}
            for entry in entries:
                for item_id, packed in entry.items:
                    if entry.op == "add":
                        self._item_to_id[item_id] = packed
                        self._id_to_item[packed] = item_id
                    else:
                        if self._item_to_id.get(item_id) == packed:
                            del self._item_to_id[item_id]
                        if self._id_to_item.get(packed) == item_id:
                            del self._id_to_item[packed]
            after = {p for p in touched if p in self._id_to_item}
            self.verifier.update(add=list(after - before), remove=list(before - after))
            self.version = entries[-1].version
            self._lock.notify_all()

    def replace(self, items: Mapping[str, int], version: int, source: str) -> None:
        item_to_id = {str(i): int(p) for i, p in items.items()}
        id_to_item = {p: i for i, p in item_to_id.items()}
        with self._lock:
            self.verifier.replace(list(id_to_item))
            self._item_to_id, self._id_to_item = item_to_id, id_to_item
            self.version, self.source = version, source
            self._lock.notify_all()

    def wait_for(self, version: int, timeout: float) -> bool:
        """Block until this copy reached `version` (True) or `timeout` seconds passed (False)."""
        with self._lock:
            return self._lock.wait_for(lambda: self.version >= version, timeout)
