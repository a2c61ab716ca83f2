"""`nezha synth`: a synthetic dataset (items + interactions as Parquet) for benchmarks and tests."""

from __future__ import annotations

import argparse
from typing import Any

from nezha.cli._common import add_command
from nezha.config import config_from_args
from nezha.synth import SynthConfig, synthesize


def run(args: argparse.Namespace) -> None:
    cfg = config_from_args(SynthConfig, args)
    s = synthesize(cfg)
    print(f"wrote {cfg.out}: {s['items']} items, {s['users']} users, {s['interactions']} interactions in "
          f"{s['parts']} part(s), {s['clusters']} clusters, {s['seconds']:.1f} s")


def register(subparsers: Any) -> None:
    add_command(subparsers, "synth", SynthConfig, run)
