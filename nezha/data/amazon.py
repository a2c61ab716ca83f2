"""The original Amazon Review files -> a Dataset (`nezha import-amazon`; `write_dataset` stores it in the
directory format of nezha/data/datasets.py).

Reviews and metadata are JSON lines (optionally gzipped), k-core filtered here.
"""

from __future__ import annotations

import ast
import gzip
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from nezha.data.columnar import Interactions, group_by_user, k_core_filter
from nezha.data.datasets import DataError, Dataset, category_list, finish_stats, items_frame

log = logging.getLogger(__name__)


def _json_lines(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) of a JSON-lines file, gzipped or not.

    The 2014 Amazon metadata files hold Python dict literals rather than JSON; those are parsed with
    `ast.literal_eval` (literals only, no code is run).
    """
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    with path.open("rb") as probe:
        gzipped = probe.read(2) == b"\x1f\x8b"
    opener = gzip.open if gzipped else open
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                try:
                    record = ast.literal_eval(line)
                except (ValueError, SyntaxError):
                    raise DataError(f"{path}:{lineno}: malformed line (neither JSON nor a Python literal)") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{lineno}: expected an object, got {type(record).__name__}")
            yield lineno, record


def _meta_categories(record: dict[str, Any]) -> list[str]:
    """2014 metadata: `categories` is a list of category paths (lists) -> the first path; 2018: `category`."""
    value = record.get("categories", record.get("category"))
    if isinstance(value, list) and value and isinstance(value[0], list):
        return category_list(value[0])
    return category_list(value)


def load_amazon_raw(reviews_path: str | Path, meta_path: str | Path, k_core: int = 5) -> Dataset:
    """Build a Dataset from original Amazon Review files (reviews + metadata, JSON lines, gzip or plain).

    Reviews need `reviewerID`, `asin`, `unixReviewTime`; reviews of items absent from the metadata are
    dropped (logged with their count) before iterative `k_core`-core filtering of users and items.
    Sequences are ordered by `unixReviewTime` (ties keep file order); items keep metadata-file order
    and users order of first review.
    """
    reviews_path, meta_path = Path(reviews_path), Path(meta_path)
    rows = []
    for lineno, r in _json_lines(reviews_path):
        try:
            rows.append((str(r["reviewerID"]), str(r["asin"]), int(r["unixReviewTime"])))
        except (KeyError, TypeError, ValueError):
            raise DataError(f"{reviews_path}:{lineno}: needs reviewerID, asin and an integer unixReviewTime") from None
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "time"])
    raw_interactions = len(frame)

    records = []
    for lineno, m in _json_lines(meta_path):
        if m.get("asin") in (None, ""):
            raise DataError(f"{meta_path}:{lineno}: missing 'asin'")
        records.append(
            {"item_id": str(m["asin"]), "title": m.get("title"), "brand": m.get("brand"), "categories": _meta_categories(m)}
        )
    meta = pd.DataFrame(records, columns=["item_id", "title", "brand", "categories"]).drop_duplicates("item_id")

    known = frame["item_id"].isin(meta["item_id"])
    unknown = int((~known).sum())
    if unknown:
        log.warning("%s: dropping %d review(s) of items missing from %s", reviews_path, unknown, meta_path)
    frame = frame[known]
    user_codes, user_ids = pd.factorize(frame["user_id"], sort=False)
    item_index = pd.Index(meta["item_id"]).get_indexer(frame["item_id"]).astype(np.int32)
    inter = Interactions(user_codes.astype(np.int32), item_index, frame["time"].to_numpy(np.int64),
                         pa.array(user_ids.astype(str), pa.string()))
    del frame
    inter = k_core_filter(inter, k_core, len(meta))
    if not len(inter):
        raise DataError(f"{reviews_path}: nothing left after {k_core}-core filtering")

    used = np.bincount(inter.item, minlength=len(meta)) > 0  # the catalog: items with reviews left
    inter.item = (np.cumsum(used) - 1)[inter.item].astype(np.int32)
    items, stats = items_frame(meta[used].reset_index(drop=True), str(meta_path))
    sequences, user_ids = group_by_user(inter)
    stats.update(raw_interactions=raw_interactions, unknown_item_interactions=unknown, k_core=k_core)
    ds = Dataset(items=items, sequences=sequences, user_ids=user_ids, stats=finish_stats(items, sequences, stats))
    log.info(
        "%s: %d-core gives %d items, %d users, %d interactions (of %d reviews)",
        reviews_path, k_core, ds.num_items, ds.num_users, ds.stats["num_interactions"], raw_interactions,
    )
    return ds
