"""The HTTP layer: the FastAPI app (`create_api`) over a replica's methods, and its body-size limit.

Every non-200 answer is the envelope of serve/errors.py; no answer ever carries a traceback. The replica's
methods answer with `reply(status, body)` dicts, which `create_api` turns into responses. A 503
`unavailable` (the replica is past its pending-request bound) is retryable and carries `Retry-After`.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from nezha.live_catalog import (
    MAX_ITEM_ID_CHARS,
)
from serve.config import ADMIN_TOKEN_ENV, ServeConfig
from serve.errors import TimedOut, Unavailable, error_body, error_reply, error_response, reply
from serve.metrics import HttpMetrics
from serve.schemas import (
    AddItemsRequest,
    BatchRecommendRequest,
    BatchRecommendResponse,
    ItemResponse,
    RecommendRequest,
    RecommendResponse,
)

log = logging.getLogger("ray.serve.nezha")


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


Forward = Callable[..., Awaitable[dict[str, Any]]]


def create_api(cfg: ServeConfig, forward: Forward, metrics: HttpMetrics) -> FastAPI:
    """The HTTP API; `forward(method, *args, timeout=seconds)` calls a replica method and returns its reply."""
    api = FastAPI(title="NEZHA recommendations", version="1",
                  description="Generative recommendation with the NEZHA decoder over a live item catalog.")
    api.add_middleware(BodySizeLimit, max_bytes=cfg.max_body_bytes, on_reject=lambda: metrics.count("*", 413))

    def count(request: Request, status: int) -> None:
        # The route template, not the path: paths carry item ids and would explode the label set.
        metrics.count(getattr(request.scope.get("route"), "path", "unmatched"), status)

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

    @api.exception_handler(Unavailable)
    async def unavailable(request: Request, exc: Unavailable) -> JSONResponse:
        count(request, 503)
        return error_response(503, "unavailable", str(exc), headers={"Retry-After": str(cfg.retry_after_s)},
                              retryable=True)

    @api.exception_handler(TimedOut)
    async def timed_out(request: Request, exc: TimedOut) -> JSONResponse:
        count(request, 504)
        return error_response(504, "timeout", str(exc))

    @api.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        count(request, 500)
        return error_response(500, "internal_error", "internal error; the server log has the details")

    async def call(method: str, *args: Any) -> dict[str, Any]:
        return await forward(method, *args, timeout=cfg.request_timeout_s)

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

    def respond(route: str, start: float, answer: dict[str, Any]) -> JSONResponse:
        """The HTTP response for a replica method's `reply(...)`, recorded in the metrics."""
        body, status = answer["body"], answer["status"]
        elapsed = time.perf_counter() - start
        if status == 200 and route.startswith("/v1/recommend"):
            body["latency_ms"] = round(elapsed * 1000, 3)
        metrics.observe(route, status, elapsed)
        return JSONResponse(body, status_code=status)

    def check_limits(req: RecommendRequest) -> str | None:
        """Limits that depend on the config (pydantic already checked the types)."""
        if len(req.history) > cfg.max_history_items:
            return f"history: {len(req.history)} items; at most {cfg.max_history_items} (the model reads the last ones)"
        seen: set[str] = set()
        dups = sorted({i for i in req.history if i in seen or seen.add(i)})
        if dups:
            return f"history: duplicate item ids {dups[:20]}"
        if not 1 <= req.k <= cfg.max_k:
            return f"k: {req.k} is out of range 1..{cfg.max_k}"
        if len(req.exclude) > cfg.max_exclude:
            return f"exclude: {len(req.exclude)} items; at most {cfg.max_exclude}"
        return None

    @api.post("/v1/recommend", response_model=RecommendResponse,
              responses={422: {"description": "invalid request; `detail` names the field and the reason"}})
    async def recommend(req: RecommendRequest) -> JSONResponse:
        start = time.perf_counter()
        problem = check_limits(req)
        if problem is not None:
            return respond("/v1/recommend", start, error_reply(422, "invalid_request", problem))
        return respond("/v1/recommend", start, await call("recommend", req.model_dump()))

    @api.post("/v1/recommend/batch", response_model=BatchRecommendResponse,
              responses={422: {"description": "too many users; one user's bad request is reported in its result"}})
    async def recommend_batch(req: BatchRecommendRequest) -> JSONResponse:
        start = time.perf_counter()
        if len(req.requests) > cfg.max_batch_users:
            return respond("/v1/recommend/batch", start, error_reply(
                422, "invalid_request", f"requests: {len(req.requests)} users; at most {cfg.max_batch_users}"))
        problems = [check_limits(r) for r in req.requests]
        valid = [r.model_dump() for r, problem in zip(req.requests, problems, strict=True) if problem is None]
        decoded = iter((await call("recommend_many", valid))["body"]["results"] if valid else [])
        results = []
        for problem in problems:
            if problem is None:
                answer = next(decoded)
                results.append({"status": answer["status"], **answer["body"]})
            else:
                results.append({"status": 422, **error_body("invalid_request", problem)})
        return respond("/v1/recommend/batch", start, reply(200, {"results": results}))

    @api.get("/v1/items/{item_id}", response_model=ItemResponse,
             responses={404: {"description": "no such item in the catalog"}})
    async def item(item_id: Annotated[str, Path(max_length=MAX_ITEM_ID_CHARS)]) -> JSONResponse:
        return respond("/v1/items/{item_id}", time.perf_counter(), await call("item", item_id))

    @api.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/readyz")
    async def readyz() -> JSONResponse:
        # The replica answering is the one that is ready: a local status read, nothing to wait for.
        return JSONResponse(await forward("ready", timeout=cfg.request_timeout_s))

    @api.get("/v1/catalog", dependencies=[Depends(require_admin)])
    async def catalog_status() -> JSONResponse:
        return respond("/v1/catalog", time.perf_counter(), await call("catalog_status"))

    @api.post("/v1/catalog/items", dependencies=[Depends(require_admin)])
    async def add_items(req: AddItemsRequest) -> JSONResponse:
        items = [i.model_dump(exclude_none=True) for i in req.items]
        return respond("/v1/catalog/items", time.perf_counter(), await call("add_items", items))

    @api.delete("/v1/catalog/items/{item_id}", dependencies=[Depends(require_admin)])
    async def remove_item(item_id: Annotated[str, Path(max_length=MAX_ITEM_ID_CHARS)]) -> JSONResponse:
        return respond("/v1/catalog/items", time.perf_counter(), await call("remove_items", [item_id]))

    return api
