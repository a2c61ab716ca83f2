"""Catalog writes of the admin API, as one replica carries them out.

A write goes to the shared store (Redis, or without Redis the replica's in-process catalog); its answer
waits (bounded) until this replica's own copy has the change, so the writer reads its own write here at
once. Items added by text get codes from the quantizer of the checkpoint's prepared dataset. A refused
change raises its ServiceError (serve/errors.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from nezha.live_catalog import (
    META_FIELDS,
    CatalogStore,
    InvalidItemError,
    LocalCatalog,
    NewItem,
    add_new_items,
    clean_meta,
    codes_of,
    load_quantizer_for,
)
from nezha.semantic_ids.embed import EmbeddingModelError, embed_texts
from serve.config import ServeConfig
from serve.errors import STORE_ERROR_TYPES, EmbeddingUnavailable, from_store_error
from serve.schemas import NewItemModel


class CatalogAdmin:
    """Adds and removes items through `store`; answers are the change's JSON bodies."""

    def __init__(self, store: CatalogStore, local: LocalCatalog, cfg: ServeConfig, mode: str, replica: str,
                 on_change: Callable[[], None]) -> None:
        self.store, self.local, self.mode, self.replica = store, local, mode, replica
        self._on_change = on_change
        self._embedding_model = cfg.embedding_model
        self._quantizer_loader = load_quantizer_for(cfg.checkpoint, cfg.quantizer)
        self._quantizer: Any = None

    def add(self, items: list[NewItemModel]) -> dict[str, Any]:
        return self._write(self._add, items)

    def remove(self, item_ids: list[str]) -> dict[str, Any]:
        return self._write(self._remove, item_ids)

    def _write(self, action: Callable[[Any], dict[str, Any]], arg: Any) -> dict[str, Any]:
        try:
            body = action(arg)
        except STORE_ERROR_TYPES as exc:
            raise from_store_error(exc) from exc
        applied = self.local.wait_for(body["version"], timeout=1.0)
        self._on_change()
        return {**body, "mode": self.mode, "applied_on_replica": applied, "replica": self.replica}

    def _add(self, items: list[NewItemModel]) -> dict[str, Any]:
        new = [NewItem(i.item_id, i.codes, i.text,
                       {k: getattr(i, k) for k in META_FIELDS if getattr(i, k) is not None}) for i in items]
        version, pairs = add_new_items(self.store, new, self.local.sizes, self._load_quantizer_once, self._embed)
        meta = {n.item_id: clean_meta(n.meta) for n in new}
        return {"version": version, "added": [{"item_id": item, "semantic_id": packed,
                                               "codes": codes_of(packed, self.local.sizes), **meta[item]}
                                              for item, packed in pairs]}

    def _remove(self, item_ids: list[str]) -> dict[str, Any]:
        return {"version": self.store.remove(item_ids), "removed": item_ids}

    def _load_quantizer_once(self) -> Any:
        if self._quantizer_loader is None:
            raise InvalidItemError("adding items by text needs the quantizer of the checkpoint's prepared dataset, "
                                   "which this service cannot find (set `quantizer`); give explicit `codes`")
        if self._quantizer is None:
            self._quantizer = self._quantizer_loader()
        return self._quantizer

    def _embed(self, texts: list[str]) -> np.ndarray:
        try:
            return embed_texts(texts, self._embedding_model, show_progress=False)
        except EmbeddingModelError as exc:
            raise EmbeddingUnavailable(str(exc)) from exc
