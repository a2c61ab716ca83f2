"""`nezha bench latency` (decoder latency against one prefill) and `nezha bench serve` (HTTP load)."""

from __future__ import annotations

import argparse

from nezha.bench import LatencyBenchConfig, format_latency_table, run_latency_bench
from nezha.cli._common import add_command
from nezha.config import config_from_args
from nezha.loadgen import ServeBenchConfig, format_serve_table, run_serve_bench


def _latency(args: argparse.Namespace) -> None:
    cfg = config_from_args(LatencyBenchConfig, args)
    report = run_latency_bench(cfg)
    print(format_latency_table(report))
    for path in (cfg.json, cfg.plot):
        if path:
            print(f"wrote {path}")


def _serve(args: argparse.Namespace) -> None:
    cfg = config_from_args(ServeBenchConfig, args)
    report = run_serve_bench(cfg)
    print(format_serve_table(report))
    if cfg.json:
        print(f"wrote {cfg.json}")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `nezha bench latency` and `nezha bench serve`."""
    bench = subparsers.add_parser("bench", help="decoder latency and serving throughput benchmarks",
                                  description=__doc__)
    sub = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    add_command(sub, "latency", LatencyBenchConfig, _latency)
    add_command(sub, "serve", ServeBenchConfig, _serve)
