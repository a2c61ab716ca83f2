"""Precomputed item embeddings (`nezha prepare --embeddings FILE`), instead of embedding item text:

    FILE.npy      [num_items, D] float array, row i = the i-th item of the catalog (items.jsonl order);
                  memory-mapped, so a large file is read only where the quantizer needs it
    FILE.parquet  a column `item_id` and one list column of floats (any name), one row per item, any
                  order; read in record batches into one [num_items, D] float32 array

Every catalog item needs a vector; rows of items not in the catalog are left out and counted.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from nezha.data.datasets import DataError

log = logging.getLogger(__name__)

EMBEDDING_SUFFIXES = (".npy", ".parquet")
_EXAMPLES = 5  # missing item ids named in an error


def read_embeddings(path: str | Path, item_ids: Sequence[str]) -> np.ndarray:
    """[len(item_ids), D] float embeddings of the catalog from `path` (module docstring); DataError naming
    the file and what is wrong (shape, missing items, columns, non-finite values)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"embeddings: {path} is not a file")
    if path.suffix.lower() not in EMBEDDING_SUFFIXES:
        raise DataError(f"embeddings: {path}: expected a .npy or .parquet file")
    emb = _read_npy(path, len(item_ids)) if path.suffix.lower() == ".npy" else _read_parquet(path, item_ids)
    _check_finite(emb, path)
    return emb


def _read_npy(path: Path, num_items: int) -> np.ndarray:
    try:
        emb = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        raise DataError(f"embeddings: {path}: not a numpy array file ({exc})") from None
    if emb.ndim != 2 or not np.issubdtype(emb.dtype, np.floating):
        raise DataError(f"embeddings: {path} holds a {emb.dtype} array of shape {emb.shape}; expected a 2-d "
                        f"float array [num_items, dim]")
    if emb.shape[0] != num_items:
        raise DataError(
            f"embeddings: {path} has {emb.shape[0]:,} rows but the catalog has {num_items:,} items; a .npy needs "
            "one row per item in catalog (items.jsonl) order, or use a .parquet with an item_id column"
        )
    return emb


def _vector_column(schema: pa.Schema, path: Path) -> str:
    names = schema.names
    if "item_id" not in names:
        raise DataError(f"embeddings: {path} has no item_id column (columns: {names})")
    lists = [f.name for f in schema if f.name != "item_id"
             and (pa.types.is_list(f.type) or pa.types.is_large_list(f.type) or pa.types.is_fixed_size_list(f.type))
             and pa.types.is_floating(f.type.value_type)]
    if len(lists) != 1:
        raise DataError(f"embeddings: {path} needs exactly one list-of-floats column beside item_id, found "
                        f"{lists or 'none'} (columns: {names})")
    return lists[0]


def _read_parquet(path: Path, item_ids: Sequence[str]) -> np.ndarray:
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"embeddings: {path}: not a Parquet file ({exc})") from None
    column = _vector_column(parquet.schema_arrow, path)
    index = pd.Index(item_ids)
    emb: np.ndarray | None = None
    times = np.zeros(len(item_ids), dtype=np.int64)  # rows per catalog item
    unknown = 0
    for batch in parquet.iter_batches(columns=["item_id", column]):
        ids = batch.column("item_id").cast(pa.string()).to_numpy(zero_copy_only=False)
        vectors = batch.column(column)
        lengths = vectors.value_lengths().to_numpy(zero_copy_only=False)
        dim = emb.shape[1] if emb is not None else int(lengths[0]) if len(lengths) else 0
        if len(lengths) and (vectors.null_count or (lengths != dim).any()):
            raise DataError(f"embeddings: {path}: column {column!r} has null or differently sized vectors "
                            f"(expected {dim} values each)")
        if emb is None and len(lengths):
            emb = np.zeros((len(item_ids), dim), dtype=np.float32)
        rows = index.get_indexer(ids)
        known = rows >= 0
        unknown += int((~known).sum())
        times += np.bincount(rows[known], minlength=len(item_ids))
        values = vectors.flatten().to_numpy(zero_copy_only=False).reshape(len(ids), dim)
        emb[rows[known]] = values[known]
    if (times > 1).any():
        twice = np.flatnonzero(times > 1)
        raise DataError(f"embeddings: {path}: item {item_ids[twice[0]]!r} has {times[twice[0]]} rows "
                        f"({len(twice)} item(s) have more than one); give one vector per item")
    if emb is None or (times == 0).any():
        missing = np.flatnonzero(times == 0)
        raise DataError(f"embeddings: {path} has no vector for {len(missing):,} of the {len(item_ids):,} "
                        f"catalog items, e.g. {[item_ids[i] for i in missing[:_EXAMPLES]]}; every item needs one")
    if unknown:
        log.warning("embeddings: %s: leaving out %d row(s) of items not in the catalog", path, unknown)
    return emb


def _check_finite(emb: np.ndarray, path: str | Path) -> None:
    """DataError naming the first row with a NaN or infinite value (checked in chunks: `emb` may be mapped)."""
    for start in range(0, len(emb), 65536):
        bad = ~np.isfinite(emb[start:start + 65536]).all(1)
        if bad.any():
            raise DataError(f"embeddings: {path}: row {start + int(np.flatnonzero(bad)[0])} has a NaN or "
                            f"infinite value ({int(bad.sum())} such rows in that chunk)")
