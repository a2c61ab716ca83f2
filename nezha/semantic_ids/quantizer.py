"""RQ-KMeans semantic IDs: residual k-means codebooks, unique ID assignment, IDs for new items.

Level l clusters the residual left after levels 0..l-1 (x minus the chosen centroids) into T_l codes;
an item's ID is its nearest centroid per level. Storage is safetensors (centroids + JSON metadata).

Uniqueness (`assign_unique_codes`): items whose full ID was already taken by an earlier item (catalog
order) are moved to the nearest free ID, searched depth-first in distance order: first the other codes
of the last level under the same prefix (nearest last-level centroid to the last-level residual first),
then, if all T_{L-1} of them are taken, the next-nearest level L-2 code (with its own nearest free last
code), and so on up the levels. The first candidate of that search is the item's own greedy ID, so an
item without a collision keeps its code, and a new item (`assign_new_item`) gets the same treatment
against the IDs already in use.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Container, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from nezha.verify.codec import pack, radix_weights

log = logging.getLogger(__name__)

_FORMAT = "nezha-rq-kmeans/1"


class ResidualQuantizer:
    """RQ-KMeans codebooks: fitted per level by nezha/semantic_ids/rq_kmeans.py (scikit-learn's KMeans, its
    measurements there), stored as safetensors, and encoding with numpy alone."""

    def __init__(
        self,
        levels: int = 3,
        codebook_size: int | Sequence[int] = 256,
        seed: int = 0,
        n_init: int = 1,
        max_iter: int = 100,
    ) -> None:
        sizes = (codebook_size,) * levels if isinstance(codebook_size, int) else tuple(codebook_size)
        if len(sizes) != levels or levels < 1 or min(sizes) < 1:
            raise ValueError(f"need {levels} >= 1 positive codebook sizes, got {codebook_size}")
        radix_weights(sizes)  # the packed ID space must fit an int64
        self.codebook_sizes = tuple(int(s) for s in sizes)
        self.seed = seed
        self.n_init = n_init
        self.max_iter = max_iter
        self.centroids: list[np.ndarray] = []  # per level [T_l, D] float32; empty until fit/load
        self.fit_stats: list[dict[str, float]] = []  # per level: seconds, iterations, inertia (after fit)

    @property
    def levels(self) -> int:
        return len(self.codebook_sizes)

    @property
    def dim(self) -> int:
        self._check_fitted()
        return self.centroids[0].shape[1]

    def _check_fitted(self) -> None:
        if not self.centroids:
            raise RuntimeError("ResidualQuantizer is not fitted: call fit() or load()")

    def fit(self, X: np.ndarray) -> ResidualQuantizer:
        # Imported here: scikit-learn is for fitting only; loading and encoding (training, serving) go without.
        from nezha.semantic_ids.rq_kmeans import kmeans_level

        X = np.asarray(X, dtype=np.float32)
        if X.ndim != 2 or len(X) < max(self.codebook_sizes):
            raise ValueError(
                f"need a [N, D] array with N >= the largest codebook size {max(self.codebook_sizes)}, "
                f"got shape {X.shape}; use a smaller codebook size for this catalog"
            )
        residual = X.copy()
        self.centroids, self.fit_stats = [], []
        for level, size in enumerate(self.codebook_sizes):
            start = time.perf_counter()
            centroids, iterations, inertia = kmeans_level(residual, size, seed=self.seed + level,
                                                          n_init=self.n_init, max_iter=self.max_iter)
            self.centroids.append(centroids)
            residual -= centroids[self.distances(residual, level).argmin(1)]
            stats = {"seconds": time.perf_counter() - start, "iterations": iterations, "inertia": inertia}
            self.fit_stats.append(stats)
            log.info(
                "rq-kmeans level %d: %d codes, %d iterations, inertia %.4g, %.2f s",
                level, size, stats["iterations"], stats["inertia"], stats["seconds"],
            )
        return self

    def distances(self, residual: np.ndarray, level: int) -> np.ndarray:
        """[N, T_level] squared Euclidean distances (float64) of residuals to the level's centroids."""
        self._check_fitted()
        r = np.asarray(residual, dtype=np.float64)
        c = self.centroids[level].astype(np.float64)
        d = (r * r).sum(1, keepdims=True) - 2.0 * r @ c.T + (c * c).sum(1)
        return np.maximum(d, 0.0)

    def encode(self, X: np.ndarray) -> np.ndarray:
        """[N, L] int64 greedy codes: the nearest centroid per level on the running residual."""
        self._check_fitted()
        residual = np.asarray(X, dtype=np.float32).copy()
        codes = np.empty((len(residual), self.levels), dtype=np.int64)
        for level in range(self.levels):
            codes[:, level] = self.distances(residual, level).argmin(1)
            residual -= self.centroids[level][codes[:, level]]
        return codes

    def save(self, path: str | Path) -> None:
        self._check_fitted()
        tensors = {f"centroids_{level}": c for level, c in enumerate(self.centroids)}
        meta = {"format": _FORMAT, "codebook_sizes": json.dumps(self.codebook_sizes), "seed": str(self.seed)}
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> ResidualQuantizer:
        with safe_open(str(path), framework="np") as f:
            meta = f.metadata() or {}
            if meta.get("format") != _FORMAT:
                raise ValueError(f"{path}: not a nezha RQ-KMeans file (format {meta.get('format')!r})")
            sizes = json.loads(meta["codebook_sizes"])
            rq = cls(levels=len(sizes), codebook_size=sizes, seed=int(meta["seed"]))
            rq.centroids = [f.get_tensor(f"centroids_{level}") for level in range(len(sizes))]
        for level, (c, size) in enumerate(zip(rq.centroids, sizes, strict=True)):
            if c.shape != (size, rq.centroids[0].shape[1]):
                raise ValueError(f"{path}: level {level} centroids have shape {c.shape}, expected ({size}, D)")
        return rq


def _nearest_free(
    quantizer: ResidualQuantizer, residual: np.ndarray, used: Container[int], prefix: list[int], weights: list[int]
) -> list[int] | None:
    """Depth-first search in distance order for the nearest full ID not in `used` (see module docstring)."""
    level = len(prefix)
    order = np.argsort(quantizer.distances(residual[None], level)[0], kind="stable")
    if level == quantizer.levels - 1:
        base = sum(t * w for t, w in zip(prefix, weights, strict=False))
        for code in order.tolist():
            if base + code * weights[level] not in used:
                return [*prefix, code]
        return None
    for code in order.tolist():
        found = _nearest_free(quantizer, residual - quantizer.centroids[level][code], used, [*prefix, code], weights)
        if found is not None:
            return found
    return None


def codebook_usage(codes: np.ndarray, sizes: Sequence[int]) -> list[float]:
    """Per level: number of distinct codes in use / codebook size."""
    return [len(np.unique(codes[:, level])) / size for level, size in enumerate(sizes)]


def assign_unique_codes(X: np.ndarray, quantizer: ResidualQuantizer) -> tuple[np.ndarray, dict[str, Any]]:
    """[N, L] codes with pairwise distinct rows, plus collision and codebook-usage statistics."""
    X = np.asarray(X, dtype=np.float32)
    sizes = quantizer.codebook_sizes
    capacity = math.prod(sizes)
    if len(X) > capacity:
        raise ValueError(f"{len(X)} items cannot get unique IDs from codebooks {list(sizes)} ({capacity} IDs)")
    codes = quantizer.encode(X)
    packed = pack(codes, sizes)
    _, first, counts = np.unique(packed, return_index=True, return_counts=True)
    is_first = np.zeros(len(X), dtype=bool)
    is_first[first] = True
    colliders = np.flatnonzero(~is_first)  # ascending: the earliest item keeps a shared ID
    raw_usage = codebook_usage(codes, sizes)

    used = set(packed[is_first].tolist())
    weights = radix_weights(sizes)
    moved_above_last = 0
    for i in colliders.tolist():
        new = _nearest_free(quantizer, X[i], used, [], weights)
        assert new is not None  # len(X) <= capacity, so a free ID exists
        moved_above_last += new[:-1] != codes[i, :-1].tolist()
        codes[i] = new
        used.add(int(pack(codes[i], sizes)))

    num_unique_final = len(np.unique(pack(codes, sizes)))
    stats = {
        "num_items": len(X),
        "raw_collisions": len(colliders),
        "raw_collision_rate": len(colliders) / max(len(X), 1),
        "max_items_per_raw_id": int(counts.max()) if len(counts) else 0,
        "reassigned_beyond_last_level": int(moved_above_last),
        "final_collision_rate": (len(X) - num_unique_final) / max(len(X), 1),
        "raw_codebook_usage": raw_usage,
        "codebook_usage": codebook_usage(codes, sizes),
    }
    log.info(
        "semantic IDs: raw collision rate %.4f (%d items, at most %d per ID), %d moved above the last level; "
        "codebook usage per level %s",
        stats["raw_collision_rate"], len(colliders), stats["max_items_per_raw_id"], moved_above_last,
        [round(u, 3) for u in stats["codebook_usage"]],
    )
    return codes, stats


def assign_new_item(x: np.ndarray, quantizer: ResidualQuantizer, used_ids: Container[int]) -> np.ndarray:
    """[L] int64 codes for a new item's embedding `x`: its nearest ID not in `used_ids` (no refit).

    `used_ids` holds packed IDs: a set, or anything with `__contains__` such as a PrefixVerifier.
    """
    x = np.asarray(x, dtype=np.float32).reshape(-1)
    found = _nearest_free(quantizer, x, used_ids, [], radix_weights(quantizer.codebook_sizes))
    if found is None:
        raise ValueError(f"no free semantic ID left in codebooks {list(quantizer.codebook_sizes)}")
    return np.asarray(found, dtype=np.int64)
