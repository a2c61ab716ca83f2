"""The item catalog: item ids, their unique semantic IDs, and lookups in both directions.

Stored as `catalog.json` (ids, titles, codebook sizes) + `codes.npy` ([N, L] int64) + `codes.json` (the codebook
sizes alone), never pickled. Construction validates everything (used on load too): at least one item, equal
lengths, no duplicate item ids, codes in range of the codebook sizes, no two items with the same semantic ID.

`ItemCodes` is the catalog without its ids and titles, all that training and scoring read: `ItemCodes.load`
skips `catalog.json`, whose ids and titles as Python strings are most of a large catalog's memory (~250 MB at
1M items), in every training worker.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nezha.verify.codec import pack
from nezha.verify.verifier import PrefixVerifier

_FORMAT = "nezha-catalog/1"
_META_FILE = "catalog.json"
_CODES_FILE = "codes.npy"
_SIZES_FILE = "codes.json"


class CatalogError(ValueError):
    """A catalog that is inconsistent or cannot be read."""


class UnknownItemError(KeyError):
    """An item id that is not in the catalog."""

    def __str__(self) -> str:  # KeyError's default str() shows the repr of its argument
        return str(self.args[0]) if self.args else "unknown item"


class ItemCodes:
    """Every item's semantic ID, row i = item i: `codes` [N, L] int64 (rows pairwise distinct), their packed
    values, and the verifier over them."""

    codes: np.ndarray
    codebook_sizes: tuple[int, ...]

    def __init__(self, codes: np.ndarray, codebook_sizes: Sequence[int]) -> None:
        self.codes, self.codebook_sizes = codes, tuple(codebook_sizes)
        self._check_codes()

    def _name(self, row: int) -> str:
        return f"row {row}"

    def _check_codes(self) -> None:
        self.codebook_sizes = tuple(int(s) for s in self.codebook_sizes)
        self.codes = np.asarray(self.codes)
        if self.codes.ndim != 2 or self.codes.shape[1] != len(self.codebook_sizes):
            raise CatalogError(f"codes must be [N, {len(self.codebook_sizes)}], got shape {self.codes.shape}")
        if not np.issubdtype(self.codes.dtype, np.integer):
            raise CatalogError(f"codes must be integers, got {self.codes.dtype}")
        self.codes = self.codes.astype(np.int64, copy=False)
        if len(self.codes) == 0:
            raise CatalogError("a catalog needs at least one item")
        out_of_range = (self.codes < 0) | (self.codes >= np.asarray(self.codebook_sizes))
        if out_of_range.any():
            row = int(np.flatnonzero(out_of_range.any(1))[0])
            raise CatalogError(
                f"item {self._name(row)} has codes {self.codes[row].tolist()} outside codebook sizes "
                f"{list(self.codebook_sizes)} ({int(out_of_range.any(1).sum())} such items)"
            )
        values, counts = np.unique(self.packed, return_counts=True)
        if (counts > 1).any():
            shared = int(values[counts > 1][0])
            holders = [self._name(int(i)) for i in np.flatnonzero(self.packed == shared)[:5]]
            raise CatalogError(
                f"{int((counts > 1).sum())} semantic ID(s) shared by several items, e.g. {holders}; "
                "IDs must be unique (see semantic_ids.quantizer.assign_unique_codes)"
            )

    @property
    def num_items(self) -> int:
        return len(self.codes)

    @property
    def levels(self) -> int:
        return len(self.codebook_sizes)

    @cached_property
    def packed(self) -> np.ndarray:
        """[N] int64 mixed-radix IDs (nezha.verify.codec.pack)."""
        return pack(self.codes, self.codebook_sizes)

    def verifier(self, device: str | torch.device = "cpu") -> PrefixVerifier:
        """The model-free verifier over these semantic IDs, its tables on `device`."""
        return PrefixVerifier(self.packed, self.codebook_sizes, device=device)

    @classmethod
    def load(cls, directory: str | Path) -> ItemCodes:
        """The codes of a saved catalog, without reading its ids and titles."""
        path = Path(directory)
        sizes_path = path / _SIZES_FILE
        if not sizes_path.is_file():  # saved before codes.json existed: the sizes are only in catalog.json
            catalog = Catalog.load(path)
            return cls(catalog.codes, catalog.codebook_sizes)
        meta = _read_meta(sizes_path)
        return cls(_read_codes(path / _CODES_FILE), meta["codebook_sizes"])


@dataclass
class Catalog(ItemCodes):
    """The item ids and titles beside their codes (`ItemCodes`): row i of each is item i."""

    item_ids: list[str]
    codes: np.ndarray  # [N, L] int64, rows pairwise distinct
    codebook_sizes: tuple[int, ...]
    titles: list[str]

    def __post_init__(self) -> None:
        n = len(self.codes)
        if len(self.item_ids) != n or len(self.titles) != n:
            raise CatalogError(f"{len(self.item_ids)} item ids, {len(self.titles)} titles and {n} code rows differ")
        self._check_codes()
        if len(self._index) != n:
            seen: set[str] = set()
            dups = sorted({i for i in self.item_ids if i in seen or seen.add(i)})
            raise CatalogError(f"{len(dups)} duplicate item id(s), e.g. {dups[:5]}")

    def _name(self, row: int) -> str:
        return repr(self.item_ids[row])

    @cached_property
    def _index(self) -> dict[str, int]:
        return {item_id: i for i, item_id in enumerate(self.item_ids)}

    @cached_property
    def _packed_order(self) -> np.ndarray:
        return np.argsort(self.packed, kind="stable")

    @cached_property
    def _sorted_packed(self) -> np.ndarray:
        return self.packed[self._packed_order]

    def index_of(self, item_id: str) -> int:
        try:
            return self._index[item_id]
        except KeyError:
            raise UnknownItemError(f"item {item_id!r} is not in the catalog ({self.num_items} items)") from None

    def indices_of(self, item_ids: Sequence[str]) -> np.ndarray:
        return np.asarray([self.index_of(i) for i in item_ids], dtype=np.int64)

    def item_of_packed(self, values: np.ndarray) -> list[str | None]:
        """Item id for each packed ID; None where no item has that ID."""
        values = np.asarray(values, dtype=np.int64).reshape(-1)
        sorted_packed = self._sorted_packed  # cached: one sort per catalog, not one gather per call
        pos = np.minimum(np.searchsorted(sorted_packed, values), self.num_items - 1)
        found = sorted_packed[pos] == values
        rows = self._packed_order[pos]
        return [self.item_ids[r] if ok else None for r, ok in zip(rows.tolist(), found.tolist(), strict=True)]

    def save(self, directory: str | Path) -> Path:
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        np.save(out / _CODES_FILE, self.codes)
        meta = {
            "format": _FORMAT,
            "codebook_sizes": list(self.codebook_sizes),
            "num_items": self.num_items,
            "item_ids": self.item_ids,
            "titles": self.titles,
        }
        (out / _META_FILE).write_text(json.dumps(meta, ensure_ascii=False))
        sizes = {"format": _FORMAT, "codebook_sizes": list(self.codebook_sizes), "num_items": self.num_items}
        (out / _SIZES_FILE).write_text(json.dumps(sizes))
        return out

    @classmethod
    def load(cls, directory: str | Path) -> Catalog:
        path = Path(directory)
        meta_path, codes_path = path / _META_FILE, path / _CODES_FILE
        if not meta_path.is_file() or not codes_path.is_file():
            raise CatalogError(f"{path}: not a catalog directory (needs {_META_FILE} and {_CODES_FILE})")
        meta = _read_meta(meta_path)
        return cls(
            item_ids=[str(i) for i in meta["item_ids"]],
            codes=_read_codes(codes_path),
            codebook_sizes=tuple(meta["codebook_sizes"]),
            titles=[str(t) for t in meta["titles"]],
        )


def _read_meta(meta_path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise CatalogError(f"{meta_path}: malformed JSON ({exc.msg})") from None
    if meta.get("format") != _FORMAT:
        raise CatalogError(f"{meta_path}: unsupported format {meta.get('format')!r} (expected {_FORMAT})")
    return meta


def _read_codes(codes_path: Path) -> np.ndarray:
    if not codes_path.is_file():
        raise CatalogError(f"{codes_path.parent}: not a catalog directory (needs {_CODES_FILE})")
    try:
        return np.load(codes_path, allow_pickle=False)
    except ValueError as exc:
        raise CatalogError(f"{codes_path}: cannot read ({exc})") from None
