"""Compact item id <-> packed ID maps for catalogs of millions: numpy arrays, no Python object per item.

    StringColumn  strings as one UTF-8 buffer + int64 offsets (8 bytes an item plus the text)
    ItemTable     a catalog's (item id, packed ID) pairs: rows in a StringColumn, a sorted packed-ID index
                  and a sorted hash index of the item ids (about 40 bytes an item plus the id's text)
    ItemMap       an ItemTable plus the changes applied since it was built (three small layers of dicts):
                  what one catalog version is; a change makes a new ItemMap and leaves the old one as it was

Lookups are binary searches (item id -> hash -> candidate rows whose text is compared). A change copies
the top layer (<= RECENT_AT entries); every RECENT_AT changes it folds into the middle layer (a copy of
<= MIDDLE_AT entries), every MIDDLE_AT changes that folds into the bottom one (a copy of <= MERGE_AT
entries), and every MERGE_AT changes the bottom layer merges into a new table in O(N) numpy passes (no
sort of the catalog). A fold merges a layer's dicts into the copy below without looking anything up (the
changes were checked when made), and the middle layer keeps the frequent folds' copies small: these folds,
each replaying its changes with a lookup apiece into a copy of up to MERGE_AT entries, were a replica's
slowest applies.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

# Entries (adds + removes) of the bottom layer that trigger a merge into a new table, and of the middle and
# top layers that fold each into the one below (see ItemMap).
MERGE_AT = 32768
MIDDLE_AT = 4096
RECENT_AT = 256
# Rows gathered per step when compacting (bounds the temporary index arrays).
_GATHER_BYTES = 1 << 21
_HASH_P = 0x100000001B3  # FNV prime: odd, so the polynomial hash is a bijection per length
_MIX_1, _MIX_2 = np.uint64(0xFF51AFD7ED558CCD), np.uint64(0xC4CEB9FE1A85EC53)
_POWERS = np.ones(1, dtype=np.uint64)


def _powers(n: int) -> np.ndarray:
    """_HASH_P ** k mod 2**64 for k < n (grown on demand, kept for the next call)."""
    global _POWERS
    if _POWERS.size < n:
        values = [1]
        for _ in range(max(n, 2 * _POWERS.size) - 1):
            values.append(values[-1] * _HASH_P % (1 << 64))
        _POWERS = np.array(values, dtype=np.uint64)
    return _POWERS[:n]


def _segment_positions(starts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(source byte index, position inside its string) for every byte of the strings at starts/lengths."""
    total = int(lengths.sum())
    first = np.cumsum(lengths) - lengths
    inside = np.arange(total, dtype=np.int64) - np.repeat(first, lengths)
    return np.repeat(starts, lengths) + inside, inside


def _hash_equal_lengths(buffer: np.ndarray, start: int, rows: int, length: int) -> np.ndarray:
    """The polynomial part of hash_strings for `rows` strings of `length` bytes laid end to end from `start`
    (the common case of item ids of one length: a [rows, length] product, no per-byte index arrays)."""
    out = np.zeros(rows, dtype=np.uint64)
    powers = _powers(length)
    step = max(1, (_GATHER_BYTES << 3) // length)
    for lo in range(0, rows, step):
        hi = min(rows, lo + step)
        block = buffer[start + lo * length:start + hi * length].reshape(hi - lo, length)
        for j in range(length):  # a column at a time: numpy reduces a short last axis slowly
            out[lo:hi] += (block[:, j].astype(np.uint64) + np.uint64(1)) * powers[j]
    return out


def _mix(out: np.ndarray, lengths: np.ndarray | int) -> np.ndarray:
    out ^= np.uint64(lengths * int(_MIX_2) % (1 << 64)) if isinstance(lengths, int) \
        else lengths.astype(np.uint64) * _MIX_2
    out ^= out >> np.uint64(33)
    out *= _MIX_1
    out ^= out >> np.uint64(29)
    return out


def hash_strings(buffer: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """uint64 hash of each string buffer[starts[i]:starts[i]+lengths[i]] (a polynomial hash, then mixed)."""
    out = np.zeros(starts.size, dtype=np.uint64)
    if starts.size == 0:
        return out
    length = int(lengths[0])
    if length > 0 and (lengths == length).all() and (np.diff(starts) == length).all():  # contiguous, one length
        return _mix(_hash_equal_lengths(buffer, int(starts[0]), starts.size, length), length)
    powers = _powers(int(lengths.max()) if lengths.size else 1)
    bounds = np.searchsorted(np.cumsum(lengths), np.arange(_GATHER_BYTES, int(lengths.sum()), _GATHER_BYTES))
    for lo, hi in zip([0, *bounds.tolist()], [*bounds.tolist(), starts.size], strict=True):
        if hi <= lo:
            continue
        src, inside = _segment_positions(starts[lo:hi], lengths[lo:hi])
        weighted = (buffer[src].astype(np.uint64) + np.uint64(1)) * powers[inside]
        nonempty = lengths[lo:hi] > 0
        firsts = (np.cumsum(lengths[lo:hi]) - lengths[lo:hi])[nonempty]
        if firsts.size:
            out[lo:hi][nonempty] = np.add.reduceat(weighted, firsts)
    return _mix(out, lengths)


def _hash_one(text: bytes) -> int:
    """hash_strings of one string, in plain Python ints (a lookup's hash; numpy's per-call cost is higher)."""
    mask = (1 << 64) - 1
    h, power = 0, 1
    for byte in text:
        h = (h + (byte + 1) * power) & mask
        power = power * _HASH_P & mask
    h ^= len(text) * int(_MIX_2) & mask
    h ^= h >> 33
    h = h * int(_MIX_1) & mask
    return h ^ h >> 29


@dataclass(frozen=True)
class StringColumn:
    """Strings as one UTF-8 buffer: string r is buffer[offsets[r]:offsets[r + 1]]."""

    buffer: np.ndarray  # uint8
    offsets: np.ndarray  # int64 [rows + 1]

    @classmethod
    def of(cls, texts: Iterable[str]) -> StringColumn:
        encoded = [t.encode() for t in texts]
        return cls.from_encoded(b"".join(encoded), np.fromiter(map(len, encoded), dtype=np.int64,
                                                                count=len(encoded)))

    @classmethod
    def from_encoded(cls, joined: bytes, lengths: np.ndarray) -> StringColumn:
        offsets = np.zeros(lengths.size + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return cls(np.frombuffer(joined, dtype=np.uint8), offsets)

    def __len__(self) -> int:
        return self.offsets.size - 1

    def text(self, row: int) -> str:
        return self.raw(row).decode()

    def raw(self, row: int) -> bytes:
        return self.buffer[self.offsets[row]:self.offsets[row + 1]].tobytes()

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def hashes(self, rows: np.ndarray | None = None) -> np.ndarray:
        rows = np.arange(len(self), dtype=np.int64) if rows is None else rows
        return hash_strings(self.buffer, self.offsets[rows], self.offsets[rows + 1] - self.offsets[rows])

    def appended(self, texts: Sequence[str]) -> StringColumn:
        tail = StringColumn.of(texts)
        return StringColumn(np.concatenate([self.buffer, tail.buffer]),
                            np.concatenate([self.offsets, tail.offsets[1:] + self.offsets[-1]]))

    def gathered(self, rows: np.ndarray) -> StringColumn:
        """A new column of the strings at `rows`, in that order (a step at a time: bounded temporaries)."""
        lengths = self.offsets[rows + 1] - self.offsets[rows]
        offsets = np.zeros(rows.size + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        buffer = np.empty(int(offsets[-1]), dtype=np.uint8)
        bounds = np.searchsorted(offsets[1:], np.arange(_GATHER_BYTES, int(offsets[-1]), _GATHER_BYTES))
        for lo, hi in zip([0, *bounds.tolist()], [*bounds.tolist(), rows.size], strict=True):
            if hi > lo:
                src, _ = _segment_positions(self.offsets[rows[lo:hi]], lengths[lo:hi])
                buffer[offsets[lo]:offsets[hi]] = self.buffer[src]
        return StringColumn(buffer, offsets)

    @property
    def nbytes(self) -> int:
        return int(self.buffer.nbytes + self.offsets.nbytes)


def _row_dtype(rows: int) -> type:
    return np.int32 if rows < 2**31 else np.int64


@dataclass(frozen=True)
class ItemTable:
    """(item id, packed ID) pairs in compact arrays. Immutable: `merged` makes the next table.

    Rows are append-only (a removed row stays in `ids` until `compacted`); the two indexes hold live rows only.
    """

    ids: StringColumn  # item id of each row
    row_packed: np.ndarray  # int64 [rows]
    by_packed: np.ndarray  # int64 [N] sorted packed IDs of the live rows
    by_packed_row: np.ndarray  # [N] their rows
    by_hash: np.ndarray  # uint64 [N] sorted hashes of the live rows' item ids
    by_hash_row: np.ndarray  # [N] their rows

    @classmethod
    def build(cls, ids: StringColumn, packed: np.ndarray) -> ItemTable:
        """The table of rows (ids[r], packed[r]); of rows sharing a packed ID only the first is live."""
        packed = np.asarray(packed, dtype=np.int64)
        dtype = _row_dtype(packed.size)
        if packed.size and bool((packed[1:] > packed[:-1]).all()):  # already sorted and unique (a snapshot blob)
            unique, first = packed, np.arange(packed.size, dtype=np.int64)
            hashes = ids.hashes() if len(ids) == packed.size else ids.hashes(first)
        else:
            unique, first = np.unique(packed, return_index=True)
            hashes = ids.hashes(first.astype(np.int64))
        order = np.argsort(hashes)  # rows of equal hashes are all compared on lookup: any order does
        return cls(ids, packed, unique, first.astype(dtype), hashes[order], first[order].astype(dtype))

    @classmethod
    def of(cls, pairs: Iterable[tuple[str, int]]) -> ItemTable:
        pairs = list(pairs)
        return cls.build(StringColumn.of(item for item, _ in pairs),
                         np.fromiter((p for _, p in pairs), dtype=np.int64, count=len(pairs)))

    @classmethod
    def empty(cls) -> ItemTable:
        return cls.of([])

    def __len__(self) -> int:
        return int(self.by_packed.size)

    def row_of_packed(self, packed: int) -> int:
        """The live row holding `packed`, or -1."""
        at = int(np.searchsorted(self.by_packed, packed))
        return int(self.by_packed_row[at]) if at < self.by_packed.size and self.by_packed[at] == packed else -1

    def item_of(self, packed: int) -> str | None:
        row = self.row_of_packed(packed)
        return None if row < 0 else self.ids.text(row)

    def has_packed(self, packed: int) -> bool:
        return self.row_of_packed(packed) >= 0

    def has_packed_many(self, packed: np.ndarray) -> np.ndarray:
        """has_packed of each value, in one search."""
        if self.by_packed.size == 0:
            return np.zeros(packed.shape, dtype=bool)
        at = np.minimum(np.searchsorted(self.by_packed, packed), self.by_packed.size - 1)
        return self.by_packed[at] == packed

    def packed_of(self, item_id: str) -> int | None:
        raw = item_id.encode()
        h = np.uint64(_hash_one(raw))
        lo, hi = np.searchsorted(self.by_hash, h, "left"), np.searchsorted(self.by_hash, h, "right")
        for row in self.by_hash_row[lo:hi].tolist():
            if self.ids.raw(row) == raw:
                return int(self.row_packed[row])
        return None

    def packed_ids(self) -> np.ndarray:
        """The sorted packed IDs of all items (read-only; no copy)."""
        view = self.by_packed.view()
        view.flags.writeable = False
        return view

    def pairs(self) -> Iterator[tuple[str, int]]:
        for row, packed in zip(self.by_packed_row.tolist(), self.by_packed.tolist(), strict=True):
            yield self.ids.text(row), packed

    def merged(self, removed: np.ndarray, added: Sequence[tuple[str, int]]) -> ItemTable:
        """The table without the items holding packed IDs `removed` and with `added` (disjoint from what stays).

        O(N) array passes; the strings are only appended (compacted when dead rows outnumber live ones).
        """
        removed = np.unique(np.asarray(removed, dtype=np.int64))
        at = np.searchsorted(self.by_packed, removed)
        at = at[(at < self.by_packed.size) & (self.by_packed[np.minimum(at, max(self.by_packed.size - 1, 0))]
                                              == removed)] if self.by_packed.size else at[:0]
        gone_rows = self.by_packed_row[at].astype(np.int64)
        by_packed, by_packed_row = np.delete(self.by_packed, at), np.delete(self.by_packed_row, at)
        by_hash, by_hash_row = self.by_hash, self.by_hash_row
        if gone_rows.size:
            gone_hashes = self.ids.hashes(gone_rows)
            lo = np.searchsorted(by_hash, gone_hashes, "left")
            hi = np.searchsorted(by_hash, gone_hashes, "right")
            # 64-bit hashes almost never collide: the row is the one at `lo`; a Python search only where not
            drop = lo.copy()
            for i in np.flatnonzero(by_hash_row[np.minimum(lo, max(by_hash_row.size - 1, 0))] != gone_rows).tolist():
                drop[i] = int(lo[i]) + int(np.flatnonzero(by_hash_row[lo[i]:hi[i]] == gone_rows[i])[0])
            by_hash, by_hash_row = np.delete(by_hash, drop), np.delete(by_hash_row, drop)
        ids, row_packed = self.ids, self.row_packed
        if added:
            first_row = len(ids)
            ids = ids.appended([item for item, _ in added])
            new_packed = np.fromiter((p for _, p in added), dtype=np.int64, count=len(added))
            row_packed = np.concatenate([row_packed, new_packed])
            dtype = _row_dtype(row_packed.size)
            new_rows = np.arange(first_row, first_row + len(added), dtype=np.int64)
            order = np.argsort(new_packed, kind="stable")
            positions = np.searchsorted(by_packed, new_packed[order])
            by_packed = np.insert(by_packed, positions, new_packed[order])
            by_packed_row = np.insert(by_packed_row.astype(dtype), positions, new_rows[order].astype(dtype))
            new_hashes = ids.hashes(new_rows)
            order = np.argsort(new_hashes, kind="stable")
            positions = np.searchsorted(by_hash, new_hashes[order])
            by_hash = np.insert(by_hash, positions, new_hashes[order])
            by_hash_row = np.insert(by_hash_row.astype(dtype), positions, new_rows[order].astype(dtype))
        table = ItemTable(ids, row_packed, by_packed, by_packed_row, by_hash, by_hash_row)
        return table.compacted() if len(ids) > 2 * max(len(table), 1024) else table

    def sorted_rows(self) -> tuple[np.ndarray, StringColumn]:
        """(the sorted packed IDs, the item id of each in that order): the live rows, nothing else."""
        rows = self.by_packed_row.astype(np.int64)
        if rows.size == len(self.ids) and bool((rows == np.arange(rows.size)).all()):
            return self.by_packed, self.ids
        return self.by_packed, self.ids.gathered(rows)

    def compacted(self) -> ItemTable:
        """The same items with the removed rows' strings dropped (rows renumbered in packed-ID order)."""
        return ItemTable.build(self.ids.gathered(self.by_packed_row.astype(np.int64)), self.by_packed)

    @property
    def nbytes(self) -> int:
        return int(self.ids.nbytes + self.row_packed.nbytes + self.by_packed.nbytes + self.by_packed_row.nbytes
                   + self.by_hash.nbytes + self.by_hash_row.nbytes)


@dataclass(frozen=True)
class ItemMap:
    """One catalog version's item id <-> packed ID maps: a base (a table, or another ItemMap) plus the changes
    made since it (a layer of small dicts, copied by every change).

    `ItemMap.of(table)` stacks three layers on the table: a change copies the top one (at most RECENT_AT
    entries), a full top layer is folded into the middle one (at most MIDDLE_AT entries, copied once per
    RECENT_AT changes), a full middle layer into the bottom one (at most MERGE_AT entries, copied once per
    MIDDLE_AT changes), and a full bottom layer is merged into a new table (O(N), once per MERGE_AT changes).
    With `merge=False` the bottom layer keeps growing instead, `merge_due` says so, and the owner merges
    (`as_table`) where it does not hold up a change: LocalCatalog does it in a thread of its own.
    """

    base: ItemTable | ItemMap
    fold_at: int = MERGE_AT  # entries in this layer that fold it into the base
    added_items: dict[str, int] = field(default_factory=dict)  # item id -> packed, added in this layer
    added_ids: dict[int, str] = field(default_factory=dict)  # packed -> item id, added in this layer
    removed: frozenset[int] = frozenset()  # packed IDs the base holds that were removed in this layer

    @classmethod
    def of(cls, table: ItemTable) -> ItemMap:
        return cls(cls(cls(table, MERGE_AT), MIDDLE_AT), RECENT_AT)

    @property
    def table(self) -> ItemTable:
        return self.base if isinstance(self.base, ItemTable) else self.base.table

    def packed_of(self, item_id: str) -> int | None:
        packed = self.added_items.get(item_id)
        if packed is not None:
            return packed
        packed = self.base.packed_of(item_id)
        return None if packed is None or packed in self.removed else packed

    def item_of(self, packed: int) -> str | None:
        item = self.added_ids.get(packed)
        if item is not None or packed in self.removed:
            return item
        return self.base.item_of(packed)

    def has_packed(self, packed: int) -> bool:
        return packed in self.added_ids or (packed not in self.removed and self.base.has_packed(packed))

    def has_packed_many(self, packed: np.ndarray) -> np.ndarray:
        """has_packed of each value (one search of the table, then this layer's dicts)."""
        held = self.base.has_packed_many(packed)
        for i, p in enumerate(packed.tolist()):
            if p in self.added_ids:
                held[i] = True
            elif p in self.removed:
                held[i] = False
        return held

    def __len__(self) -> int:
        return len(self.base) - len(self.removed) + len(self.added_ids)

    def packed_ids(self) -> np.ndarray:
        """Sorted packed IDs of every item (the table's array when nothing changed since it was built)."""
        base = self.base.packed_ids()
        if not self.added_ids and not self.removed:
            return base
        if self.removed:
            base = base[~np.isin(base, np.fromiter(self.removed, dtype=np.int64, count=len(self.removed)))]
        return np.union1d(base, np.fromiter(self.added_ids, dtype=np.int64, count=len(self.added_ids)))

    @property
    def merge_due(self) -> bool:
        """The layer on the table holds more than MERGE_AT changes (only after changes with merge=False)."""
        layer = self
        while isinstance(layer.base, ItemMap):
            layer = layer.base
        return len(layer.added_ids) + len(layer.removed) > layer.fold_at

    def changed(self, changes: Iterable[tuple[str, str, int]],
                merge: bool = True) -> tuple[ItemMap, np.ndarray, np.ndarray]:
        """The map after `changes` ((add|remove, item id, packed ID), in order), and the packed IDs that became
        valid and invalid. A removal only drops a pair that is there; an add sets both directions.
        merge=False: a full bottom layer is not merged into a new table here (see `merge_due`)."""
        changes = list(changes)
        added_items, added_ids, removed = dict(self.added_items), dict(self.added_ids), set(self.removed)
        touched = np.fromiter(dict.fromkeys(p for _, _, p in changes), dtype=np.int64)
        before = self.has_packed_many(touched)
        for op, item_id, packed in changes:
            if op == "add":
                added_items[item_id] = packed
                added_ids[packed] = item_id
                continue
            if added_items.get(item_id) == packed:
                del added_items[item_id]
            if added_ids.get(packed) == item_id:
                del added_ids[packed]
            elif packed not in removed and self.base.item_of(packed) == item_id:
                removed.add(packed)
        after = ItemMap(self.base, self.fold_at, added_items, added_ids, frozenset(removed))
        now = after.has_packed_many(touched)
        if len(added_ids) + len(removed) > self.fold_at:
            after = after.folded(merge)
        return after, touched[now & ~before], touched[before & ~now]

    def as_table(self) -> ItemTable:
        """This version as one table (O(N) when changes are layered on it: what a published snapshot holds)."""
        base = self.base if isinstance(self.base, ItemTable) else self.base.as_table()
        if not self.added_ids and not self.removed:
            return base
        gone = set(self.removed) | {p for p in self.added_ids if base.has_packed(p)}
        return base.merged(np.fromiter(gone, dtype=np.int64, count=len(gone)),
                           [(item, p) for p, item in self.added_ids.items()])

    def absorbed(self, layer: ItemMap, merge: bool = True) -> ItemMap:
        """This map with `layer`, a layer stacked on it, folded in: dict operations only, no lookups, since
        `changed` checked each of the layer's changes against this map when it made them (its removals are
        IDs held below it, its adds the pairs it holds)."""
        added_items, added_ids, removed = dict(self.added_items), dict(self.added_ids), set(self.removed)
        for packed in layer.removed:
            item = added_ids.pop(packed, None)
            if item is None:
                removed.add(packed)  # held below this layer
            elif added_items.get(item) == packed:
                del added_items[item]
        for packed, item in layer.added_ids.items():
            added_ids[packed] = item
            added_items[item] = packed
        after = ItemMap(self.base, self.fold_at, added_items, added_ids, frozenset(removed))
        return after.folded(merge) if len(added_ids) + len(removed) > self.fold_at else after

    def folded(self, merge: bool = True) -> ItemMap:
        """The same catalog with this layer folded into its base (merged into a new table at the bottom, unless
        not `merge`: the bottom layer then stays as it is)."""
        if isinstance(self.base, ItemMap):
            return ItemMap(self.base.absorbed(self, merge), self.fold_at)
        if not merge:
            return self
        gone = set(self.removed) | {p for p in self.added_ids if self.base.has_packed(p)}
        removed = np.fromiter(gone, dtype=np.int64, count=len(gone))
        return ItemMap(self.base.merged(removed, [(item, p) for p, item in self.added_ids.items()]), self.fold_at)
