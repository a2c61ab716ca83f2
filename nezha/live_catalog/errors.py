"""Errors of the live catalog's stores. Each class words its own message from its fields, once.

The fields are the exception's `args`, so an error pickles and crosses process boundaries (Ray) intact.
The service maps each class to an HTTP status (serve/http.py); `nezha catalog` prints the message.
"""

from __future__ import annotations


class CatalogStoreError(RuntimeError):
    """A catalog change or read that cannot be done; the message says why."""


class StoreUnavailableError(CatalogStoreError):
    """Redis cannot be reached (503): the write was refused, or the read failed."""

    def __init__(self, url: str, cause: str, consequence: str) -> None:
        super().__init__(url, cause, consequence)
        self.url, self.cause, self.consequence = url, cause, consequence

    def __str__(self) -> str:
        return f"catalog store unavailable: Redis at {self.url} ({self.cause}); {self.consequence}"


class WriteNotConfirmedError(StoreUnavailableError):
    """A write whose outcome is not confirmed (503, retryable): fewer replicas than asked acknowledged it in time,
    or the connection failed during a failover (no primary yet, the primary went away or was demoted).

    Retrying is the remedy: a retry lands on the current primary. A retried add answered "already in the
    catalog" with the same semantic ID, or a retried remove answered "not in the catalog", means the first
    attempt had landed and was kept.
    """

    retry_after_s = 1

    def __str__(self) -> str:
        return f"catalog write not confirmed: Redis at {self.url} ({self.cause}); {self.consequence}"


class NoCatalogError(CatalogStoreError):
    """Redis holds no catalog under the prefix (503 until `nezha catalog push`)."""

    def __init__(self, url: str, prefix: str) -> None:
        super().__init__(url, prefix)
        self.url, self.prefix = url, prefix

    def __str__(self) -> str:
        return (f"Redis at {self.url} holds no catalog under {self.prefix!r} (never pushed, or lost on a restart "
                "without persistence): run `nezha catalog push --checkpoint DIR`")


class CatalogConflictError(CatalogStoreError):
    """The item already exists, or its semantic ID belongs to another item (409)."""

    item_id: str
    packed: int


class ItemExistsError(CatalogConflictError):
    """The item id is already in the catalog (with semantic ID `packed`)."""

    def __init__(self, item_id: str, packed: int) -> None:
        super().__init__(item_id, packed)
        self.item_id, self.packed = item_id, packed

    def __str__(self) -> str:
        return (f"item {self.item_id!r} is already in the catalog (semantic ID {self.packed}); remove it first "
                "to give it a new ID")


class IdTakenError(CatalogConflictError):
    """The semantic ID `packed` chosen for `item_id` belongs to another item, `holder`."""

    def __init__(self, item_id: str, packed: int, holder: str) -> None:
        super().__init__(item_id, packed, holder)
        self.item_id, self.packed, self.holder = item_id, packed, holder

    def __str__(self) -> str:
        return f"semantic ID {self.packed} asked for item {self.item_id!r} belongs to item {self.holder!r}"


class ItemNotFoundError(CatalogStoreError):
    """An item to remove is not in the catalog (404)."""

    def __init__(self, item_id: str) -> None:
        super().__init__(item_id)
        self.item_id = item_id

    def __str__(self) -> str:
        return f"item {self.item_id!r} is not in the catalog"


class InvalidItemError(CatalogStoreError, ValueError):
    """A new item that cannot be added as given (422): bad codes, no text and no codes, ...; the message says why."""


__all__ = ["CatalogConflictError", "CatalogStoreError", "IdTakenError", "InvalidItemError", "ItemExistsError",
           "ItemNotFoundError", "NoCatalogError", "StoreUnavailableError", "WriteNotConfirmedError"]
