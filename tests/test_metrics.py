"""Hit@K / NDCG@K, the popularity floor and the paired significance test."""


import numpy as np
import pytest

from nezha.metrics import hit_ndcg, metrics_from_ranks, paired_difference, target_ranks


def test_popularity_ranking_and_metrics_by_hand():
    from nezha.metrics import popularity_ranking, target_ranks

    ranking = popularity_ranking([np.array([2, 2, 1, 0, 0]), np.array([3, 1, 3])], num_items=4, holdout=2)
    # counts without the last 2 per user: item 2 twice, items 1 and 3 once (tie: smaller index first)
    assert ranking.tolist() == [2, 1, 3, 0]
    ranked = np.array([[5, 7, 9], [9, 8, -1], [1, 2, 3]])
    assert target_ranks(ranked, np.array([7, 9, 4])).tolist() == [1, 0, -1]
    m = hit_ndcg(ranked, np.array([7, 9, 4]), ks=(1, 2))
    assert m["hit@1"] == pytest.approx(1 / 3) and m["hit@2"] == pytest.approx(2 / 3)
    assert m["ndcg@2"] == pytest.approx((1 / np.log2(3) + 1) / 3)


def test_paired_difference_detects_a_real_gap_and_not_a_null_one() -> None:
    rng = np.random.default_rng(0)
    base = rng.random(4000) < 0.05
    better = base | (rng.random(4000) < 0.03)
    gap = paired_difference(better.astype(float), base.astype(float), resamples=2000)
    assert gap["diff"] > 0 and gap["ci_low"] > 0 and gap["p_value"] < 0.01
    same = paired_difference(base.astype(float), rng.permutation(base).astype(float), resamples=2000)
    assert same["ci_low"] < 0 < same["ci_high"] or same["diff"] == 0
    assert same["p_value"] > 0.05


def test_metrics_from_ranks_equals_hit_ndcg_on_the_ranked_lists():
    ranked = np.array([[5, 7, 9], [9, 8, -1], [1, 2, 3]])
    targets = np.array([7, 9, 4])
    assert metrics_from_ranks(target_ranks(ranked, targets), ks=(1, 2)) == hit_ndcg(ranked, targets, ks=(1, 2))


def test_paired_difference_refuses_mismatched_inputs():
    with pytest.raises(ValueError, match="equal-length"):
        paired_difference(np.ones(3), np.ones(4))
