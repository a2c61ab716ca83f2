"""Loading interaction datasets into one in-memory form: an item table plus per-user item sequences.

A dataset is a directory (`load_dataset`) holding

- the items: `items.jsonl` (one JSON object a line), `items.parquet` or `items.csv`, with `item_id`,
  `title`, `brand`, `categories` (a list; in CSV one string, levels separated by " > ");
- the interactions: `interactions.csv`, `interactions.jsonl`, `interactions.parquet`, or a directory
  `interactions/` of parts in one of those formats, with `user_id`, `item_id` and `position` (0-based
  order within the user) or `timestamp`; or `interactions.json` (`{"user": ["item", ...], ...}`, each
  list oldest first). Exactly one of them: two would leave it to us which one you meant.

Interactions are read in blocks (nezha/data/readers.py) and kept as integer columns
(nezha/data/columnar.py), so memory grows by ~16-32 bytes per interaction, not by a Python object per
row. `write_dataset` writes a Dataset as `items.jsonl` + `interactions.csv`, e.g. one made from the
original Amazon Review files (nezha/data/amazon.py).

Item text for the embedding model (`item_text`) is

    "<title> | Brand: <brand> | Categories: <cat_1> > <cat_2> > ..."

with empty parts left out; an item with no title, brand or categories gets its item id as text so that
it still has a (distinct) embedding. Such items are kept and counted in `Dataset.stats`
(`items_without_text`); `nezha prepare` warns when they are many and refuses a catalog with no text at all.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from nezha.data.columnar import Collector, Interactions, group_by_user, k_core_filter
from nezha.data.errors import DataError
from nezha.data.readers import Block, InputStats, part_files, read_blocks
from nezha.data.split import Ragged

log = logging.getLogger(__name__)

ITEMS_FILE = "items.jsonl"
ITEMS_FILES = (ITEMS_FILE, "items.parquet", "items.csv")
INTERACTIONS_FILE = "interactions.csv"
INTERACTIONS_JSON_FILE = "interactions.json"
INTERACTIONS_FILES = (INTERACTIONS_FILE, "interactions.jsonl", "interactions.parquet", INTERACTIONS_JSON_FILE,
                      "interactions")  # the last: a directory of parts
ITEM_COLUMNS = ("item_id", "title", "brand", "categories")

__all__ = ["DataError", "Dataset", "load_dataset", "write_dataset"]


@dataclass
class Dataset:
    items: pd.DataFrame  # columns: item_id, title, brand, categories (list[str]), text
    sequences: Ragged  # per user: chronological int64 indices into `items`
    user_ids: list[str]
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def num_items(self) -> int:
        return len(self.items)

    @property
    def num_users(self) -> int:
        return len(self.sequences)


# ---- locating data ----------------------------------------------------------------------------------


def default_data_dir() -> Path:
    """`../shared/data` beside the repository root (the directory holding the `nezha` package)."""
    repo_root = Path(__file__).resolve().parents[2]
    return repo_root.parent / "shared" / "data"


def resolve_data_dir(data_dir: str | Path | None) -> Path:
    """The data root: `data_dir` if given, else $NEZHA_DATA_DIR, else `default_data_dir()` if it exists."""
    if data_dir is not None:
        source = f"data dir {str(data_dir)!r}"
        path = Path(data_dir)
    elif os.environ.get("NEZHA_DATA_DIR"):
        source = f"NEZHA_DATA_DIR={os.environ['NEZHA_DATA_DIR']!r}"
        path = Path(os.environ["NEZHA_DATA_DIR"])
    else:
        source = f"default data dir {str(default_data_dir())!r}"
        path = default_data_dir()
    if not path.is_dir():
        raise DataError(
            f"{source} does not exist or is not a directory; pass --data-dir DIR or set NEZHA_DATA_DIR "
            f"to a directory holding one sub-directory per dataset (e.g. DIR/amazon-beauty/{ITEMS_FILE})"
        )
    return path.resolve()


def _is_dataset_dir(path: Path) -> bool:
    # the items may be absent when the semantic IDs come from a file, so interactions suffice
    return path.is_dir() and any((path / f).exists() for f in (*ITEMS_FILES, *INTERACTIONS_FILES))


def resolve_dataset_dir(dataset: str, data_dir: str | Path | None) -> Path:
    """`dataset` as a directory: an existing path as given, else `<data dir>/<dataset>`."""
    direct = Path(dataset)
    if _is_dataset_dir(direct):
        return direct.resolve()
    root = resolve_data_dir(data_dir)
    path = root / dataset
    if not path.is_dir():
        available = sorted(p.name for p in root.iterdir() if _is_dataset_dir(p))
        raise DataError(f"dataset {dataset!r} not found in {root}; available: {available or 'none'}")
    return path


# ---- item text --------------------------------------------------------------------------------------


def _clean(value: Any) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    return " ".join(str(value).split())


def category_list(value: Any) -> list[str]:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return []
    if isinstance(value, str):
        value = [value]
    return [c for c in (_clean(v) for v in value) if c]


def item_text(item_id: str, title: str, brand: str, categories: list[str]) -> str:
    """The embedding text of one item (format in the module docstring)."""
    parts = []
    if title:
        parts.append(title)
    if brand:
        parts.append(f"Brand: {brand}")
    if categories:
        parts.append("Categories: " + " > ".join(categories))
    return " | ".join(parts) if parts else item_id


# Python's str.split() whitespace in RE2 syntax: the vectorised cleaning below must give `_clean`'s text
_WHITESPACE = r"[\p{Z}\t\n\x0b\x0c\r\x1c-\x1f\x{85}]+"


def _as_text(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    return value if isinstance(value, str) else str(value)


def _as_list(value: Any) -> list[str]:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return []
    if isinstance(value, str):
        return [value]
    return [v if isinstance(v, str) else str(v) for v in value if _as_text(v) is not None]


def _clean_strings(col: pa.Array) -> pa.Array:
    """`_clean` on a whole column: whitespace runs -> one space, trimmed; missing -> ""."""
    col = pc.replace_substring_regex(col, _WHITESPACE, " ")
    return pc.fill_null(pc.utf8_trim(col, " "), "")


def _clean_lists(arr: pa.ListArray) -> pa.ListArray:
    """`category_list` on a whole column: each entry cleaned, empty ones dropped; a missing list is empty."""
    flat = _clean_strings(pc.list_flatten(arr))
    keep = pc.not_equal(flat, "")
    counts = np.bincount(pc.list_parent_indices(arr).filter(keep).to_numpy(), minlength=len(arr))
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), flat.filter(keep))


def _raw_items(records: Sequence[dict[str, Any]]) -> pa.Table:
    """Item records (dicts) as the raw item table: ids and text as strings, categories as string lists."""
    return pa.table({
        "item_id": pa.array([str(r["item_id"]) for r in records], pa.string()),
        "title": pa.array([_as_text(r.get("title")) for r in records], pa.string()),
        "brand": pa.array([_as_text(r.get("brand")) for r in records], pa.string()),
        "categories": pa.array([_as_list(r.get("categories")) for r in records], pa.list_(pa.string())),
    })


def _duplicates(ids: pa.Array) -> list[str]:
    counts = pc.value_counts(ids)
    return sorted(counts.field("values").filter(pc.greater(counts.field("counts"), 1)).to_pylist())


def items_frame(raw: pa.Table | pd.DataFrame, source: str) -> tuple[pd.DataFrame, dict[str, int]]:
    """Normalise raw item rows (the raw item table, or a DataFrame of item records) into the item table;
    errors on an empty catalog or duplicate ids. The cleaning and the text (`item_text`) are computed
    column-wise with pyarrow: a million items take seconds and no Python object per value until the end."""
    if isinstance(raw, pd.DataFrame):
        raw = _raw_items(raw.to_dict("records"))
    if not raw.num_rows:
        raise DataError(f"{source}: no items (empty catalog)")
    ids = raw.column("item_id").combine_chunks()
    n = len(ids)
    if pc.count_distinct(ids).as_py() < n:
        dups = _duplicates(ids)
        raise DataError(f"{source}: {len(dups)} duplicate item id(s), e.g. {dups[:5]}")
    titles = _clean_strings(raw.column("title").combine_chunks())
    brands = _clean_strings(raw.column("brand").combine_chunks())
    cats = _clean_lists(raw.column("categories").combine_chunks())
    joined = pc.binary_join(cats, " > ")
    # each row's non-empty parts as a list, joined by " | " (lists, not nulls: pyarrow's null-skipping join
    # drops rows that are null in every argument)
    parts = [titles, pc.binary_join_element_wise("Brand: ", brands, ""),
             pc.binary_join_element_wise("Categories: ", joined, "")]
    filled = [pc.equal(titles, ""), pc.equal(brands, ""), pc.equal(joined, "")]
    interleave = pa.array(np.arange(3 * n).reshape(3, n).T.ravel())
    flat = pa.concat_arrays(parts).take(interleave)
    keep = pc.invert(pa.concat_arrays(filled).take(interleave))
    per_row = np.bincount(np.repeat(np.arange(n), 3)[keep.to_numpy(zero_copy_only=False)], minlength=n)
    offsets = pa.array(np.concatenate([[0], np.cumsum(per_row)]).astype(np.int32))
    texts = pc.binary_join(pa.ListArray.from_arrays(offsets, flat.filter(keep)), " | ")
    empty = pc.and_(pc.and_(filled[0], filled[1]), filled[2])
    texts = pc.if_else(empty, ids, texts)  # no text at all: the id stands in
    # Arrow-backed columns: no Python object per value (a million items would need ~1 GB of them);
    # .tolist() still gives Python strings and lists
    items = pa.table({"item_id": ids, "title": titles, "brand": brands, "categories": cats,
                      "text": texts}).to_pandas(types_mapper=pd.ArrowDtype)
    stats = {
        "items_missing_title": int(pc.sum(filled[0]).as_py() or 0),
        "items_without_text": int(pc.sum(empty).as_py() or 0),
    }
    return items, stats


# ---- reading ------------------------------------------------------------------------------------------


def _read_items_jsonl(path: Path) -> list[dict[str, Any]]:
    records = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: malformed JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            if record.get("item_id") in (None, ""):
                raise DataError(f"{path}:{lineno}: missing 'item_id'")
            records.append(record)
    return records


def _column(table: pa.Table, name: str, path: Path) -> pa.Array:
    """Column `name` of an item table as the raw type (strings, or string lists for categories); absent:
    nulls."""
    kind = pa.list_(pa.string()) if name == "categories" else pa.string()
    if name not in table.column_names:
        return pa.nulls(table.num_rows, kind)
    col = table.column(name).combine_chunks()
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    if name == "categories" and (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        # CSV: one string, levels separated by " > "; a Parquet string column: one category
        return pc.split_pattern(col, " > ") if path.suffix == ".csv" else pa.ListArray.from_arrays(
            pa.array(np.arange(len(col) + 1, dtype=np.int32)), col.cast(pa.string()), mask=pc.is_null(col))
    try:
        return col.cast(kind)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise DataError(f"{path}: column {name!r} has type {col.type}; expected {kind}") from None


def _read_items(path: Path) -> pa.Table:
    """The raw item table of items.jsonl / .parquet / .csv; a row without an item_id is an error naming it."""
    if path.suffix == ".jsonl":
        return _raw_items(_read_items_jsonl(path))
    try:
        if path.suffix == ".parquet":
            table = pq.read_table(path)
        else:
            table = pcsv.read_csv(path, convert_options=pcsv.ConvertOptions(
                column_types={c: pa.string() for c in ITEM_COLUMNS}, strings_can_be_null=True))
    except pa.ArrowInvalid as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None
    if "item_id" not in table.column_names:
        raise DataError(f"{path}: missing column 'item_id'; has {table.column_names}")
    raw = pa.table({name: _column(table, name, path) for name in ITEM_COLUMNS})
    missing = pc.fill_null(pc.equal(raw.column("item_id"), ""), True)
    if pc.any(missing).as_py():
        row = int(np.flatnonzero(missing.to_numpy(zero_copy_only=False))[0]) + 1
        raise DataError(f"{path}, row {row}: missing 'item_id' ({pc.sum(missing).as_py()} such row(s))")
    return raw


def _select_items(raw: pa.Table, item_ids: Sequence[str], source: str) -> tuple[pa.Table, int]:
    """The rows of `item_ids` in that order (an id without a row gets one without text), and the number of
    rows whose id is not among `item_ids`."""
    ids = raw.column("item_id").combine_chunks()
    if pc.count_distinct(ids).as_py() < len(ids):
        dups = _duplicates(ids)
        raise DataError(f"{source}: {len(dups)} duplicate item id(s), e.g. {dups[:5]}")
    wanted = pa.array([str(i) for i in item_ids], pa.string())
    selected = raw.take(pc.index_in(wanted, value_set=ids)).set_column(0, "item_id", wanted)
    unlisted = len(ids) - int(pc.sum(pc.is_in(ids, value_set=wanted)).as_py() or 0)
    return selected, unlisted


def read_json_object(path: Path, key_name: str) -> dict[str, Any]:
    """A JSON file holding one non-empty object. A key that appears twice is an error: `json` would keep
    the last value silently."""

    def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj: dict[str, Any] = {}
        for key, value in pairs:
            if key in obj:
                raise DataError(f"{path}: {key_name} {key!r} appears twice")
            obj[key] = value
        return obj

    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason})") from None
    if not text.strip():
        raise DataError(f"{path}: empty file")
    try:
        data = json.loads(text, object_pairs_hook=unique_keys)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object keyed by {key_name}, got a {type(data).__name__}")
    if not data:
        raise DataError(f"{path}: empty object (no {key_name}s)")
    return data


def _single(path: Path, names: Sequence[str], what: str) -> Path | None:
    present = [path / n for n in names if (path / n).exists()]
    if len(present) > 1:
        raise DataError(f"{path}: both {' and '.join(p.name for p in present)} exist; remove the one that should "
                        f"not be used (one {what} source)")
    return present[0] if present else None


def dataset_files(path: Path, items_required: bool = True) -> tuple[Path | None, Path]:
    """(the items file, or None when it is absent and not required; the interactions file or directory)."""
    items_path = _single(path, ITEMS_FILES, "item")
    inter_path = _single(path, INTERACTIONS_FILES, "interaction")
    missing = []
    if items_required and items_path is None:
        missing.append(ITEMS_FILE)
    if inter_path is None:
        missing.append(f"{INTERACTIONS_FILE} (or {INTERACTIONS_JSON_FILE})")
    if missing:
        raise DataError(
            f"{path}: missing {', '.join(missing)}; {ITEMS_FILE} may be left out only when the semantic IDs "
            "come from a file (nezha prepare --semantic-ids). Other forms: items.parquet/.csv; "
            "interactions.jsonl/.parquet or a directory interactions/ of parts"
        )
    assert inter_path is not None
    return items_path, inter_path


def input_files(path: Path, items_required: bool = True) -> list[Path]:
    """Every input file of a dataset directory: the items file (if any), then each interaction part."""
    items_path, inter_path = dataset_files(path, items_required)
    return ([items_path] if items_path else []) + part_files(inter_path)


def _json_block(path: Path) -> Block:
    """`{"user": ["item", ...], ...}`, oldest first, as one block. Item ids may be strings or integers (the
    LC-Rec / LETTER `.inter.json` files number their items); both become strings."""
    users, items, positions = [], [], []
    for user, sequence in read_json_object(path, "user").items():
        if not user:
            raise DataError(f"{path}: empty user id")
        if not isinstance(sequence, list):
            raise DataError(f"{path}: user {user!r}: expected a list of item ids, got a {type(sequence).__name__}")
        for position, item in enumerate(sequence):
            if isinstance(item, bool) or not isinstance(item, str | int) or item == "":
                raise DataError(
                    f"{path}: user {user!r}, position {position}: an item id is a non-empty string or an "
                    f"integer, got {item!r}"
                )
            users.append(user)
            items.append(str(item))
            positions.append(position)
    return Block(pa.array(users, pa.string()), pa.array(items, pa.string()), np.asarray(positions, np.int64), path)


def read_interactions(inter_path: Path, catalog_ids: Sequence[str], catalog_source: str) -> Interactions:
    """The interactions of `inter_path` as integer columns; those naming items outside the catalog are
    dropped with a warning giving their count."""
    collector = Collector(pa.array(list(catalog_ids), pa.string()))
    stats = InputStats()
    if inter_path.suffix == ".json":
        collector.add(_json_block(inter_path))
    else:
        for block in read_blocks(inter_path, stats):
            collector.add(block)
    inter = collector.finish()
    unknown = inter.stats["unknown_item_interactions"]
    if unknown:
        log.warning("%s: dropping %d interaction(s) with %d item id(s) not in %s",
                    inter_path, unknown, inter.stats["unknown_item_ids"], catalog_source)
    if stats.empty_parts:
        log.warning("%s: %d empty part(s) skipped", inter_path, len(stats.empty_parts))
    inter.stats.update(parts=stats.parts, empty_parts=len(stats.empty_parts), malformed_rows_skipped=stats.malformed_rows,
                       order_column=stats.order_column or "position", timestamp_unit=stats.timestamp_unit)
    if not len(inter):
        raise DataError(f"{inter_path}: no interactions with known items (items in {catalog_source})")
    return inter


def finish_stats(items: pd.DataFrame, sequences: Ragged, stats: dict[str, Any]) -> dict[str, Any]:
    lengths = sequences.lengths()
    stats.update(
        num_items=len(items),
        num_users=len(sequences),
        num_interactions=int(lengths.sum()),
        mean_sequence_length=float(lengths.mean()) if len(lengths) else 0.0,
        items_without_interactions=int((np.bincount(sequences.values, minlength=len(items)) == 0).sum()),
    )
    return stats


def load_catalog(path: Path, item_ids: Sequence[str] | None = None) -> tuple[pd.DataFrame, dict[str, Any], str]:
    """(item table, its stats, what the catalog is called in messages) of a dataset directory; see
    `load_dataset` for `item_ids`."""
    items_path, _ = dataset_files(path, items_required=item_ids is None)
    raw = _read_items(items_path) if items_path else _raw_items([])
    if item_ids is None:
        items, stats = items_frame(raw, str(items_path))
        return items, stats, str(items_path.name if items_path else ITEMS_FILE)
    raw, unlisted = _select_items(raw, item_ids, str(items_path))
    if unlisted:
        log.warning("%s: leaving out %d item(s) that have no semantic ID in the ID file", items_path, unlisted)
    items, stats = items_frame(raw, "the semantic-ID file")
    stats["items_without_semantic_id"] = unlisted
    return items, stats, "the semantic-ID file"


def load_dataset(path: str | Path, item_ids: Sequence[str] | None = None, k_core_min: int = 0) -> Dataset:
    """Load a dataset directory (formats in the module docstring).

    `item_ids` (the keys of a semantic-ID file) fixes the catalog: exactly those items, in that order,
    with title/brand/categories from the items file where it has them; the items file may then be
    absent, and its items not among `item_ids` are left out with a warning and counted
    (`items_without_semantic_id`).

    Interactions of items outside the catalog are dropped with a warning that gives their count; with
    `k_core_min` > 1 users and items with fewer interactions are then removed, repeatedly (items stay in
    the catalog). Timings of the steps land in `stats["timings"]`.
    """
    path = Path(path)
    _, inter_path = dataset_files(path, items_required=item_ids is None)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    items, stats, catalog_source = load_catalog(path, item_ids)
    timings["items_s"] = time.perf_counter() - t
    t = time.perf_counter()
    inter = read_interactions(inter_path, items["item_id"].tolist(), catalog_source)
    timings["read_s"] = time.perf_counter() - t
    t = time.perf_counter()
    inter = k_core_filter(inter, k_core_min, len(items))
    if not len(inter):
        raise DataError(f"{inter_path}: nothing left after {k_core_min}-core filtering")
    timings["filter_s"] = time.perf_counter() - t
    t = time.perf_counter()
    sequences, user_ids = group_by_user(inter)
    timings["group_s"] = time.perf_counter() - t
    stats.update(inter.stats)
    del inter
    ds = Dataset(items=items, sequences=sequences, user_ids=user_ids, stats=finish_stats(items, sequences, stats))
    ds.stats["timings"] = timings
    log.info("loaded %s: %d items, %d users, %d interactions",
             path, ds.num_items, ds.num_users, ds.stats["num_interactions"])
    return ds


def write_dataset(ds: Dataset, out_dir: str | Path) -> Path:
    """Write `ds` as items.jsonl + interactions.csv, a form `load_dataset` (and `nezha prepare`) reads."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with (out / ITEMS_FILE).open("w", encoding="utf-8") as f:
        for row in ds.items[["item_id", "title", "brand", "categories"]].itertuples(index=False):
            record = {"item_id": row.item_id, "title": row.title, "brand": row.brand, "categories": list(row.categories)}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    values, offsets = ds.sequences.offsets()
    lengths = np.diff(offsets)
    item_ids = ds.items["item_id"].to_numpy()
    frame = pd.DataFrame(
        {
            "user_id": np.repeat(np.asarray(ds.user_ids, dtype=object), lengths),
            "item_id": item_ids[values],
            "position": np.arange(len(values)) - np.repeat(offsets[:-1], lengths),
        }
    )
    frame.to_csv(out / INTERACTIONS_FILE, index=False)
    return out
