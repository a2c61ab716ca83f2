"""The live catalog in Redis (the source of truth for serving) and `nezha catalog push|status|add|remove`.

Keys under one prefix P (default `nezha:catalog`):

    P:item2id   hash  item id -> packed semantic ID (decimal string)
    P:id2item   hash  packed semantic ID -> item id; its keys are the set of valid IDs
    P:version   int   bumped by every change (INCR, or SET under WATCH for a full push)
    P:meta      hash  codebook_sizes (JSON), epoch (random per push), source, pushed_at
    P:feed      stream one entry per change, entry ID `<version>-0`, fields op (add|remove|reset), epoch
                and items (JSON [[item_id, packed], ...]); capped with MAXLEN ~ feed_maxlen

Every change updates the maps, the version and the feed in one atomic step (a Lua script for add/remove,
WATCH + MULTI/EXEC for a full push), so a reader never sees a version whose feed entry or maps are
missing. Stream IDs equal versions, so a follower that knows version v reads from `v-0` and sees a gap
(trimmed feed, lost data) as a first entry other than v+1. The serving side (serve/catalog_store.py)
follows the feed; this module lives in the library so the `nezha` command can use it without `serve/`.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import numpy as np
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from nezha.catalog import Catalog
from nezha.verify.codec import pack, unpack

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "nezha:catalog"
DEFAULT_FEED_MAXLEN = 10_000
REDIS_URL_ENV = "NEZHA_REDIS_URL"
MAX_ITEM_ID_CHARS = 256

# ARGV[1] = feed maxlen, then item id / packed ID pairs. All checks happen before any write, so a
# rejected batch changes nothing; Redis runs the script atomically.
_ADD_LUA = """
if redis.call('EXISTS', KEYS[3]) == 0 then return {'nocatalog'} end
for i = 2, #ARGV, 2 do
  local current = redis.call('HGET', KEYS[1], ARGV[i])
  if current then return {'exists', ARGV[i], current} end
  local holder = redis.call('HGET', KEYS[2], ARGV[i + 1])
  if holder then return {'taken', ARGV[i], ARGV[i + 1], holder} end
end
local changes = {}
for i = 2, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  redis.call('HSET', KEYS[2], ARGV[i + 1], ARGV[i])
  changes[#changes + 1] = {ARGV[i], ARGV[i + 1]}
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
  changes[#changes + 1] = {ARGV[i], id}
end
local version = redis.call('INCR', KEYS[3])
local epoch = redis.call('HGET', KEYS[5], 'epoch') or ''
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[1], version .. '-0', 'op', 'remove', 'epoch', epoch,
           'items', cjson.encode(changes))
return {'ok', tostring(version)}
"""


# ---- errors (the service maps them to HTTP statuses) -----------------------------------------------------
class CatalogStoreError(RuntimeError):
    """A catalog change or read that cannot be done; the message says why."""


class StoreUnavailableError(CatalogStoreError):
    """Redis cannot be reached (503): the write was refused."""


class NoCatalogError(CatalogStoreError):
    """Redis holds no catalog under the prefix (503 until `nezha catalog push`)."""


class CatalogConflictError(CatalogStoreError):
    """The item already exists, or its semantic ID belongs to another item (409)."""

    def __init__(self, message: str, item_id: str, packed: int) -> None:
        super().__init__(message)
        self.item_id = item_id
        self.packed = packed


class ItemExistsError(CatalogConflictError):
    """The item id is already in the catalog (with semantic ID `packed`)."""


class IdTakenError(CatalogConflictError):
    """The semantic ID `packed` chosen for `item_id` belongs to another item."""


class ItemNotFoundError(CatalogStoreError):
    """An item to remove is not in the catalog (404)."""

    def __init__(self, message: str, item_id: str) -> None:
        super().__init__(message)
        self.item_id = item_id


class InvalidItemError(CatalogStoreError, ValueError):
    """A new item that cannot be added as given (422): bad codes, no text and no codes, ..."""


# ---- values ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FeedEntry:
    version: int
    op: str  # add | remove | reset
    items: list[tuple[str, int]]
    epoch: str = ""  # the push this change builds on; a follower on another epoch must resync


@dataclass(frozen=True)
class Snapshot:
    version: int
    codebook_sizes: tuple[int, ...]
    items: dict[str, int]  # item id -> packed ID
    epoch: str
    run_id: str


@dataclass(frozen=True)
class RemoteState:
    version: int | None  # None: no catalog under the prefix
    epoch: str | None
    run_id: str


@dataclass
class NewItem:
    item_id: str
    codes: list[int] | None = None
    text: str | None = None


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
        self._add = self.client.register_script(_ADD_LUA)
        self._remove = self.client.register_script(_REMOVE_LUA)

    def close(self) -> None:
        self.client.close()

    def _unavailable(self, exc: Exception, what: str) -> StoreUnavailableError:
        return StoreUnavailableError(
            f"catalog store unavailable: Redis at {self.display_url} ({type(exc).__name__}: {exc}); {what}")

    # ---- writes ----------------------------------------------------------------------------------------
    def push(self, catalog: Catalog, source: str = "", if_empty: bool = False) -> int | None:
        """Replace the catalog with `catalog` (maps, meta, version+1, a `reset` feed entry) atomically.

        Idempotent in content; every push bumps the version so followers resync. With `if_empty`, only
        seeds a prefix that holds no catalog yet and returns None otherwise.
        """
        item2id = {item: str(int(p)) for item, p in zip(catalog.item_ids, catalog.packed.tolist(), strict=True)}
        id2item = {p: item for item, p in item2id.items()}
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
                        pipe.delete(self.item2id, self.id2item, self.meta)
                        pipe.hset(self.item2id, mapping=item2id)
                        pipe.hset(self.id2item, mapping=id2item)
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

    def add(self, items: Sequence[tuple[str, int]]) -> int:
        """Add (item id, packed ID) pairs, all or none; returns the new version."""
        _check_unique([i for i, _ in items], "item id")
        _check_unique([p for _, p in items], "semantic ID")
        args: list[Any] = [self.feed_maxlen]
        for item_id, packed in items:
            args += [item_id, str(int(packed))]
        return self._run(self._add, args, "add")

    def remove(self, item_ids: Sequence[str]) -> int:
        """Remove items, all or none; returns the new version."""
        _check_unique(list(item_ids), "item id")
        return self._run(self._remove, [self.feed_maxlen, *item_ids], "remove")

    def _run(self, script: Any, args: list[Any], what: str) -> int:
        keys = [self.item2id, self.id2item, self.version_key, self.feed, self.meta]
        try:
            reply = script(keys=keys, args=args)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise self._unavailable(exc, f"the {what} was refused (if the connection dropped mid-request, "
                                         "check the catalog version before retrying)") from None
        status = reply[0]
        if status == "ok":
            return int(reply[1])
        if status == "nocatalog":
            raise NoCatalogError(f"Redis at {self.display_url} holds no catalog under {self.prefix!r}: "
                                 "run `nezha catalog push --checkpoint DIR` first")
        if status == "exists":
            raise ItemExistsError(f"item {reply[1]!r} is already in the catalog (semantic ID {reply[2]}); "
                                  "remove it first to give it a new ID", reply[1], int(reply[2]))
        if status == "taken":
            raise IdTakenError(f"semantic ID {reply[2]} asked for item {reply[1]!r} belongs to item {reply[3]!r}",
                               reply[1], int(reply[2]))
        if status == "missing":
            raise ItemNotFoundError(f"item {reply[1]!r} is not in the catalog", reply[1])
        raise CatalogStoreError(f"unexpected reply from the {what} script: {reply!r}")

    # ---- reads -----------------------------------------------------------------------------------------
    def snapshot(self) -> Snapshot | None:
        """The whole catalog at one version (read in one MULTI/EXEC), or None when there is none."""
        try:
            with self.client.pipeline(transaction=True) as pipe:
                pipe.get(self.version_key).hgetall(self.id2item).hgetall(self.meta).info("server")
                version, id2item, meta, info = pipe.execute()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise self._unavailable(exc, "cannot read the catalog") from None
        if version is None:
            return None
        return Snapshot(version=int(version), codebook_sizes=tuple(json.loads(meta.get("codebook_sizes", "[]"))),
                        items={item: int(p) for p, item in id2item.items()}, epoch=meta.get("epoch", ""),
                        run_id=str(info.get("run_id", "")))

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
                items = [(str(i), int(p)) for i, p in json.loads(fields.get("items", "[]"))]
                entries.append(FeedEntry(int(entry_id.split("-")[0]), fields.get("op", ""), items,
                                         fields.get("epoch", "")))
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


def _check_unique(values: Sequence[Any], what: str) -> None:
    seen: set[Any] = set()
    dups = sorted({str(v) for v in values if v in seen or seen.add(v)})
    if dups:
        raise InvalidItemError(f"duplicate {what}(s) in one request: {dups[:10]}")


# ---- new items: explicit codes or text -> nearest free semantic ID -----------------------------------------
def check_codes(codes: Sequence[int], sizes: Sequence[int]) -> int:
    """The packed ID of explicit codes, or InvalidItemError saying what is wrong."""
    if len(codes) != len(sizes) or any(not 0 <= int(c) < s for c, s in zip(codes, sizes, strict=False)):
        raise InvalidItemError(f"codes {list(codes)} do not fit codebook sizes {list(sizes)} "
                               f"({len(sizes)} codes, code l in 0..T_l-1)")
    return int(pack(np.asarray(codes, dtype=np.int64), sizes))


def add_new_items(store: Any, items: Sequence[NewItem], sizes: Sequence[int],
                  quantizer_loader: Callable[[], Any] | None, embed: Callable[[list[str]], np.ndarray],
                  attempts: int = 3) -> tuple[int, list[tuple[str, int]]]:
    """Add items with explicit codes or with text (embedded, then given the nearest free ID).

    `store` has add(pairs) -> version and used_ids() (RedisCatalog or the service's in-process store).
    The store checks ID uniqueness atomically; when a concurrent writer took an ID chosen for a text item,
    that ID is excluded and the assignment retried. Returns (version, [(item id, packed ID)]).
    """
    from nezha.semantic_ids.quantizer import assign_new_item  # local: pulls in scikit-learn

    for item in items:
        if not isinstance(item.item_id, str) or not item.item_id.strip() or len(item.item_id) > MAX_ITEM_ID_CHARS:
            raise InvalidItemError(f"item id {item.item_id!r} must be a non-blank string of at most "
                                   f"{MAX_ITEM_ID_CHARS} characters")
        if (item.codes is None) == (item.text is None):
            raise InvalidItemError(f"item {item.item_id!r}: give exactly one of `codes` or `text`")
    _check_unique([i.item_id for i in items], "item id")
    explicit = {i.item_id: check_codes(i.codes, sizes) for i in items if i.codes is not None}
    textual = [i for i in items if i.text is not None]
    embeddings: np.ndarray | None = None
    quantizer = None
    if textual:
        if quantizer_loader is None:
            raise InvalidItemError("adding items by text needs the quantizer of the prepared dataset "
                                   "(quantizer.safetensors); give explicit `codes` instead")
        quantizer = quantizer_loader()
        if tuple(quantizer.codebook_sizes) != tuple(sizes):
            raise InvalidItemError(f"the quantizer has codebook sizes {list(quantizer.codebook_sizes)}, the "
                                   f"catalog {list(sizes)}")
        embeddings = embed([i.text for i in textual])
    text_ids = {i.item_id for i in textual}
    excluded: set[int] = set()
    for attempt in range(attempts):
        used: set[int] = set()
        if textual:
            used = set(store.used_ids()) | excluded | set(explicit.values())
        assigned = dict(explicit)
        for row, item in enumerate(textual):
            packed = int(pack(assign_new_item(embeddings[row], quantizer, used), sizes))
            assigned[item.item_id] = packed
            used.add(packed)  # two new items in one request never share an ID
        pairs = [(i.item_id, assigned[i.item_id]) for i in items]
        try:
            return store.add(pairs), pairs
        except IdTakenError as exc:
            if exc.item_id not in text_ids or attempt == attempts - 1:
                raise
            log.info("semantic ID %d was taken concurrently; reassigning (attempt %d)", exc.packed, attempt + 2)
            excluded.add(exc.packed)
    raise AssertionError("unreachable")


def load_quantizer_for(checkpoint: str | Path | None, quantizer: str | Path | None) -> Callable[[], Any] | None:
    """A loader for the quantizer: an explicit file, else the checkpoint's prepared dataset's; None if neither."""
    from nezha.model.checkpoint import read_meta
    from nezha.prepare import QUANTIZER_FILE

    path: Path | None = Path(quantizer) if quantizer else None
    if path is None and checkpoint is not None:
        prepared = read_meta(checkpoint).get("extra", {}).get("prepared")
        path = Path(prepared) / QUANTIZER_FILE if prepared else None
    if path is None or not path.is_file():
        return None

    def load() -> Any:
        from nezha.semantic_ids.quantizer import ResidualQuantizer

        return ResidualQuantizer.load(path)

    return load


def codes_of(packed: int, sizes: Sequence[int]) -> list[int]:
    return unpack(np.asarray([packed], dtype=np.int64), sizes)[0].tolist()


__all__ = ["DEFAULT_PREFIX", "CatalogConflictError", "CatalogStoreError", "FeedEntry", "IdTakenError",
           "InvalidItemError", "ItemExistsError", "ItemNotFoundError", "NewItem", "NoCatalogError", "RedisCatalog", "RemoteState", "Snapshot",
           "StoreUnavailableError", "add_new_items", "check_codes", "codes_of", "load_quantizer_for", "redact_url", "REDIS_URL_ENV"]
