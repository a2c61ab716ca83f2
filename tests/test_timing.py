"""Latency summaries and device-synchronised timing (nezha/timing.py) and device choice (nezha/device.py)."""

from __future__ import annotations

import pytest
import torch

from nezha.device import cpu_model, device_name, resolve_device
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


def test_device_choice_and_names():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto", gpu_granted=False).type == "cpu"  # a scheduler gave no GPU: never take one
    if not torch.cuda.is_available():
        assert resolve_device("auto").type == "cpu"
        with pytest.raises(ValueError, match="no CUDA GPU"):
            resolve_device("cuda")
    assert cpu_model() and device_name(torch.device("cpu")).startswith("cpu (")
