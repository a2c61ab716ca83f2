"""`nezha evaluate`: quality and latency of a checkpoint's decoders on the validation or test split."""

from __future__ import annotations

import argparse
from typing import Any

from nezha.cli._common import add_command
from nezha.config import config_from_args
from nezha.evaluation import EvalConfig, evaluate, format_table


def run(args: argparse.Namespace) -> None:
    cfg = config_from_args(EvalConfig, args)
    report = evaluate(cfg)
    print(format_table(report))
    if cfg.json:
        print(f"wrote {cfg.json}")


def register(subparsers: Any) -> None:
    add_command(subparsers, "evaluate", EvalConfig, run)
