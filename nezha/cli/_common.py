"""What every subcommand module uses: add a subcommand whose flags are a config dataclass's fields."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from nezha.config import add_config_arguments, config_from_args


def add_command(subparsers: Any, name: str, cls: type, handler: Callable[[argparse.Namespace], None]) -> None:
    """`nezha NAME` with one --flag per field of `cls` (and --config FILE.yaml); runs `handler(args)`."""
    doc = (cls.__doc__ or "").strip()
    parser = subparsers.add_parser(name, help=doc.splitlines()[0] if doc else None, description=doc)
    add_config_arguments(parser, cls)
    parser.set_defaults(handler=handler)


def report_handler(cls: type, run: Callable[[Any], Any], table: Callable[[Any], str],
                   outputs: Callable[[Any], list[str | None]]) -> Callable[[argparse.Namespace], None]:
    """A handler that builds `cls` from the flags, runs it, prints its table and where its files went."""

    def handler(args: argparse.Namespace) -> None:
        cfg = config_from_args(cls, args)
        print(table(run(cfg)))
        for path in outputs(cfg):
            if path:
                print(f"wrote {path}")

    return handler


def metrics_line(metrics: dict[str, Any]) -> str:
    return " ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.startswith(("hit@", "ndcg@")))
