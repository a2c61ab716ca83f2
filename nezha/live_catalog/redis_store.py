"""The live catalog in Redis: the source of truth for serving, read and written atomically.

Keys under one prefix, hash-tagged: P is `{prefix}` (default `{nezha:catalog}`), so every key of a catalog is
in one Redis Cluster slot and each script and pipeline below runs on one node (keys written before the tag,
`nezha:catalog:*`, are not read: push the catalog again, docs/operations.md):

    P:item2id:<k>   hash  item id -> packed semantic ID (decimal string)
    P:id2item:<k>   hash  packed semantic ID -> item id; their keys are the set of valid IDs
    P:itemmeta:<k>  hash  item id -> JSON {title, brand, categories}
    P:version       int   bumped by every change (INCR, or SET under WATCH for a full push)
    P:meta          hash  codebook_sizes (JSON), epoch (random per push), source, pushed_at, shards
    P:feed      stream one entry per change, entry ID `<version>-0`, fields op (add|remove|reset), epoch, id and
                prev (add/remove: a random token of the change and the previous change's, P:meta `head`),
                and items (JSON [[item_id, packed, meta JSON], ...]; removals [[item_id, packed], ...]);
                capped with MAXLEN ~ feed_maxlen

The three maps are split into `shards` hashes each (P:meta `shards`, chosen by each push: a power of two
giving at most SHARD_FIELDS fields per hash; shard k of a field is crc32(field) mod shards, computed by the
client, which passes every key a script touches). One hash of 10M fields blocked Redis 40-60 ms each time it
grew (a table of 2^24 buckets); 128 hashes of ~80k fields grow in steps of ~1 MB. A catalog pushed before
sharding (no `shards` in P:meta) is read and written in place, as one unsuffixed hash per map, until the
next push.

Every change updates the maps, the version and the feed in one atomic step (a Lua script for add/remove),
so a reader never sees a version whose feed entry or maps are missing. Stream IDs equal versions, so a
follower that knows version v reads from `v-0` and sees a gap (trimmed feed, lost data) as a first entry
other than v+1 (nezha/live_catalog/follower.py).

No command blocks Redis for long at millions of items:
  - `push` writes the new maps into staging keys (P:staging:<epoch>:*, expiring if the push dies) in
    pipelined chunks of PUSH_CHUNK fields, then one Lua script UNLINKs the live keys (freed in the
    background), RENAMEs the staged ones into place, bumps the version and adds the `reset` entry;
  - a push also writes a snapshot blob: the (packed ID, item id) pairs sorted by packed ID, in string keys
    P:blob:<id>:<k> of BLOB_ROWS rows each (int64 IDs, uint32 id lengths, the ids' UTF-8), described by
    the hash P:blob (id, epoch, version, chunks, rows). `snapshot` reads it with pipelined GETs and replays
    the feed from its version; a replica whose snapshot replayed more than half the feed (or had to scan)
    publishes a newer blob from its copy (`publish_snapshot`), so the blob stays within the feed's reach;
  - without a usable blob (none, another epoch, or older than the feed), `snapshot` reads id2item in HSCAN
    chunks (a Lua script returns each chunk as three strings), then replays the feed entries written while
    it read: the chunks hold every pair that did not change, the feed what did, so the result is exactly
    the catalog at the last chunk's version;
  - existence checks are HEXISTS (`id_in_use`) or inside the scripts, never HKEYS.
"""

from __future__ import annotations

import functools
import json
import threading
import time
import uuid
import zlib
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import redis

from nezha.catalog import Catalog
from nezha.live_catalog.connection import (
    TRANSIENT_ERRORS,
    RedisDeployment,
    describe_error,
    online_replicas,
    redact_url,
)
from nezha.live_catalog.errors import (
    CatalogStoreError,
    IdTakenError,
    ItemExistsError,
    ItemNotFoundError,
    NoCatalogError,
    StoreUnavailableError,
    WriteNotConfirmedError,
)
from nezha.live_catalog.item_table import ItemTable, StringColumn
from nezha.live_catalog.metadata import ItemMeta, clean_meta
from nezha.live_catalog.store import DEFAULT_FEED_MAXLEN, DEFAULT_PREFIX, FeedEntry, check_unique

# Fields per HSET of a push, and per HSCAN step of a snapshot: each command stays in the milliseconds.
PUSH_CHUNK = 2_000
SCAN_COUNT = 5_000
# Fields per map hash at push time (see the docstring): the shard count is the power of two that keeps under it.
SHARD_FIELDS = 131_072
MAPS = ("item2id", "id2item", "itemmeta")
STAGING_TTL_S = 3600  # staging keys of a push that died expire after this
# Rows per snapshot blob key (~1 MB with 10-character ids: one short SET / GET each), and blob keys per
# pipelined round trip when reading.
BLOB_ROWS = 50_000
BLOB_READ_AHEAD = 16
PUBLISH_LOCK_S = 300  # one replica publishes a blob at a time; a lock left by a dead one expires
REPLICA_CHECK_S = 5.0  # how long a write trusts its look at the primary's replicas (INFO replication)

# KEYS[1..3] = version, feed, meta, then per item its item2id, id2item and itemmeta shard keys; ARGV[1] = feed
# maxlen, ARGV[2] = this change's token, ARGV[3] = the shard layout the keys were computed for (P:meta
# `shards`, '0' before sharding), then item id / packed ID / metadata JSON triples (ARGV[i..i+2] go with
# KEYS[i..i+2]). All checks happen before any write, so a rejected batch changes nothing; Redis runs the
# script atomically. Each feed entry carries its token (`id`) and the previous change's (`prev`, kept in meta
# `head`): a follower checks that chain, so a history that forked under it (a failover lost changes it
# applied) cannot go unseen.
_ADD_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'nocatalog'} end
if (redis.call('HGET', KEYS[3], 'shards') or '0') ~= ARGV[3] then return {'layout'} end
for i = 4, #ARGV, 3 do
  local current = redis.call('HGET', KEYS[i], ARGV[i])
  if current then return {'exists', ARGV[i], current} end
  local holder = redis.call('HGET', KEYS[i + 1], ARGV[i + 1])
  if holder then return {'taken', ARGV[i], ARGV[i + 1], holder} end
end
local changes = {}
for i = 4, #ARGV, 3 do
  redis.call('HSET', KEYS[i], ARGV[i], ARGV[i + 1])
  redis.call('HSET', KEYS[i + 1], ARGV[i + 1], ARGV[i])
  redis.call('HSET', KEYS[i + 2], ARGV[i], ARGV[i + 2])
  changes[#changes + 1] = {ARGV[i], ARGV[i + 1], ARGV[i + 2]}
end
local version = redis.call('INCR', KEYS[1])
local epoch = redis.call('HGET', KEYS[3], 'epoch') or ''
local prev = redis.call('HGET', KEYS[3], 'head') or ''
redis.call('HSET', KEYS[3], 'head', ARGV[2])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[1], version .. '-0', 'op', 'add', 'epoch', epoch,
           'id', ARGV[2], 'prev', prev, 'items', cjson.encode(changes))
return {'ok', tostring(version)}
"""

# As _ADD_LUA, with item id / packed ID / metadata triples where the packed ID is the one the client read for
# the item ('' for none: the item is missing) and the metadata is unused: an item whose ID moved since the
# client read it (a concurrent remove and add) is reported and the client reads again.
_REMOVE_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'nocatalog'} end
if (redis.call('HGET', KEYS[3], 'shards') or '0') ~= ARGV[3] then return {'layout'} end
for i = 4, #ARGV, 3 do
  local current = redis.call('HGET', KEYS[i], ARGV[i])
  if not current then return {'missing', ARGV[i]} end
  if current ~= ARGV[i + 1] then return {'moved', ARGV[i]} end
end
local changes = {}
for i = 4, #ARGV, 3 do
  redis.call('HDEL', KEYS[i], ARGV[i])
  redis.call('HDEL', KEYS[i + 1], ARGV[i + 1])
  redis.call('HDEL', KEYS[i + 2], ARGV[i])
  changes[#changes + 1] = {ARGV[i], ARGV[i + 1]}
end
local version = redis.call('INCR', KEYS[1])
local epoch = redis.call('HGET', KEYS[3], 'epoch') or ''
local prev = redis.call('HGET', KEYS[3], 'head') or ''
redis.call('HSET', KEYS[3], 'head', ARGV[2])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[1], version .. '-0', 'op', 'remove', 'epoch', epoch,
           'id', ARGV[2], 'prev', prev, 'items', cjson.encode(changes))
return {'ok', tostring(version)}
"""


# KEYS: meta, version, feed, then n staged map keys, the n live keys they become, then the old layout's live
# map keys. ARGV: if_empty (0|1), feed maxlen, epoch, n, the old layout (P:meta `shards` as the client read
# it, '0' before sharding), then meta field/value pairs. The old live keys are UNLINKed first, so each RENAME
# finds no destination to free (O(1)); UNLINK frees the old hashes in a background thread.
_SWAP_LUA = """
local n = tonumber(ARGV[4])
if ARGV[1] == '1' and redis.call('EXISTS', KEYS[2]) == 1 then
  for i = 4, 3 + n do redis.call('UNLINK', KEYS[i]) end
  return {'exists'}
end
if (redis.call('HGET', KEYS[1], 'shards') or '0') ~= ARGV[5] then return {'layout'} end
for i = 4, 3 + n do
  if redis.call('EXISTS', KEYS[i]) == 0 then return {'nostage', KEYS[i]} end
end
for i = 4 + 2 * n, #KEYS do redis.call('UNLINK', KEYS[i]) end
redis.call('UNLINK', KEYS[1])
for i = 4, 3 + n do
  redis.call('RENAME', KEYS[i], KEYS[i + n])
  redis.call('PERSIST', KEYS[i + n])
end
redis.call('HSET', KEYS[1], unpack(ARGV, 6))
local version = redis.call('INCR', KEYS[2])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[2], version .. '-0', 'op', 'reset', 'items', '[]',
           'epoch', ARGV[3])
return {'ok', tostring(version)}
"""

# KEYS[1] = the blob hash, KEYS[2] = meta. ARGV: id, epoch, version, chunks, rows of the staged blob
# P:blob:<id>:<k>. Installs it unless the catalog moved to another epoch or a blob at least as new is there;
# the old blob's keys are UNLINKed (a few hundred short keys), the new ones made permanent.
_PUBLISH_LUA = """
if redis.call('HGET', KEYS[2], 'epoch') ~= ARGV[2] then return 'stale' end
local old = redis.call('HMGET', KEYS[1], 'id', 'epoch', 'version', 'chunks')
if old[2] == ARGV[2] and old[3] and tonumber(old[3]) >= tonumber(ARGV[3]) then return 'older' end
local chunks = tonumber(ARGV[4])
for k = 0, chunks - 1 do
  if redis.call('EXISTS', KEYS[1] .. ':' .. ARGV[1] .. ':' .. k) == 0 then return 'nostage' end
end
if old[1] and old[4] then
  for k = 0, tonumber(old[4]) - 1 do redis.call('UNLINK', KEYS[1] .. ':' .. old[1] .. ':' .. k) end
end
for k = 0, chunks - 1 do redis.call('PERSIST', KEYS[1] .. ':' .. ARGV[1] .. ':' .. k) end
redis.call('HSET', KEYS[1], 'id', ARGV[1], 'epoch', ARGV[2], 'version', ARGV[3], 'chunks', ARGV[4],
           'rows', ARGV[5])
return 'ok'
"""

# Drops a lock only if it is still ours.
_UNLOCK_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def blob_chunks(packed: np.ndarray, ids: StringColumn, rows: int | None = None) -> Iterator[bytes]:
    """The snapshot blob's keys' values for sorted packed IDs and their item ids: per `rows` (BLOB_ROWS) rows,
    the row count (int64), the IDs (int64), the ids' byte lengths (uint32) and the ids' UTF-8, little-endian."""
    rows = rows or BLOB_ROWS
    for lo in range(0, packed.size, rows):
        hi = min(lo + rows, packed.size)
        start, end = int(ids.offsets[lo]), int(ids.offsets[hi])
        yield (np.array([hi - lo], dtype="<i8").tobytes() + packed[lo:hi].astype("<i8").tobytes()
               + np.diff(ids.offsets[lo:hi + 1]).astype("<u4").tobytes() + ids.buffer[start:end].tobytes())


def _blob_parts(data: bytes) -> tuple[np.ndarray, np.ndarray, memoryview]:
    """(packed IDs, id lengths, ids' UTF-8) of one blob key's value (views, no copy)."""
    rows = int(np.frombuffer(data, dtype="<i8", count=1)[0])
    return (np.frombuffer(data, dtype="<i8", count=rows, offset=8),
            np.frombuffer(data, dtype="<u4", count=rows, offset=8 + 8 * rows), memoryview(data)[8 + 12 * rows:])


# One HSCAN step of id2item: {next cursor, packed IDs (comma-separated), item id byte lengths (comma-
# separated), the item ids concatenated, version, epoch}, the version and epoch read atomically with it.
_SCAN_LUA = """
local step = redis.call('HSCAN', KEYS[1], ARGV[1], 'COUNT', ARGV[2])
local flat = step[2]
local ids, lengths, items = {}, {}, {}
for i = 1, #flat, 2 do
  ids[#ids + 1] = flat[i]
  lengths[#lengths + 1] = #flat[i + 1]
  items[#items + 1] = flat[i + 1]
end
return {step[1], table.concat(ids, ','), table.concat(lengths, ','), table.concat(items),
        redis.call('GET', KEYS[2]) or '', redis.call('HGET', KEYS[3], 'epoch') or ''}
"""


@dataclass(frozen=True)
class Snapshot:
    """The whole catalog at one version, as Redis held it (the maps as compact arrays)."""

    version: int
    codebook_sizes: tuple[int, ...]
    table: ItemTable  # (item id, packed ID) pairs
    epoch: str
    run_id: str
    blob_version: int | None = None  # the version of the blob it was read from (None: scanned)


@dataclass(frozen=True)
class RemoteState:
    """Redis's version, epoch and run_id now: what a follower compares with its own to decide to resync."""

    version: int | None  # None: no catalog under the prefix
    epoch: str | None
    run_id: str


def shards_for(items: int) -> int:
    """Hashes per map for a catalog of `items`: the least power of two keeping each under SHARD_FIELDS."""
    shards = 1
    while items > shards * SHARD_FIELDS:
        shards *= 2
    return shards


def shard_of(field: str, shards: int) -> int:
    """The shard of a map field (an item id, or a packed ID's decimal string) under `shards` (0: unsharded)."""
    return zlib.crc32(field.encode()) % shards if shards > 1 else 0


class RedisCatalog:
    """Atomic reads and writes of one catalog in Redis. Thread-safe (redis-py pools connections).

    Writes are never retried by the client: a retried script whose first attempt did run would report a
    false conflict, so a lost connection is reported to the caller instead.
    """

    def __init__(self, url: str, prefix: str = DEFAULT_PREFIX, feed_maxlen: int = DEFAULT_FEED_MAXLEN,
                 socket_timeout: float = 5.0, min_replicas: int | None = None,
                 wait_timeout_ms: int | None = None) -> None:
        """`url`: one server, Sentinel or Cluster (nezha/live_catalog/connection.py). `min_replicas`: replicas an
        add/remove/push must reach before it returns (None: the URL's `min_replicas`, else 1 when the primary
        has a replica online, 0 alone); `wait_timeout_ms`: how long it waits for them (None: the URL's, 1000)."""
        self.display_url = redact_url(url)
        self.prefix = prefix
        self.feed_maxlen = feed_maxlen
        # Every key in the hash tag {prefix}: one Cluster slot, so each script and pipeline stays on one node.
        self.tag = "{" + prefix + "}"
        self.deployment = RedisDeployment(url, self.tag, socket_timeout)
        target = self.deployment.target
        self.min_replicas = target.min_replicas if min_replicas is None else min_replicas
        self.wait_timeout_ms = target.wait_timeout_ms if wait_timeout_ms is None else wait_timeout_ms
        self._auto_replicas = (0, 0.0)  # (replicas to wait for, monotonic time until which that holds)
        self.client = self.deployment.client(decode_responses=True)
        self.version_key, self.meta, self.feed = f"{self.tag}:version", f"{self.tag}:meta", f"{self.tag}:feed"
        self._shards: int | None = None  # the layout last read (P:meta `shards`); checked by every use
        # Snapshot chunks are read as bytes (item ids stay UTF-8, parsed by numpy, never one str per item).
        self._raw = self.deployment.client(decode_responses=False)
        self._add = self.client.register_script(_ADD_LUA)
        self._remove = self.client.register_script(_REMOVE_LUA)
        self._swap = self.client.register_script(_SWAP_LUA)
        self._scan = self._raw.register_script(_SCAN_LUA)

    def close(self) -> None:
        self.client.close()
        self._raw.close()
        self.deployment.close()

    def _unavailable(self, exc: Exception, what: str) -> StoreUnavailableError:
        return StoreUnavailableError(self.display_url, describe_error(exc), what)

    # ---- the sharded maps ------------------------------------------------------------------------------
    def map_key(self, name: str, shard: int, shards: int) -> str:
        """The key of shard `shard` of map `name` (item2id, id2item, itemmeta) under `shards` (0: unsharded)."""
        return f"{self.tag}:{name}" if shards == 0 else f"{self.tag}:{name}:{shard}"

    def map_keys(self, name: str, shards: int | None = None) -> list[str]:
        """Every key of map `name` under `shards` (default: the catalog's layout now)."""
        shards = self.layout() if shards is None else shards
        return [self.map_key(name, k, shards) for k in range(max(shards, 1))]

    def _field_key(self, name: str, field: str, shards: int) -> str:
        return self.map_key(name, shard_of(field, shards), shards)

    def layout(self, refresh: bool = False) -> int:
        """The catalog's shard count (P:meta `shards`; 0: pushed before sharding, or no catalog), cached: each
        script checks it and each read reads it in the same transaction, so a re-push is noticed."""
        if refresh or self._shards is None:
            self._shards = int(self.client.hget(self.meta, "shards") or 0)
        return self._shards

    def _read_keyed(self, shards: int, build: Any) -> list[Any] | None:
        """The replies of `build(pipe, shards)`'s reads, run in one transaction with a check that `shards` is
        still the catalog's layout; None when it is not (pushed again)."""
        with self.client.pipeline(transaction=True) as pipe:
            pipe.hget(self.meta, "shards")
            build(pipe, shards)
            current, *replies = pipe.execute()
        return replies if int(current or 0) == shards else None

    def _read_maps(self, build: Any) -> list[Any]:
        """`_read_keyed` under the catalog's layout now, looked up again after a push."""
        for attempt in range(3):
            replies = self._read_keyed(self.layout(refresh=attempt > 0), build)
            if replies is not None:
                return replies
        raise CatalogStoreError(f"the catalog at {self.display_url} was pushed again under three reads in a row: "
                                "retry")

    # ---- writes ----------------------------------------------------------------------------------------
    def push(self, catalog: Catalog, source: str = "", if_empty: bool = False,
             item_meta: Mapping[str, ItemMeta] | None = None, chunk: int = PUSH_CHUNK,
             shards: int | None = None) -> int | None:
        """Replace the catalog with `catalog` (maps, item metadata, meta, version+1, a `reset` feed entry)
        atomically. `item_meta`: title/brand/categories by item id (default: the catalog's titles).

        The maps are written `chunk` items per pipelined round trip into staging keys (`shards` hashes per
        map, default shards_for(items)), then swapped in by one script, so
        readers see the old catalog or the new one, and no command blocks Redis for long. A concurrent
        add/remove lands in the old catalog and is replaced, as with any push. Idempotent in content; every
        push bumps the version so followers resync. With `if_empty`, only seeds a prefix that holds no
        catalog yet and returns None otherwise.
        """
        item_meta = item_meta or {}
        epoch = uuid.uuid4().hex
        shards = shards or shards_for(catalog.num_items)
        meta = {"codebook_sizes": json.dumps(list(catalog.codebook_sizes)), "epoch": epoch, "source": source,
                "pushed_at": f"{time.time():.3f}", "pushed_items": str(catalog.num_items), "shards": str(shards)}
        staged: dict[str, str] = {}  # staged key -> the live key it becomes
        packed = [str(p) for p in catalog.packed.tolist()]
        order = np.argsort(catalog.packed, kind="stable")
        blob_ids = StringColumn.of(catalog.item_ids[i] for i in order.tolist())
        try:
            if if_empty and self.client.exists(self.version_key):
                return None
            blob_chunks_staged = self._stage_blob(np.asarray(catalog.packed, dtype=np.int64)[order], blob_ids, epoch)
            with self.client.pipeline(transaction=False) as pipe:
                for start in range(0, catalog.num_items, chunk):
                    items = catalog.item_ids[start:start + chunk]
                    ids = packed[start:start + chunk]
                    metas = [json.dumps(clean_meta(item_meta.get(item) or {"title": title}))
                             for item, title in zip(items, catalog.titles[start:start + chunk], strict=True)]
                    writes: dict[tuple[str, int], dict[str, str]] = {}
                    for item, packed_id, item_json in zip(items, ids, metas, strict=True):
                        item_shard, id_shard = shard_of(item, shards), shard_of(packed_id, shards)
                        writes.setdefault(("item2id", item_shard), {})[item] = packed_id
                        writes.setdefault(("id2item", id_shard), {})[packed_id] = item
                        writes.setdefault(("itemmeta", item_shard), {})[item] = item_json
                    for (name, shard), mapping in writes.items():
                        key = f"{self.tag}:staging:{epoch}:{name}:{shard}"
                        pipe.hset(key, mapping=mapping)
                        if key not in staged:  # expires if the push dies before the swap
                            staged[key] = self.map_key(name, shard, shards)
                            pipe.expire(key, STAGING_TTL_S)
                    pipe.execute()
            for _attempt in range(3):
                old = self.layout(refresh=True)
                old_keys = [key for name in MAPS for key in self.map_keys(name, old)]
                keys = [self.meta, self.version_key, self.feed, *staged, *staged.values(), *old_keys]
                reply = self._durable(self._swap, keys, [int(if_empty), self.feed_maxlen, epoch, len(staged), old,
                                                         *(x for pair in meta.items() for x in pair)], "push")
                if reply[0] != "layout":  # another push changed the layout between our look and the swap
                    break
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise self._unavailable(exc, "the push was not applied") from None
        if reply[0] == "exists":
            self._drop_blob(epoch, blob_chunks_staged)
            return None
        if reply[0] == "layout":
            self._drop_blob(epoch, blob_chunks_staged)
            if staged:
                self.client.unlink(*staged)
            raise CatalogStoreError("other pushes changed the catalog's layout under this one three times: retry it")
        if reply[0] != "ok":
            raise CatalogStoreError(f"the push's staged keys vanished before the swap ({reply[1:]}): retry it")
        self._shards = shards
        try:
            self._install_blob(epoch, epoch, int(reply[1]), blob_chunks_staged, catalog.num_items)
        except (redis.ConnectionError, redis.TimeoutError):
            pass  # the push is in; replicas scan until one publishes a blob
        return int(reply[1])

    # ---- the snapshot blob -----------------------------------------------------------------------------
    @property
    def blob_key(self) -> str:
        return f"{self.tag}:blob"

    def _blob_chunk_key(self, blob_id: str, k: int) -> str:
        return f"{self.blob_key}:{blob_id}:{k}"

    @functools.cached_property
    def _publish(self) -> Any:
        return self.client.register_script(_PUBLISH_LUA)

    @functools.cached_property
    def _unlock(self) -> Any:
        return self.client.register_script(_UNLOCK_LUA)

    def _stage_blob(self, packed: np.ndarray, ids: StringColumn, blob_id: str) -> int:
        """Write the blob's keys (expiring until installed); returns how many."""
        chunks = 0
        with self._raw.pipeline(transaction=False) as pipe:
            for data in blob_chunks(packed, ids):
                pipe.set(self._blob_chunk_key(blob_id, chunks), data, ex=STAGING_TTL_S)
                chunks += 1
                if chunks % BLOB_READ_AHEAD == 0:
                    pipe.execute()
            pipe.execute()
        return chunks

    def _drop_blob(self, blob_id: str, chunks: int) -> None:
        with self._raw.pipeline(transaction=False) as pipe:
            for k in range(chunks):
                pipe.unlink(self._blob_chunk_key(blob_id, k))
            pipe.execute()

    def _install_blob(self, blob_id: str, epoch: str, version: int, chunks: int, rows: int) -> str:
        """Install staged blob keys as the blob of `version` (see _PUBLISH_LUA); drops them when not installed."""
        status = self._publish(keys=[self.blob_key, self.meta], args=[blob_id, epoch, version, chunks, rows])
        if status != "ok":
            self._drop_blob(blob_id, chunks)
        return str(status)

    def blob_state(self) -> tuple[str | None, int | None]:
        """(epoch, version) of the snapshot blob in Redis ((None, None): there is none)."""
        try:
            epoch, version = self.client.hmget(self.blob_key, ["epoch", "version"])
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise self._unavailable(exc, "cannot read the snapshot blob") from None
        return epoch, None if version is None else int(version)

    def publish_snapshot(self, table: ItemTable, version: int, epoch: str) -> str:
        """Write `table` (the catalog at `version` of `epoch`, e.g. a replica's copy) as the snapshot blob.
        Returns ok, busy (another replica is publishing), older (a blob at least as new is there) or stale
        (the catalog was pushed since). Only short commands: BLOB_ROWS rows per SET, a small install script."""
        token = uuid.uuid4().hex
        lock = f"{self.blob_key}:lock"
        try:
            if not self.client.set(lock, token, nx=True, ex=PUBLISH_LOCK_S):
                return "busy"
            try:
                current_epoch, current = self.blob_state()
                if current_epoch == epoch and current is not None and current >= version:
                    return "older"
                packed, ids = table.sorted_rows()
                chunks = self._stage_blob(packed, ids, token)
                return self._install_blob(token, epoch, version, chunks, len(table))
            finally:
                self._unlock(keys=[lock], args=[token])
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise self._unavailable(exc, "the snapshot blob was not published") from None

    def _read_blob(self, epoch: str) -> tuple[int, ItemTable] | None:
        """(version, table) of the snapshot blob of `epoch`; None when there is none or it was replaced while
        being read."""
        info = self.client.hgetall(self.blob_key)
        if info.get("epoch") != epoch or "chunks" not in info:
            return None
        chunks = int(info["chunks"])
        packed, lengths, texts = [], [], []
        with self._raw.pipeline(transaction=False) as pipe:
            for lo in range(0, chunks, BLOB_READ_AHEAD):
                for k in range(lo, min(chunks, lo + BLOB_READ_AHEAD)):
                    pipe.get(self._blob_chunk_key(info["id"], k))
                for data in pipe.execute():
                    if data is None:
                        return None  # a newer blob replaced it while we read
                    chunk_packed, chunk_lengths, chunk_text = _blob_parts(data)
                    packed.append(chunk_packed)
                    lengths.append(chunk_lengths)
                    texts.append(chunk_text)
        ids = StringColumn.from_encoded(b"".join(texts), np.concatenate(lengths).astype(np.int64) if lengths
                                        else np.empty(0, dtype=np.int64))
        table = ItemTable.build(ids, np.concatenate(packed) if packed else np.empty(0, dtype=np.int64))
        return int(info["version"]), table

    def add(self, items: Sequence[tuple[str, int]], meta: Mapping[str, ItemMeta] | None = None) -> int:
        """Add (item id, packed ID) pairs with their metadata, all or none; returns the new version."""
        check_unique([i for i, _ in items], "item id")
        check_unique([p for _, p in items], "semantic ID")
        triples = [(item_id, str(int(packed)), json.dumps(clean_meta((meta or {}).get(item_id))))
                   for item_id, packed in items]
        return self._run(self._add, lambda _shards: triples, "add")

    def remove(self, item_ids: Sequence[str]) -> int:
        """Remove items, all or none; returns the new version."""
        check_unique(list(item_ids), "item id")

        def triples(shards: int) -> list[tuple[str, str, str]] | None:
            # each item's packed ID as it is now: the script needs its id2item shard, and checks it is unchanged
            ids = self._read_keyed(shards, lambda pipe, n: [pipe.hget(self._field_key("item2id", i, n), i)
                                                          for i in item_ids])
            return None if ids is None else [(i, packed or "", "") for i, packed in zip(item_ids, ids, strict=True)]

        return self._run(self._remove, triples, "remove")

    def _run(self, script: Any, triples: Any, what: str) -> int:
        """Run an add/remove script over `triples(shards)` (item id, packed ID, metadata JSON; None: the layout
        changed while reading), keyed for the catalog's layout; again when the catalog was re-pushed in between
        (a 'layout' reply) or an item's ID changed since it was read ('moved')."""
        for attempt in range(3):
            try:
                shards = self.layout(refresh=attempt > 0)
                batch = triples(shards)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                raise self._unavailable(exc, f"the {what} was not applied") from None
            if batch is None:
                continue
            keys, args = [self.version_key, self.feed, self.meta], [self.feed_maxlen, uuid.uuid4().hex, shards]
            for item_id, packed, item_json in batch:
                keys += [self._field_key("item2id", item_id, shards), self._field_key("id2item", packed, shards),
                         self._field_key("itemmeta", item_id, shards)]
                args += [item_id, packed, item_json]
            reply = self._durable(script, keys, args, what)
            if reply[0] not in ("layout", "moved"):
                break
        else:
            raise CatalogStoreError(f"the catalog at {self.display_url} changed under three {what}s in a row "
                                    "(pushes, or the same items changed concurrently): retry")
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

    def _durable(self, script: Any, keys: list[str], args: list[Any], what: str) -> list[Any]:
        """Run a write script and, on the same connection (WAIT counts that connection's writes), wait until
        enough replicas have it; its reply. WriteNotConfirmedError when they do not acknowledge in time, or
        when the connection fails (a failover: no primary yet, the old one gone or demoted)."""
        try:
            wanted = self._replicas_to_wait()
            if wanted == 0:
                return script(keys=keys, args=args)
            with self.client.pipeline(transaction=False) as pipe:
                script(keys=keys, args=args, client=pipe)
                pipe.execute_command("WAIT", wanted, self.wait_timeout_ms)
                reply, acked = pipe.execute()
        except TRANSIENT_ERRORS as exc:
            self._auto_replicas = (0, 0.0)  # look again at the (maybe new) primary's replicas next time
            raise WriteNotConfirmedError(
                self.display_url, describe_error(exc),
                f"the {what} was refused or its connection dropped (a failover, or Redis down): retry it; a "
                "retried add answered 'already in the catalog' with the same semantic ID, or a retried remove "
                "answered 'not in the catalog', means the first attempt had landed") from None
        if reply[0] == "ok" and int(acked) < wanted:
            self._auto_replicas = (0, 0.0)
            raise WriteNotConfirmedError(
                self.display_url, f"{acked} of {wanted} replica(s) acknowledged version {reply[1]} within "
                                  f"{self.wait_timeout_ms} ms",
                f"the {what} is on the primary but not confirmed on a replica, so a failover now could lose it: "
                "retry it (a retried add answered 'already in the catalog' with the same semantic ID, or a "
                "retried remove answered 'not in the catalog', means it was kept)")
        return reply

    def _replicas_to_wait(self) -> int:
        """min_replicas, or by default 1 while the primary has a replica online (0 alone), looked up at most
        every REPLICA_CHECK_S and again after any write that was not confirmed."""
        if self.min_replicas is not None:
            return self.min_replicas
        wanted, until = self._auto_replicas
        now = time.monotonic()
        if now >= until:
            wanted = min(1, online_replicas(self.client.info("replication")))
            self._auto_replicas = (wanted, now + REPLICA_CHECK_S)
        return wanted

    # ---- reads -----------------------------------------------------------------------------------------
    def snapshot(self, count: int = SCAN_COUNT, attempts: int = 5, use_blob: bool = True) -> Snapshot | None:
        """The whole catalog at one version, or None when there is none: the snapshot blob plus the feed
        since its version when the feed still reaches back to it, else HSCAN chunks of `count`.

        Changes made while it reads are replayed from the feed; a push meanwhile, or a feed trimmed past the
        read's start, starts it again (up to `attempts` times).
        """
        for _ in range(attempts):
            try:
                snapshot = (self._snapshot_from_blob() if use_blob else None) or self._read_snapshot(count)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                raise self._unavailable(exc, "cannot read the catalog") from None
            if snapshot is not None or self.remote_state().version is None:
                return snapshot
        raise CatalogStoreError(f"the catalog at {self.display_url} changed under {attempts} snapshot reads in "
                                "a row (pushes, or a feed trimmed faster than a read): raise feed_maxlen")

    def _snapshot_from_blob(self) -> Snapshot | None:
        """The snapshot from the blob and the feed after it; None when there is no usable blob."""
        state = self.remote_state()
        sizes = self.codebook_sizes()
        if state.version is None or sizes is None or state.epoch is None:
            return None
        blob = self._read_blob(state.epoch)
        if blob is None:
            return None
        blob_version, table = blob
        now = self.remote_state()
        if now.epoch != state.epoch or now.version is None or now.version < blob_version:
            return None
        if now.version > blob_version:
            replayed = self._replay(table, blob_version, now.version, state.epoch)
            if replayed is None:
                return None  # the feed no longer reaches back to the blob
            table = replayed
        return Snapshot(version=now.version, codebook_sizes=sizes, table=table, epoch=state.epoch,
                        run_id=now.run_id, blob_version=blob_version)

    def _read_snapshot(self, count: int) -> Snapshot | None:
        """The snapshot, or None when there is no catalog or it must be read again."""
        state = self.remote_state()
        sizes = self.codebook_sizes()
        if state.version is None or sizes is None:
            return None
        ids, lengths, texts = [], [], []
        first: int | None = None
        for key in self.map_keys("id2item", self.layout(refresh=True)):  # a push since `state`: epoch differs
            cursor: bytes = b"0"
            while True:
                cursor, chunk_ids, chunk_lengths, chunk_texts, version, epoch = self._scan(
                    keys=[key, self.version_key, self.meta], args=[cursor, count])
                if epoch.decode() != state.epoch or not version:
                    return None  # pushed (or lost) while reading
                first = int(version) if first is None else first
                ids.append(np.fromstring(chunk_ids, dtype=np.int64, sep=","))
                lengths.append(np.fromstring(chunk_lengths, dtype=np.int64, sep=","))
                texts.append(chunk_texts)
                if cursor == b"0":
                    break
        last = int(version)
        table = ItemTable.build(StringColumn.from_encoded(b"".join(texts), np.concatenate(lengths)),
                                np.concatenate(ids))
        if last > first:
            replayed = self._replay(table, first, last, state.epoch or "")
            if replayed is None:
                return None
            table = replayed
        return Snapshot(version=last, codebook_sizes=sizes, table=table, epoch=state.epoch or "",
                        run_id=state.run_id)

    def _replay(self, table: ItemTable, first: int, last: int, epoch: str) -> ItemTable | None:
        """The table read between versions `first` and `last` with the feed's changes (first, last] applied;
        None when the feed no longer holds them all."""
        final: dict[int, tuple[str, str]] = {}  # packed ID -> its last change (op, item id)
        after = first
        while after < last:
            entries = [e for e in self.read_feed(after, None, count=1000) if e.version <= last]
            if not entries:
                return None
            for entry in entries:
                if entry.version != after + 1 or entry.op == "reset" or entry.epoch != epoch:
                    return None
                for item_id, packed in entry.items:
                    final[packed] = (entry.op, item_id)
                after = entry.version
        touched = np.fromiter(final, dtype=np.int64, count=len(final))
        return table.merged(touched, [(item_id, p) for p, (op, item_id) in final.items() if op == "add"])

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
                                         fields.get("epoch", ""), meta, fields.get("id", ""), fields.get("prev")))
        return entries

    def id_in_use(self, packed: int) -> bool:
        """Whether an item holds the packed ID now (one HEXISTS)."""
        field = str(int(packed))
        try:
            return bool(self._read_maps(lambda pipe, shards: pipe.hexists(self._field_key("id2item", field,
                                                                                           shards), field))[0])
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise self._unavailable(exc, "cannot read the IDs in use") from None

    def item_metas(self, item_ids: Sequence[str]) -> list[ItemMeta | None]:
        """Metadata of each item (None: not in the catalog), one HGET per item in one round trip."""
        if not item_ids:
            return []

        def read(pipe: Any, shards: int) -> None:
            for item in item_ids:
                pipe.hget(self._field_key("itemmeta", item, shards), item)

        try:
            values = self._read_maps(read)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise self._unavailable(exc, "cannot read item metadata") from None
        return [None if v is None else clean_meta(json.loads(v)) for v in values]

    def codebook_sizes(self) -> tuple[int, ...] | None:
        try:
            sizes = self.client.hget(self.meta, "codebook_sizes")
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise self._unavailable(exc, "cannot read the catalog") from None
        return tuple(json.loads(sizes)) if sizes else None

    def status(self) -> dict[str, Any]:
        """Version, size, feed length and persistence settings, as seen in Redis now."""
        try:
            def read(pipe: Any, shards: int) -> None:
                pipe.get(self.version_key).hgetall(self.meta).xlen(self.feed)
                for key in self.map_keys("item2id", shards):
                    pipe.hlen(key)

            version, meta, feed_len, *sizes = self._read_maps(read)
            size = sum(sizes)
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


class RedisItemMeta:
    """Item metadata read from Redis for the items a replica answers (one HMGET per call), with a bounded
    cache that the applied changes keep true. A Redis outage gives the empty metadata, never an error:
    titles decorate an answer, they do not make it.
    """

    def __init__(self, store: RedisCatalog, cache_items: int = 100_000, pause_after_error_s: float = 1.0) -> None:
        self.store = store
        self.cache_items = cache_items
        self.pause_after_error_s = pause_after_error_s
        self._cache: OrderedDict[str, ItemMeta] = OrderedDict()
        self._lock = threading.Lock()
        self._skip_until = 0.0  # after an error, answer without Redis for a moment instead of waiting on it

    def get_many(self, item_ids: Sequence[str]) -> list[ItemMeta]:
        with self._lock:
            found = {i: self._cache[i] for i in item_ids if i in self._cache}
            for item in found:
                self._cache.move_to_end(item)
        missing = [i for i in dict.fromkeys(item_ids) if i not in found]
        if missing and time.monotonic() >= self._skip_until:
            try:
                fetched = self.store.item_metas(missing)
            except StoreUnavailableError:
                self._skip_until = time.monotonic() + self.pause_after_error_s
            else:
                got = {i: m for i, m in zip(missing, fetched, strict=True) if m is not None}
                self._remember(got)
                found.update(got)
        return [found.get(i) or clean_meta(None) for i in item_ids]

    def changed(self, added: Mapping[str, ItemMeta], removed: Iterable[str]) -> None:
        with self._lock:
            for item in removed:
                self._cache.pop(item, None)
        self._remember(added)

    def _remember(self, metas: Mapping[str, ItemMeta]) -> None:
        with self._lock:
            self._cache.update(metas)
            for item in metas:
                self._cache.move_to_end(item)
            while len(self._cache) > self.cache_items:
                self._cache.popitem(last=False)
