"""Model-free verification: is there a valid item with this ID, or with this ID prefix?

For each prefix length l (1..L) the verifier keeps the set of valid prefix values (V mod prod_{j<l} T_j)
on the decoding device, as a dense boolean table when the prefix space is small (a gather: the cheapest
check there is) and as a sorted tensor + searchsorted otherwise. Both answer a whole [B, K, T] batch of
candidates in one kernel with no host sync, so a decoder can mask invalid branches at every beam step.
A plain Python set of full IDs serves host-side lookups.

Catalog changes (`update`) rebuild the tables from the ID set and swap them in with one assignment. A
decode reads the tables at every level, so a change landing mid-search would mix two catalogs in one call:
decode with `snapshot()`, a verifier pinned to the tables of one moment, to see exactly one catalog.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from nezha.verify.codec import radix_weights

# Prefix spaces up to this many values get a dense table (16 MiB of bools at 2**24).
DEFAULT_DENSE_LIMIT = 1 << 24


@dataclass(frozen=True)
class _Tables:
    ids: frozenset[int]  # the full IDs the tables were built from
    dense: tuple[torch.Tensor | None, ...]  # per length 1..L: bool[prod T_<l] or None
    sorted_values: tuple[torch.Tensor | None, ...]  # per length 1..L: sorted unique int64 or None
    # per length 0..L-1: bool[prod T_<l, T_l], row p = which codes extend prefix p (None where the
    # longer prefix has no dense table). The beam step's mask is then one row gather, not K*T lookups.
    children: tuple[torch.Tensor | None, ...]


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
        if isinstance(packed_ids, torch.Tensor):
            packed_ids = packed_ids.cpu().numpy()
        values = np.asarray(list(packed_ids) if not isinstance(packed_ids, np.ndarray) else packed_ids, dtype=np.int64)
        self._check_range(values)
        self._tables = self._build(set(values.tolist()))

    # ---- queries -------------------------------------------------------------------------------------
    @property
    def levels(self) -> int:
        return len(self.sizes)

    def __len__(self) -> int:
        return len(self._tables.ids)

    def __contains__(self, packed_id: int) -> bool:
        return int(packed_id) in self._tables.ids

    @property
    def tables(self) -> object:
        """The current lookup tables: a new object after every catalog change (holders compare by identity)."""
        return self._tables

    @property
    def ids(self) -> frozenset[int]:
        return self._tables.ids

    def snapshot(self) -> PrefixVerifier:
        """A verifier that keeps answering from the current tables whatever `update` or `replace` do later."""
        # Changes rebind `_tables` on this object (never mutate the tables), so a shallow copy is pinned.
        return copy.copy(self)

    def contains(self, values: torch.Tensor, length: int | None = None) -> torch.Tensor:
        """Bool tensor, same shape as `values`: True where some valid item has that prefix (length l, default L).

        Values outside the prefix space (e.g. -1 padding) are never valid.
        """
        length = self.levels if length is None else length
        if not 1 <= length <= self.levels:
            raise ValueError(f"prefix length {length} outside 1..{self.levels}")
        tables = self._tables  # one read: a concurrent update swaps the whole object
        space = self.weights[length]
        in_range = (values >= 0) & (values < space)
        dense = tables.dense[length - 1]
        if dense is not None:
            return dense[values.clamp(0, space - 1)] & in_range
        sorted_values = tables.sorted_values[length - 1]
        assert sorted_values is not None
        if sorted_values.numel() == 0:
            return torch.zeros_like(values, dtype=torch.bool)
        idx = torch.searchsorted(sorted_values, values.contiguous()).clamp(max=sorted_values.numel() - 1)
        return (sorted_values[idx] == values) & in_range

    def child_mask(self, prefix_values: torch.Tensor, length: int) -> torch.Tensor:
        """[..., T_length] bool: which next codes extend each length-`length` prefix to a valid prefix."""
        space = self.weights[length]
        in_range = ((prefix_values >= 0) & (prefix_values < space)).unsqueeze(-1)  # e.g. -1 padding: no children
        tables = self._tables  # one read: a concurrent update swaps the whole object
        children = tables.children[length]
        if children is not None:
            rows = children.index_select(0, prefix_values.clamp(0, space - 1).reshape(-1))
            return rows.view(*prefix_values.shape, -1) & in_range
        codes = torch.arange(self.sizes[length], device=prefix_values.device, dtype=torch.int64)
        return self.contains(prefix_values.unsqueeze(-1) + codes * space, length + 1) & in_range

    # ---- catalog changes -----------------------------------------------------------------------------
    def update(self, add: Iterable[int] = (), remove: Iterable[int] = ()) -> None:
        """Add and remove full packed IDs, then swap in rebuilt tables (removals win over adds of the same ID)."""
        add_values = np.asarray(list(add), dtype=np.int64)
        remove_values = np.asarray(list(remove), dtype=np.int64)
        self._check_range(add_values)
        ids = set(self._tables.ids)
        ids.update(add_values.tolist())
        ids.difference_update(remove_values.tolist())
        self._tables = self._build(ids)

    def replace(self, packed_ids: Iterable[int]) -> None:
        """Swap in a whole new ID set (a full catalog resync)."""
        values = np.asarray(list(packed_ids), dtype=np.int64)
        self._check_range(values)
        self._tables = self._build(set(values.tolist()))

    # ---- internals -----------------------------------------------------------------------------------
    def _check_range(self, values: np.ndarray) -> None:
        if values.size and ((values < 0).any() or (values >= self.weights[-1]).any()):
            bad = values[(values < 0) | (values >= self.weights[-1])][:5].tolist()
            raise ValueError(f"packed IDs outside 0..{self.weights[-1] - 1} for sizes {list(self.sizes)}: {bad}")

    def _build(self, ids: set[int]) -> _Tables:
        full = np.fromiter(ids, dtype=np.int64, count=len(ids))
        dense: list[torch.Tensor | None] = []
        sorted_values: list[torch.Tensor | None] = []
        for length in range(1, self.levels + 1):
            space = math.prod(self.sizes[:length])
            prefixes = np.unique(full % space)
            if space <= self.dense_limit:
                table = torch.zeros(space, dtype=torch.bool)
                table[torch.from_numpy(prefixes)] = True
                dense.append(table.to(self.device))
                sorted_values.append(None)
            else:
                dense.append(None)
                sorted_values.append(torch.from_numpy(prefixes).to(self.device))
        # Level-0-least-significant radix: a length-(l+1) prefix is p + c * W_l, so its dense table viewed
        # as [T_l, W_l] holds the children of p in column p.
        children = tuple(None if table is None else table.view(size, -1).t().contiguous()
                         for table, size in zip(dense, self.sizes, strict=True))
        return _Tables(frozenset(ids), tuple(dense), tuple(sorted_values), children)
