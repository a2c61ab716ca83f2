"""`nezha evaluate`: quality and latency of a checkpoint's decoders on the validation or test split."""

from __future__ import annotations

from typing import Any

from nezha.cli._common import add_command, report_handler
from nezha.evaluation import EvalConfig, evaluate, format_table


def register(subparsers: Any) -> None:
    add_command(subparsers, "evaluate", EvalConfig,
                report_handler(EvalConfig, evaluate, format_table, lambda cfg: [cfg.json]))
