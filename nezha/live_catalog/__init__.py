"""The live catalog: the item catalog that changes while the service runs.

    store.py         CatalogStore (the protocol both stores satisfy), FeedEntry, defaults
    connection.py    Redis by URL: one server, Sentinel (redis+sentinel://) or Cluster (redis+cluster://)
    errors.py        the stores' errors, each worded once
    redis_store.py   RedisCatalog: the source of truth in Redis (maps, version, change feed), chunked push and
                     snapshot reads; RedisItemMeta: metadata of answered items read from Redis; redact_url
    memory_store.py  InProcessStore: changes to one replica's copy only, when there is no Redis
    item_table.py    ItemTable / ItemMap: compact item id <-> packed ID maps (numpy arrays, no object per item)
    local.py         LocalCatalog: a replica's copy; CatalogView: that copy at one version (what a decode reads)
    metadata.py      item metadata (title, brand, categories) shown with recommendations; MetaSource, MemoryMeta
    follower.py      CatalogFollower: the thread that keeps a LocalCatalog in step with Redis; freeze_heap
    new_items.py     new items by explicit codes or by text (nearest free semantic ID)

The fixed on-disk catalog format of a checkpoint is `nezha.catalog`; `nezha catalog push|status|add|remove`
(nezha/cli/catalog.py) and the service (serve/) use this package.
"""

from nezha.live_catalog.errors import (
    CatalogConflictError,
    CatalogStoreError,
    IdTakenError,
    InvalidItemError,
    ItemExistsError,
    ItemNotFoundError,
    NoCatalogError,
    StoreUnavailableError,
    WriteNotConfirmedError,
)
from nezha.live_catalog.follower import DEFAULT_BATCH_MS, CatalogFollower, FollowerHealth, freeze_heap
from nezha.live_catalog.item_table import ItemMap, ItemTable
from nezha.live_catalog.local import CatalogView, LocalCatalog
from nezha.live_catalog.memory_store import InProcessStore
from nezha.live_catalog.metadata import (
    META_FIELDS,
    ItemMeta,
    MemoryMeta,
    MetaSource,
    clean_meta,
    load_item_metadata,
)
from nezha.live_catalog.new_items import NewItem, add_new_items, check_codes, codes_of, load_quantizer_for
from nezha.live_catalog.redis_store import RedisCatalog, RedisItemMeta, RemoteState, Snapshot, redact_url
from nezha.live_catalog.store import (
    DEFAULT_FEED_MAXLEN,
    DEFAULT_PREFIX,
    MAX_ITEM_ID_CHARS,
    REDIS_URL_ENV,
    CatalogStore,
    FeedEntry,
)

__all__ = [
    "DEFAULT_BATCH_MS", "DEFAULT_FEED_MAXLEN", "DEFAULT_PREFIX", "MAX_ITEM_ID_CHARS", "META_FIELDS", "REDIS_URL_ENV",
    "CatalogConflictError", "CatalogFollower", "CatalogView", "ItemMeta", "CatalogStore", "CatalogStoreError",
    "FeedEntry", "FollowerHealth", "IdTakenError", "InProcessStore", "InvalidItemError", "ItemExistsError",
    "ItemMap", "ItemNotFoundError", "ItemTable", "LocalCatalog", "MemoryMeta", "MetaSource", "NewItem",
    "NoCatalogError", "RedisCatalog", "RedisItemMeta", "RemoteState", "Snapshot", "StoreUnavailableError",
    "WriteNotConfirmedError", "add_new_items", "check_codes", "clean_meta", "codes_of", "freeze_heap", "load_item_metadata", "load_quantizer_for",
    "redact_url",
]
