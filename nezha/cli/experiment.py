"""`nezha experiment`: a resumable grid of independent trainings + test evaluations, with a summary."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from nezha.cli._common import add_command
from nezha.config import config_from_args
from nezha.experiment import ExperimentConfig, run_experiment


def run(args: argparse.Namespace) -> None:
    cfg = config_from_args(ExperimentConfig, args)
    run_experiment(cfg)
    print((Path(cfg.out) / "results.md").read_text())
    print(f"wrote {cfg.out}/summary.json, results.md, curves.png")


def register(subparsers: Any) -> None:
    add_command(subparsers, "experiment", ExperimentConfig, run)
