"""`nezha catalog push|status|add|remove`: the live catalog in Redis, from the command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import redis

from nezha.catalog import Catalog
from nezha.catalog_cli import (
    DEFAULT_FEED_MAXLEN,
    DEFAULT_PREFIX,
    REDIS_URL_ENV,
    CatalogStoreError,
    InvalidItemError,
    NewItem,
    NoCatalogError,
    RedisCatalog,
    add_new_items,
    codes_of,
    load_quantizer_for,
)

log = logging.getLogger(__name__)


def _store(args: argparse.Namespace) -> RedisCatalog:
    url = args.redis_url or os.environ.get(REDIS_URL_ENV)
    if not url:
        raise SystemExit(f"nezha catalog: error: pass --redis-url URL or set {REDIS_URL_ENV}")
    return RedisCatalog(url, prefix=args.prefix, feed_maxlen=args.feed_maxlen)


def _push(args: argparse.Namespace) -> None:
    catalog = Catalog.load(Path(args.checkpoint) / "catalog")
    store = _store(args)
    version = store.push(catalog, source=str(Path(args.checkpoint).resolve()), if_empty=args.if_empty)
    if version is None:
        print(f"{store.display_url} already holds a catalog under {store.prefix!r}: left unchanged (--if-empty)")
        return
    print(f"pushed {catalog.num_items} items (codebooks {list(catalog.codebook_sizes)}) to {store.display_url} "
          f"under {store.prefix!r}: version {version}")
    if store.durability() in ("none", "aof-no"):
        log.warning("Redis persistence is %s: a Redis restart loses catalog changes (see docs/serving.md)",
                    store.durability())


def _status(args: argparse.Namespace) -> None:
    print(json.dumps(_store(args).status(), indent=2))


def _add(args: argparse.Namespace) -> None:
    store = _store(args)
    items: list[NewItem] = []
    if args.jsonl:
        for n, line in enumerate(Path(args.jsonl).read_text().splitlines(), 1):
            if line.strip():
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise InvalidItemError(f"{args.jsonl}:{n}: expected a JSON object")
                items.append(NewItem(str(row.get("item_id", "")), row.get("codes"), row.get("text")))
    if args.item_id:
        codes = [int(c) for c in args.codes.split(",")] if args.codes else None
        items.append(NewItem(args.item_id, codes, args.text))
    if not items:
        raise InvalidItemError("nothing to add: pass --item-id with --codes or --text, or --jsonl FILE")
    sizes = store.codebook_sizes()
    if sizes is None:
        raise NoCatalogError(f"no catalog under {store.prefix!r}: run `nezha catalog push` first")
    quantizer = load_quantizer_for(args.checkpoint, args.quantizer)

    def embed(texts: list[str]) -> np.ndarray:
        from nezha.semantic_ids.embed import embed_texts

        return embed_texts(texts, args.embedding_model, show_progress=False)

    version, pairs = add_new_items(store, items, sizes, quantizer, embed)
    for item_id, packed in pairs:
        print(f"added {item_id}: semantic ID {codes_of(packed, sizes)} ({packed})")
    print(f"catalog version {version}")


def _remove(args: argparse.Namespace) -> None:
    version = _store(args).remove(args.item_ids)
    print(f"removed {len(args.item_ids)} item(s); catalog version {version}")


def _run(handler: Callable[[argparse.Namespace], None]) -> Callable[[argparse.Namespace], None]:
    def run(args: argparse.Namespace) -> None:
        try:
            handler(args)
        except (CatalogStoreError, redis.RedisError) as exc:
            raise SystemExit(f"nezha catalog {args.catalog_command}: error: {exc}") from None

    return run


def register(subparsers: Any) -> None:
    """Add `nezha catalog` with its sub-commands to the `nezha` command."""
    parser = subparsers.add_parser("catalog", help="the live catalog in Redis: push, status, add, remove",
                                   description=__doc__)
    sub = parser.add_subparsers(dest="catalog_command", required=True, metavar="ACTION")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--redis-url", help=f"redis:// or rediss:// URL (default: ${REDIS_URL_ENV})")
        p.add_argument("--prefix", default=DEFAULT_PREFIX, help=f"key prefix (default: {DEFAULT_PREFIX})")
        p.add_argument("--feed-maxlen", type=int, default=DEFAULT_FEED_MAXLEN, help="change-feed cap")

    push = sub.add_parser("push", help="load a checkpoint's catalog into Redis (replaces it; bumps the version)")
    common(push)
    push.add_argument("--checkpoint", required=True, help="checkpoint directory (its catalog/ is pushed)")
    push.add_argument("--if-empty", action="store_true", help="only seed a prefix that holds no catalog yet")
    push.set_defaults(handler=_run(_push))

    status = sub.add_parser("status", help="version, size, feed length and persistence of the catalog in Redis")
    common(status)
    status.set_defaults(handler=_run(_status))

    add = sub.add_parser("add", help="add items by explicit codes or by text (nearest free semantic ID)")
    common(add)
    add.add_argument("--item-id", help="the new item's id")
    add.add_argument("--codes", help="comma-separated codes, one per level (e.g. 3,17,250)")
    add.add_argument("--text", help="item text to embed and quantize into a new unique ID")
    add.add_argument("--jsonl", help='file of {"item_id": ..., "codes": [...]} or {"item_id": ..., "text": ...} lines')
    add.add_argument("--checkpoint", help="checkpoint whose prepared dataset holds the quantizer (for --text)")
    add.add_argument("--quantizer", help="quantizer.safetensors (instead of --checkpoint)")
    add.add_argument("--embedding-model", help="local sentence-transformers folder (default: bundled)")
    add.set_defaults(handler=_run(_add))

    remove = sub.add_parser("remove", help="remove items by id")
    common(remove)
    remove.add_argument("item_ids", nargs="+", metavar="ITEM_ID")
    remove.set_defaults(handler=_run(_remove))
