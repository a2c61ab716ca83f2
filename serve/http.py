"""The HTTP layer: the FastAPI app (`create_api`) over a replica's methods, and its body-size limit.

The routes call the replica directly and return its results as the declared response models, which FastAPI
enforces. The replica refuses a call by raising a typed error (serve/errors.py); `ERROR_STATUS` gives each
its HTTP status, and every non-200 answer is the envelope of serve/errors.py, never a traceback. A 503
`unavailable` (the replica is past its pending-request bound) and a 503 `store_unavailable` (Redis unreachable, or
a catalog change not confirmed during a failover) are retryable and carry `Retry-After`.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Protocol, TypeVar

from fastapi import Depends, FastAPI, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from nezha.live_catalog import MAX_ITEM_ID_CHARS
from serve.config import ADMIN_TOKEN_ENV, ServeConfig
from serve.errors import (
    Conflict,
    EmbeddingUnavailable,
    InvalidItem,
    InvalidRequest,
    NoCatalog,
    NotFound,
    ServiceError,
    StoreUnavailable,
    TimedOut,
    Unavailable,
    UnknownDecoder,
    UnknownItems,
    error_body,
)
from serve.metrics import HttpMetrics
from serve.schemas import (
    AddItemsRequest,
    BatchRecommendRequest,
    BatchRecommendResponse,
    ItemResponse,
    NewItemModel,
    Recommendation,
    RecommendRequest,
    RecommendResponse,
    UserResult,
)

log = logging.getLogger("ray.serve.nezha")

T = TypeVar("T")

# The HTTP status of each typed error; the body is the error's envelope (ServiceError.body).
ERROR_STATUS: dict[type[ServiceError], int] = {
    InvalidRequest: 422,
    UnknownDecoder: 422,
    UnknownItems: 422,
    InvalidItem: 422,
    NotFound: 404,
    Conflict: 409,
    NoCatalog: 503,
    StoreUnavailable: 503,
    EmbeddingUnavailable: 503,
    Unavailable: 503,
    TimedOut: 504,
}
# Refusals for load or time are counted, not timed: the latency histogram is of the calls the replica answered.
UNTIMED = (Unavailable, TimedOut)


def error_response(status: int, code: str, detail: str, headers: dict[str, str] | None = None,
                   **extra: Any) -> JSONResponse:
    return JSONResponse(error_body(code, detail, **extra), status_code=status, headers=headers)


class BodySizeLimit:
    """413 for request bodies over the limit, counted as they stream in (Content-Length may be absent)."""

    def __init__(self, app: ASGIApp, max_bytes: int, on_reject: Callable[[], None]) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.on_reject = on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes
        declared = dict(scope.get("headers") or []).get(b"content-length")
        too_large = error_response(413, "body_too_large", f"request body over {limit} bytes")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            self.on_reject()
            await too_large(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                self.on_reject()
                await too_large(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


class Replica(Protocol):
    """What the API calls on a replica (serve/replica.py): validated requests in, results out, or a
    ServiceError."""

    async def recommend(self, request: RecommendRequest) -> Recommendation: ...

    async def recommend_many(self, requests: list[RecommendRequest]) -> list[Recommendation | ServiceError]: ...

    def item(self, item_id: str) -> ItemResponse: ...

    def ready(self) -> dict[str, Any]: ...

    async def catalog_status(self) -> dict[str, Any]: ...

    async def add_items(self, items: list[NewItemModel]) -> dict[str, Any]: ...

    async def remove_items(self, item_ids: list[str]) -> dict[str, Any]: ...


def create_api(cfg: ServeConfig, replica: Replica, metrics: HttpMetrics) -> FastAPI:
    """The HTTP API over `replica`; every call but the local reads is bounded by cfg.request_timeout_s."""
    api = FastAPI(title="NEZHA recommendations", version="1",
                  description="Generative recommendation with the NEZHA decoder over a live item catalog.")
    api.add_middleware(BodySizeLimit, max_bytes=cfg.max_body_bytes, on_reject=lambda: metrics.count("*", 413))

    def count(request: Request, status: int) -> None:
        # The route template, not the path: paths carry item ids and would explode the label set.
        metrics.count(getattr(request.scope.get("route"), "path", "unmatched"), status)

    def start_clock(request: Request, route: str) -> None:
        """The call reaches the replica: its answer, an error too, is timed under `route`."""
        request.state.clock = (route, time.perf_counter())

    def observe(request: Request, status: int) -> float:
        """Record the answer of a timed call in the metrics; its server-side seconds."""
        route, start = request.state.clock
        elapsed = time.perf_counter() - start
        metrics.observe(route, status, elapsed)
        return elapsed

    @api.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"field": ".".join(str(p) for p in e["loc"] if p != "body") or "body", "message": e["msg"]}
                  for e in exc.errors()]
        count(request, 422)
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
        return error_response(422, "invalid_request", detail, errors=errors)

    @api.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed"}.get(
            exc.status_code, "http_error")
        count(request, exc.status_code)
        return error_response(exc.status_code, code, str(exc.detail), headers=getattr(exc, "headers", None))

    async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
        status = ERROR_STATUS[type(exc)]
        if isinstance(exc, UNTIMED) or not hasattr(request.state, "clock"):
            count(request, status)
        else:
            observe(request, status)
        retry_after = getattr(exc, "retry_after_s", None)  # Unavailable, StoreUnavailable: retryable
        headers = None if retry_after is None else {"Retry-After": str(retry_after)}
        return JSONResponse(exc.body(), status_code=status, headers=headers)

    for error in ERROR_STATUS:
        api.add_exception_handler(error, service_error)

    @api.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        count(request, 500)
        return error_response(500, "internal_error", "internal error; the server log has the details")

    async def bounded(call: Awaitable[T]) -> T:
        """The replica's answer to a call, or TimedOut after request_timeout_s."""
        try:
            return await asyncio.wait_for(call, cfg.request_timeout_s)
        except asyncio.TimeoutError:
            raise TimedOut(f"the decode did not finish within {cfg.request_timeout_s} s") from None

    def latency_ms(seconds: float) -> float:
        return round(seconds * 1000, 3)

    async def require_admin(request: Request) -> None:
        """Bearer-token check (constant-time) for the catalog admin routes."""
        if cfg.admin_token is None:
            raise StarletteHTTPException(403, f"the catalog admin API is disabled: set {ADMIN_TOKEN_ENV} or "
                                              "admin_token")
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise StarletteHTTPException(401, "missing bearer token (Authorization: Bearer <token>)",
                                         headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(given.strip().encode(), cfg.admin_token.encode()):
            raise StarletteHTTPException(403, "invalid admin token")

    @api.post("/v1/recommend",
              responses={422: {"description": "invalid request; `detail` names the field and the reason"}})
    async def recommend(req: RecommendRequest, request: Request) -> RecommendResponse:
        start_clock(request, "/v1/recommend")
        recommendation = await bounded(replica.recommend(req))
        return RecommendResponse(**dict(recommendation), latency_ms=latency_ms(observe(request, 200)))

    @api.post("/v1/recommend/batch", response_model_exclude_unset=True,
              responses={422: {"description": "too many users; one user's bad request is reported in its result"}})
    async def recommend_batch(req: BatchRecommendRequest, request: Request) -> BatchRecommendResponse:
        start_clock(request, "/v1/recommend/batch")
        answers = await bounded(replica.recommend_many(req.requests))
        results = [UserResult(status=200, **dict(answer)) if isinstance(answer, Recommendation)
                   else UserResult(status=ERROR_STATUS[type(answer)], **answer.body()) for answer in answers]
        return BatchRecommendResponse(results=results, latency_ms=latency_ms(observe(request, 200)))

    @api.get("/v1/items/{item_id}", responses={404: {"description": "no such item in the catalog"}})
    async def item(item_id: Annotated[str, Path(max_length=MAX_ITEM_ID_CHARS)], request: Request) -> ItemResponse:
        start_clock(request, "/v1/items/{item_id}")
        answer = replica.item(item_id)
        observe(request, 200)
        return answer

    @api.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    # Status and catalog-change answers are free-form JSON: no response model.
    @api.get("/readyz", response_model=None)
    async def readyz() -> dict[str, Any]:
        # The replica answering is the one that is ready: a local status read, nothing to wait for.
        return replica.ready()

    @api.get("/v1/catalog", dependencies=[Depends(require_admin)], response_model=None)
    async def catalog_status(request: Request) -> dict[str, Any]:
        start_clock(request, "/v1/catalog")
        status = await bounded(replica.catalog_status())
        observe(request, 200)
        return status

    @api.post("/v1/catalog/items", dependencies=[Depends(require_admin)], response_model=None)
    async def add_items(req: AddItemsRequest, request: Request) -> dict[str, Any]:
        start_clock(request, "/v1/catalog/items")
        body = await bounded(replica.add_items(req.items))
        observe(request, 200)
        return body

    @api.delete("/v1/catalog/items/{item_id}", dependencies=[Depends(require_admin)], response_model=None)
    async def remove_item(item_id: Annotated[str, Path(max_length=MAX_ITEM_ID_CHARS)],
                          request: Request) -> dict[str, Any]:
        start_clock(request, "/v1/catalog/items")  # the metrics' label of both catalog writes
        body = await bounded(replica.remove_items([item_id]))
        observe(request, 200)
        return body

    return api
