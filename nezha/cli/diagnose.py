"""`nezha diagnose`: per-level teacher-forced scores and hit splits of an experiment's runs (nezha/diagnosis.py)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from nezha.cli._common import add_command
from nezha.config import config_from_args
from nezha.diagnosis import DiagnoseConfig, diagnose


def run(args: argparse.Namespace) -> None:
    cfg = config_from_args(DiagnoseConfig, args)
    torch.set_num_threads(1)
    report = json.dumps(diagnose(Path(cfg.experiment), cfg.dataset, cfg.seed, cfg.methods, cfg.users), indent=2)
    if cfg.out:
        Path(cfg.out).write_text(report)
    else:
        print(report)


def register(subparsers: Any) -> None:
    add_command(subparsers, "diagnose", DiagnoseConfig, run)
