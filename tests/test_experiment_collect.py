"""The committed copy of an experiment (experiments/collect.sh) recomputes the same summary on its own."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_tiny_dataset

from nezha.config import ConfigError
from nezha.experiment import ExperimentConfig, run_experiment, summarize_dir

REPO = Path(__file__).resolve().parents[1]


def test_the_collected_copy_recomputes_the_same_summary(tmp_path: Path) -> None:
    write_tiny_dataset(tmp_path / "data" / "tiny")
    cfg = ExperimentConfig(
        out=str(tmp_path / "runs" / "exp" / "g"), prepared_root=str(tmp_path / "prepared"),
        data_dir=str(tmp_path / "data"), datasets={"tiny": {"dataset": "tiny", "codebook_size": 6}},
        methods={"nezha": {"train": {"objectives": ["nezha"]}}, "beam": {"train": {"objectives": ["lm"]}}},
        seeds=[0, 1], beam=5, topk=5, resamples=100,
        train={"backbone": "tiny", "epochs": 1, "batch_size": 8, "lr": 3e-3, "eval_beam": 5})
    original = run_experiment(cfg)
    assert "seed_level" in original["datasets"]["tiny"]["nezha"]["vs_beam"]
    subprocess.run(["bash", str(REPO / "experiments" / "collect.sh"), "g", cfg.out], cwd=tmp_path, check=True,
                   capture_output=True)
    copy = tmp_path / "results" / "g"
    assert sorted(p.name for p in (copy / "runs").iterdir()) == [
        "tiny__beam__s0", "tiny__beam__s1", "tiny__nezha__s0", "tiny__nezha__s1"]
    assert {p.name for p in (copy / "runs" / "tiny__nezha__s0").iterdir()} == {"result.json", "ranks.npz"}
    shutil.rmtree(tmp_path / "runs")  # nothing of the grid's directory (checkpoints included) is left
    (copy / "summary.json").unlink()
    (copy / "results.md").unlink()

    recomputed = summarize_dir(copy)
    assert recomputed == json.loads(json.dumps(original))
    assert json.loads((copy / "summary.json").read_text()) == recomputed
    assert "| seeds (t) |" in (copy / "results.md").read_text()

    out = subprocess.run([sys.executable, str(REPO / "experiments" / "summarize.py"), str(copy)],
                         capture_output=True, text=True, check=True).stdout
    assert "4 runs" in out


def test_collected_run_files_are_not_git_ignored_and_grids_are() -> None:
    def ignored(path: str) -> bool:
        return subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO).returncode == 0

    assert not ignored("results/some-grid/runs/some__run__s0/ranks.npz")
    assert ignored("runs/exp/some-grid/runs/some__run__s0/ranks.npz")


def test_a_directory_without_runs_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no experiment.json"):
        summarize_dir(tmp_path)
    (tmp_path / "experiment.json").write_text(json.dumps({"baseline": "beam", "out": "/elsewhere"}))
    with pytest.raises(ConfigError, match="collect.sh"):
        summarize_dir(tmp_path)
