"""Ranking metrics for full-catalog generation with one relevant item per user, and the popularity floor."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

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


USER_COVERS = ("test users: the trained models held fixed (each user's metric averaged over the seeds), "
               "users resampled (bootstrap CI) or sign-flipped (p-value)")
SEED_T_COVERS = ("seeds: the per-seed mean differences (each over all test users), a paired t-test over seeds "
                 "with S − 1 degrees of freedom")
SEED_BOOTSTRAP_COVERS = "seeds and users: two-level bootstrap, seeds resampled, then the users within each drawn seed"


def seed_level_difference(a: np.ndarray, b: np.ndarray, resamples: int = 10000, seed: int = 0,
                          user_pool: int = 1000, chunk: int = 100) -> dict[str, Any]:
    """Row − baseline with the trained models as random draws: `a`, `b` are [S, U] per-user values of the
    same S ≥ 2 seeds on the same U users (row s of both: models trained with seed s).

    Returns the per-seed differences and two tests, each naming what it covers:
    - "t": mean of the S per-seed differences, its t-based 95% CI and the paired t-test p-value;
    - "bootstrap": a two-level bootstrap 95% CI: each of `resamples` draws picks S seeds with replacement
      and, for each, one of `user_pool` user-level bootstrap means of that seed's differences (users
      resampled with replacement), and averages them.
    """
    # Local: only the seed-level statistics need scipy.
    from scipy import stats

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.ndim != 2 or a.shape != b.shape or a.shape[0] < 2 or a.shape[1] == 0:
        raise ValueError(f"expected two equal [seeds >= 2, users >= 1] arrays, got shapes {a.shape} and {b.shape}")
    diff = a - b
    seeds, users = diff.shape
    per_seed = diff.mean(axis=1)
    mean = float(per_seed.mean())
    se = float(per_seed.std(ddof=1)) / np.sqrt(seeds)
    if se > 0:
        half = float(stats.t.ppf(0.975, seeds - 1)) * se
        p_value = float(2 * stats.t.sf(abs(mean) / se, seeds - 1))
    else:  # every seed the same difference
        half, p_value = 0.0, 1.0 if mean == 0 else 0.0
    rng = np.random.default_rng(seed)
    pool_size = min(resamples, user_pool)
    pool = np.empty((seeds, pool_size))
    for s in range(seeds):
        for first in range(0, pool_size, chunk):
            size = min(chunk, pool_size - first)
            pool[s, first : first + size] = diff[s][rng.integers(0, users, size=(size, users))].mean(axis=1)
    drawn_seeds = rng.integers(0, seeds, size=(resamples, seeds))
    drawn_users = rng.integers(0, pool_size, size=(resamples, seeds))
    low, high = np.percentile(pool[drawn_seeds, drawn_users].mean(axis=1), [2.5, 97.5])
    return {"per_seed": per_seed.tolist(), "baseline_mean": float(b.mean()),
            "t": {"covers": SEED_T_COVERS, "diff": mean, "ci_low": mean - half, "ci_high": mean + half,
                  "p_value": p_value, "seeds": seeds},
            "bootstrap": {"covers": SEED_BOOTSTRAP_COVERS, "diff": mean, "ci_low": float(low), "ci_high": float(high),
                          "resamples": resamples, "user_pool": pool_size, "seeds": seeds, "users": users}}
