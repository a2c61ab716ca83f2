"""Loading interaction datasets into one in-memory form: an item table plus per-user item sequences.

The input format is the Beauty-like directory (`load_dataset`): `items.jsonl` (one JSON object a line
with `item_id`, `title`, `brand`, `categories`) and the interactions, either `interactions.csv`
(`user_id,item_id,position`, position = 0-based chronological order within the user) or
`interactions.json` (`{"user": ["item", ...], ...}`, each list oldest first), never both.
`write_dataset` writes a Dataset in that format, e.g. one made from the original Amazon Review files
(nezha/data/amazon.py).

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
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

ITEMS_FILE = "items.jsonl"
INTERACTIONS_FILE = "interactions.csv"
INTERACTIONS_JSON_FILE = "interactions.json"
INTERACTION_COLUMNS = ("user_id", "item_id", "position")


class DataError(ValueError):
    """Input data that cannot be used; the message names the file (and line) and what is wrong."""


@dataclass
class Dataset:
    items: pd.DataFrame  # columns: item_id, title, brand, categories (list[str]), text
    sequences: list[np.ndarray]  # per user: chronological int64 indices into `items`
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
    # items.jsonl may be absent when the semantic IDs come from a file, so an interactions file suffices
    return path.is_dir() and any((path / f).is_file() for f in (ITEMS_FILE, INTERACTIONS_FILE, INTERACTIONS_JSON_FILE))


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


def _check_unique_ids(ids: list[str], source: str) -> None:
    seen: set[str] = set()
    dups = sorted({i for i in ids if i in seen or seen.add(i)})
    if dups:
        raise DataError(f"{source}: {len(dups)} duplicate item id(s), e.g. {dups[:5]}")


def items_frame(records: list[dict[str, Any]], source: str) -> tuple[pd.DataFrame, dict[str, int]]:
    """Normalise item records into the item table; errors on an empty catalog or duplicate ids."""
    if not records:
        raise DataError(f"{source}: no items (empty catalog)")
    ids = [str(r["item_id"]) for r in records]
    titles = [_clean(r.get("title")) for r in records]
    brands = [_clean(r.get("brand")) for r in records]
    cats = [category_list(r.get("categories")) for r in records]
    _check_unique_ids(ids, source)
    items = pd.DataFrame({"item_id": ids, "title": titles, "brand": brands, "categories": cats})
    items["text"] = [item_text(*row) for row in zip(ids, titles, brands, cats, strict=True)]
    stats = {
        "items_missing_title": sum(not t for t in titles),
        "items_without_text": sum(not (t or b or c) for t, b, c in zip(titles, brands, cats, strict=True)),
    }
    return items, stats


# ---- directory format -------------------------------------------------------------------------------


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


def _select_items(
    records: list[dict[str, Any]], item_ids: Sequence[str], source: str
) -> tuple[list[dict[str, Any]], int]:
    """The records of `item_ids` in that order (an id without a record gets one without text), and the
    number of records whose id is not among `item_ids`."""
    _check_unique_ids([str(r["item_id"]) for r in records], source)
    by_id = {str(r["item_id"]): r for r in records}
    unlisted = len(by_id.keys() - set(item_ids))
    return [by_id.get(i, {"item_id": i}) for i in item_ids], unlisted


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


def dataset_files(path: Path, items_required: bool = True) -> tuple[Path | None, Path]:
    """(items.jsonl, or None when it is absent and not required; the interactions file).

    The interactions are `interactions.csv` or `interactions.json`; both at once is an error, since
    silently preferring one would train on data the user may have meant to replace.
    """
    items_path = path / ITEMS_FILE
    csv_path, json_path = path / INTERACTIONS_FILE, path / INTERACTIONS_JSON_FILE
    if csv_path.is_file() and json_path.is_file():
        raise DataError(
            f"{path}: both {INTERACTIONS_FILE} and {INTERACTIONS_JSON_FILE} exist; "
            "remove the one that should not be used"
        )
    missing = []
    if items_required and not items_path.is_file():
        missing.append(ITEMS_FILE)
    if not csv_path.is_file() and not json_path.is_file():
        missing.append(f"{INTERACTIONS_FILE} (or {INTERACTIONS_JSON_FILE})")
    if missing:
        raise DataError(
            f"{path}: missing {', '.join(missing)}; {ITEMS_FILE} may be left out only when the semantic IDs "
            "come from a file (nezha prepare --semantic-ids)"
        )
    return (items_path if items_path.is_file() else None), (json_path if json_path.is_file() else csv_path)


def _read_interactions_csv(path: Path) -> pd.DataFrame:
    try:
        frame = pd.read_csv(path, dtype={"user_id": str, "item_id": str}, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot parse CSV ({exc})") from None
    absent = [c for c in INTERACTION_COLUMNS if c not in frame.columns]
    if absent:
        raise DataError(f"{path}: missing column(s) {absent}; expected {list(INTERACTION_COLUMNS)}")
    blank = (frame["user_id"] == "") | (frame["item_id"] == "")
    position = pd.to_numeric(frame["position"], errors="coerce")
    bad = blank | position.isna()
    if bad.any():
        first = int(np.flatnonzero(bad.to_numpy())[0]) + 2  # +1 header, +1 one-based
        raise DataError(f"{path}:{first}: empty user_id/item_id or non-numeric position ({int(bad.sum())} such rows)")
    return frame.assign(position=position)


def _read_interactions_json(path: Path) -> pd.DataFrame:
    """`{"user": ["item", ...], ...}`, oldest first. Item ids may be strings or integers (the LC-Rec /
    LETTER `.inter.json` files number their items); both become strings."""
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
    return pd.DataFrame({"user_id": users, "item_id": items, "position": positions})


def sequences_from_frame(
    frame: pd.DataFrame, item_index: pd.Index, order_column: str
) -> tuple[list[np.ndarray], list[str]]:
    """Per-user index sequences ordered by `order_column` (stable: ties keep file order).

    Users come in order of first appearance; `frame.item_id` must all be in `item_index`.
    """
    user_codes, user_ids = pd.factorize(frame["user_id"], sort=False)
    item_idx = item_index.get_indexer(frame["item_id"]).astype(np.int64)
    order = np.lexsort((frame[order_column].to_numpy(), user_codes))  # lexsort is stable
    counts = np.bincount(user_codes, minlength=len(user_ids))
    sequences = np.split(item_idx[order], np.cumsum(counts)[:-1])
    return sequences, [str(u) for u in user_ids]


def finish_stats(items: pd.DataFrame, sequences: list[np.ndarray], stats: dict[str, Any]) -> dict[str, Any]:
    lengths = np.array([len(s) for s in sequences], dtype=np.int64)
    used = np.zeros(len(items), dtype=bool)
    if len(sequences):
        used[np.concatenate(sequences)] = True
    stats.update(
        num_items=len(items),
        num_users=len(sequences),
        num_interactions=int(lengths.sum()),
        mean_sequence_length=float(lengths.mean()) if len(lengths) else 0.0,
        items_without_interactions=int((~used).sum()),
    )
    return stats


def load_dataset(path: str | Path, item_ids: Sequence[str] | None = None) -> Dataset:
    """Load a Beauty-like directory (`items.jsonl` + `interactions.csv` or `interactions.json`).

    `item_ids` (the keys of a semantic-ID file) fixes the catalog: exactly those items, in that order,
    with title/brand/categories from `items.jsonl` where it has them; `items.jsonl` may then be absent,
    and its items not among `item_ids` are left out with a warning and counted (`items_without_semantic_id`).

    Interactions of items outside the catalog are dropped with a warning that gives their count; every
    other problem (missing file or column, malformed line, duplicate item id, empty catalog, no
    interaction left) is a DataError.
    """
    path = Path(path)
    items_path, inter_path = dataset_files(path, items_required=item_ids is None)
    records = _read_items_jsonl(items_path) if items_path else []
    if item_ids is None:
        catalog_source = ITEMS_FILE
        items, stats = items_frame(records, str(items_path))
    else:
        catalog_source = "the semantic-ID file"
        records, unlisted = _select_items(records, item_ids, str(items_path))
        if unlisted:
            log.warning("%s: leaving out %d item(s) that have no semantic ID in the ID file", items_path, unlisted)
        items, stats = items_frame(records, catalog_source)
        stats["items_without_semantic_id"] = unlisted

    frame = _read_interactions_json(inter_path) if inter_path.suffix == ".json" else _read_interactions_csv(inter_path)
    item_index = pd.Index(items["item_id"])
    known = item_index.get_indexer(frame["item_id"]) >= 0
    unknown = int((~known).sum())
    if unknown:
        log.warning(
            "%s: dropping %d interaction(s) with %d item id(s) not in %s",
            inter_path, unknown, frame.loc[~known, "item_id"].nunique(), catalog_source,
        )
        frame = frame[known]
    if frame.empty:
        raise DataError(f"{inter_path}: no interactions with known items (items in {catalog_source})")
    sequences, user_ids = sequences_from_frame(frame, item_index, "position")
    stats["unknown_item_interactions"] = unknown
    ds = Dataset(items=items, sequences=sequences, user_ids=user_ids, stats=finish_stats(items, sequences, stats))
    log.info(
        "loaded %s: %d items, %d users, %d interactions",
        path, ds.num_items, ds.num_users, ds.stats["num_interactions"],
    )
    return ds


def write_dataset(ds: Dataset, out_dir: str | Path) -> Path:
    """Write `ds` in the directory format that `load_dataset` (and `nezha prepare --data-dir`) reads."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with (out / ITEMS_FILE).open("w", encoding="utf-8") as f:
        for row in ds.items[["item_id", "title", "brand", "categories"]].itertuples(index=False):
            record = {"item_id": row.item_id, "title": row.title, "brand": row.brand, "categories": list(row.categories)}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    item_ids = ds.items["item_id"].to_numpy()
    lengths = [len(s) for s in ds.sequences]
    frame = pd.DataFrame(
        {
            "user_id": np.repeat(np.asarray(ds.user_ids, dtype=object), lengths),
            "item_id": item_ids[np.concatenate(ds.sequences)] if ds.sequences else [],
            "position": np.concatenate([np.arange(n) for n in lengths]) if lengths else [],
        }
    )
    frame.to_csv(out / INTERACTIONS_FILE, index=False)
    return out
