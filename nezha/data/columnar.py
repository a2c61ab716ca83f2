"""Interactions as integer columns: ids -> codes while reading, k-core filtering, grouping into per-user
sequences, all with array operations (no Python object per interaction).

Memory, per interaction: 16 bytes of columns (user and item code int32, order int64) while reading and
filtering, plus 8 (a sort key) and 8 (the int64 sequence values) while grouping; strings exist only for
the block being read and for the distinct users.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from nezha.data.readers import Block
from nezha.data.split import Ragged

log = logging.getLogger(__name__)

GROUP_ROWS = 1 << 22  # rows looked up per call: one hash table of the catalog per call, not per block
_STEP = 1 << 23  # rows per slice of the element-wise passes (bounds their temporary arrays)


@dataclass
class Interactions:
    user: np.ndarray  # int32 code into user_ids
    item: np.ndarray  # int32 index into the catalog
    order: np.ndarray  # int64 position or timestamp
    user_ids: pa.Array  # string; codes follow the order of first appearance in the files
    stats: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.user)


class Collector:
    """Blocks in, integer columns out: item ids become catalog indices (interactions with an item outside
    the catalog are dropped and counted), user ids become codes in order of first appearance."""

    def __init__(self, catalog_ids: pa.Array) -> None:
        self.catalog_ids = catalog_ids
        self.pending: list[Block] = []
        self.pending_rows = 0
        self.users: list[np.ndarray] = []  # per group: codes into that group's dictionary
        self.dictionaries: list[pa.Array] = []
        self.items: list[np.ndarray] = []
        self.orders: list[np.ndarray] = []
        self.unknown = 0
        self.unknown_ids: list[pa.Array] = []

    def add(self, block: Block) -> None:
        self.pending.append(block)
        self.pending_rows += len(block.order)
        if self.pending_rows >= GROUP_ROWS:
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        items = pa.chunked_array([b.item for b in self.pending], pa.string())
        index = pc.index_in(items, value_set=self.catalog_ids)
        known = index.is_valid()
        unknown = index.null_count
        if unknown:
            self.unknown += unknown
            self.unknown_ids.append(pc.unique(items.filter(pc.invert(known))))
        users = pa.chunked_array([b.user for b in self.pending], pa.string())
        order = np.concatenate([b.order for b in self.pending])
        if unknown:
            users, index = users.filter(known), index.filter(known)
            order = order[known.to_numpy()]
        encoded = pc.dictionary_encode(users.combine_chunks())
        self.users.append(encoded.indices.to_numpy())
        self.dictionaries.append(encoded.dictionary)
        self.items.append(index.combine_chunks().to_numpy().astype(np.int32, copy=False))
        self.orders.append(order)
        self.pending, self.pending_rows = [], 0

    def finish(self) -> Interactions:
        """The columns, each concatenated into one array while the per-group pieces are freed."""
        self._flush()
        groups = pa.chunked_array(self.dictionaries, pa.string()).combine_chunks()
        encoded = pc.dictionary_encode(groups)  # one code per distinct user, first appearance first
        global_codes = encoded.indices.to_numpy()
        sizes = [len(d) for d in self.dictionaries]
        self.dictionaries.clear()
        total = sum(len(u) for u in self.users)
        user = np.empty(total, dtype=np.int32)
        at, base = 0, 0
        for size in sizes:
            local = self.users.pop(0)
            user[at : at + len(local)] = global_codes[base : base + size][local]
            at, base = at + len(local), base + size
        unknown_distinct = len(pc.unique(pa.chunked_array(self.unknown_ids, pa.string()))) if self.unknown_ids else 0
        pa.default_memory_pool().release_unused()  # the blocks' string buffers: back to the system, not kept
        return Interactions(user, _concat(self.items, np.int32), _concat(self.orders, np.int64), encoded.dictionary,
                            {"unknown_item_interactions": self.unknown, "unknown_item_ids": unknown_distinct})


def _concat(pieces: list[np.ndarray], dtype: type) -> np.ndarray:
    """np.concatenate that frees each piece once copied (peak: the result plus one piece)."""
    out = np.empty(sum(len(p) for p in pieces), dtype=dtype)
    at = 0
    while pieces:
        piece = pieces.pop(0)
        out[at : at + len(piece)] = piece
        at += len(piece)
    return out


def k_core_filter(inter: Interactions, k: int, num_items: int) -> Interactions:
    """Keep interactions whose user and item both have >= k of them, repeated until nothing changes.
    `inter` is filtered in place (and returned)."""
    if k <= 1 or not len(inter):
        return inter
    alive = np.ones(len(inter), dtype=bool)
    rounds = 0
    while True:
        rounds += 1
        user_ok = np.bincount(inter.user[alive], minlength=len(inter.user_ids)) >= k
        item_ok = np.bincount(inter.item[alive], minlength=num_items) >= k
        changed = False
        for s in range(0, len(alive), _STEP):
            part = alive[s : s + _STEP]
            keep = part & user_ok[inter.user[s : s + _STEP]] & item_ok[inter.item[s : s + _STEP]]
            changed |= bool((keep != part).any())
            alive[s : s + _STEP] = keep
        if not changed:
            break
    removed = int(len(alive) - alive.sum())
    log.info("%d-core: %d round(s), %d of %d interactions removed", k, rounds, removed, len(alive))
    inter.stats.update(k_core=k, k_core_rounds=rounds, k_core_removed_interactions=removed)
    if removed:  # in place, one column at a time: each old column is freed before the next copy
        inter.user = inter.user[alive]
        inter.item = inter.item[alive]
        inter.order = inter.order[alive]
    return inter


def _stable_user_order(user: np.ndarray, rank: np.ndarray | None) -> np.ndarray:
    """Row indices sorted by (user, rank), rank = file position when None: one sort of unique int64 keys."""
    n = len(user)
    key = user.astype(np.int64)
    key *= n
    for s in range(0, n, _STEP):
        key[s : s + _STEP] += rank[s : s + _STEP] if rank is not None else np.arange(s, min(n, s + _STEP))
    key.sort()
    np.remainder(key, n, out=key)
    return key


def group_by_user(inter: Interactions) -> tuple[Ragged, list[str]]:
    """Per-user sequences of item indices (int64) ordered by the order column, ties in file order; users in
    order of first appearance, users without interactions left out."""
    n = len(inter)
    counts = np.bincount(inter.user, minlength=len(inter.user_ids))
    offsets = np.concatenate([[0], np.cumsum(counts[counts > 0])]).astype(np.int64)
    perm = _stable_user_order(inter.user, None)
    # Files usually list each user's rows in order (a time-ordered log, positions in sequence); then the
    # file order within a user is the order and one sort suffices. Otherwise sort again with the rank.
    first = np.zeros(n, dtype=bool)
    first[offsets[:-1]] = True
    in_order = True
    for s in range(1, n, _STEP):
        o = inter.order[perm[s - 1 : s + _STEP]]
        if np.any((o[1:] < o[:-1]) & ~first[s : s + _STEP]):
            in_order = False
            break
    del first
    if not in_order:
        by_order = np.argsort(inter.order, kind="stable")
        rank = np.empty(n, dtype=np.int64)
        rank[by_order] = np.arange(n)
        perm = by_order[_stable_user_order(inter.user, rank)]
        del rank, by_order
    values = np.empty(n, dtype=np.int64)
    for s in range(0, n, _STEP):
        values[s : s + _STEP] = inter.item[perm[s : s + _STEP]]
    del perm
    user_ids = inter.user_ids.filter(pa.array(counts > 0)) if (counts == 0).any() else inter.user_ids
    return Ragged.from_offsets(values, offsets), user_ids.to_pylist()
