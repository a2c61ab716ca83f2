"""The HTTP load generator (`nezha bench serve`, and `python -m serve.loadtest` on top of it): bounds, loopback
only, the history sampler, and runs against a stub app."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from nezha.catalog import Catalog
from nezha.config import ConfigError
from nezha.loadgen import (
    ServeBenchConfig,
    catalog_windows,
    format_serve_table,
    run_level,
    run_serve_bench,
    sample_histories,
    summarize_level,
    validate_serve_config,
)


@pytest.mark.parametrize("url", ["http://10.0.0.1:8000", "https://127.0.0.1:8000", "http://example.com", "ftp://::1"])
def test_serve_bench_only_loads_loopback(url):
    with pytest.raises(ValueError, match="loopback"):
        validate_serve_config(ServeBenchConfig(url=url))


@pytest.mark.parametrize("change", [dict(concurrency=[0]), dict(concurrency=[]), dict(requests=0),
                                    dict(max_seconds=0), dict(k=0)])
def test_serve_bench_rejects_unbounded_or_empty_runs(change):
    with pytest.raises(ValueError):
        validate_serve_config(ServeBenchConfig(**change))
    validate_serve_config(ServeBenchConfig(url="http://localhost:9/"))


def test_summarize_level_counts_errors_and_throughput():
    level = summarize_level(4, [10.0, 20.0, 30.0], Counter({"200": 3, "503": 1, "TimeoutError": 1}), wall_s=2.0)
    assert (level["requests"], level["ok"], level["errors"]) == (5, 3, 2)
    assert level["throughput_rps"] == pytest.approx(1.5)
    assert level["p50_ms"] == pytest.approx(20.0) and level["mean_ms"] == pytest.approx(20.0)
    assert level["statuses"] == {"200": 3, "503": 1, "TimeoutError": 1}
    empty = summarize_level(1, [], Counter({"ConnectionRefusedError": 2}), wall_s=0.1)
    assert empty["ok"] == 0 and "p50_ms" not in empty


def test_sample_histories_are_distinct_and_capped():
    ids = [f"I{i}" for i in range(6)]
    histories = catalog_windows(ids, 5, 20, np.random.default_rng(0))
    assert len(histories) == 5 and all(sorted(h) == sorted(ids) for h in histories)


def test_summarize_level_reports_what_the_app_measured():
    level = summarize_level(2, [10.0, 30.0], Counter({"200": 2}), wall_s=1.0, server_ms=[4.0, 6.0],
                            batch_sizes=[1, 2])
    assert level["server_p50_ms"] == pytest.approx(5.0) and level["mean_batch_size"] == pytest.approx(1.5)
    assert level["p90_ms"] == pytest.approx(28.0)  # percentiles from nezha.timing.latency_stats


def _checkpoint_of(prepared: Path, directory: Path) -> Path:
    """A folder that reads as a checkpoint trained on `prepared` (its meta and catalog; no real weights)."""
    directory.mkdir(parents=True)
    (directory / "model.safetensors").write_bytes(b"")
    (directory / "nezha.json").write_text(json.dumps({"extra": {"prepared": str(prepared)}}))
    Catalog.load(prepared / "catalog").save(directory / "catalog")
    return directory


def test_sample_histories_are_real_test_split_histories(tiny_prepared, tmp_path):
    from nezha.data.split import Split

    catalog = Catalog.load(tiny_prepared / "catalog")
    test = Split.load(tiny_prepared / "split.npz").test
    real = {tuple(catalog.item_ids[i] for i in h[-3:]) for h in test.histories}
    histories = sample_histories(_checkpoint_of(tiny_prepared, tmp_path / "ckpt"), 10, 3, np.random.default_rng(0))
    assert len(histories) == min(10, len(test.histories))
    assert all(tuple(h) in real and len(set(h)) == len(h) <= 3 for h in histories)
    # Without a prepared dataset (a folder with only the catalog): windows of the catalog.
    catalog.save(tmp_path / "bare" / "catalog")
    windows = sample_histories(tmp_path / "bare", 4, 3, np.random.default_rng(0))
    assert len(windows) == 4 and all(len(set(w)) == 3 and set(w) <= set(catalog.item_ids) for w in windows)


class _StubApp(BaseHTTPRequestHandler):
    """Answers POST /v1/recommend like the app (after `delay_s`); every 4th request gets a 503."""

    seen: list[dict] = []
    lock = threading.Lock()
    delay_s = 0.0

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.lock:
            self.seen.append(body)
            status = 503 if len(self.seen) % 4 == 0 else 200
        time.sleep(self.delay_s)
        payload = json.dumps({"items": [{"item_id": body["history"][0], "score": -1.0}], "latency_ms": 2.5,
                              "batch": {"id": 0, "size": 2}}).encode()
        self.send_response(status if self.path == "/v1/recommend" else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def stub_url() -> Iterator[str]:
    _StubApp.seen = []
    _StubApp.delay_s = 0.0
    server = ThreadingHTTPServer(("127.0.0.1", 0), _StubApp)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_serve_bench_end_to_end_against_a_stub_app(stub_url, tmp_path):
    catalog = Catalog([f"I{i:02d}" for i in range(30)], np.stack([np.arange(30) % 5, np.arange(30) // 5], 1),
                      (5, 6), [f"item {i}" for i in range(30)])
    catalog.save(tmp_path / "ckpt" / "catalog")
    cfg = ServeBenchConfig(checkpoint=str(tmp_path / "ckpt"), url=stub_url, concurrency=[1, 3], requests=12,
                           warmup=1, history=4, k=3, offline_batch=0, json=str(tmp_path / "serve.json"))
    report = run_serve_bench(cfg)
    assert [lv["concurrency"] for lv in report["levels"]] == [1, 3]
    for level in report["levels"]:
        assert level["requests"] == 12 and level["ok"] + level["errors"] == 12
        assert level["statuses"].get("503", 0) >= 2 and level["throughput_rps"] > 0
        assert level["server_p50_ms"] == pytest.approx(2.5) and level["mean_batch_size"] == pytest.approx(2.0)
    body = _StubApp.seen[0]
    assert body["k"] == 3 and len(body["history"]) == len(set(body["history"])) == 4
    assert set(body["history"]) <= set(catalog.item_ids)
    assert json.loads((tmp_path / "serve.json").read_text())["levels"] == report["levels"]
    assert "concurrency" in format_serve_table(report)


def test_serve_bench_times_the_offline_decoder_and_reports_the_ratio(stub_url, tiny_checkpoint):
    cfg = ServeBenchConfig(checkpoint=str(tiny_checkpoint), url=stub_url, concurrency=[2], requests=16, warmup=0,
                           history=4, k=3, offline_batch=8, beam=5)
    report = run_serve_bench(cfg)
    offline = report["offline"]
    assert offline["batch"] == 8 and offline["requests"] >= 16 and offline["throughput_rps"] > 0
    (level,) = report["levels"]
    assert level["ratio_to_offline"] == pytest.approx(level["throughput_rps"] / offline["throughput_rps"])
    table = format_serve_table(report)
    assert "offline batched decode (nezha, batch 8, beam 5)" in table and "ratio" in table


def test_serve_bench_says_when_no_app_answers(tmp_path):
    catalog = Catalog(["a", "b"], np.array([[0, 0], [1, 0]]), (2, 2), ["a", "b"])
    catalog.save(tmp_path / "catalog")
    with pytest.raises(ValueError, match="is the app running"):
        run_serve_bench(ServeBenchConfig(checkpoint=str(tmp_path), url="http://127.0.0.1:9", warmup=1,
                                         max_seconds=2, timeout_s=1, offline_batch=0))


def test_run_level_stops_at_its_time_bound(stub_url):
    _StubApp.delay_s = 0.2
    start = time.perf_counter()
    level = run_level(stub_url, [b'{"history": ["a"], "k": 1}'], concurrency=2, max_requests=1000, max_seconds=0.5,
                      timeout_s=5)
    assert time.perf_counter() - start < 2.0 and 2 <= level["requests"] <= 8  # far below 1000
    assert level["requests"] == len(_StubApp.seen)


def test_loadtest_config_takes_the_same_flags_and_refuses_non_loopback():
    from nezha.config import parse_config
    from serve.loadtest import LoadTestConfig, _joined_lists

    argv = ["--checkpoint", "ck", "--replicas", "1", "2", "--requests", "50", "--concurrency", "4", "--k", "5"]
    cfg = parse_config(LoadTestConfig, _joined_lists(argv))
    assert (cfg.replicas, cfg.requests, cfg.concurrency, cfg.k, cfg.url) == ([1, 2], 50, 4, 5, None)
    bench = cfg.bench("http://127.0.0.1:8000")
    assert (bench.concurrency, bench.requests, bench.history, bench.warmup) == ([4], 50, 20, 20)
    with pytest.raises(ConfigError, match="loopback"):
        LoadTestConfig(url="http://10.0.0.1:8000")
    with pytest.raises(ConfigError, match="replicas"):
        LoadTestConfig(replicas=[0])
    with pytest.raises(ConfigError):
        LoadTestConfig(requests=0)


def test_loadtest_against_a_running_app_uses_the_generator(stub_url, tmp_path, capsys):
    from serve.loadtest import main

    catalog = Catalog([f"I{i:02d}" for i in range(30)], np.stack([np.arange(30) % 5, np.arange(30) // 5], 1),
                      (5, 6), [f"item {i}" for i in range(30)])
    catalog.save(tmp_path / "ckpt" / "catalog")
    main(["--url", stub_url, "--checkpoint", str(tmp_path / "ckpt"), "--requests", "8", "--concurrency", "2",
          "--warmup", "1", "--history-len", "4", "--json", str(tmp_path / "load.json")])
    out = capsys.readouterr().out
    assert "replicas ?: " in out and "(server p50 2.5 ms, mean batch 2.00)" in out
    (result,) = json.loads((tmp_path / "load.json").read_text())
    assert result["requests"] == 8 and result["concurrency"] == 2 and result["replicas"] is None
    assert len(_StubApp.seen) == 9 and all(len(b["history"]) == 4 for b in _StubApp.seen)  # 1 warm-up + 8
