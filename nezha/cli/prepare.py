"""`nezha prepare`: embeddings, unique semantic IDs and the leave-one-out split of a dataset."""

from __future__ import annotations

import argparse
from typing import Any

from nezha.cli._common import add_command
from nezha.config import config_from_args
from nezha.prepare import PrepareConfig, prepare


def run(args: argparse.Namespace) -> None:
    result = prepare(config_from_args(PrepareConfig, args))
    s = result.summary
    ids = s["semantic_ids"]
    print(f"{'reused' if result.cached else 'prepared'} {result.out_dir}: {s['num_items']} items, "
          f"{s['num_users']} users, codebooks {s['codebook_sizes']}, collision rate "
          f"{ids['raw_collision_rate']:.4f} -> {ids.get('final_collision_rate', 0.0):.4f}, split {s['split_sizes']}, "
          f"{s['timings']['total_s']:.1f} s")


def register(subparsers: Any) -> None:
    add_command(subparsers, "prepare", PrepareConfig, run)
