"""The live catalog in Redis: the source of truth for serving, read and written atomically.

Keys under one prefix P (default `nezha:catalog`):

    P:item2id   hash  item id -> packed semantic ID (decimal string)
    P:id2item   hash  packed semantic ID -> item id; its keys are the set of valid IDs
    P:version   int   bumped by every change (INCR, or SET under WATCH for a full push)
    P:meta      hash  codebook_sizes (JSON), epoch (random per push), source, pushed_at
    P:itemmeta  hash  item id -> JSON {title, brand, categories}
    P:feed      stream one entry per change, entry ID `<version>-0`, fields op (add|remove|reset), epoch
                and items (JSON [[item_id, packed, meta JSON], ...]; removals [[item_id, packed], ...]);
                capped with MAXLEN ~ feed_maxlen

Every change updates the maps, the version and the feed in one atomic step (a Lua script for add/remove,
WATCH + MULTI/EXEC for a full push), so a reader never sees a version whose feed entry or maps are
missing. Stream IDs equal versions, so a follower that knows version v reads from `v-0` and sees a gap
(trimmed feed, lost data) as a first entry other than v+1 (nezha/live_catalog/follower.py).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from nezha.catalog import Catalog
from nezha.live_catalog.errors import (
    CatalogStoreError,
    IdTakenError,
    ItemExistsError,
    ItemNotFoundError,
    NoCatalogError,
    StoreUnavailableError,
)
from nezha.live_catalog.metadata import ItemMeta, clean_meta
from nezha.live_catalog.store import DEFAULT_FEED_MAXLEN, DEFAULT_PREFIX, FeedEntry, check_unique

# ARGV[1] = feed maxlen, then item id / packed ID / metadata JSON triples. All checks happen before any
# write, so a rejected batch changes nothing; Redis runs the script atomically.
_ADD_LUA = """
if redis.call('EXISTS', KEYS[3]) == 0 then return {'nocatalog'} end
for i = 2, #ARGV, 3 do
  local current = redis.call('HGET', KEYS[1], ARGV[i])
  if current then return {'exists', ARGV[i], current} end
  local holder = redis.call('HGET', KEYS[2], ARGV[i + 1])
  if holder then return {'taken', ARGV[i], ARGV[i + 1], holder} end
end
local changes = {}
for i = 2, #ARGV, 3 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  redis.call('HSET', KEYS[2], ARGV[i + 1], ARGV[i])
  redis.call('HSET', KEYS[6], ARGV[i], ARGV[i + 2])
  changes[#changes + 1] = {ARGV[i], ARGV[i + 1], ARGV[i + 2]}
end
local version = redis.call('INCR', KEYS[3])
local epoch = redis.call('HGET', KEYS[5], 'epoch') or ''
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[1], version .. '-0', 'op', 'add', 'epoch', epoch,
           'items', cjson.encode(changes))
return {'ok', tostring(version)}
"""

# ARGV[1] = feed maxlen, then item ids.
_REMOVE_LUA = """
if redis.call('EXISTS', KEYS[3]) == 0 then return {'nocatalog'} end
for i = 2, #ARGV do
  if redis.call('HEXISTS', KEYS[1], ARGV[i]) == 0 then return {'missing', ARGV[i]} end
end
local changes = {}
for i = 2, #ARGV do
  local id = redis.call('HGET', KEYS[1], ARGV[i])
  redis.call('HDEL', KEYS[1], ARGV[i])
  redis.call('HDEL', KEYS[2], id)
  redis.call('HDEL', KEYS[6], ARGV[i])
  changes[#changes + 1] = {ARGV[i], id}
end
local version = redis.call('INCR', KEYS[3])
local epoch = redis.call('HGET', KEYS[5], 'epoch') or ''
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[1], version .. '-0', 'op', 'remove', 'epoch', epoch,
           'items', cjson.encode(changes))
return {'ok', tostring(version)}
"""


@dataclass(frozen=True)
class Snapshot:
    """The whole catalog at one version, as Redis held it."""

    version: int
    codebook_sizes: tuple[int, ...]
    items: dict[str, int]  # item id -> packed ID
    epoch: str
    run_id: str
    meta: dict[str, ItemMeta] = field(default_factory=dict)  # item id -> title/brand/categories


@dataclass(frozen=True)
class RemoteState:
    """Redis's version, epoch and run_id now: what a follower compares with its own to decide to resync."""

    version: int | None  # None: no catalog under the prefix
    epoch: str | None
    run_id: str


def redact_url(url: str) -> str:
    """The URL with any password (in the authority or a `password=` query option) replaced by ***."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        host = parts.hostname or ""
        if parts.port is not None:
            host = f"{host}:{parts.port}"
        netloc = f"{parts.username or ''}:***@{host}"
    query = urlencode([(k, "***" if k == "password" else v) for k, v in parse_qsl(parts.query, keep_blank_values=True)],
                      safe="*/")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


class RedisCatalog:
    """Atomic reads and writes of one catalog in Redis. Thread-safe (redis-py pools connections).

    Writes are never retried by the client: a retried script whose first attempt did run would report a
    false conflict, so a lost connection is reported to the caller instead.
    """

    def __init__(self, url: str, prefix: str = DEFAULT_PREFIX, feed_maxlen: int = DEFAULT_FEED_MAXLEN,
                 socket_timeout: float = 5.0) -> None:
        self.display_url = redact_url(url)
        self.prefix = prefix
        self.feed_maxlen = feed_maxlen
        self.client = redis.Redis.from_url(url, decode_responses=True, socket_connect_timeout=2.0,
                                           socket_timeout=socket_timeout, retry=Retry(NoBackoff(), 0))
        self.item2id, self.id2item = f"{prefix}:item2id", f"{prefix}:id2item"
        self.version_key, self.meta, self.feed = f"{prefix}:version", f"{prefix}:meta", f"{prefix}:feed"
        self.item_meta = f"{prefix}:itemmeta"  # item id -> JSON title/brand/categories
        self._add = self.client.register_script(_ADD_LUA)
        self._remove = self.client.register_script(_REMOVE_LUA)

    def close(self) -> None:
        self.client.close()

    def _unavailable(self, exc: Exception, what: str) -> StoreUnavailableError:
        return StoreUnavailableError(self.display_url, f"{type(exc).__name__}: {exc}", what)

    # ---- writes ----------------------------------------------------------------------------------------
    def push(self, catalog: Catalog, source: str = "", if_empty: bool = False,
             item_meta: Mapping[str, ItemMeta] | None = None) -> int | None:
        """Replace the catalog with `catalog` (maps, item metadata, meta, version+1, a `reset` feed entry)
        atomically. `item_meta`: title/brand/categories by item id (default: the catalog's titles).

        Idempotent in content; every push bumps the version so followers resync. With `if_empty`, only
        seeds a prefix that holds no catalog yet and returns None otherwise.
        """
        item2id = {item: str(int(p)) for item, p in zip(catalog.item_ids, catalog.packed.tolist(), strict=True)}
        id2item = {p: item for item, p in item2id.items()}
        titles = dict(zip(catalog.item_ids, catalog.titles, strict=True))
        item_meta = item_meta or {}
        meta_json = {item: json.dumps(clean_meta(item_meta.get(item) or {"title": titles[item]}))
                     for item in catalog.item_ids}
        epoch = uuid.uuid4().hex
        meta = {"codebook_sizes": json.dumps(list(catalog.codebook_sizes)), "epoch": epoch, "source": source,
                "pushed_at": f"{time.time():.3f}", "pushed_items": str(catalog.num_items)}
        try:
            with self.client.pipeline(transaction=True) as pipe:
                while True:
                    try:
                        pipe.watch(self.version_key)  # a concurrent add/remove/push makes EXEC fail: retry
                        current = pipe.get(self.version_key)
                        if if_empty and current is not None:
                            pipe.unwatch()
                            return None
                        version = int(current or 0) + 1
                        pipe.multi()
                        pipe.delete(self.item2id, self.id2item, self.meta, self.item_meta)
                        pipe.hset(self.item2id, mapping=item2id)
                        pipe.hset(self.id2item, mapping=id2item)
                        pipe.hset(self.item_meta, mapping=meta_json)
                        pipe.hset(self.meta, mapping=meta)
                        pipe.set(self.version_key, version)
                        pipe.xadd(self.feed, {"op": "reset", "items": "[]", "epoch": epoch}, id=f"{version}-0",
                                  maxlen=self.feed_maxlen, approximate=True)
                        pipe.execute()
                        return version
                    except redis.WatchError:
                        continue
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise self._unavailable(exc, "the push was not applied") from None

    def add(self, items: Sequence[tuple[str, int]], meta: Mapping[str, ItemMeta] | None = None) -> int:
        """Add (item id, packed ID) pairs with their metadata, all or none; returns the new version."""
        check_unique([i for i, _ in items], "item id")
        check_unique([p for _, p in items], "semantic ID")
        args: list[Any] = [self.feed_maxlen]
        for item_id, packed in items:
            args += [item_id, str(int(packed)), json.dumps(clean_meta((meta or {}).get(item_id)))]
        return self._run(self._add, args, "add")

    def remove(self, item_ids: Sequence[str]) -> int:
        """Remove items, all or none; returns the new version."""
        check_unique(list(item_ids), "item id")
        return self._run(self._remove, [self.feed_maxlen, *item_ids], "remove")

    def _run(self, script: Any, args: list[Any], what: str) -> int:
        keys = [self.item2id, self.id2item, self.version_key, self.feed, self.meta, self.item_meta]
        try:
            reply = script(keys=keys, args=args)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise self._unavailable(exc, f"the {what} was refused (if the connection dropped mid-request, "
                                         "check the catalog version before retrying)") from None
        status = reply[0]
        if status == "ok":
            return int(reply[1])
        if status == "nocatalog":
            raise NoCatalogError(self.display_url, self.prefix)
        if status == "exists":
            raise ItemExistsError(reply[1], int(reply[2]))
        if status == "taken":
            raise IdTakenError(reply[1], int(reply[2]), reply[3])
        if status == "missing":
            raise ItemNotFoundError(reply[1])
        raise CatalogStoreError(f"unexpected reply from the {what} script: {reply!r}")

    # ---- reads -----------------------------------------------------------------------------------------
    def snapshot(self) -> Snapshot | None:
        """The whole catalog at one version (read in one MULTI/EXEC), or None when there is none."""
        try:
            with self.client.pipeline(transaction=True) as pipe:
                pipe.get(self.version_key).hgetall(self.id2item).hgetall(self.meta).hgetall(self.item_meta)
                version, id2item, meta, item_meta, info = pipe.info("server").execute()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise self._unavailable(exc, "cannot read the catalog") from None
        if version is None:
            return None
        return Snapshot(version=int(version), codebook_sizes=tuple(json.loads(meta.get("codebook_sizes", "[]"))),
                        items={item: int(p) for p, item in id2item.items()}, epoch=meta.get("epoch", ""),
                        run_id=str(info.get("run_id", "")),
                        meta={item: json.loads(value) for item, value in item_meta.items()})

    def remote_state(self) -> RemoteState:
        try:
            with self.client.pipeline(transaction=False) as pipe:
                pipe.get(self.version_key).hget(self.meta, "epoch").info("server")
                version, epoch, info = pipe.execute()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise self._unavailable(exc, "cannot read the catalog version") from None
        return RemoteState(None if version is None else int(version), epoch, str(info.get("run_id", "")))

    def read_feed(self, after_version: int, block_ms: int | None, count: int = 1000) -> list[FeedEntry]:
        """Feed entries after `after_version` (waits up to block_ms for the first one; None: no wait)."""
        try:
            reply = self.client.xread({self.feed: f"{after_version}-0"}, count=count, block=block_ms)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise self._unavailable(exc, "cannot read the change feed") from None
        entries = []
        for _stream, messages in reply or []:
            for entry_id, fields in messages:
                # [item id, packed ID] (removals, and adds written before metadata existed) or [.., meta JSON]
                changes = json.loads(fields.get("items", "[]"))
                items = [(str(c[0]), int(c[1])) for c in changes]
                meta = {str(c[0]): json.loads(c[2]) for c in changes if len(c) > 2}
                entries.append(FeedEntry(int(entry_id.split("-")[0]), fields.get("op", ""), items,
                                         fields.get("epoch", ""), meta))
        return entries

    def used_ids(self) -> set[int]:
        try:
            return {int(p) for p in self.client.hkeys(self.id2item)}
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise self._unavailable(exc, "cannot read the IDs in use") from None

    def codebook_sizes(self) -> tuple[int, ...] | None:
        try:
            sizes = self.client.hget(self.meta, "codebook_sizes")
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise self._unavailable(exc, "cannot read the catalog") from None
        return tuple(json.loads(sizes)) if sizes else None

    def status(self) -> dict[str, Any]:
        """Version, size, feed length and persistence settings, as seen in Redis now."""
        try:
            with self.client.pipeline(transaction=True) as pipe:
                pipe.get(self.version_key).hlen(self.item2id).hgetall(self.meta).xlen(self.feed)
                version, size, meta, feed_len = pipe.execute()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise self._unavailable(exc, "cannot read the catalog status") from None
        return {"url": self.display_url, "prefix": self.prefix, "version": None if version is None else int(version),
                "size": int(size), "feed_length": int(feed_len), "epoch": meta.get("epoch"),
                "source": meta.get("source"), "codebook_sizes": json.loads(meta.get("codebook_sizes", "null")),
                "durability": self.durability()}

    def durability(self) -> str:
        """`aof-always`, `aof-everysec`, `aof-no`, `rdb-only` / `none`, or `unknown` where CONFIG is disabled."""
        try:
            config = self.client.config_get("appendonly") | self.client.config_get("appendfsync") \
                | self.client.config_get("save")
        except redis.ResponseError:  # managed Redis often renames/disables CONFIG
            return "unknown"
        if config.get("appendonly") == "yes":
            return f"aof-{config.get('appendfsync', 'everysec')}"
        return "rdb-only" if config.get("save") else "none"
