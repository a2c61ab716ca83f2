"""`nezha evaluate`: the quality/latency table of every decoder, and its input checks."""

import json

import pytest

from nezha.evaluation import EvalConfig, evaluate, format_table


def test_evaluate_writes_the_table_and_json(tiny_checkpoint, tmp_path):
    out = tmp_path / "eval.json"
    report = evaluate(EvalConfig(checkpoint=str(tiny_checkpoint), beam=5, latency_requests=3, latency_batch=4,
                                 decoders=["nezha", "beam", "hf-beam", "hf-beam-constrained", "mtp", "popular"],
                                 json=str(out), progress=False))
    saved = json.loads(out.read_text())
    assert set(saved["decoders"]) == {"nezha", "beam", "hf-beam", "hf-beam-constrained", "mtp", "popular"}
    for name, entry in saved["decoders"].items():
        for key in ("hit@5", "hit@10", "ndcg@5", "ndcg@10", "invalid_rate", "device"):
            assert key in entry, (name, key)
        if name != "popular":
            assert entry["latency_ms"]["p99"] >= entry["latency_ms"]["p50"] > 0
    for name in ("nezha", "beam", "hf-beam-constrained", "mtp"):
        assert saved["decoders"][name]["invalid_rate"] == 0.0
    table = format_table(report)
    assert "nezha" in table and "popular" in table


def test_hf_rows_score_fewer_users_when_asked(tiny_checkpoint):
    report = evaluate(EvalConfig(checkpoint=str(tiny_checkpoint), beam=5, latency_requests=0, max_users=6,
                                 hf_max_users=3, decoders=["nezha", "hf-beam-constrained", "popular"],
                                 progress=False))
    users = {name: entry["users"] for name, entry in report["decoders"].items()}
    assert users == {"nezha": 6, "hf-beam-constrained": 3, "popular": 6}
    assert report["users"] == 6
    assert "hf-beam-constrained" in format_table(report)
    with pytest.raises(ValueError, match="hf_max_users"):
        EvalConfig(hf_max_users=-1)


def test_evaluate_rejects_bad_arguments(tiny_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="unknown decoder"):
        evaluate(EvalConfig(checkpoint=str(tiny_checkpoint), decoders=["greedy"]))
    with pytest.raises(ValueError, match="split"):
        evaluate(EvalConfig(checkpoint=str(tiny_checkpoint), split="train"))
    with pytest.raises(ValueError, match="not a nezha checkpoint"):
        evaluate(EvalConfig(checkpoint=str(tmp_path)))
