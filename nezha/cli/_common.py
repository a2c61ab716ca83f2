"""What every subcommand module uses: add a subcommand whose flags are a config dataclass's fields."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from nezha.config import add_config_arguments


def add_command(subparsers: Any, name: str, cls: type, handler: Callable[[argparse.Namespace], None]) -> None:
    """`nezha NAME` with one --flag per field of `cls` (and --config FILE.yaml); runs `handler(args)`."""
    doc = (cls.__doc__ or "").strip()
    parser = subparsers.add_parser(name, help=doc.splitlines()[0] if doc else None, description=doc)
    add_config_arguments(parser, cls)
    parser.set_defaults(handler=handler)


def metrics_line(metrics: dict[str, Any]) -> str:
    return " ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.startswith(("hit@", "ndcg@")))
