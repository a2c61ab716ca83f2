"""Item metadata shown with recommendations: title, brand and categories.

A checkpoint's catalog keeps titles only; brand and categories come from the `items.jsonl` of the dataset its
prepared dataset was made from, when that file is still there. Items added at run time carry what the admin
API was given. In Redis the metadata sits next to the ID maps and travels in the change feed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from nezha.catalog import Catalog
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
