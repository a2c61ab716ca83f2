"""`nezha catalog push|status|add|remove`: the live catalog in Redis, from the command line.

Each action is one config dataclass (its fields are the flags, and the keys of `--config FILE.yaml`);
every error exits with `nezha catalog ACTION: error: ...`, never a stack trace.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import redis

from nezha.catalog import Catalog
from nezha.cli._common import add_command
from nezha.config import ConfigError, config_from_args
from nezha.live_catalog import (
    DEFAULT_FEED_MAXLEN,
    DEFAULT_PREFIX,
    META_FIELDS,
    REDIS_URL_ENV,
    CatalogStoreError,
    InvalidItemError,
    NewItem,
    NoCatalogError,
    RedisCatalog,
    add_new_items,
    codes_of,
    load_item_metadata,
    load_quantizer_for,
)
from nezha.semantic_ids.embed import embed_texts

log = logging.getLogger(__name__)


@dataclass
class CatalogStoreConfig:
    """Which catalog in Redis: the fields every `nezha catalog` action has."""

    redis_url: str | None = field(default=None, repr=False, metadata={
        "help": f"redis[s]://, redis[s]+sentinel:// or redis[s]+cluster:// URL (None: ${REDIS_URL_ENV})"})
    prefix: str = field(default=DEFAULT_PREFIX, metadata={"help": "key prefix"})
    feed_maxlen: int = field(default=DEFAULT_FEED_MAXLEN, metadata={"help": "change-feed cap"})

    def __post_init__(self) -> None:
        self.redis_url = self.redis_url or os.environ.get(REDIS_URL_ENV) or None
        if not self.redis_url:
            raise ConfigError(f"redis_url: not given: pass --redis-url URL or set {REDIS_URL_ENV}")
        if not self.prefix:
            raise ConfigError("prefix: must not be empty")
        if self.feed_maxlen < 1:
            raise ConfigError(f"feed_maxlen: must be >= 1, got {self.feed_maxlen}")

    def store(self) -> RedisCatalog:
        assert self.redis_url is not None  # __post_init__ made sure
        return RedisCatalog(self.redis_url, prefix=self.prefix, feed_maxlen=self.feed_maxlen)


@dataclass
class CatalogPushConfig(CatalogStoreConfig):
    """Load a checkpoint's catalog into Redis (replaces it; bumps the version)."""

    checkpoint: str | None = field(default=None, metadata={"help": "checkpoint directory (its catalog/ is pushed)"})
    if_empty: bool = field(default=False, metadata={"help": "only seed a prefix that holds no catalog yet"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.checkpoint:
            raise ConfigError("checkpoint: required (the checkpoint directory whose catalog/ is pushed)")


@dataclass
class CatalogStatusConfig(CatalogStoreConfig):
    """Version, size, feed length and persistence of the catalog in Redis."""


@dataclass
class CatalogAddConfig(CatalogStoreConfig):
    """Add items by explicit codes or by text (nearest free semantic ID)."""

    item_id: str | None = field(default=None, metadata={"help": "the new item's id"})
    codes: list[int] | None = field(default=None, metadata={
        "help": "comma-separated codes, one per level (e.g. 3,17,250)"})
    text: str | None = field(default=None, metadata={"help": "item text to embed and quantize into a new unique ID"})
    jsonl: str | None = field(default=None, metadata={
        "help": 'file of {"item_id": ..., "codes": [...]} or {"item_id": ..., "text": ...} lines'})
    checkpoint: str | None = field(default=None, metadata={
        "help": "checkpoint whose prepared dataset holds the quantizer (for --text)"})
    quantizer: str | None = field(default=None, metadata={"help": "quantizer.safetensors (instead of --checkpoint)"})
    embedding_model: str | None = field(default=None, metadata={
        "help": "local sentence-transformers folder (default: bundled)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.item_id and not self.jsonl:
            raise ConfigError("item_id: nothing to add: pass --item-id with --codes or --text, or --jsonl FILE")
        if not self.item_id and (self.codes is not None or self.text is not None):
            raise ConfigError("item_id: --codes and --text describe the item of --item-id, which is not given")


@dataclass
class CatalogRemoveConfig(CatalogStoreConfig):
    """Remove items by id."""

    item_ids: list[str] = field(default_factory=list, metadata={
        "help": "ids of the items to remove (also as positional ITEM_ID arguments)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.item_ids:
            raise ConfigError("item_ids: give at least one ITEM_ID to remove")


def _push(cfg: CatalogPushConfig) -> None:
    assert cfg.checkpoint is not None
    catalog = Catalog.load(Path(cfg.checkpoint) / "catalog")
    store = cfg.store()
    version = store.push(catalog, source=str(Path(cfg.checkpoint).resolve()), if_empty=cfg.if_empty,
                         item_meta=load_item_metadata(cfg.checkpoint, catalog))
    if version is None:
        print(f"{store.display_url} already holds a catalog under {store.prefix!r}: left unchanged (--if-empty)")
        return
    print(f"pushed {catalog.num_items} items (codebooks {list(catalog.codebook_sizes)}) to {store.display_url} "
          f"under {store.prefix!r}: version {version}")
    if store.durability() in ("none", "aof-no"):
        log.warning("Redis persistence is %s: a Redis restart loses catalog changes (see docs/serving.md)",
                    store.durability())


def _status(cfg: CatalogStatusConfig) -> None:
    print(json.dumps(cfg.store().status(), indent=2))


def _read_jsonl(path: str) -> list[NewItem]:
    items = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            row = json.loads(line)
            if not isinstance(row, dict):
                raise InvalidItemError(f"{path}:{n}: expected a JSON object")
            items.append(NewItem(str(row.get("item_id", "")), row.get("codes"), row.get("text"),
                                 {k: row[k] for k in META_FIELDS if k in row}))
    return items


def _add(cfg: CatalogAddConfig) -> None:
    store = cfg.store()
    items = _read_jsonl(cfg.jsonl) if cfg.jsonl else []
    if cfg.item_id:
        items.append(NewItem(cfg.item_id, cfg.codes, cfg.text))
    if not items:
        raise InvalidItemError(f"nothing to add: {cfg.jsonl} holds no items")
    sizes = store.codebook_sizes()
    if sizes is None:
        raise NoCatalogError(store.display_url, store.prefix)
    quantizer = load_quantizer_for(cfg.checkpoint, cfg.quantizer)

    def embed(texts: list[str]) -> np.ndarray:
        return embed_texts(texts, cfg.embedding_model, show_progress=False)

    version, pairs = add_new_items(store, items, sizes, quantizer, embed)
    for item_id, packed in pairs:
        print(f"added {item_id}: semantic ID {codes_of(packed, sizes)} ({packed})")
    print(f"catalog version {version}")


def _remove(cfg: CatalogRemoveConfig) -> None:
    version = cfg.store().remove(cfg.item_ids)
    print(f"removed {len(cfg.item_ids)} item(s); catalog version {version}")


def _action(cls: type, run: Callable[[Any], None]) -> Callable[[argparse.Namespace], None]:
    """The handler of one action: build its config, run it, and turn every store or config error into one line."""

    def handler(args: argparse.Namespace) -> None:
        if getattr(args, "item_id_args", None):  # `nezha catalog remove ITEM_ID...`, with any --item-ids a,b
            args.item_ids = [*(i for i in (args.item_ids or "").split(",") if i.strip()), *args.item_id_args]
        try:
            run(config_from_args(cls, args))
        except (ConfigError, CatalogStoreError, redis.RedisError) as exc:
            raise SystemExit(f"nezha catalog {args.catalog_command}: error: {exc}") from None

    return handler


ACTIONS: dict[str, tuple[type, Callable[[Any], None]]] = {
    "push": (CatalogPushConfig, _push),
    "status": (CatalogStatusConfig, _status),
    "add": (CatalogAddConfig, _add),
    "remove": (CatalogRemoveConfig, _remove),
}


def register(subparsers: Any) -> None:
    """Add `nezha catalog` with its sub-commands (one config dataclass each) to the `nezha` command."""
    parser = subparsers.add_parser("catalog", help="the live catalog in Redis: push, status, add, remove",
                                   description=__doc__)
    sub = parser.add_subparsers(dest="catalog_command", required=True, metavar="ACTION")
    for name, (cls, run) in ACTIONS.items():
        add_command(sub, name, cls, _action(cls, run))
    # Item ids to remove are also positional, as they always were: `nezha catalog remove OLD-1 OLD-2`.
    sub.choices["remove"].add_argument("item_id_args", nargs="*", metavar="ITEM_ID", help="items to remove")
