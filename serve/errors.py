"""The service's error envelope and the catalog-store-error -> HTTP table.

Every non-200 answer is `{"error": code, "detail": text, ...}` built by `error_body`. A replica method
answers the HTTP layer with `reply(status, body)`; the exceptions below are what the HTTP layer turns into
503 `unavailable` (retryable, `Retry-After`) and 504 `timeout`.
"""

from __future__ import annotations

import functools
from typing import Any

from fastapi.responses import JSONResponse

from nezha.live_catalog import (
    CatalogConflictError,
    InvalidItemError,
    ItemNotFoundError,
    NoCatalogError,
    StoreUnavailableError,
)


def error_body(code: str, detail: str, **extra: Any) -> dict[str, Any]:
    """The body of every error answer: a stable machine-readable code, a sentence for people, extra fields."""
    return {"error": code, "detail": detail, **extra}


def error_response(status: int, code: str, detail: str, headers: dict[str, str] | None = None,
                   **extra: Any) -> JSONResponse:
    return JSONResponse(error_body(code, detail, **extra), status_code=status, headers=headers)


def reply(status: int, body: dict[str, Any]) -> dict[str, Any]:
    """A replica method's answer to the HTTP layer: HTTP status and body."""
    return {"status": status, "body": body}


def error_reply(status: int, code: str, detail: str, **extra: Any) -> dict[str, Any]:
    return reply(status, error_body(code, detail, **extra))


@functools.cache
def store_errors() -> tuple[tuple[type[Exception], int, str], ...]:
    """Catalog admin failures -> (HTTP status, error code), most specific first; errors about one item add its id.

    Built on first use: the embedding module's package pulls in scikit-learn, which recommendations never need.
    """
    from nezha.semantic_ids.embed import EmbeddingModelError

    return ((InvalidItemError, 422, "invalid_item"),
            (CatalogConflictError, 409, "conflict"),
            (ItemNotFoundError, 404, "not_found"),
            (NoCatalogError, 503, "no_catalog"),
            (StoreUnavailableError, 503, "store_unavailable"),
            (EmbeddingModelError, 503, "embedding_unavailable"))


def admin_errors() -> tuple[type[Exception], ...]:
    """The exceptions a catalog change answers with an error reply (anything else is a bug: 500)."""
    return tuple(cls for cls, _, _ in store_errors())


def store_error_reply(exc: Exception) -> dict[str, Any]:
    """The reply for a failed catalog change (`exc` is one of admin_errors())."""
    status, code = next((s, c) for cls, s, c in store_errors() if isinstance(exc, cls))
    extra = {"item_id": exc.item_id} if isinstance(exc, CatalogConflictError | ItemNotFoundError) else {}
    return error_reply(status, code, str(exc), **extra)


class Unavailable(Exception):
    """The replica cannot take the call now (past its pending-request bound): safe to retry."""


class TimedOut(Exception):
    """The replica's decode did not finish within request_timeout_s."""
