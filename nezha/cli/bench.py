"""`nezha bench latency` (decoder latency against one prefill), `nezha bench serve` (HTTP load) and
`nezha bench catalog` (verifier cost against catalog size)."""

from __future__ import annotations

import argparse

from nezha.bench import LatencyBenchConfig, format_latency_table, run_latency_bench
from nezha.catalog_bench import CatalogBenchConfig, bench_catalog, format_catalog_table
from nezha.cli._common import add_command, report_handler
from nezha.data_bench import DataBenchConfig, format_data_table, run_data_bench
from nezha.loadgen import ServeBenchConfig, format_serve_table, run_serve_bench


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `nezha bench latency`, `nezha bench serve` and `nezha bench catalog`."""
    bench = subparsers.add_parser("bench", help="decoder latency and serving throughput benchmarks",
                                  description=__doc__)
    sub = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    add_command(sub, "latency", LatencyBenchConfig, report_handler(
        LatencyBenchConfig, run_latency_bench, format_latency_table, lambda cfg: [cfg.json, cfg.plot]))
    add_command(sub, "serve", ServeBenchConfig, report_handler(
        ServeBenchConfig, run_serve_bench, format_serve_table, lambda cfg: [cfg.json]))
    add_command(sub, "catalog", CatalogBenchConfig, report_handler(
        CatalogBenchConfig, bench_catalog, format_catalog_table, lambda cfg: [cfg.json]))
    add_command(sub, "data", DataBenchConfig, report_handler(
        DataBenchConfig, run_data_bench, format_data_table, lambda cfg: [cfg.json]))
