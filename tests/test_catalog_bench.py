"""`nezha bench catalog`: verifier build, change and snapshot costs on synthetic catalogs."""

from __future__ import annotations

import json
import os

import pytest

from nezha.catalog_bench import CatalogBenchConfig, format_catalog_table, run_catalog_bench
from nezha.cli import main
from nezha.config import ConfigError

MEASUREMENTS = ("change_ms", "served_ms", "pinned_ms", "snapshot_ms")


def test_catalog_bench_cli_writes_every_measurement_per_size(tmp_path, capsys):
    out = tmp_path / "catalog.json"
    code = main(["bench", "catalog", "--sizes", "500,2000", "--shapes", "16x16x16", "--reps", "5", "--batch", "20",
                 "--batch-reps", "3", "--sustained", "100", "--json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert [(r["shape"], r["items"]) for r in report["results"]] == [([16, 16, 16], 500), ([16, 16, 16], 2000)]
    for row in report["results"]:
        assert all(row[m]["n"] == 5 and 0 < row[m]["p50"] <= row[m]["p99"] for m in MEASUREMENTS)
        assert row["batch_ms"]["n"] == 3 and row["batch"] == 20
        # 100 changes of IDs the verifier has not seen: 5 updates of 20, timed per change
        assert row["sustained"]["changes"] == 100 and row["sustained"]["batch_ms"]["n"] == 5
        assert row["sustained"]["amortised_change_us"] > 0
        assert row["nbytes"]["ids"] == 8 * row["items"] and row["per_item_bytes_per_item"] == 8.0
        assert row["build_s"] > 0 and set(row["load_average_1m"]) == {"start", "end"}
    assert "16x16x16" in capsys.readouterr().out


def test_catalog_bench_stops_a_slow_measurement_at_its_budget():
    report = run_catalog_bench(sizes=(300,), shapes=((8, 8, 8),), reps=1000, batch=10, batch_reps=1000,
                               budget_s=0.0)
    row = report["results"][0]
    assert row["change_ms"]["n"] == row["batch_ms"]["n"] == 3  # the minimum, then the budget is spent
    assert "8x8x8" in format_catalog_table(report)


def test_catalog_bench_rejects_shapes_it_cannot_fill():
    with pytest.raises(ConfigError, match="256x256"):
        CatalogBenchConfig(shapes=["256x256x"])
    with pytest.raises(ConfigError, match="no free ID"):
        run_catalog_bench(sizes=(64,), shapes=((4, 4, 4),), reps=3)


def test_local_copy_bench_streams_changes_at_a_rate(tmp_path):
    """`python -m nezha.live_catalog_bench --local-only`: the replica's copy alone, then --rate changes/s
    applied a batch every 0.1 s for --seconds, with apply time and lag per batch."""
    from nezha.live_catalog_bench import main as live_bench

    out = tmp_path / "local.json"
    live_bench(["--sizes", "3000", "--shape", "64x64x64", "--local-only", "--rate", "200", "--seconds", "0.5",
                "--decode-backbone", "tiny", "--json", str(out)])
    row = json.loads(out.read_text())["rows"][0]
    assert row["items"] == 3000 and row["stream_batches"] == 5 and row["stream_rate"] == 200
    assert 0 <= row["stream_apply_p50_ms"] <= row["stream_apply_max_ms"]
    assert row["stream_lag_p99_ms"] >= row["stream_apply_p50_ms"] * 0.9  # a lag includes its own apply
    assert row["change_p50_ms"] is not None and row["valid_id_set_bytes_per_item"] > 0
    for phase in ("decode_idle", "decode_streaming"):  # decodes against the copy, idle and while it changes
        assert row[phase]["batch1"]["n"] >= 20 and row[phase]["batch32"]["p50_ms"] > 0


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="pinning the replica apart needs 2 CPUs")
def test_redis_bench_pins_the_replica_apart_from_redis_and_the_writer(tmp_path):
    """`python -m nezha.live_catalog_bench --pin-replica`: a real redis-server, a push, a stream of changes
    and a replica process that follows it on the last CPU alone while Redis and the writer use the others."""
    from nezha.live_catalog_bench import main as live_bench

    out = tmp_path / "redis.json"
    live_bench(["--sizes", "2000", "--shape", "64x64x64", "--rate", "100", "--seconds", "1", "--pin-replica",
                "--json", str(out)])
    row = json.loads(out.read_text())["rows"][0]
    cpus = sorted(os.sched_getaffinity(0))
    assert row["pinned"] == {"redis_and_writer_cpus": cpus[:-1], "replica_cpus": cpus[-1:]}
    assert row["replica_ran_on_cpus"] == cpus[-1:]
    assert row["items"] == 2000 and row["changes"] >= 90 and row["unapplied"] == 0
    assert row["resyncs_during_stream"] == 0 and 0 <= row["lag_p50_ms"] <= row["lag_max_ms"]
    assert row["push_s"] > 0 and row["add_by_text_ms"] > 0
    assert sorted(os.sched_getaffinity(0)) == cpus  # the bench gave this process its CPUs back
    with pytest.raises(SystemExit):
        live_bench(["--sizes", "2000", "--local-only", "--pin-replica"])
    with pytest.raises(ConfigError, match="add --redis true"):
        CatalogBenchConfig(pin_replica=True)
    os.sched_setaffinity(0, {cpus[0]})  # one CPU: nothing to pin the replica apart on
    try:
        with pytest.raises(ConfigError, match="needs at least 2 CPUs, this process may use 1"):
            CatalogBenchConfig(redis=True, pin_replica=True)
        with pytest.raises(SystemExit):
            live_bench(["--sizes", "2000", "--pin-replica"])
    finally:
        os.sched_setaffinity(0, set(cpus))


def test_decodes_leave_idle_time_at_a_busy_share_below_one():
    """`--decode-busy 0.5`: each decode is followed by a pause as long as it (a replica with idle time for its
    background work); 1, the default, decodes back to back. Out-of-range shares are refused."""
    import time

    from nezha.live_catalog import LocalCatalog
    from nezha.live_catalog_bench import _Decodes
    from nezha.live_catalog_bench import main as live_bench

    local = LocalCatalog({f"I{i}": i * 7 for i in range(300)}, (16, 16, 16))
    for busy, least_share in ((0.5, 2.0), (1.0, 1.0)):
        decodes = _Decodes("tiny", (16, 16, 16), local, busy=busy)
        start = time.perf_counter()
        decodes.run(least=5)
        wall = time.perf_counter() - start
        decoding = sum(sum(t) for t in decodes.times.values())
        assert wall >= least_share * decoding and all(len(t) == 5 for t in decodes.times.values())
        if busy == 1.0:
            assert wall < 1.5 * decoding + 0.5  # no pauses beyond the loop's own overhead
    for bad in (0.0, 1.5):
        with pytest.raises(ConfigError, match="decode_busy"):
            CatalogBenchConfig(decode_busy=bad)
        with pytest.raises(SystemExit):
            live_bench(["--sizes", "2000", "--decode-busy", str(bad)])
