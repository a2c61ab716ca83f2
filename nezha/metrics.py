"""Ranking metrics for full-catalog generation with one relevant item per user, and the popularity floor."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

DEFAULT_KS = (1, 5, 10, 20)


def target_ranks(ranked: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """0-based rank of each user's target in its ranked list, or -1 when absent.

    `ranked` is [N, K] (item indices or packed IDs, -1 as padding), `targets` is [N] of the same kind.
    """
    ranked = np.asarray(ranked)
    targets = np.asarray(targets)
    if ranked.ndim != 2 or targets.shape != (ranked.shape[0],):
        raise ValueError(f"expected ranked [N, K] and targets [N], got {ranked.shape} and {targets.shape}")
    hits = ranked == targets[:, None]
    found = hits.any(axis=1)
    return np.where(found, hits.argmax(axis=1), -1)


def hit_ndcg(ranked: np.ndarray, targets: np.ndarray, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """hit@k and ndcg@k averaged over users (ndcg with one relevant item: 1 / log2(rank + 2))."""
    ranks = target_ranks(ranked, targets)
    if ranks.size == 0:
        raise ValueError("no users to score")
    result: dict[str, float] = {}
    for k in ks:
        inside = (ranks >= 0) & (ranks < k)
        result[f"hit@{k}"] = float(inside.mean())
        gains = np.where(inside, 1.0 / np.log2(np.where(inside, ranks, 0) + 2.0), 0.0)
        result[f"ndcg@{k}"] = float(gains.mean())
    return result


def popularity_ranking(sequences: Iterable[np.ndarray], num_items: int, holdout: int = 2) -> np.ndarray:
    """Item indices by descending count over each user's sequence without its last `holdout` items
    (the validation and test targets), ties broken by the smaller index."""
    counts = np.zeros(num_items, dtype=np.int64)
    for seq in sequences:
        seq = np.asarray(seq)
        np.add.at(counts, seq[: max(len(seq) - holdout, 0)], 1)
    return np.lexsort((np.arange(num_items), -counts))
