"""RQ-KMeans semantic IDs: residual k-means codebooks, unique ID assignment, IDs for new items.

Level l clusters the residual left after levels 0..l-1 (x minus the chosen centroids) into T_l codes;
an item's ID is its nearest centroid per level. The codebooks are fitted on a random sample of the items
(`fit(X, sample=...)`, faiss's k-means in float32, see rq_kmeans.py); every item is then encoded in
row chunks, so memory stays a few hundred MB above the embeddings whatever the catalog size. Storage is
safetensors (centroids + JSON metadata).

Uniqueness (`assign_unique_codes`): the first item (catalog order) with a greedy ID keeps it; every
later item with that ID moves to a free ID, nearest first under the deepest shared prefix:
1. under its own level 0..L-2 prefix, the free last-level code nearest to its last-level residual. Done
   for all such items at once, in rounds: round r places the r-th colliding item of every prefix, so
   within a prefix items choose in catalog order, as a one-by-one search would;
2. when that prefix is full, a depth-first search in distance order: the next-nearest level L-2 code
   (with its own nearest free last code), and so on up the levels, skipping subtrees already full.
   These items go one by one in catalog order, after all items of step 1 (a one-by-one search would
   interleave them, so an item of step 2 can land on a code that an item of step 1 would have taken:
   the result differs from it only when a prefix overflows).
A new item (`assign_new_item`) gets the search of step 2 against the IDs already in use; its first
candidate is its own greedy ID, so an item without a collision keeps its code.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Container, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from nezha.verify.codec import pack, radix_weights, unpack

log = logging.getLogger(__name__)

_FORMAT = "nezha-rq-kmeans/1"
# Rows per encoding chunk: a [chunk, D] residual plus [chunk, T] distances, float32 (~80 MB at D=384,
# T=256), whatever the number of items.
_CHUNK = 32768
# ID-space fill (items / number of IDs) above which `id_space_warning` warns: items crowd into the
# semantic neighbourhoods, so collisions push many of them off their nearest prefix well before 100%.
MAX_FILL = 0.10
# Share of items moved off their own level 0..L-2 prefix above which `id_space_warning` warns.
MAX_MOVED_ABOVE_LAST = 0.01


class ResidualQuantizer:
    """RQ-KMeans codebooks: fitted per level by nezha/semantic_ids/rq_kmeans.py (faiss's k-means, its
    measurements there), stored as safetensors, and encoding with numpy alone."""

    def __init__(
        self,
        levels: int = 3,
        codebook_size: int | Sequence[int] = 256,
        seed: int = 0,
        n_init: int = 1,
        max_iter: int = 25,
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

    def fit(self, X: np.ndarray, sample: int | None = None) -> ResidualQuantizer:
        """Fit the codebooks on `sample` rows of X drawn at random (seeded), or on all rows when
        `sample` is None or at least len(X). X may be a memory-mapped array: only the sample is read."""
        # Imported here: faiss is for fitting only; loading and encoding (training, serving) go without.
        from nezha.semantic_ids.rq_kmeans import kmeans_level

        X = np.asarray(X)  # no copy of an array, nor a read of a memory-mapped one
        if X.ndim != 2 or len(X) < max(self.codebook_sizes):
            raise ValueError(
                f"need a [N, D] array with N >= the largest codebook size {max(self.codebook_sizes)}, "
                f"got shape {X.shape}; use a smaller codebook size for this catalog"
            )
        if sample is not None and sample < len(X):
            if sample < max(self.codebook_sizes):
                raise ValueError(f"a sample of {sample} rows cannot fit {max(self.codebook_sizes)} codes")
            rows = np.sort(np.random.default_rng(self.seed).choice(len(X), sample, replace=False))
            residual = np.asarray(X[rows], dtype=np.float32)
        else:
            residual = np.array(X, dtype=np.float32)  # a copy: the residuals are updated in place
        self.centroids, self.fit_stats = [], []
        for level, size in enumerate(self.codebook_sizes):
            start = time.perf_counter()
            centroids, iterations, inertia = kmeans_level(residual, size, seed=self.seed + level,
                                                          n_init=self.n_init, max_iter=self.max_iter)
            self.centroids.append(centroids)
            for chunk in range(0, len(residual), _CHUNK):
                part = residual[chunk:chunk + _CHUNK]
                part -= centroids[self.nearest(part, level)]
            stats = {"seconds": time.perf_counter() - start, "iterations": iterations, "inertia": inertia,
                     "sample": len(residual)}
            self.fit_stats.append(stats)
            log.info(
                "rq-kmeans level %d: %d codes on %d items, %d iterations, inertia %.4g, %.2f s",
                level, size, len(residual), stats["iterations"], stats["inertia"], stats["seconds"],
            )
        return self

    def distances(self, residual: np.ndarray, level: int) -> np.ndarray:
        """[N, T_level] squared Euclidean distances (float64) of residuals to the level's centroids."""
        self._check_fitted()
        r = np.asarray(residual, dtype=np.float64)
        c = self.centroids[level].astype(np.float64)
        d = (r * r).sum(1, keepdims=True) - 2.0 * r @ c.T + (c * c).sum(1)
        return np.maximum(d, 0.0)

    def nearest(self, residual: np.ndarray, level: int) -> np.ndarray:
        """[N] index of the nearest level-`level` centroid to each float32 residual row: one float32 matrix
        product (4-5x less CPU than `distances`; a near-tie may go the other way than in float64)."""
        c = self.centroids[level]
        return ((c * c).sum(1) - 2.0 * (residual @ c.T)).argmin(1)

    def encode(self, X: np.ndarray) -> np.ndarray:
        """[N, L] int64 greedy codes: the nearest centroid per level on the running residual, computed in
        chunks of rows (X may be memory-mapped)."""
        self._check_fitted()
        codes = np.empty((len(X), self.levels), dtype=np.int64)
        for chunk in range(0, len(X), _CHUNK):
            residual = np.array(X[chunk:chunk + _CHUNK], dtype=np.float32)
            for level in range(self.levels):
                codes[chunk:chunk + _CHUNK, level] = self.nearest(residual, level)
                residual -= self.centroids[level][codes[chunk:chunk + _CHUNK, level]]
        return codes

    def residuals(self, X: np.ndarray, codes: np.ndarray, levels: int) -> np.ndarray:
        """[N, D] float32 residuals of X's rows after subtracting their first `levels` centroids."""
        residual = np.array(X, dtype=np.float32)
        for level in range(levels):
            residual -= self.centroids[level][codes[:, level]]
        return residual

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
    quantizer: ResidualQuantizer,
    residual: np.ndarray,
    used: Container[int],
    weights: list[int],
    full: Callable[[int, int], bool] | None = None,
    level: int = 0,
    base: int = 0,
) -> int | None:
    """Depth-first search in distance order for the nearest packed ID not in `used` under the prefix
    `base` (packed value of the first `level` codes). `full(depth, prefix)`, when given, says a prefix of
    `depth` codes has no free ID left, so its subtree is skipped unsearched."""
    order = np.argsort(quantizer.distances(residual[None], level)[0], kind="stable").tolist()
    if level == quantizer.levels - 1:
        for code in order:
            if base + code * weights[level] not in used:
                return base + code * weights[level]
        return None
    for code in order:
        prefix = base + code * weights[level]
        if full is not None and full(level + 1, prefix):
            continue
        found = _nearest_free(quantizer, residual - quantizer.centroids[level][code], used, weights, full,
                              level + 1, prefix)
        if found is not None:
            return found
    return None


def codebook_usage(codes: np.ndarray, sizes: Sequence[int]) -> list[float]:
    """Per level: number of distinct codes in use / codebook size."""
    return [len(np.unique(codes[:, level])) / size for level, size in enumerate(sizes)]


def _place_under_own_prefix(
    X: np.ndarray, quantizer: ResidualQuantizer, codes: np.ndarray, packed: np.ndarray, is_first: np.ndarray,
    colliders: np.ndarray,
) -> np.ndarray:
    """Step 1 of the module docstring: the new last-level code of each collider under its own level
    0..L-2 prefix, or -1 where that prefix has no free code left for it."""
    last = quantizer.levels - 1
    prefix_weight = radix_weights(quantizer.codebook_sizes)[last]  # packed % this = value of the prefix
    groups, group_of = np.unique(packed[colliders] % prefix_weight, return_inverse=True)
    taken = np.zeros((len(groups), quantizer.codebook_sizes[last]), dtype=bool)
    held = packed[is_first]
    pos = np.minimum(np.searchsorted(groups, held % prefix_weight), len(groups) - 1)
    inside = groups[pos] == held % prefix_weight
    taken[pos[inside], held[inside] // prefix_weight] = True

    # colliders are in catalog order; a stable sort by (round, group) gives each its round r = its rank
    # among the colliders of its prefix
    by_group = np.argsort(group_of, kind="stable")
    rank = np.empty(len(colliders), dtype=np.int64)
    rank[by_group] = np.arange(len(colliders)) - np.searchsorted(group_of[by_group], group_of[by_group])
    by_round = np.argsort(rank, kind="stable")
    round_start = np.searchsorted(rank[by_round], np.arange(rank.max() + 2))
    new_last = np.full(len(colliders), -1, dtype=np.int64)
    for r in range(rank.max() + 1):
        active = by_round[round_start[r]:round_start[r + 1]]
        active = active[~taken[group_of[active]].all(1)]  # their prefix is full: step 2
        if not len(active):
            continue
        rows = colliders[active]
        g = group_of[active]
        d = quantizer.distances(quantizer.residuals(X[rows], codes[rows], last), last)
        d[taken[g]] = np.inf
        choice = d.argmin(1)
        taken[g, choice] = True
        new_last[active] = choice
    return new_last


def _place_anywhere(
    X: np.ndarray, quantizer: ResidualQuantizer, used_packed: np.ndarray, rows: np.ndarray
) -> list[int]:
    """Step 2 of the module docstring: packed IDs for `rows` (catalog order), one by one, none in
    `used_packed` nor given to an earlier row."""
    sizes = quantizer.codebook_sizes
    weights = radix_weights(sizes)
    used = set(used_packed.tolist())
    # items held under each prefix of 1..L-1 codes, to skip full subtrees in the search
    held: list[dict[int, int]] = [{}]
    for depth in range(1, len(sizes)):
        values, counts = np.unique(used_packed % weights[depth], return_counts=True)
        held.append(dict(zip(values.tolist(), counts.tolist(), strict=True)))
    room = [weights[-1] // weights[depth] for depth in range(len(sizes))]  # IDs under a prefix of `depth`

    def full(depth: int, prefix: int) -> bool:
        return held[depth].get(prefix, 0) >= room[depth]

    placed = []
    for row in rows.tolist():
        value = _nearest_free(quantizer, np.asarray(X[row], dtype=np.float32), used, weights, full)
        assert value is not None  # there are at most as many items as IDs
        used.add(value)
        for depth in range(1, len(sizes)):
            held[depth][value % weights[depth]] = held[depth].get(value % weights[depth], 0) + 1
        placed.append(value)
    return placed


def assign_unique_codes(X: np.ndarray, quantizer: ResidualQuantizer) -> tuple[np.ndarray, dict[str, Any]]:
    """[N, L] codes with pairwise distinct rows, plus collision and codebook-usage statistics.
    X may be memory-mapped: it is read in chunks, and row by row for colliding items."""
    sizes = quantizer.codebook_sizes
    capacity = math.prod(sizes)
    if len(X) > capacity:
        raise ValueError(f"{len(X)} items cannot get unique IDs from codebooks {list(sizes)} ({capacity} IDs)")
    start = time.perf_counter()
    codes = quantizer.encode(X)
    encode_s = time.perf_counter() - start
    packed = pack(codes, sizes)
    _, first, counts = np.unique(packed, return_index=True, return_counts=True)
    is_first = np.zeros(len(X), dtype=bool)
    is_first[first] = True
    colliders = np.flatnonzero(~is_first)  # ascending: the earliest item keeps a shared ID
    raw_usage = codebook_usage(codes, sizes)
    items_per_first_code = np.bincount(codes[:, 0], minlength=sizes[0])

    start = time.perf_counter()
    moved_above_last = 0
    if len(colliders):
        last = quantizer.levels - 1
        new_last = _place_under_own_prefix(X, quantizer, codes, packed, is_first, colliders)
        codes[colliders, last] = np.where(new_last >= 0, new_last, codes[colliders, last])
        overflow = colliders[new_last < 0]
        if len(overflow):
            settled = np.ones(len(X), dtype=bool)
            settled[overflow] = False
            placed = _place_anywhere(X, quantizer, pack(codes[settled], sizes), overflow)
            codes[overflow] = unpack(np.asarray(placed, dtype=np.int64), sizes)
            moved_above_last = len(overflow)
    resolve_s = time.perf_counter() - start

    num_unique_final = len(np.unique(pack(codes, sizes)))
    stats = {
        "num_items": len(X),
        "id_space_fill": len(X) / capacity,
        "raw_collisions": len(colliders),
        "raw_collision_rate": len(colliders) / max(len(X), 1),
        "max_items_per_raw_id": int(counts.max()) if len(counts) else 0,
        "max_items_per_first_code": int(items_per_first_code.max()) if len(X) else 0,
        "reassigned_beyond_last_level": int(moved_above_last),
        "final_collision_rate": (len(X) - num_unique_final) / max(len(X), 1),
        "raw_codebook_usage": raw_usage,
        "codebook_usage": codebook_usage(codes, sizes),
        "encode_s": encode_s,
        "resolve_s": resolve_s,
    }
    log.info(
        "semantic IDs: raw collision rate %.4f (%d items, at most %d per ID), %d moved above the last level; "
        "codebook usage per level %s",
        stats["raw_collision_rate"], len(colliders), stats["max_items_per_raw_id"], moved_above_last,
        [round(u, 3) for u in stats["codebook_usage"]],
    )
    return codes, stats


def id_space_advice(num_items: int, levels: int, codebook_size: int, busiest_first_code: int = 0) -> str:
    """Which `--levels` and `--codebook-size` give `num_items` an ID space at most MAX_FILL full, with
    every level-0 code numbering its items (`busiest_first_code`: the most greedy items on one level-0
    code, scaled by T/T' for a larger codebook)."""
    options = []
    more_levels = levels + 1
    while codebook_size**more_levels < 2**63:
        if (num_items <= MAX_FILL * codebook_size**more_levels
                and busiest_first_code <= codebook_size ** (more_levels - 1)):
            ids = codebook_size**more_levels
            options.append(f"--levels {more_levels} ({ids:,} IDs, {num_items / ids:.1%} full)")
            break
        more_levels += 1
    size = codebook_size * 2
    while size**levels < 2**63 and size <= max(num_items, 1):
        if num_items <= MAX_FILL * size**levels and busiest_first_code * codebook_size / size <= size ** (levels - 1):
            options.append(f"--codebook-size {size} ({size**levels:,} IDs, {num_items / size**levels:.1%} full)")
            break
        size *= 2
    if not options:
        return "no --levels or --codebook-size fits this many items in an int64 ID; bring IDs with --semantic-ids"
    return "IDs that fit: " + " or ".join(options)


def id_space_warning(num_items: int, levels: int, codebook_size: int, stats: dict[str, Any]) -> str | None:
    """A warning with the numbers when the ID space of `levels` x `codebook_size` is too full for the
    catalog (`stats` of assign_unique_codes), and the `id_space_advice`; None when it is not."""
    ids = codebook_size**levels
    under_first = codebook_size ** (levels - 1)
    busiest, moved = stats["max_items_per_first_code"], stats["reassigned_beyond_last_level"]
    reasons = []
    if num_items > MAX_FILL * ids:
        reasons.append(f"{num_items:,} items fill {num_items / ids:.1%} of the {ids:,} IDs of {levels} levels x "
                       f"{codebook_size} codes (warning above {MAX_FILL:.0%})")
    if busiest > under_first:
        reasons.append(f"the busiest level-0 code has {busiest:,} items but only {under_first:,} IDs under it")
    if moved > MAX_MOVED_ABOVE_LAST * num_items:
        reasons.append(f"{moved:,} items ({moved / num_items:.1%}) had to leave their own level 0..{levels - 2} "
                       f"prefix because it was full (warning above {MAX_MOVED_ABOVE_LAST:.0%})")
    if not reasons:
        return None
    return (f"semantic-ID space too full: {'; '.join(reasons)}. "
            f"{id_space_advice(num_items, levels, codebook_size, busiest)}.")


def assign_new_item(x: np.ndarray, quantizer: ResidualQuantizer, used_ids: Container[int]) -> np.ndarray:
    """[L] int64 codes for a new item's embedding `x`: its nearest ID not in `used_ids` (no refit).

    `used_ids` holds packed IDs: a set, or anything with `__contains__` such as a PrefixVerifier.
    """
    x = np.asarray(x, dtype=np.float32).reshape(-1)
    found = _nearest_free(quantizer, x, used_ids, radix_weights(quantizer.codebook_sizes))
    if found is None:
        raise ValueError(f"no free semantic ID left in codebooks {list(quantizer.codebook_sizes)}")
    return unpack(np.asarray([found], dtype=np.int64), quantizer.codebook_sizes)[0]
