"""A finished run gains the evaluation rows its method lists later, scored from its best checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import write_tiny_dataset

from nezha.config import ConfigError
from nezha.experiment import ExperimentConfig, run_experiment
from nezha.metrics import metrics_from_ranks


def one_run_grid(tmp_path: Path, data_root: Path, evals: dict, **overrides) -> ExperimentConfig:
    values = dict(
        out=str(tmp_path / "exp"), prepared_root=str(tmp_path / "prepared"), data_dir=str(data_root),
        datasets={"tiny": {"dataset": "tiny", "codebook_size": 6}},
        methods={"nezha": {"train": {"objectives": ["nezha"]}, "evals": evals}},
        seeds=[0], beam=5, topk=5, resamples=50, baselines=[],
        train={"backbone": "tiny", "epochs": 1, "batch_size": 8, "lr": 3e-3, "eval_beam": 5})
    values.update(overrides)
    return ExperimentConfig(**values)


def test_a_finished_run_is_scored_for_just_its_missing_rows(tmp_path: Path) -> None:
    write_tiny_dataset(tmp_path / "data" / "tiny")
    first = one_run_grid(tmp_path, tmp_path / "data", {"nezha": {"decoder": "nezha"}})
    run_experiment(first)
    run_dir = Path(first.out) / "runs" / "tiny__nezha__s0"
    before = json.loads((run_dir / "result.json").read_text())
    with np.load(run_dir / "ranks.npz") as stored:
        nezha_ranks = stored["nezha"].copy()
    weights = run_dir / "train" / "best" / "model.safetensors"
    trained_at = weights.stat().st_mtime_ns

    wider = one_run_grid(tmp_path, tmp_path / "data", {"nezha": {"decoder": "nezha"},
                                                       "nezha-noverify": {"decoder": "nezha", "verify": "none"}})
    summary = run_experiment(wider)
    after = json.loads((run_dir / "result.json").read_text())
    assert weights.stat().st_mtime_ns == trained_at  # not trained again
    assert after["finished_at"] == before["finished_at"] and after["rows"]["nezha"] == before["rows"]["nezha"]
    assert [a["rows"] for a in after["rows_added"]] == [["nezha-noverify"]]
    assert len(before["code"]["commit"]) == 40  # which code trained the run (this checkout's commit)
    with np.load(run_dir / "ranks.npz") as stored:
        assert sorted(stored.files) == ["nezha", "nezha-noverify"]
        np.testing.assert_array_equal(stored["nezha"], nezha_ranks)
        added = stored["nezha-noverify"]
    assert len(added) == after["test_users"]
    assert after["rows"]["nezha-noverify"]["verify"] == "none"
    assert after["rows"]["nezha-noverify"]["hit@5"] == pytest.approx(metrics_from_ranks(added)["hit@5"])
    assert set(summary["datasets"]["tiny"]) == {"nezha", "nezha-noverify"}
    assert not list(run_dir.glob("*.tmp*"))

    # A row on other users or another beam than the run's own rows is refused, not mixed in.
    other_beam = one_run_grid(tmp_path, tmp_path / "data", {"nezha": {}, "again": {"verify": "none"}}, beam=4)
    with pytest.raises(ConfigError, match="beam 5"):
        run_experiment(other_beam)
