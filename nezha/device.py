"""Which device to run on, and how to name it in a report."""

from __future__ import annotations

import platform
from pathlib import Path

import torch


def resolve_device(name: str = "auto", gpu_granted: bool = True) -> torch.device:
    """"auto": the GPU when there is one (and `gpu_granted`: a scheduler may hide none yet give none), else CPU."""
    if name == "auto":
        return torch.device("cuda" if gpu_granted and torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but no CUDA GPU is visible")
    return device


def cpu_model() -> str:
    """The CPU's marketing name on Linux (platform.processor() is often empty there)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({cpu_model()}, {torch.get_num_threads()} threads)"
