"""`nezha export`: a checkpoint as a Hugging Face model folder (see nezha/export.py)."""

from __future__ import annotations

import argparse
from typing import Any

from nezha.cli._common import add_command
from nezha.config import config_from_args
from nezha.export import ExportConfig, export_checkpoint


def run(args: argparse.Namespace) -> None:
    out = export_checkpoint(config_from_args(ExportConfig, args))
    print(f"exported to {out}: load it with transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}), "
          f"or with nezha (--checkpoint {out} to evaluate or serve, --backbone {out} to fine-tune)")


def register(subparsers: Any) -> None:
    add_command(subparsers, "export", ExportConfig, run)
