"""`nezha train`: one model (and/or its baselines' heads) on a prepared dataset, single process."""

from __future__ import annotations

import argparse
from typing import Any

from nezha.cli._common import add_command, metrics_line
from nezha.config import config_from_args
from nezha.training import TrainConfig, train


def run(args: argparse.Namespace) -> None:
    result = train(config_from_args(TrainConfig, args))
    print(f"best checkpoint: {result.best_checkpoint} (validation {metrics_line(result.best_metrics)})")


def register(subparsers: Any) -> None:
    add_command(subparsers, "train", TrainConfig, run)
