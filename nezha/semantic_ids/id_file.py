"""Bring-your-own semantic IDs: item -> codes files in the form the TIGER / LETTER / LC-Rec family publishes.

    {"item": ["<a_12>", "<b_3>", "<c_40>", "<d_7>"], ...}   token strings <letter_number>; the letter is
                                                           the level (a = level 0, b = level 1, ...)
    {"item": [12, 3, 40], ...}                              plain integers

Every item needs the same number of levels. Codebook sizes are the largest code + 1 per level unless
given; a code outside a given codebook is an error.

Collisions (two items, one ID) occur in published files. The rule (`make_unique`): refuse by default,
naming the shared IDs and their items; with "append-level", add one level that numbers the items within
each shared ID in file order (0, 1, ...; 0 for an item whose ID is its own), the LC-Rec / LETTER
convention, so every item gets a unique ID and no two items are ever merged. Its size is the largest
number of items on one ID. No level is appended when there is no collision.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nezha.data.datasets import DataError, read_json_object
from nezha.semantic_ids.quantizer import codebook_usage
from nezha.verify.codec import pack, radix_weights

COLLISION_RULES = ("refuse", "append-level")
_TOKEN = re.compile(r"<([a-z])_([0-9]+)>")
_EXAMPLES = 5  # shared IDs listed in a refusal; the message also gives the total


def _code(value: Any, level: int, item: str, path: Path) -> int:
    """One code of `item` at `level`: an integer, or a token string whose letter names that level."""
    if isinstance(value, int) and not isinstance(value, bool):  # bool is an int subclass: true is no code
        if value < 0:
            raise DataError(f"{path}: item {item!r}: negative code {value} at level {level}")
        return value
    if not isinstance(value, str):
        raise DataError(f"{path}: item {item!r}: code {value!r} at level {level} is neither an integer nor a token")
    letter = string.ascii_lowercase[level] if level < len(string.ascii_lowercase) else None
    match = _TOKEN.fullmatch(value)
    if match is None:
        raise DataError(
            f"{path}: item {item!r}: token {value!r} at level {level} does not parse; expected <letter_number> "
            f"such as <{letter or 'a'}_12>"
        )
    if match[1] != letter:
        expected = f"<{letter}_N>" if letter else "an integer (tokens name levels a..z only)"
        raise DataError(f"{path}: item {item!r}: token {value!r} is at level {level}, which takes {expected}")
    return int(match[2])


def read_semantic_ids(
    path: str | Path, codebook_sizes: Sequence[int] | None = None
) -> tuple[list[str], np.ndarray, tuple[int, ...]]:
    """(item ids in file order, [N, L] int64 codes, codebook sizes) of an ID file; DataError naming the
    item and the reason for anything unusable. Rows need not be unique yet (see `make_unique`)."""
    path = Path(path)
    data = read_json_object(path, "item")
    rows: list[list[int]] = []
    first_item = next(iter(data))
    for item, value in data.items():
        if not isinstance(value, list) or not value:
            raise DataError(f"{path}: item {item!r}: expected a non-empty list of codes, got {value!r:.80}")
        row = [_code(v, level, item, path) for level, v in enumerate(value)]
        if rows and len(row) != len(rows[0]):
            raise DataError(
                f"{path}: item {item!r} has {len(row)} levels but item {first_item!r} has {len(rows[0])}; "
                "every item needs the same number of levels"
            )
        rows.append(row)
    levels = len(rows[0])
    try:
        codes = np.asarray(rows, dtype=np.int64)
    except OverflowError:
        raise DataError(f"{path}: a code does not fit an int64") from None
    item_ids = list(data)

    if codebook_sizes is None:
        sizes = tuple(int(s) for s in codes.max(0) + 1)
    else:
        sizes = tuple(int(s) for s in codebook_sizes)
        if len(sizes) != levels:
            raise DataError(f"{path} has {levels} levels but codebook_sizes gives {len(sizes)}: {list(sizes)}")
        outside = codes >= np.asarray(sizes)
        if outside.any():
            row, level = (int(i) for i in np.argwhere(outside)[0])
            raise DataError(
                f"{path}: item {item_ids[row]!r}: code {codes[row, level]} at level {level} is outside its codebook "
                f"(size {sizes[level]}); {int(outside.any(1).sum())} item(s) have such codes"
            )
    _check_id_space(sizes, path)
    return item_ids, codes, sizes


def _check_id_space(sizes: Sequence[int], path: Path) -> None:
    try:
        radix_weights(sizes)
    except ValueError as exc:  # packed IDs are int64
        raise DataError(f"{path}: codebook sizes {list(sizes)} are too large: {exc}") from None


def make_unique(
    item_ids: list[str], codes: np.ndarray, sizes: tuple[int, ...], rule: str, path: str | Path
) -> tuple[np.ndarray, tuple[int, ...], dict[str, Any]]:
    """Apply the collision rule (module docstring): (codes with unique rows, codebook sizes, statistics)."""
    if rule not in COLLISION_RULES:
        raise ValueError(f"unknown collision rule {rule!r}; choose one of {COLLISION_RULES}")
    n, levels = codes.shape
    packed = pack(codes, sizes)
    _, first, inverse, counts = np.unique(packed, return_index=True, return_inverse=True, return_counts=True)
    shared = np.flatnonzero(counts > 1)
    shared = shared[np.argsort(first[shared], kind="stable")]  # in file order, for the message
    if len(shared) and rule == "refuse":
        examples = []
        for group in shared[:_EXAMPLES].tolist():
            members = np.flatnonzero(inverse == group)
            examples.append(f"{codes[members[0]].tolist()} <- {[item_ids[m] for m in members[:_EXAMPLES]]}")
        raise DataError(
            f"{path}: {len(shared)} semantic ID(s) are shared by {int(counts[shared].sum())} items, e.g. "
            f"{'; '.join(examples)}. Every item needs its own ID: fix the file, or pass --resolve-collisions "
            "append-level to add a level that numbers the items sharing an ID"
        )
    if len(shared):
        # rank of each item among the items with its ID, in file order (a stable sort keeps file order)
        order = np.argsort(inverse, kind="stable")
        sorted_groups = inverse[order]
        rank = np.empty(n, dtype=np.int64)
        rank[order] = np.arange(n) - np.searchsorted(sorted_groups, sorted_groups)
        codes = np.column_stack([codes, rank])
        sizes = (*sizes, int(counts.max()))
        _check_id_space(sizes, Path(path))
    stats = {
        "source": str(path),
        "num_items": n,
        "levels_in_file": levels,
        "raw_collisions": n - len(counts),  # items whose ID an earlier item already holds
        "raw_collision_rate": (n - len(counts)) / n,
        "shared_ids": len(shared),
        "max_items_per_raw_id": int(counts.max()),
        "appended_level": bool(len(shared)),
        "final_collision_rate": 0.0,
        "codebook_usage": codebook_usage(codes, sizes),
    }
    return codes, sizes, stats
