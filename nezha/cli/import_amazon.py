"""`nezha import-amazon`: original Amazon review files -> a dataset directory for `nezha prepare`."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any

from nezha.cli._common import add_command
from nezha.config import ConfigError, config_from_args
from nezha.data.amazon import load_amazon_raw
from nezha.data.datasets import write_dataset


@dataclass
class ImportAmazonConfig:
    """Convert original Amazon Review files (reviews + metadata) into a dataset directory for `nezha prepare`."""

    reviews: str = field(default="", metadata={"help": "reviews file, JSON lines (.json or .json.gz)"})
    meta: str = field(default="", metadata={"help": "metadata file, JSON lines (.json or .json.gz)"})
    out: str = field(default="", metadata={"help": "dataset directory to write (items.jsonl, interactions.csv)"})
    k_core: int = field(default=5, metadata={"help": "keep users and items with at least this many reviews"})

    def __post_init__(self) -> None:
        missing = [name for name in ("reviews", "meta", "out") if not getattr(self, name)]
        if missing:
            raise ConfigError(f"{', '.join(missing)}: required; pass {' and '.join('--' + name for name in missing)}")
        if self.k_core < 1:
            raise ConfigError(f"k_core: must be >= 1, got {self.k_core}")


def run(args: argparse.Namespace) -> None:
    cfg = config_from_args(ImportAmazonConfig, args)
    ds = load_amazon_raw(cfg.reviews, cfg.meta, k_core=cfg.k_core)
    out = write_dataset(ds, cfg.out)
    print(f"wrote {out}: {ds.num_items} items, {ds.num_users} users, {ds.stats['num_interactions']} interactions "
          f"({ds.stats['unknown_item_interactions']} reviews of items without metadata dropped); "
          f"next: nezha prepare --dataset {out}")


def register(subparsers: Any) -> None:
    add_command(subparsers, "import-amazon", ImportAmazonConfig, run)
