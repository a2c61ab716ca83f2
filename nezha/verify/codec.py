"""Mixed-radix codec: an L-token semantic ID (t_0, ..., t_{L-1}) <-> one integer.

V = sum_l t_l * prod_{j<l} T_j, level 0 least significant (as the authors' public code), so the
value of the length-l prefix is simply V mod prod_{j<l} T_j. Works on numpy arrays and torch tensors
(any device) alike; the last dimension of `codes` is the level.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TypeVar

import numpy as np
import torch

Array = TypeVar("Array", np.ndarray, torch.Tensor)


def radix_weights(sizes: Sequence[int]) -> list[int]:
    """[1, T_0, T_0*T_1, ..., prod(T)]: weight of each level, plus the total number of IDs last."""
    weights = [1]
    for size in sizes:
        if size < 1:
            raise ValueError(f"codebook sizes must be positive, got {list(sizes)}")
        weights.append(weights[-1] * int(size))
    if weights[-1] >= 2**63:
        raise ValueError(f"{list(sizes)} has {weights[-1]} IDs: more than an int64 holds")
    return weights


def _weights_like(values: Array, weights: list[int]) -> Array:
    if isinstance(values, torch.Tensor):
        return torch.tensor(weights, dtype=torch.int64, device=values.device)
    return np.asarray(weights, dtype=np.int64)


def pack(codes: Array, sizes: Sequence[int]) -> Array:
    """[..., L] codes -> [...] int64 values. Numpy inputs are range-checked (torch ones are not, to stay sync-free)."""
    if codes.shape[-1] != len(sizes):
        raise ValueError(f"codes have {codes.shape[-1]} levels, sizes have {len(sizes)}")
    weights = radix_weights(sizes)
    if isinstance(codes, np.ndarray):
        codes = codes.astype(np.int64, copy=False)
        if codes.size and ((codes < 0).any() or (codes >= np.asarray(sizes)).any()):
            raise ValueError(f"codes out of range for codebook sizes {list(sizes)}")
        return (codes * _weights_like(codes, weights[:-1])).sum(-1)
    return (codes.long() * _weights_like(codes, weights[:-1])).sum(-1)


def unpack(values: Array, sizes: Sequence[int]) -> Array:
    """[...] values -> [..., L] int64 codes."""
    weights = radix_weights(sizes)
    w = _weights_like(values, weights[:-1])
    t = _weights_like(values, list(sizes))
    if isinstance(values, np.ndarray):
        values = values.astype(np.int64, copy=False)
        if values.size and ((values < 0).any() or (values >= weights[-1]).any()):
            raise ValueError(f"values out of range for codebook sizes {list(sizes)}")
        return (values[..., None] // w) % t
    return (values.long()[..., None] // w) % t


def prefix_of(values: Array, length: int, sizes: Sequence[int]) -> Array:
    """Value of the first `length` tokens of each ID (V mod prod_{j<length} T_j)."""
    if not 0 <= length <= len(sizes):
        raise ValueError(f"prefix length {length} outside 0..{len(sizes)}")
    return values % math.prod(sizes[:length])


def random_packed_ids(num_items: int, sizes: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    """`num_items` distinct packed IDs drawn uniformly from the ID space, sorted (a synthetic catalog for
    benchmarks: unique, as real catalogs must be)."""
    space = int(np.prod(sizes))
    return np.sort(rng.choice(space, size=num_items, replace=False)).astype(np.int64)
