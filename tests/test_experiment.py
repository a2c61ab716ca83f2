"""The experiment runner on a tiny grid: independent runs, selection by each method's decoder, resume, summary."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import write_tiny_dataset

from nezha.config import ConfigError
from nezha.experiment import (
    ExperimentConfig,
    Run,
    claim_run,
    grid,
    method_decoder,
    own_seed_warning,
    per_user,
    run_experiment,
)


def tiny_grid(tmp_path: Path, data_root: Path, **overrides) -> ExperimentConfig:
    values = dict(
        out=str(tmp_path / "exp"), prepared_root=str(tmp_path / "prepared"), data_dir=str(data_root),
        datasets={"tiny": {"dataset": "tiny", "codebook_size": 6}},
        methods={"nezha": {"train": {"objectives": ["nezha"]},
                           "evals": {"nezha": {"decoder": "nezha"}, "nezha-noverify": {"verify": "none"}}},
                 "beam": {"train": {"objectives": ["lm"]}},
                 "nezha-noph": {"train": {"objectives": ["nezha"], "placeholders": False}, "seeds": [0]}},
        seeds=[0, 1], beam=5, topk=5, resamples=200,
        width_sweep={"methods": ["nezha", "beam"], "widths": [2, 5], "batches": [1, 2], "latency_requests": 5},
        train={"backbone": "tiny", "epochs": 4, "batch_size": 8, "lr": 3e-3, "eval_beam": 5, "patience": 1})
    values.update(overrides)
    return ExperimentConfig(**values)


@pytest.fixture(scope="module")
def tiny_data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_tiny_dataset(root / "tiny")
    return root


def test_grid_runs_each_method_alone_resumes_and_summarises(tmp_path: Path, tiny_data_root: Path) -> None:
    cfg = tiny_grid(tmp_path, tiny_data_root)
    summary = run_experiment(cfg)
    out = Path(cfg.out)
    results = {p.parent.name: json.loads(p.read_text()) for p in out.glob("runs/*/result.json")}
    assert len(results) == 5
    for result in results.values():
        objectives = result["train_config"]["objectives"]
        assert len(objectives) == 1  # each method its own model, never the joint backbone
        assert result["selected_by"] == ("beam" if result["method"] == "beam" else "nezha")
        assert all(v["decoder"] == result["selected_by"] for v in result["validations"])
    assert results["tiny__nezha-noph__s0"]["train_config"]["placeholders"] is False
    table = summary["datasets"]["tiny"]
    assert set(table) == {"nezha", "nezha-noverify", "beam", "nezha-noph"}
    assert table["nezha"]["seeds"] == [0, 1] and table["nezha-noph"]["seeds"] == [0]
    assert "vs_beam" in table["nezha"] and "vs_beam" not in table["beam"]
    assert 0 < table["nezha"]["vs_beam"]["hit@10"]["p_value"] <= 1
    assert (out / "results.md").read_text().count("| nezha") >= 1
    assert (out / "curves.png").stat().st_size > 0
    sweep = summary["width_sweep"]["datasets"]["tiny"]
    assert sorted(sweep) == ["beam@2", "beam@5", "nezha@2", "nezha@5"]
    for row in sweep.values():
        assert set(row["latency_ms"]) == {"1", "2"} and row["latency_ms"]["1"]["p50"] > 0
        assert row["hit@10"] >= row["hit@5"]
    # width 5 = the grid's beam: the sweep re-scores the same checkpoint the same way
    assert sweep["nezha@5"]["ndcg@10"] == pytest.approx(json.loads(
        (out / "runs" / "tiny__nezha__s0" / "result.json").read_text())["rows"]["nezha"]["ndcg@10"])
    assert "Beam width sweep" in (out / "results.md").read_text()

    # A second call repeats nothing: the finished runs' files stay as they were.
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/result.json")}
    run_experiment(cfg)
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/result.json")} == stamps

    # An unfinished run (no result.json) is run again from scratch.
    (out / "runs" / "tiny__beam__s1" / "result.json").unlink()
    run_experiment(cfg)
    assert (out / "runs" / "tiny__beam__s1" / "result.json").is_file()


def test_grid_filter_and_parallel_workers(tmp_path: Path, tiny_data_root: Path) -> None:
    cfg = tiny_grid(tmp_path, tiny_data_root, only=["beam"], parallel=2)
    assert [r.name for r in grid(cfg)] == ["tiny__beam__s0", "tiny__beam__s1"]
    summary = run_experiment(cfg)  # two worker processes
    assert summary["datasets"]["tiny"]["beam"]["seeds"] == [0, 1]
    full = tiny_grid(tmp_path, tiny_data_root)
    assert [r.name for r in grid(full)] == ["tiny__nezha__s0", "tiny__beam__s0", "tiny__nezha__s1", "tiny__beam__s1",
                                            "tiny__nezha-noph__s0"]
    assert method_decoder({"train": {"objectives": ["joint"]}}) == "nezha"
    assert method_decoder({"train": {"objectives": "mtp"}}) == "mtp"


def test_a_run_claimed_by_a_live_process_is_left_to_it(tmp_path: Path, tiny_data_root: Path) -> None:
    """Two processes on one `out` never train one run twice: a live claim is respected, a dead one taken over,
    a finished run never claimed."""
    cfg = tiny_grid(tmp_path, tiny_data_root, seeds=[0], only=["tiny__nezha__s0"], width_sweep={})
    run = Run("tiny", "nezha", 0)
    runs_dir = Path(cfg.out) / "runs"
    runs_dir.mkdir(parents=True)
    live = runs_dir / f"{run.name}.claim"
    live.write_text(f"{socket.gethostname()} {os.getpid()}")  # this test's process: alive
    assert claim_run(cfg, run) is None
    run_experiment(cfg)
    assert not (runs_dir / run.name).exists()  # left to the live claimant
    dead = subprocess.Popen(["true"])
    dead.wait()
    live.write_text(f"{socket.gethostname()} {dead.pid}")
    run_experiment(cfg)
    assert (runs_dir / run.name / "result.json").is_file() and not live.exists()
    assert claim_run(cfg, run) is None and not live.exists()  # finished: nothing to claim


def test_bad_grid_is_refused(tmp_path: Path, tiny_data_root: Path) -> None:
    with pytest.raises(ConfigError, match="parallel"):
        tiny_grid(tmp_path, tiny_data_root, parallel=0)
    with pytest.raises(ConfigError, match="unknown key"):
        tiny_grid(tmp_path, tiny_data_root, methods={"x": {"trian": {}}})
    with pytest.raises(ConfigError, match="width_sweep.methods"):
        tiny_grid(tmp_path, tiny_data_root, width_sweep={"methods": ["greedy"]})


def test_per_user_metrics_match_the_definitions() -> None:
    ranks = np.array([0, 1, 9, 10, -1])
    assert per_user(ranks, "hit@10").tolist() == [1, 1, 1, 0, 0]
    np.testing.assert_allclose(per_user(ranks, "ndcg@10"), [1, 1 / np.log2(3), 1 / np.log2(11), 0, 0])


def test_a_method_with_its_own_seeds_keeps_them_and_only_says_so() -> None:
    """`--only big --seeds 1,2` on a method whose config lists `seeds: [0]` runs seed 0 (the method's own
    seeds win); the experiment warns, naming the method and how to run other seeds, before anything runs."""
    methods = {"nezha": {"train": {}}, "big": {"train": {}, "seeds": [0]}}
    cfg = ExperimentConfig(methods=methods, seeds=[1, 2], only=["big"])
    runs = grid(cfg)
    assert [r.name for r in runs] == ["beauty__big__s0"]
    warning = own_seed_warning(cfg, runs)
    assert warning is not None and "big runs its own seeds [0], not the grid's [1, 2]" in warning
    assert "methods.<name>.seeds" in warning
    assert own_seed_warning(ExperimentConfig(methods=methods, seeds=[0], only=["big"]), runs) is None  # the same seeds
    everything = ExperimentConfig(methods=methods, seeds=[1, 2])
    assert own_seed_warning(everything, grid(everything)) is None  # the whole grid: as configured
