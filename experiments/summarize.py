"""Recompute an experiment's summary.json, results.md and curves.png from its files alone: the committed
copy under results/ (experiment.json, runs/*/result.json + ranks.npz, width_sweep.json) or a grid's out
directory. No checkpoint and no dataset is read.

    python experiments/summarize.py results/beauty-main
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nezha.config import ConfigError
from nezha.experiment import summarize_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directories", nargs="+", help="experiment directories, e.g. results/beauty-main")
    args = parser.parse_args(argv)
    for directory in args.directories:
        try:
            summary = summarize_dir(directory)
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"{directory}: {summary['runs']} runs -> {Path(directory) / 'summary.json'}, results.md, curves.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
