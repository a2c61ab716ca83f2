"""The HTTP load generator (`nezha bench serve`): bounds, loopback only, and a run against a stub app."""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from nezha.catalog import Catalog
from nezha.loadgen import (
    ServeBenchConfig,
    format_serve_table,
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
    histories = sample_histories(ids, 5, 20, np.random.default_rng(0))
    assert len(histories) == 5 and all(sorted(h) == sorted(ids) for h in histories)


class _StubApp(BaseHTTPRequestHandler):
    """Answers POST /v1/recommend like the app; every 4th request gets a 503."""

    seen: list[dict] = []
    lock = threading.Lock()

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.lock:
            self.seen.append(body)
            status = 503 if len(self.seen) % 4 == 0 else 200
        payload = json.dumps({"items": [{"item_id": body["history"][0], "score": -1.0}]}).encode()
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
                           warmup=1, history=4, k=3, json=str(tmp_path / "serve.json"))
    report = run_serve_bench(cfg)
    assert [lv["concurrency"] for lv in report["levels"]] == [1, 3]
    for level in report["levels"]:
        assert level["requests"] == 12 and level["ok"] + level["errors"] == 12
        assert level["statuses"].get("503", 0) >= 2 and level["throughput_rps"] > 0
    body = _StubApp.seen[0]
    assert body["k"] == 3 and len(body["history"]) == len(set(body["history"])) == 4
    assert set(body["history"]) <= set(catalog.item_ids)
    assert json.loads((tmp_path / "serve.json").read_text())["levels"] == report["levels"]
    assert "concurrency" in format_serve_table(report)


def test_serve_bench_says_when_no_app_answers(tmp_path):
    catalog = Catalog(["a", "b"], np.array([[0, 0], [1, 0]]), (2, 2), ["a", "b"])
    catalog.save(tmp_path / "catalog")
    with pytest.raises(ValueError, match="is the app running"):
        run_serve_bench(ServeBenchConfig(checkpoint=str(tmp_path), url="http://127.0.0.1:9", warmup=1,
                                         max_seconds=2, timeout_s=1))
