"""What every catalog store offers (`CatalogStore`), the change record they share, and their defaults."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from nezha.live_catalog.errors import InvalidItemError

DEFAULT_PREFIX = "nezha:catalog"
DEFAULT_FEED_MAXLEN = 100_000  # ~200 B of Redis memory a change: ~20 MB; see docs/operations.md, "Catalog size"
REDIS_URL_ENV = "NEZHA_REDIS_URL"
MAX_ITEM_ID_CHARS = 256


@runtime_checkable
class CatalogStore(Protocol):
    """Where catalog changes are written: Redis (`RedisCatalog`) or one replica's memory (`InProcessStore`).

    Writes are all or none and return the new catalog version; conflicts raise the errors of
    `nezha.live_catalog.errors` (ItemExistsError, IdTakenError, ItemNotFoundError, ...).
    """

    def add(self, items: Sequence[tuple[str, int]], meta: Mapping[str, dict[str, Any]] | None = None) -> int:
        """Add (item id, packed semantic ID) pairs, with their metadata by item id; returns the new version."""
        ...

    def remove(self, item_ids: Sequence[str]) -> int:
        """Remove items by id; returns the new version."""
        ...

    def id_in_use(self, packed: int) -> bool:
        """Whether an item holds the packed semantic ID now."""
        ...

    def status(self) -> dict[str, Any]:
        """What the store reports about itself (JSON-serialisable)."""
        ...


@dataclass(frozen=True)
class FeedEntry:
    """One change: the version it made, add | remove | reset, and the (item id, packed ID) pairs it touched."""

    version: int
    op: str  # add | remove | reset
    items: list[tuple[str, int]]
    epoch: str = ""  # the push this change builds on; a follower on another epoch must resync
    meta: Mapping[str, dict[str, Any]] = field(default_factory=dict)  # added items' title/brand/categories
    token: str = ""  # this change's random id ("" for a push's reset, or entries written before tokens)
    prev: str | None = None  # the token of the change before it (None: not recorded)


def check_unique(values: Sequence[Any], what: str) -> None:
    """InvalidItemError when `values` (of one request) repeat."""
    seen: set[Any] = set()
    dups = sorted({str(v) for v in values if v in seen or seen.add(v)})
    if dups:
        raise InvalidItemError(f"duplicate {what}(s) in one request: {dups[:10]}")
