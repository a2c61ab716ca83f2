"""Wall-clock timing that waits for the GPU, and the percentile summary every latency report uses."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_ms(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """(fn(), its wall time in ms), with the device's queued work finished before and after."""
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, (time.perf_counter() - start) * 1000.0


def latency_stats(times_ms: Sequence[float]) -> dict[str, float]:
    """p50, p90, p99, mean, min and count of a list of latencies (ms)."""
    arr = np.asarray(times_ms, dtype=np.float64)
    if arr.size == 0:
        raise ValueError("no latencies to summarise")
    p50, p90, p99 = np.percentile(arr, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "mean": float(arr.mean()),
            "min": float(arr.min()), "n": int(arr.size)}
