import csv
import dataclasses
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `tune/` is a top-level folder of the repo, not part of the installed package
    sys.path.insert(0, str(REPO))

from nezha.config import ConfigError, parse_config  # noqa: E402
from nezha.model.checkpoint import load_checkpoint  # noqa: E402
from tune.report import choose, mark_frontier  # noqa: E402
from tune.run import run_search  # noqa: E402
from tune.search import SCORE, SearchConfig, make_scheduler, plan_steps  # noqa: E402

QUICK = REPO / "tune" / "configs" / "quick.yaml"


def test_asha_rungs_sit_on_validations_and_never_stop_a_finished_trial():
    cfg = SearchConfig(epochs=1.0, batch_size=10, evaluations=4, asha_reduction_factor=2)
    total, every = plan_steps(cfg, num_train_examples=1000)
    assert (total, every) == (100, 25)
    scheduler = make_scheduler(cfg, total, every)
    scheduler.set_search_properties(SCORE, "max")
    validations = [25, 50, 75, 100]
    strong, weak = SimpleNamespace(trial_id="strong"), SimpleNamespace(trial_id="weak")
    for trial in (strong, weak):
        scheduler.on_trial_add(None, trial)
    for step in validations:
        assert scheduler.on_trial_result(None, strong, {"step": step, SCORE: 0.5}) == "CONTINUE"
    # equal at the rungs (kept), far worse at its last validation: still not stopped before the sweep
    for step, score in zip(validations, (0.5, 0.5, 0.5, 0.0), strict=True):
        assert scheduler.on_trial_result(None, weak, {"step": step, SCORE: score}) == "CONTINUE"
    late = SimpleNamespace(trial_id="late")
    scheduler.on_trial_add(None, late)
    assert scheduler.on_trial_result(None, late, {"step": 25, SCORE: 0.1}) == "STOP"  # pruned at the first rung


def test_plan_steps_needs_a_validation_before_the_last_step():
    with pytest.raises(ConfigError, match="ASHA needs a validation"):
        plan_steps(SearchConfig(max_steps=10, evaluations=1), num_train_examples=1000)


def test_choice_respects_the_budget_and_the_frontier_is_undominated():
    def row(width: int, ndcg: float, ms: float, within: bool = True) -> dict:
        return {"width": width, "ndcg@10": ndcg, "p50_ms": ms, "within_budget": within}

    rows = [row(5, 0.02, 1.0), row(10, 0.03, 2.0), row(20, 0.03, 3.0), row(50, 0.05, 9.0, within=False)]
    mark_frontier(rows)
    assert [r["frontier"] for r in rows] == [True, True, False, True]
    assert choose(rows)["width"] == 10  # best within budget; the tie with width 20 goes to the faster one
    assert choose([row(50, 0.05, 9.0, within=False)]) is None  # nothing meets the budget


def test_quick_search_end_to_end(tiny_prepared, tmp_path, ray_session):
    cfg = parse_config(SearchConfig, ["--config", str(QUICK), "--prepared", str(tiny_prepared),
                                      "--storage-path", str(tmp_path)])
    report = run_search(cfg)

    assert {t["transition"] for t in report.trials} == {"rnn", "none"}
    assert {t["status"] for t in report.trials} <= {"swept", "stopped by ASHA"}
    swept = {t["trial"] for t in report.trials if t["status"] == "swept"}
    assert swept, "the first trial at each ASHA rung always continues"
    with report.files["csv"].open() as f:
        table = list(csv.DictReader(f))
    assert sorted((r["trial"], int(r["width"])) for r in table) == sorted((t, w) for t in swept for w in (5, 10))
    for r in table:
        assert 0.0 <= float(r["ndcg@10"]) <= float(r["hit@10"]) <= 1.0 and float(r["p50_ms"]) > 0
    md = report.files["md"].read_text()
    assert "**Ship:**" in md and all(t["trial"] in md for t in report.trials)
    assert "measured after the search" in md  # latencies come from the driver's quiet pass, not the trials
    assert report.files["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    chosen = report.chosen
    assert chosen in report.rows and chosen["trial"] in swept
    assert chosen["ndcg@10"] == max(r["ndcg@10"] for r in report.rows)
    assert load_checkpoint(chosen["checkpoint"]).config.transition == chosen["transition"]

    with pytest.raises(ConfigError, match="--resume"):
        run_search(cfg)
    resumed = run_search(dataclasses.replace(cfg, resume=True))  # finished trials are not trained again
    assert [(r["trial"], r["width"], r["ndcg@10"]) for r in resumed.rows] == \
        [(r["trial"], r["width"], r["ndcg@10"]) for r in report.rows]


@pytest.mark.slow
def test_search_over_the_distributed_trainer(tiny_prepared, tmp_path, ray_session):
    """trainer: ray makes each trial a 2-worker DeepSpeed job whose validations reach Tune (and ASHA)."""
    cfg = parse_config(SearchConfig, ["--config", str(QUICK), "--prepared", str(tiny_prepared),
                                      "--storage-path", str(tmp_path), "--trainer", "ray",
                                      "--workers-per-trial", "2", "--cpus-per-trial", "0.5"])
    cfg = dataclasses.replace(cfg, name="quick-ray", transitions=["rnn"], widths=[5], max_concurrent_trials=1)
    report = run_search(cfg)

    [trial] = report.trials
    assert trial["status"] == "swept" and trial["steps"] == 8
    assert trial["best_val_ndcg@10"] >= 0.0  # Tune saw the Train job's validations (steps 4 and 8)
    [train_run] = [p for p in (tmp_path / "quick-ray" / "train").iterdir() if p.is_dir()]  # named by the trial
    assert sorted(p.name for p in train_run.glob("state_step*")) == ["state_step00000008"]  # keep_checkpoints 1
    assert load_checkpoint(report.chosen["checkpoint"]).config.transition == "rnn"


def test_trainer_must_be_single_or_ray():
    with pytest.raises(ConfigError, match="trainer: must be one of"):
        SearchConfig(trainer="fsdp")
