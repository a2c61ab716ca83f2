"""Latency summaries and device-synchronised timing (nezha/timing.py)."""

from __future__ import annotations

import pytest
import torch

from nezha.timing import latency_stats, timed_ms


def test_latency_stats_percentiles_by_hand():
    stats = latency_stats([float(v) for v in range(1, 101)])
    assert stats["n"] == 100 and stats["min"] == 1.0 and stats["mean"] == pytest.approx(50.5)
    assert stats["p50"] == pytest.approx(50.5) and stats["p90"] == pytest.approx(90.1)
    assert stats["p99"] == pytest.approx(99.01)
    with pytest.raises(ValueError, match="no latencies"):
        latency_stats([])


def test_timed_ms_returns_the_value_and_a_positive_time():
    value, ms = timed_ms(lambda: torch.ones(3).sum().item(), torch.device("cpu"))
    assert value == 3.0 and ms > 0

