"""The `nezha` command. This file only builds the top-level parser: each subcommand lives in its own module
of this package (`nezha/cli/<name>.py`, one `register(subparsers)` each)."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from nezha.config import ConfigError

# Subcommand modules in the order `nezha --help` lists them; each is imported only to register it.
SUBCOMMANDS = ("import_amazon", "synth", "prepare", "train", "evaluate", "recommend", "export", "experiment", "diagnose", "quickstart", "bench", "catalog")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nezha", description="NEZHA generative recommendation: "
                                     "data, training, evaluation, experiments, benchmarks, the live catalog.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"nezha.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        args.handler(args)
    except (ConfigError, ValueError, FileNotFoundError, KeyError) as exc:
        # Bad input is the user's to fix: say what is wrong, no stack trace (-v shows it).
        if args.verbose:
            raise
        print(f"nezha {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
