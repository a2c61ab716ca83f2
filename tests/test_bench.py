"""`nezha bench latency`: the latency bench end to end on the tiny preset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from nezha.bench import (
    BENCH_DECODERS,
    LatencyBenchConfig,
    format_latency_table,
    latency_ratios,
    run_latency_bench,
)
from nezha.cli import main
from nezha.verify import random_packed_ids

REQUIRED_RATIOS = {"nezha_over_prefill", "beam_over_nezha", "hf_over_nezha", "mtp_over_nezha", "verifier_share"}


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("bench")
    cfg = LatencyBenchConfig(backbone="tiny", batch=[1, 2], beam=[4], history=5, codebook_size=16, levels=3,
                             catalog_items=300, repeats=2, warmup=1, threads=1, json=str(out / "latency.json"),
                             plot=str(out / "latency.png"))
    return run_latency_bench(cfg), out


def test_latency_bench_writes_every_decoder_and_ratio(tiny_report):
    report, out = tiny_report
    written = json.loads((out / "latency.json").read_text())
    assert written["ratios"] == report["ratios"] and set(written["ratios_min"]) == set(written["ratios"])
    assert REQUIRED_RATIOS <= set(written["ratios"])
    assert all(isinstance(written["ratios"][k], float) and written["ratios"][k] > 0 for k in REQUIRED_RATIOS)
    assert set(written["latency_ms"]) == set(BENCH_DECODERS)
    for stats in written["latency_ms"].values():
        assert {"p50", "p99", "mean"} <= set(stats) and stats["n"] == 2
        assert 0 < stats["p50"] <= stats["p99"]
    assert [(r["batch"], r["beam"]) for r in written["results"]] == [(1, 4), (2, 4)]
    assert written["device"].startswith("cpu") and written["torch"] and written["config"]["backbone"] == "tiny"
    assert (out / "latency.png").stat().st_size > 0
    table = format_latency_table(written)
    assert "hf-beam-constrained" in table and "nezha_over_prefill" in table


def test_latency_cli_accepts_comma_lists(tmp_path, capsys):
    out = tmp_path / "cli.json"
    code = main(["bench", "latency", "--backbone", "tiny", "--batch", "1", "--beam", "2,3", "--history", "3",
                 "--codebook-size", "8", "--catalog-items", "50", "--decoders", "prefill,nezha,beam",
                 "--repeats", "1", "--warmup", "0", "--json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert [r["beam"] for r in report["results"]] == [2, 3]
    assert report["ratios"]["hf_over_nezha"] is None  # hf-beam was not asked for
    assert "batch 1, beam 3" in capsys.readouterr().out


def test_latency_bench_times_the_attention_transition(tmp_path):
    # rnn-attn's head also reads the history states: the prefill hands them on to the head and both decoders.
    out = tmp_path / "attn.json"
    assert main(["bench", "latency", "--backbone", "tiny", "--transition", "rnn-attn", "--batch", "2", "--beam", "3",
                 "--history", "3", "--codebook-size", "8", "--catalog-items", "50",
                 "--decoders", "prefill,head,nezha,nezha-rescore", "--repeats", "1", "--warmup", "0",
                 "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["config"]["transition"] == "rnn-attn"
    assert set(report["results"][0]["latency_ms"]) == {"prefill", "head", "nezha", "nezha-rescore"}


def test_latency_config_rejects_what_cannot_run():
    with pytest.raises(ValueError, match="must include"):
        LatencyBenchConfig(decoders=["beam"])
    with pytest.raises(ValueError, match="unknown decoder"):
        LatencyBenchConfig(decoders=["prefill", "nezha", "greedy"])
    with pytest.raises(ValueError, match="do not fit"):
        LatencyBenchConfig(codebook_size=4, levels=2, catalog_items=17)


def test_ratios_and_catalog_are_what_they_say():
    lat = {"prefill": {"p50": 10.0}, "nezha": {"p50": 11.0}, "hf-beam": {"p50": 44.0}}
    ratios = latency_ratios(lat, verifier_ms=0.55)
    assert ratios["nezha_over_prefill"] == pytest.approx(1.1)
    assert ratios["hf_over_nezha"] == pytest.approx(4.0)
    assert ratios["verifier_share"] == pytest.approx(0.05)
    assert ratios["beam_over_nezha"] is None
    ids = random_packed_ids(100, [4, 4, 8], np.random.default_rng(0))
    assert len(np.unique(ids)) == 100 and ids.min() >= 0 and ids.max() < 128


# ---- serve -----------------------------------------------------------------------------------------------
