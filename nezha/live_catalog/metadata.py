"""Item metadata shown with recommendations: title, brand and categories.

A checkpoint's catalog keeps titles only; brand and categories come from the `items.jsonl` of the dataset its
prepared dataset was made from, when that file is still there. Items added at run time carry what the admin
API was given. In Redis the metadata sits next to the ID maps and travels in the change feed.

A replica does not hold a Python dict per item: it reads metadata from a `MetaSource`, either `MemoryMeta`
(compact JSON column, for a checkpoint's catalog and the in-process store) or `RedisItemMeta`
(nezha/live_catalog/redis_store.py: HMGET for the items it answers, with a bounded cache).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from nezha.catalog import Catalog
from nezha.live_catalog.item_table import ItemTable, StringColumn
from nezha.model.checkpoint import CheckpointError, prepared_dir_of
from nezha.prepared import read_summary

META_FIELDS = ("title", "brand", "categories")
ItemMeta = dict[str, Any]  # {"title": str | None, "brand": str | None, "categories": list[str]}


def clean_meta(raw: dict[str, Any] | None) -> ItemMeta:
    """The three fields, typed: blank strings become None, categories a list of non-blank strings."""
    raw = raw or {}

    def text(value: Any) -> str | None:
        return value.strip() or None if isinstance(value, str) else None

    cats = raw.get("categories")
    if isinstance(cats, str):
        cats = [cats]
    return {"title": text(raw.get("title")), "brand": text(raw.get("brand")),
            "categories": [c.strip() for c in cats or [] if isinstance(c, str) and c.strip()]}


def _source_items_file(checkpoint: str | Path) -> Path | None:
    """items.jsonl of the dataset the checkpoint's prepared dataset was made from, if it is still there."""
    try:
        prepared = prepared_dir_of(checkpoint)
    except CheckpointError:
        return None
    record = read_summary(prepared) if prepared else {}
    # `dataset_dir` is where prepare found the data; `config.dataset` may be only a name ("amazon-beauty").
    dataset = record.get("dataset_dir") or record.get("config", {}).get("dataset")
    path = Path(dataset) / "items.jsonl" if dataset else None
    return path if path is not None and path.is_file() else None


def load_item_metadata(checkpoint: str | Path, catalog: Catalog | None = None) -> dict[str, ItemMeta]:
    """Metadata of every catalog item: titles from the catalog, brand/categories from the source items.jsonl."""
    catalog = catalog or Catalog.load(Path(checkpoint) / "catalog")
    meta = {item: clean_meta({"title": title}) for item, title in zip(catalog.item_ids, catalog.titles, strict=True)}
    source = _source_items_file(checkpoint)
    if source is not None:
        with source.open() as f:
            for line in f:
                record = json.loads(line) if line.strip() else {}
                item = str(record.get("item_id", ""))
                if item in meta:
                    meta[item] = clean_meta({"title": meta[item]["title"], **{k: record.get(k) for k in
                                                                                ("brand", "categories")}})
    return meta


class MetaSource(Protocol):
    """Where a replica reads item metadata. Not versioned: an item's metadata only changes by remove + add."""

    def get_many(self, item_ids: Sequence[str]) -> list[ItemMeta]:
        """Metadata of each item (the empty metadata for unknown items)."""
        ...

    def changed(self, added: Mapping[str, ItemMeta], removed: Iterable[str]) -> None:
        """Items added (with their metadata) and removed by a change this replica applied."""
        ...


class MemoryMeta:
    """Metadata in memory as one compact JSON column (no dict per item), plus the items added since."""

    def __init__(self, item_ids: Sequence[str], metas: Iterable[ItemMeta]) -> None:
        self._index = ItemTable.build(StringColumn.of(item_ids), np.arange(len(item_ids), dtype=np.int64))
        self._json = StringColumn.of(json.dumps(m, separators=(",", ":")) for m in metas)
        self._added: dict[str, ItemMeta] = {}
        self._lock = threading.Lock()

    @classmethod
    def of(cls, meta: Mapping[str, ItemMeta]) -> MemoryMeta:
        return cls(list(meta), (clean_meta(m) for m in meta.values()))

    @classmethod
    def titles(cls, catalog: Catalog) -> MemoryMeta:
        """The catalog's titles as metadata (no brand, no categories)."""
        return cls(catalog.item_ids, (clean_meta({"title": t}) for t in catalog.titles))

    def get_many(self, item_ids: Sequence[str]) -> list[ItemMeta]:
        out = []
        for item in item_ids:
            meta = self._added.get(item)
            if meta is None:
                row = self._index.packed_of(item)
                meta = clean_meta(None) if row is None else json.loads(self._json.raw(row))
            out.append(meta)
        return out

    def changed(self, added: Mapping[str, ItemMeta], removed: Iterable[str]) -> None:
        with self._lock:
            for item in removed:
                self._added.pop(item, None)
            self._added.update(added)
