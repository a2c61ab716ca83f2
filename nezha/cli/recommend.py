"""`nezha recommend`: top-K recommendations for every user of a file (or a prepared split), in this process.

The same with Ray Data (a pool of decoder actors): `python -m batch.run`, see docs/recommend.md.
"""

from __future__ import annotations

import argparse
from typing import Any

from nezha.cli._common import add_command
from nezha.config import config_from_args
from nezha.recommend import RecommendConfig, recommend_all


def run(args: argparse.Namespace) -> None:
    cfg = config_from_args(RecommendConfig, args)
    stats = recommend_all(cfg)
    print(stats.summary())
    print(f"wrote {cfg.out} and {cfg.skipped_path}")


def register(subparsers: Any) -> None:
    add_command(subparsers, "recommend", RecommendConfig, run)
    # The spelling; `in` cannot be a field name (a Python keyword).
    subparsers.choices["recommend"].add_argument("--in", dest="input", help="same as --input")
