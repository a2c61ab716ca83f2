"""Device choice and device names (nezha/device.py)."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest
import torch

from nezha import device as device_module
from nezha.device import cpu_model, device_name, resolve_device

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is visible")


def test_a_named_device_is_taken_as_asked() -> None:
    assert resolve_device("cpu") == torch.device("cpu")


def test_auto_takes_no_gpu_the_scheduler_did_not_grant() -> None:
    assert resolve_device("auto", gpu_granted=False).type == "cpu"


@needs_no_gpu
def test_auto_is_the_cpu_when_no_gpu_is_visible() -> None:
    assert resolve_device("auto").type == "cpu"


@needs_no_gpu
@pytest.mark.parametrize("name", ["cuda", "cuda:0"])
def test_asking_for_a_gpu_without_one_is_an_error(name: str) -> None:
    with pytest.raises(ValueError, match=f"device '{name}' asked for, but no CUDA GPU is visible"):
        resolve_device(name)


@needs_gpu
def test_auto_is_the_gpu_when_one_is_visible_and_granted() -> None:
    assert resolve_device("auto").type == "cuda"
    assert device_name(torch.device("cuda")) == torch.cuda.get_device_name(torch.device("cuda"))


def test_the_cpu_name_says_the_model_and_the_threads() -> None:
    assert device_name(torch.device("cpu")) == f"cpu ({cpu_model()}, {torch.get_num_threads()} threads)"


def test_the_cpu_model_is_read_from_proc_cpuinfo(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: Acme\nmodel name\t: Acme Zen 9000 @ 3.0GHz\nflags\t: fpu\n")
    monkeypatch.setattr(device_module, "Path", lambda _: cpuinfo)
    assert cpu_model() == "Acme Zen 9000 @ 3.0GHz"


def test_without_proc_cpuinfo_the_cpu_model_comes_from_platform(monkeypatch: pytest.MonkeyPatch,
                                                                  tmp_path: Path) -> None:
    monkeypatch.setattr(device_module, "Path", lambda _: tmp_path / "absent")
    assert cpu_model() == (platform.processor() or platform.machine())
