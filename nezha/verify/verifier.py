"""Model-free verification: is there a valid item with this ID, or with this ID prefix?

For each prefix length l (1..L) the verifier keeps the set of valid prefix values (V mod prod_{j<l} T_j)
on the decoding device, as a dense boolean table when the prefix space is small (a gather: the cheapest
check there is) and as a sorted tensor + searchsorted otherwise. Both answer a whole [B, K, T] batch of
candidates in one kernel with no host sync, so a decoder can mask invalid branches at every beam step.

Catalog changes are incremental, so one change costs time in proportion to the change, not the catalog:
  - the full IDs are a sorted int64 numpy array (8 bytes an item) plus two small sorted layers, the IDs
    added and removed since that array was built (never mutated: a change makes new layers). The layers
    are merged into a new array once they hold _LAYER_AT IDs, so the O(items) copy (80 MB at 10M items)
    runs once per that many changes instead of on every change; no Python object per ID;
  - each shorter prefix length keeps how many valid items extend each prefix (a count array over a dense
    prefix space; sorted unique prefixes + counts for a sparse one), so a removal knows when a prefix dies;
  - only the prefixes that appear or die are written to the device: a scatter into the dense tables, a
    splice of the sorted ones (new tensors: the old ones stay as they were); where the full IDs have no
    dense table (more than `dense_limit` of them, e.g. 4 x 256) the device holds the same three layers.

A decode reads the tables at every level, so a change landing mid-search would mix two catalogs in one call:
decode with `snapshot()`, a read-only verifier pinned to the tables of one moment. The dense tables are
written in place only while no snapshot reads them. Otherwise a change writes into a second set of tables
(double buffering: the previous version's, once its snapshots are gone, brought up to date by replaying the
last change), and copies the current set only when both are still read (O(prefix space): 2 x 16 MiB at
2**24). A live verifier's `tables` (and `version`) change on every change; the tensors behind an old
`tables` object may be reused once no snapshot holds them.
"""

from __future__ import annotations

import copy
import dataclasses
import threading
import weakref
from collections.abc import Iterable, Iterator, Sequence, Set
from dataclasses import dataclass

import numpy as np
import torch

from nezha.verify.codec import radix_weights

# Prefix spaces up to this many values get a dense table (16 MiB of bools at 2**24).
DEFAULT_DENSE_LIMIT = 1 << 24
# Edits of a sorted array up to this many are spliced from slices (one copy, a Python step per edit);
# larger batches go through numpy's masked insert/delete.
_SLICED_EDITS = 2048
# A change writing more dense-table entries than this (a build, a resync) is not kept for the spare set to
# replay: copying the tables when they are next needed costs less than replaying millions of writes, and
# the change's index arrays (17 bytes an entry) are not held until the next change.
_REPLAY_AT_MOST = 1 << 20
# The full-ID layers (added / removed since the base array) are merged into a new base past this many IDs:
# a change copies at most this many 8-byte IDs (512 KiB), the O(items) merge runs once per this many changes.
_LAYER_AT = 1 << 16


class SortedIds(Set):
    """A read-only set of packed IDs over a sorted int64 array (what `PrefixVerifier.ids` returns).

    Membership is a binary search; `array` is the sorted array itself (read-only), for vectorised use.
    """

    def __init__(self, array: np.ndarray) -> None:
        self.array = array.view()
        self.array.flags.writeable = False

    @classmethod
    def _from_iterable(cls, values: Iterable[int]) -> frozenset[int]:
        return frozenset(values)  # set algebra (|, &, -) on a view gives a plain frozenset

    def __contains__(self, value: object) -> bool:
        try:
            return _has_id(self.array, int(value))  # type: ignore[call-overload]
        except (TypeError, ValueError):
            return False

    def __iter__(self) -> Iterator[int]:
        for start in range(0, self.array.size, 1 << 16):  # Python ints a block at a time
            yield from self.array[start:start + (1 << 16)].tolist()

    def __len__(self) -> int:
        return int(self.array.size)

    def __repr__(self) -> str:
        return f"SortedIds({self.array.size} IDs)"


@dataclass(frozen=True, eq=False)
class _FullIds:
    """The valid full IDs of one version: `base` without `removed`, plus `added`. All three are sorted, unique
    and never mutated; `removed` is a subset of `base`, `added` disjoint from it."""

    base: np.ndarray
    added: np.ndarray
    removed: np.ndarray

    @property
    def size(self) -> int:
        return int(self.base.size - self.removed.size + self.added.size)

    @property
    def nbytes(self) -> int:
        return int(self.base.nbytes + self.added.nbytes + self.removed.nbytes)

    def contains(self, values: np.ndarray) -> np.ndarray:
        found = _isin_sorted(self.base, values)
        if self.removed.size:
            found &= ~_isin_sorted(self.removed, values)
        if self.added.size:
            found |= _isin_sorted(self.added, values)
        return found

    def array(self) -> np.ndarray:
        """The IDs as one sorted array: the base itself when no layer is set, else a merge (O(items))."""
        if not self.added.size and not self.removed.size:
            return self.base
        if not self.base.size:
            return self.added
        return _Splice(self.base, self.added, self.removed).apply(self.base, self.added)

    def edited(self, born: np.ndarray, died: np.ndarray) -> _FullIds:
        """These IDs with `born` (sorted, none valid now) added and `died` (sorted, all valid now) removed:
        new layers, merged into a new base once they hold more than _LAYER_AT IDs."""
        back = _isin_sorted(self.removed, born)  # removed from the base earlier, valid again
        undone = _isin_sorted(self.added, died)  # added since the base, gone again
        removed = _Splice(self.removed, died[~undone], born[back]).apply(self.removed, died[~undone])
        added = _Splice(self.added, born[~back], died[undone]).apply(self.added, born[~back])
        edited = _FullIds(self.base, added, removed)
        if added.size + removed.size <= _LAYER_AT:
            return edited
        empty = np.empty(0, dtype=np.int64)
        return _FullIds(edited.array(), empty, empty)


@dataclass(frozen=True, eq=False)  # eq=False: compared and hashed by identity (holders and weak sets do)
class _Tables:
    version: int
    ids: _FullIds  # the valid full IDs (host)
    dense: tuple[torch.Tensor | None, ...]  # per length 1..L: bool[prod T_<l] or None
    # per length 1..L-1 without a dense table: sorted unique int64 (None elsewhere, and at length L)
    sorted_values: tuple[torch.Tensor | None, ...]
    # per length 0..L-1: bool[prod T_<l, T_l], row p = which codes extend prefix p (None where the
    # longer prefix has no dense table). The beam step's mask is then one row gather, not K*T lookups.
    children: tuple[torch.Tensor | None, ...]
    # the full IDs on the device when length L has no dense table: (base, added, removed) like `ids`
    full_layers: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None


def _as_int64(values: Iterable[int] | np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.cpu().numpy()
    if isinstance(values, np.ndarray):
        return values.astype(np.int64, copy=False).reshape(-1)
    return np.asarray(list(values), dtype=np.int64)


def _has_id(sorted_ids: np.ndarray, value: int) -> bool:
    if not 0 <= value < 2**63 or sorted_ids.size == 0:
        return False
    at = int(np.searchsorted(sorted_ids, value))
    return at < sorted_ids.size and int(sorted_ids[at]) == value


def _in_sorted(sorted_values: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Bool tensor like `values`: is each in the sorted tensor (one searchsorted, no host sync)."""
    if sorted_values.numel() == 0:
        return torch.zeros_like(values, dtype=torch.bool)
    at = torch.searchsorted(sorted_values, values.contiguous()).clamp(max=sorted_values.numel() - 1)
    return sorted_values[at] == values


def _first_of_runs(sorted_values: np.ndarray) -> np.ndarray:
    """Indices where a new value starts in a sorted array."""
    first = np.ones(sorted_values.size, dtype=bool)
    first[1:] = sorted_values[1:] != sorted_values[:-1]
    return np.flatnonzero(first)


def _distinct(values: np.ndarray) -> np.ndarray:
    """Sorted distinct values (numpy's unique is hash-based since 2.3: ~50x slower on 1M int64); `values`
    itself when it already is (a snapshot's IDs: no copy of millions at a replica's start)."""
    if values.size < 2 or bool((values[1:] > values[:-1]).all()):
        return values
    values = np.sort(values)
    return values[_first_of_runs(values)]


def _union(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Union of two sorted unique arrays (no re-sort when one is empty: a build adds millions at once)."""
    return a if b.size == 0 else b if a.size == 0 else _distinct(np.concatenate([a, b]))


def _found(sorted_values: np.ndarray, values: np.ndarray, at: np.ndarray) -> np.ndarray:
    """Bool per value: is it in `sorted_values` (where `at` = searchsorted(sorted_values, values))."""
    if sorted_values.size == 0:
        return np.zeros(values.shape, dtype=bool)
    return (at < sorted_values.size) & (sorted_values[np.minimum(at, sorted_values.size - 1)] == values)


def _isin_sorted(sorted_values: np.ndarray, values: np.ndarray) -> np.ndarray:
    return _found(sorted_values, values, np.searchsorted(sorted_values, values))


def _tally(values: np.ndarray, space: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(distinct values sorted, how often each occurs) of values in 0..space-1."""
    if space is not None and values.size * 16 > space:  # a big batch over a small space: counting beats sorting
        counts = np.bincount(values, minlength=space)
        distinct = np.flatnonzero(counts)
        return distinct, counts[distinct]
    values = np.sort(values)
    starts = _first_of_runs(values)
    return values[starts], np.diff(np.append(starts, values.size))


def _count_dtype(most: int) -> np.dtype:
    """The narrowest unsigned dtype that holds counts up to `most` (host memory per prefix)."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if most <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.uint64)


class _Splice:
    """An edit of a sorted unique array: `died` (a subset) leave, `born` (disjoint from it) enter, in order.

    `apply` makes the edited copy of that array, or of an array parallel to it, in one pass.
    """

    def __init__(self, keys: np.ndarray, born: np.ndarray, died: np.ndarray) -> None:
        self.born_at = np.searchsorted(keys, born)  # insertion points: before keys[i]
        self.died_at = np.searchsorted(keys, died)
        self.edits = born.size + died.size

    @property
    def sliced(self) -> bool:
        return self.edits <= _SLICED_EDITS

    def apply(self, array: np.ndarray | torch.Tensor, inserted: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """Numpy arrays always; tensors (any device, same type for both arguments) when `sliced`."""
        if self.edits == 0:
            return array
        if not self.sliced:
            assert isinstance(array, np.ndarray), "large edits of tensors: upload the edited host array"
            kept = np.delete(array, self.died_at)
            shifted = self.born_at - np.searchsorted(self.died_at, self.born_at)  # died ones before each
            return np.insert(kept, shifted, inserted)
        # Sort edits by position; at equal positions an insertion (before element p) precedes the removal
        # of element p, and insertions keep their sorted order.
        order = np.argsort(np.concatenate([self.born_at * 2, self.died_at * 2 + 1]), kind="stable").tolist()
        born_at, died_at, nb = self.born_at.tolist(), self.died_at.tolist(), len(self.born_at)
        pieces, start = [], 0
        for edit in order:
            if edit < nb:
                pieces += [array[start:born_at[edit]], inserted[edit:edit + 1]]
                start = born_at[edit]
            else:
                pieces.append(array[start:died_at[edit - nb]])
                start = died_at[edit - nb] + 1
        pieces.append(array[start:])
        return torch.cat(pieces) if isinstance(array, torch.Tensor) else np.concatenate(pieces)


class _DenseCounts:
    """Items per prefix of one length whose prefix space has a dense table: a count array over the space."""

    def __init__(self, space: int, most: int) -> None:
        self.space = space
        self.counts = np.zeros(space, dtype=_count_dtype(most))

    def apply(self, added: np.ndarray, removed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Count the prefixes of added and removed items; return the prefixes that (appeared, died)."""
        grown, grown_by = _tally(added, self.space)
        shrunk, shrunk_by = _tally(removed, self.space)
        touched = _union(grown, shrunk)
        before = self.counts[touched] > 0
        self.counts[grown] += grown_by.astype(self.counts.dtype)
        self.counts[shrunk] -= shrunk_by.astype(self.counts.dtype)
        after = self.counts[touched] > 0
        return touched[after & ~before], touched[before & ~after]

    @property
    def nbytes(self) -> int:
        return self.counts.nbytes


class _SparseCounts:
    """Items per prefix of one length without a dense table: sorted unique prefixes + their counts.

    `values` is replaced, never mutated (the device table on a CPU verifier is this very array).
    """

    def __init__(self, most: int) -> None:
        self.values = np.empty(0, dtype=np.int64)
        self.counts = np.empty(0, dtype=_count_dtype(most))

    def apply(self, added: np.ndarray, removed: np.ndarray) -> tuple[np.ndarray, np.ndarray, _Splice]:
        """Count the prefixes of added and removed items; (appeared, died, the splice of `values`)."""
        grown, grown_by = _tally(added)
        shrunk, shrunk_by = _tally(removed)
        touched = _union(grown, shrunk)
        at = np.searchsorted(self.values, touched)
        present = _found(self.values, touched, at)
        before = np.zeros(touched.size, dtype=np.int64)
        before[present] = self.counts[at[present]]
        after = before.copy()
        after[np.searchsorted(touched, grown)] += grown_by
        after[np.searchsorted(touched, shrunk)] -= shrunk_by
        self.counts[at[present]] = after[present]  # counts are never shared: update in place
        appeared = (before == 0) & (after > 0)
        born, died = touched[appeared], touched[(before > 0) & (after == 0)]
        splice = _Splice(self.values, born, died)
        self.values = splice.apply(self.values, born)
        self.counts = splice.apply(self.counts, after[appeared].astype(self.counts.dtype))
        return born, died, splice

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + self.counts.nbytes


# Per dense length: (indices into the length's table, indices into its parent's children rows, new values).
_Delta = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class _DenseTables:
    """One set of the dense device tables (per length: the table and its children rows).

    `readers` are the `_Tables` objects reading this set; it is written in place only when none but the
    live verifier's current one is alive.
    """

    def __init__(self, dense: list[torch.Tensor | None], children: list[torch.Tensor | None]) -> None:
        self.dense, self.children = dense, children
        self.readers: weakref.WeakSet[_Tables] = weakref.WeakSet()

    def clone(self) -> _DenseTables:
        return _DenseTables([None if t is None else t.clone() for t in self.dense],
                            [None if t is None else t.clone() for t in self.children])

    def write(self, deltas: Sequence[_Delta | None]) -> None:
        for table, rows, delta in zip(self.dense, self.children, deltas, strict=True):
            if delta is not None and table is not None and rows is not None:
                at, row_at, values = delta
                table.index_put_((at,), values)
                rows.view(-1).index_put_((row_at,), values)

    def read_only_by(self, tables: _Tables | None) -> bool:
        return all(reader is tables for reader in self.readers)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (*self.dense, *self.children) if t is not None)


class PrefixVerifier:
    def __init__(
        self,
        packed_ids: Iterable[int] | np.ndarray | torch.Tensor,
        sizes: Sequence[int],
        device: str | torch.device = "cpu",
        dense_limit: int = DEFAULT_DENSE_LIMIT,
    ) -> None:
        self.sizes = tuple(int(s) for s in sizes)
        self.weights = radix_weights(self.sizes)
        self.device = torch.device(device)
        self.dense_limit = dense_limit
        values = _as_int64(packed_ids)
        self._check_range(values)
        self._writable = True  # False on snapshots
        self._lock = threading.Lock()  # one change or snapshot at a time
        total = self.weights[-1]
        self._counts: list[_DenseCounts | _SparseCounts] = [
            _DenseCounts(self.weights[n], total // self.weights[n]) if self._is_dense(n)
            else _SparseCounts(total // self.weights[n]) for n in range(1, self.levels)]
        dense = [torch.zeros(self.weights[n], dtype=torch.bool, device=self.device) if self._is_dense(n) else None
                 for n in range(1, self.levels + 1)]
        # Level-0-least-significant radix: a length-(l+1) prefix is p + c * W_l, so its children rows are
        # the table viewed as [T_l, W_l], transposed.
        children = [None if t is None else torch.zeros(self.weights[n], size, dtype=torch.bool, device=self.device)
                    for n, (t, size) in enumerate(zip(dense, self.sizes, strict=True))]
        self._dense = _DenseTables(dense, children)
        self._spare: _DenseTables | None = None  # the previous version's tables, for double buffering
        self._last: list[_Delta | None] = []  # the change from the spare's version to the current one
        empty = np.empty(0, dtype=np.int64)
        on_device = torch.from_numpy(empty).to(self.device)
        self._tables = _Tables(-1, _FullIds(empty, empty, empty), tuple(dense),
                               tuple(None if t is not None or n == self.levels - 1 else on_device
                                     for n, t in enumerate(dense)), tuple(children),
                               None if dense[-1] is not None else (on_device, on_device, on_device))
        self._apply(_distinct(values), empty)

    # ---- queries -------------------------------------------------------------------------------------
    @property
    def levels(self) -> int:
        return len(self.sizes)

    def __len__(self) -> int:
        return self._tables.ids.size

    def __contains__(self, packed_id: int) -> bool:
        value = int(packed_id)
        return 0 <= value < self.weights[-1] and bool(self._tables.ids.contains(np.array([value]))[0])

    @property
    def tables(self) -> object:
        """The current lookup tables: a new object after every catalog change (holders compare by identity)."""
        return self._tables

    @property
    def version(self) -> int:
        """0 when built, +1 on every `update` or `replace` that changed the ID set."""
        return self._tables.version

    @property
    def ids(self) -> SortedIds:
        """The valid full IDs: a read-only set view over the sorted array (`.array`; O(items) to build when
        changes are pending since the last merge)."""
        return SortedIds(self._tables.ids.array())

    def snapshot(self) -> PrefixVerifier:
        """A read-only verifier that keeps answering from the current tables whatever `update` or `replace` do
        later (the dense tables it reads are not written again while it lives)."""
        if not self._writable:
            return copy.copy(self)
        with self._lock:
            pinned = dataclasses.replace(self._tables)  # an object of its own: alive while the snapshot is
            self._dense.readers.add(pinned)
        snap = copy.copy(self)
        snap._tables, snap._writable = pinned, False
        for name in ("_lock", "_counts", "_dense", "_spare", "_last"):  # the change state stays with the live one
            del snap.__dict__[name]
        return snap

    def nbytes(self) -> dict[str, int]:
        """Memory held, in bytes. Growing with the items: `ids` (host), `sparse_counts` (host: distinct
        prefixes of sparse lengths + items per prefix), `sorted_tables` (device copies of the sparse
        lengths; 0 on CPU, where they are the host arrays). Sized by the prefix spaces: `dense_counts`
        (host: items per prefix), `dense_tables` and `spare_tables` (device: current and double buffer)."""
        tables, counts = self._tables, self._counts if self._writable else []
        return {
            "ids": tables.ids.nbytes,
            "sparse_counts": sum(c.nbytes for c in counts if isinstance(c, _SparseCounts)),
            "sorted_tables": 0 if self.device.type == "cpu" else
            sum(t.nbytes for t in (*tables.sorted_values, *(tables.full_layers or ())) if t is not None),
            "dense_counts": sum(c.nbytes for c in counts if isinstance(c, _DenseCounts)),
            "dense_tables": sum(t.nbytes for t in (*tables.dense, *tables.children) if t is not None),
            "spare_tables": self._spare.nbytes if self._writable and self._spare is not None else 0,
        }

    def contains(self, values: torch.Tensor, length: int | None = None) -> torch.Tensor:
        """Bool tensor, same shape as `values`: True where some valid item has that prefix (length l, default L).

        Values outside the prefix space (e.g. -1 padding) are never valid.
        """
        length = self.levels if length is None else length
        if not 1 <= length <= self.levels:
            raise ValueError(f"prefix length {length} outside 1..{self.levels}")
        tables = self._tables  # one read: a change swaps the whole object
        space = self.weights[length]
        in_range = (values >= 0) & (values < space)
        dense = tables.dense[length - 1]
        if dense is not None:
            return dense[values.clamp(0, space - 1)] & in_range
        if length == self.levels:
            assert tables.full_layers is not None
            base, added, removed = tables.full_layers
            found = _in_sorted(base, values)
            if removed.numel():
                found &= ~_in_sorted(removed, values)
            if added.numel():
                found |= _in_sorted(added, values)
            return found & in_range
        sorted_values = tables.sorted_values[length - 1]
        assert sorted_values is not None
        return _in_sorted(sorted_values, values) & in_range

    def child_mask(self, prefix_values: torch.Tensor, length: int) -> torch.Tensor:
        """[..., T_length] bool: which next codes extend each length-`length` prefix to a valid prefix."""
        space = self.weights[length]
        in_range = ((prefix_values >= 0) & (prefix_values < space)).unsqueeze(-1)  # e.g. -1 padding: no children
        tables = self._tables  # one read: a change swaps the whole object
        children = tables.children[length]
        if children is not None:
            rows = children.index_select(0, prefix_values.clamp(0, space - 1).reshape(-1))
            return rows.view(*prefix_values.shape, -1) & in_range
        codes = torch.arange(self.sizes[length], device=prefix_values.device, dtype=torch.int64)
        return self.contains(prefix_values.unsqueeze(-1) + codes * space, length + 1) & in_range

    # ---- catalog changes -----------------------------------------------------------------------------
    def update(self, add: Iterable[int] = (), remove: Iterable[int] = ()) -> None:
        """Add and remove full packed IDs (removals win over adds of the same ID); a no-op keeps the tables."""
        self._check_writable()
        add_values = _as_int64(add)
        self._check_range(add_values)
        remove_values = _distinct(_as_int64(remove))
        with self._lock:
            ids = self._tables.ids
            add_values = _distinct(add_values)
            born = add_values[~ids.contains(add_values) & ~_isin_sorted(remove_values, add_values)]
            died = remove_values[ids.contains(remove_values)]
            if born.size or died.size:
                self._apply(born, died)

    def replace(self, packed_ids: Iterable[int]) -> None:
        """Swap in a whole new ID set (a full catalog resync), applied as the difference to the current one."""
        self._check_writable()
        values = _as_int64(packed_ids)
        self._check_range(values)
        values = _distinct(values)
        with self._lock:
            ids = self._tables.ids.array()
            born, died = values[~_isin_sorted(ids, values)], ids[~_isin_sorted(values, ids)]
            if born.size or died.size:
                self._apply(born, died)

    # ---- internals -----------------------------------------------------------------------------------
    def _is_dense(self, length: int) -> bool:
        return self.weights[length] <= self.dense_limit

    def _check_range(self, values: np.ndarray) -> None:
        if values.size and ((values < 0).any() or (values >= self.weights[-1]).any()):
            bad = values[(values < 0) | (values >= self.weights[-1])][:5].tolist()
            raise ValueError(f"packed IDs outside 0..{self.weights[-1] - 1} for sizes {list(self.sizes)}: {bad}")

    def _check_writable(self) -> None:
        if not self._writable:
            raise RuntimeError("a verifier snapshot is read-only: change the verifier it was taken from")

    def _apply(self, born: np.ndarray, died: np.ndarray) -> None:
        """Swap in the tables of the catalog with `born` added and `died` removed (both sorted; born new,
        died present)."""
        old = self._tables
        ids = old.ids.edited(born, died)
        deltas: list[_Delta | None] = []
        sorted_values = list(old.sorted_values)
        for length in range(1, self.levels):
            space = self.weights[length]
            state = self._counts[length - 1]
            if isinstance(state, _DenseCounts):
                appeared, gone = state.apply(born % space, died % space)
            else:
                appeared, gone, level_splice = state.apply(born % space, died % space)
            if self._is_dense(length):
                deltas.append(self._delta(length, appeared, gone))
                continue
            deltas.append(None)
            assert isinstance(state, _SparseCounts)
            if self.device.type == "cpu":
                sorted_values[length - 1] = torch.from_numpy(state.values)  # shares the (never mutated) host array
            elif level_splice.sliced:
                sorted_values[length - 1] = level_splice.apply(old.sorted_values[length - 1],
                                                               torch.from_numpy(appeared).to(self.device))
            else:
                sorted_values[length - 1] = torch.from_numpy(state.values).to(self.device)
        full_layers = None
        if self._is_dense(self.levels):
            deltas.append(self._delta(self.levels, born, died))
        else:
            deltas.append(None)
            assert old.full_layers is not None
            # the base uploads only when the layers were merged into a new one (on CPU: shared, no copy)
            base = old.full_layers[0] if ids.base is old.ids.base else torch.from_numpy(ids.base).to(self.device)
            full_layers = (base, torch.from_numpy(ids.added).to(self.device),
                           torch.from_numpy(ids.removed).to(self.device))
        dense = self._write_dense(deltas)
        tables = _Tables(old.version + 1, ids, tuple(dense.dense), tuple(sorted_values), tuple(dense.children),
                         full_layers)
        dense.readers.add(tables)
        self._tables = tables

    def _delta(self, length: int, appeared: np.ndarray, gone: np.ndarray) -> _Delta | None:
        if appeared.size == 0 and gone.size == 0:
            return None
        at = np.concatenate([appeared, gone])
        values = np.zeros(at.size, dtype=bool)
        values[:appeared.size] = True
        parent_space, size = self.weights[length - 1], self.sizes[length - 1]
        row_at = (at % parent_space) * size + at // parent_space  # (parent prefix, code) in the children rows
        return (torch.from_numpy(at).to(self.device), torch.from_numpy(row_at).to(self.device),
                torch.from_numpy(values).to(self.device))

    def _write_dense(self, deltas: list[_Delta | None]) -> _DenseTables:
        """The dense tables of the next version, written without touching any a snapshot reads."""
        current = self._dense
        if not any(deltas):
            return current  # no dense prefix changed (the spare still needs only `_last`)
        if current.read_only_by(self._tables):
            target, self._spare = current, None  # nobody else reads them: in place (the spare falls behind)
        elif self._spare is not None and self._spare.read_only_by(None):
            target, self._spare = self._spare, current  # double buffering: catch up on the last change
            target.write(self._last)
        else:
            target, self._spare = current.clone(), current  # both sets are read: copy
        target.write(deltas)
        if self._spare is None or sum(d[0].numel() for d in deltas if d is not None) > _REPLAY_AT_MOST:
            self._spare, deltas = None, []  # nothing to catch up, or a copy is cheaper than the replay
        self._dense, self._last = target, deltas
        return target
