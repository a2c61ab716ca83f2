"""The service's typed errors and their envelope.

Every non-200 answer is `{"error": code, "detail": text, ...}` built by `error_body`. The replica refuses a
call by raising one of the `ServiceError` classes below, each with its stable `code` and its extra fields;
serve/http.py gives each class its HTTP status, in one table. A failed catalog change (a store error of
nezha.live_catalog) becomes its ServiceError in `from_store_error`.
"""

from __future__ import annotations

from typing import Any, ClassVar

from nezha.live_catalog import (
    CatalogConflictError,
    InvalidItemError,
    ItemNotFoundError,
    NoCatalogError,
    StoreUnavailableError,
    WriteNotConfirmedError,
)


def error_body(code: str, detail: str, **extra: Any) -> dict[str, Any]:
    """The body of every error answer: a stable machine-readable code, a sentence for people, extra fields."""
    return {"error": code, "detail": detail, **extra}


class ServiceError(Exception):
    """A call the replica refuses: `code` and `detail` of the envelope, and its `extra` fields."""

    code: ClassVar[str]

    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.detail, self.extra = detail, extra

    def body(self) -> dict[str, Any]:
        return error_body(self.code, self.detail, **self.extra)


class InvalidRequest(ServiceError):
    """A request outside the service's limits (history length or duplicates, k, excludes, users per batch)."""

    code = "invalid_request"


class UnknownDecoder(ServiceError):
    """The decoder asked for is not served here (extra: `available`)."""

    code = "unknown_decoder"


class UnknownItems(ServiceError):
    """History items that are not in the catalog (extra: `item_ids`)."""

    code = "unknown_items"


class NotFound(ServiceError):
    """The item looked up or removed is not in the catalog (extra: `item_id`)."""

    code = "not_found"


class InvalidItem(ServiceError):
    """A new item that cannot be added as given."""

    code = "invalid_item"


class Conflict(ServiceError):
    """The item already exists, or its semantic ID belongs to another item (extra: `item_id`)."""

    code = "conflict"


class NoCatalog(ServiceError):
    """Redis holds no catalog under the prefix."""

    code = "no_catalog"


class StoreUnavailable(ServiceError):
    """Redis cannot be reached, or a change was not confirmed (its replicas did not acknowledge it in time, or
    a failover cut its connection): safe to retry after `retry_after_s`."""

    code = "store_unavailable"

    def __init__(self, detail: str, retry_after_s: int = 1) -> None:
        super().__init__(detail, retryable=True)
        self.retry_after_s = retry_after_s


class EmbeddingUnavailable(ServiceError):
    """The embedding model for items added by text cannot be loaded."""

    code = "embedding_unavailable"


class Unavailable(ServiceError):
    """The replica cannot take the call now (past its pending-request bound): safe to retry after `retry_after_s`."""

    code = "unavailable"

    def __init__(self, detail: str, retry_after_s: int) -> None:
        super().__init__(detail, retryable=True)
        self.retry_after_s = retry_after_s


class TimedOut(ServiceError):
    """The call did not finish within request_timeout_s."""

    code = "timeout"


# The store errors a catalog change answers with an error (anything else is a bug: 500), most specific first.
STORE_ERRORS: tuple[tuple[type[Exception], type[ServiceError]], ...] = (
    (InvalidItemError, InvalidItem),
    (CatalogConflictError, Conflict),
    (ItemNotFoundError, NotFound),
    (NoCatalogError, NoCatalog),
    (StoreUnavailableError, StoreUnavailable),  # WriteNotConfirmedError too: retryable, with Retry-After
)
STORE_ERROR_TYPES = tuple(store for store, _ in STORE_ERRORS)


def from_store_error(exc: Exception) -> ServiceError:
    """The ServiceError of a failed catalog change (`exc` is one of STORE_ERROR_TYPES); errors about one item
    name it."""
    error = next(service for store, service in STORE_ERRORS if isinstance(exc, store))
    extra = {"item_id": exc.item_id} if isinstance(exc, CatalogConflictError | ItemNotFoundError) else {}
    if isinstance(exc, WriteNotConfirmedError):
        extra = {"retry_after_s": exc.retry_after_s}
    return error(str(exc), **extra)
