"""The new-item policy: an item comes with explicit codes, or with text that is embedded, quantised and
given the nearest semantic ID no other item holds."""

from __future__ import annotations

import logging
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nezha.live_catalog.errors import IdTakenError, InvalidItemError
from nezha.live_catalog.store import MAX_ITEM_ID_CHARS, CatalogStore, check_unique
from nezha.model.checkpoint import prepared_dir_of
from nezha.prepared import QUANTIZER_FILE
from nezha.semantic_ids.quantizer import ResidualQuantizer, assign_new_item
from nezha.verify.codec import pack, unpack

log = logging.getLogger(__name__)


@dataclass
class NewItem:
    item_id: str
    codes: list[int] | None = None
    text: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # title, brand, categories shown with recommendations


def check_codes(codes: Sequence[int], sizes: Sequence[int]) -> int:
    """The packed ID of explicit codes, or InvalidItemError saying what is wrong."""
    if len(codes) != len(sizes) or any(not 0 <= int(c) < s for c, s in zip(codes, sizes, strict=False)):
        raise InvalidItemError(f"codes {list(codes)} do not fit codebook sizes {list(sizes)} "
                               f"({len(sizes)} codes, code l in 0..T_l-1)")
    return int(pack(np.asarray(codes, dtype=np.int64), sizes))


def add_new_items(store: CatalogStore, items: Sequence[NewItem], sizes: Sequence[int],
                  quantizer_loader: Callable[[], Any] | None, embed: Callable[[list[str]], np.ndarray],
                  attempts: int = 3) -> tuple[int, list[tuple[str, int]]]:
    """Add items with explicit codes or with text (embedded, then given the nearest free ID).

    `store` is a CatalogStore (only its add(pairs, meta) -> version and id_in_use(packed) are used: one
    check per candidate ID the search visits, never the whole set of IDs).
    The store checks ID uniqueness atomically; when a concurrent writer took an ID chosen for a text item,
    that ID is excluded and the assignment retried. Returns (version, [(item id, packed ID)]).
    """
    for item in items:
        if not isinstance(item.item_id, str) or not item.item_id.strip() or len(item.item_id) > MAX_ITEM_ID_CHARS:
            raise InvalidItemError(f"item id {item.item_id!r} must be a non-blank string of at most "
                                   f"{MAX_ITEM_ID_CHARS} characters")
        if (item.codes is None) == (item.text is None):
            raise InvalidItemError(f"item {item.item_id!r}: give exactly one of `codes` or `text`")
    check_unique([i.item_id for i in items], "item id")
    explicit = {i.item_id: check_codes(i.codes, sizes) for i in items if i.codes is not None}
    textual = [i for i in items if i.text is not None]
    embeddings: np.ndarray | None = None
    quantizer = None
    if textual:
        if quantizer_loader is None:
            raise InvalidItemError("adding items by text needs the quantizer of the prepared dataset "
                                   "(quantizer.safetensors); give explicit `codes` instead")
        quantizer = quantizer_loader()
        if tuple(quantizer.codebook_sizes) != tuple(sizes):
            raise InvalidItemError(f"the quantizer has codebook sizes {list(quantizer.codebook_sizes)}, the "
                                   f"catalog {list(sizes)}")
        embeddings = embed([i.text for i in textual])
    text_ids = {i.item_id for i in textual}
    excluded: set[int] = set()
    for attempt in range(attempts):
        used = _UsedIds(store, excluded | set(explicit.values()))
        assigned = dict(explicit)
        for row, item in enumerate(textual):
            packed = int(pack(assign_new_item(embeddings[row], quantizer, used), sizes))
            assigned[item.item_id] = packed
            used.taken.add(packed)  # two new items in one request never share an ID
        pairs = [(i.item_id, assigned[i.item_id]) for i in items]
        try:
            return store.add(pairs, {i.item_id: i.meta for i in items}), pairs
        except IdTakenError as exc:
            if exc.item_id not in text_ids or attempt == attempts - 1:
                raise
            log.info("semantic ID %d was taken concurrently; reassigning (attempt %d)", exc.packed, attempt + 2)
            excluded.add(exc.packed)
    raise AssertionError("unreachable")


class _UsedIds(Container[int]):
    """The IDs a new item may not take: `taken` here, or held in the store (asked per ID)."""

    def __init__(self, store: CatalogStore, taken: set[int]) -> None:
        self.store, self.taken = store, taken

    def __contains__(self, packed: object) -> bool:
        return packed in self.taken or self.store.id_in_use(int(packed))  # type: ignore[call-overload]


def load_quantizer_for(checkpoint: str | Path | None,
                       quantizer: str | Path | None) -> Callable[[], ResidualQuantizer] | None:
    """A loader for the quantizer: an explicit file, else the checkpoint's prepared dataset's; None if neither."""
    path: Path | None = Path(quantizer) if quantizer else None
    if path is None and checkpoint is not None:
        prepared = prepared_dir_of(checkpoint)
        path = prepared / QUANTIZER_FILE if prepared else None
    if path is None or not path.is_file():
        return None

    def load() -> ResidualQuantizer:
        return ResidualQuantizer.load(path)

    return load


def codes_of(packed: int, sizes: Sequence[int]) -> list[int]:
    return unpack(np.asarray([packed], dtype=np.int64), sizes)[0].tolist()
