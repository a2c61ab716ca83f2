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
    return metrics_from_ranks(target_ranks(ranked, targets), ks)


def metrics_from_ranks(ranks: np.ndarray, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """hit@k and ndcg@k from each user's 0-based target rank (-1: not in the list)."""
    ranks = np.asarray(ranks)
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


def paired_difference(a: np.ndarray, b: np.ndarray, resamples: int = 10000, seed: int = 0,
                      chunk: int = 500) -> dict[str, float]:
    """mean(a − b) over paired per-user values, a bootstrap 95% CI of it and a two-sided p-value.

    The CI resamples users with replacement; the p-value is a sign-flip randomisation test (under
    "no difference" each user's a − b is as likely to have either sign), with the +1 correction so it is
    never 0. Both are computed in chunks of `chunk` resamples to bound memory.
    """
    if np.ndim(a) != 1 or np.shape(a) != np.shape(b) or np.size(a) == 0:
        raise ValueError(f"expected two equal-length, non-empty 1-D arrays, got shapes {np.shape(a)} and {np.shape(b)}")
    diff = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    rng = np.random.default_rng(seed)
    n, observed = diff.size, float(diff.mean())
    boots, extreme = [], 0
    for first in range(0, resamples, chunk):
        size = min(chunk, resamples - first)
        boots.append(diff[rng.integers(0, n, size=(size, n))].mean(axis=1))
        signs = rng.integers(0, 2, size=(size, n), dtype=np.int8) * 2 - 1
        extreme += int((np.abs((signs * diff).mean(axis=1)) >= abs(observed) - 1e-12).sum())
    low, high = np.percentile(np.concatenate(boots), [2.5, 97.5])
    return {"diff": observed, "ci_low": float(low), "ci_high": float(high),
            "p_value": (extreme + 1) / (resamples + 1), "users": n}
