"""Seed-level statistics beside the user-level test, on synthetic per-user rank arrays."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from nezha.experiment import _paired, format_markdown
from nezha.metrics import seed_level_difference

USERS = 20000


def ranks_with_hit_rate(rate: float, rng: np.random.Generator, users: int = USERS) -> np.ndarray:
    """0-based ranks: a hit inside the top 10 with probability `rate`, else not returned (-1)."""
    return np.where(rng.random(users) < rate, rng.integers(0, 10, users), -1).astype(np.int16)


def grid_ranks(rates: list[float], seed: int) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {s: ranks_with_hit_rate(rate, rng) for s, rate in enumerate(rates)}


def test_a_real_difference_is_found_at_every_level():
    paired = _paired(grid_ranks([0.08] * 5, 1), grid_ranks([0.05] * 5, 2), resamples=1000)
    assert paired["hit@10"]["ci_low"] > 0 and paired["hit@10"]["p_value"] < 0.01
    t, boot = paired["seed_level"]["hit@10"]["t"], paired["seed_level"]["hit@10"]["bootstrap"]
    assert t["diff"] == pytest.approx(0.03, abs=0.005) and t["ci_low"] > 0 and t["p_value"] < 0.01
    assert boot["ci_low"] > 0
    assert t["ci_low_pct_of_baseline"] == pytest.approx(100 * t["ci_low"] / paired["seed_level"]["hit@10"]["baseline_mean"])
    assert 30 < t["ci_low_pct_of_baseline"] < 60  # about +0.03 on 0.05, less the CI's half width


def test_no_difference_is_not_found():
    paired = _paired(grid_ranks([0.06] * 5, 3), grid_ranks([0.06] * 5, 4), resamples=1000)
    for test in (paired["hit@10"], paired["seed_level"]["hit@10"]["t"], paired["seed_level"]["hit@10"]["bootstrap"]):
        assert test["ci_low"] < 0 < test["ci_high"]
    assert paired["seed_level"]["hit@10"]["t"]["p_value"] > 0.05


def test_seed_to_seed_variance_widens_only_the_seed_level_intervals():
    # Each seed's model differs from the baseline by a different amount (+3, -1, +3, -1, +1 points): over
    # 20,000 users the mean +1 point looks certain when the models are held fixed, not across seeds.
    row = grid_ranks([0.09, 0.05, 0.09, 0.05, 0.07], 5)
    paired = _paired(row, grid_ranks([0.06] * 5, 6), resamples=1000)
    assert paired["hit@10"]["ci_low"] > 0 and paired["hit@10"]["p_value"] < 0.05
    t, boot = paired["seed_level"]["hit@10"]["t"], paired["seed_level"]["hit@10"]["bootstrap"]
    assert t["ci_low"] < 0 < t["ci_high"] and t["p_value"] > 0.05
    assert boot["ci_high"] - boot["ci_low"] > 3 * (paired["hit@10"]["ci_high"] - paired["hit@10"]["ci_low"])
    assert "users" in paired["hit@10"]["covers"] and "seeds" in t["covers"] and "seeds and users" in boot["covers"]


def test_the_t_interval_is_the_textbook_one():
    per_seed = np.array([0.01, -0.02, 0.005, 0.0])
    a = np.repeat(per_seed[:, None], 3, axis=1) + 0.5  # every user of seed s differs by per_seed[s]
    result = seed_level_difference(a, np.full_like(a, 0.5), resamples=200)
    half = stats.t.ppf(0.975, 3) * per_seed.std(ddof=1) / 2
    assert result["t"]["ci_low"] == pytest.approx(per_seed.mean() - half)
    assert result["t"]["ci_high"] == pytest.approx(per_seed.mean() + half)
    assert result["per_seed"] == pytest.approx(per_seed.tolist())
    with pytest.raises(ValueError, match="seeds >= 2"):
        seed_level_difference(a[:1], a[:1])


def test_one_seed_has_no_seed_level_test_and_the_table_labels_each_test():
    one = _paired({0: ranks_with_hit_rate(0.05, np.random.default_rng(7))},
                  {0: ranks_with_hit_rate(0.05, np.random.default_rng(8))}, resamples=100)
    assert "seed_level" not in one
    three = _paired(grid_ranks([0.07] * 3, 9), grid_ranks([0.06] * 3, 10), resamples=100)
    entry = {"seeds": [0, 1, 2], "vs_beam": three, "invalid_rate": {"mean": 0.0, "std": 0.0},
             "best_epoch": {"mean": 3.0, "std": 0.0}, "train_minutes": {"mean": 1.0, "std": 0.0},
             **{m: {"mean": 0.05, "std": 0.01} for m in ("hit@5", "hit@10", "ndcg@5", "ndcg@10")}}
    text = format_markdown({"experiment": "x", "runs": 6, "beam": 10, "baselines": ["beam"],
                            "datasets": {"d": {"nezha": entry}}})
    for label in ("| users |", "| seeds (t) |", "| seeds + users (bootstrap) |"):
        assert label in text
