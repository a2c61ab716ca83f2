"""The catalog store without Redis: changes apply to one replica's copy only (and are lost when it restarts)."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any

from nezha.live_catalog.errors import IdTakenError, ItemExistsError, ItemNotFoundError
from nezha.live_catalog.local import LocalCatalog
from nezha.live_catalog.store import FeedEntry


class InProcessStore:
    """The catalog store without Redis: changes apply to this replica's copy only (one replica)."""

    mode = "embedded"

    def __init__(self, local: LocalCatalog) -> None:
        self.local = local
        self._write_lock = threading.Lock()  # checks + apply are one step

    def id_in_use(self, packed: int) -> bool:
        return self.local.id_in_use(packed)

    def add(self, items: Sequence[tuple[str, int]], meta: Mapping[str, dict[str, Any]] | None = None) -> int:
        with self._write_lock:
            for item_id, _ in items:
                known, _ = self.local.lookup([item_id])
                if known:
                    raise ItemExistsError(item_id, known[0])
            holders, _ = self.local.items_of(p for _, p in items)
            for (item_id, packed), holder in zip(items, holders, strict=True):
                if holder is not None:
                    raise IdTakenError(item_id, packed, holder)
            version = self.local.version + 1
            self.local.apply([FeedEntry(version, "add", [(i, int(p)) for i, p in items], meta=dict(meta or {}))])
            return version

    def remove(self, item_ids: Sequence[str]) -> int:
        with self._write_lock:
            packed, missing = self.local.lookup(item_ids)
            if missing:
                raise ItemNotFoundError(missing[0])
            version = self.local.version + 1
            self.local.apply([FeedEntry(version, "remove", list(zip(item_ids, packed, strict=True)))])
            return version

    def status(self) -> dict[str, Any]:
        return {"mode": self.mode, "note": "no Redis configured: changes apply to this replica only and are "
                                          "lost when it restarts"}
