"""The Ray Serve application: a FastAPI ingress in front of replicated, batching decoder replicas.

    client -> Serve proxy -> Ingress (FastAPI: validation, auth, metrics) -> Recommender replicas
                                                                             (model + local catalog copy)

Each Recommender replica loads the safetensors checkpoint and catalog once, on the GPU when it was given
one, and groups concurrent requests with `@serve.batch` into one `nezha.decoding.decode` call per
decoder (one prefill + one draft-head beam search for NEZHA). Its catalog copy is followed from Redis by
a background thread (serve/catalog_store.py) or, without Redis, lives in-process (one replica).

`serve run serve.config.yaml` builds the app with `app_builder(args)`; `build_app(ServeConfig(...))` does
the same from Python (tests, serve/loadtest.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import itertools
import json
import logging
import os
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path as FsPath
from typing import Annotated, Any

import numpy as np
import ray
import torch
from fastapi import Depends, FastAPI, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, StringConstraints, model_validator
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RayServeException
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from nezha.catalog import Catalog
from nezha.catalog_cli import (
    DEFAULT_FEED_MAXLEN,
    DEFAULT_PREFIX,
    MAX_ITEM_ID_CHARS,
    REDIS_URL_ENV,
    CatalogConflictError,
    InvalidItemError,
    ItemNotFoundError,
    NewItem,
    NoCatalogError,
    RedisCatalog,
    StoreUnavailableError,
    add_new_items,
    codes_of,
    load_quantizer_for,
    redact_url,
)
from nezha.config import ConfigError, from_dict
from nezha.decoding import DECODERS, decode, decoder_available
from nezha.decoding.graphs import DraftGraphs
from nezha.model.checkpoint import load_checkpoint, read_meta, verify_checkpoint
from serve.catalog_store import CatalogFollower, InProcessStore, LocalCatalog
from serve.metrics import CONTENT_TYPE_LATEST, ServiceMetrics

# Under "ray.serve" so Serve writes these lines to each replica's log file.
log = logging.getLogger("ray.serve.nezha")

ADMIN_TOKEN_ENV = "NEZHA_ADMIN_TOKEN"
MAX_ADMIN_ITEMS = 1000


@dataclass
class ServeConfig:
    """The recommendation service: model, request limits, batching, catalog store, replicas."""

    checkpoint: str = field(default="runs/quickstart/train/best", metadata={"help": "checkpoint directory"})
    device: str = field(default="auto", metadata={"help": "auto (GPU when the replica has one), cpu, cuda"})
    dtype: str | None = field(default=None, metadata={"help": "override the checkpoint dtype (bfloat16 on GPUs)"})
    torch_threads: int = field(default=1, metadata={"help": "torch CPU threads per replica (0: torch default)"})
    decoders: list[str] = field(default_factory=lambda: list(DECODERS),
                                metadata={"help": "decoders offered (those the checkpoint has heads for)"})
    default_decoder: str = "nezha"
    beam: int = field(default=20, metadata={"help": "beam width of the search"})
    max_beam: int = field(default=64, metadata={"help": "widest search, used when k + excluded items > beam"})
    max_k: int | None = field(default=None, metadata={"help": "largest k a request may ask for (default: beam)"})
    max_history: int | None = field(default=None, metadata={
        "help": "history items the model sees (the last ones; default: the prepared dataset's max_history)"})
    max_history_items: int = field(default=200, metadata={"help": "longest history a request may send"})
    max_exclude: int = 200
    max_body_bytes: int = field(default=65536, metadata={"help": "larger request bodies get 413"})
    max_batch_size: int = field(default=32, metadata={"help": "requests per batched decode call"})
    batch_wait_timeout_s: float = field(default=0.005, metadata={"help": "how long a batch waits to fill"})
    redis_url: str | None = field(default=None, repr=False, metadata={
        "help": f"redis:// or rediss:// URL of the live catalog (else ${REDIS_URL_ENV}; neither: in-process)"})
    redis_prefix: str = DEFAULT_PREFIX
    feed_block_ms: int = field(default=500, metadata={"help": "follower's XREAD BLOCK timeout"})
    feed_maxlen: int = DEFAULT_FEED_MAXLEN
    admin_token: str | None = field(default=None, repr=False, metadata={
        "help": f"bearer token of the catalog admin API (else ${ADMIN_TOKEN_ENV}; neither: admin API off)"})
    quantizer: str | None = field(default=None, metadata={
        "help": "quantizer.safetensors for text adds (default: the checkpoint's prepared dataset's)"})
    embedding_model: str | None = field(default=None, metadata={"help": "sentence-transformers folder for text adds"})
    # Decoder replicas: passed to Serve as they are (same names and meaning as Serve's deployment options).
    autoscaling_config: dict[str, Any] = field(default_factory=lambda: {
        "min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 8}, metadata={
        "help": "Serve autoscaling_config of the decoder (forced to 1 replica without Redis)"})
    max_ongoing_requests: int = field(default=64, metadata={"help": "per decoder replica; > max_batch_size"})
    max_queued_requests: int = field(default=-1, metadata={
        "help": "requests a caller queues for the decoder before 503 (-1: unbounded)"})
    health_check_period_s: float = 10.0
    health_check_timeout_s: float = 30.0
    ray_actor_options: dict[str, Any] = field(default_factory=lambda: {"num_cpus": 1}, metadata={
        "help": "per decoder replica, e.g. {num_cpus: 1, num_gpus: 1}; the replica decodes on its GPU if it has one"})
    ingress_replicas: int = 1
    ingress_max_ongoing_requests: int = field(default=1024, metadata={
        "help": "the ingress only awaits decoder replicas: keep it far above their total capacity"})
    ingress_num_cpus: float = 0.1
    ready_timeout_s: float = field(default=5.0, metadata={"help": "how long /readyz waits for a decoder replica"})
    request_timeout_s: float = field(default=5.0, metadata={
        "help": "how long a recommend or admin call waits for its decoder replica before 504 (keep it below "
                "http_options.request_timeout_s, the proxy's own limit)"})

    def __post_init__(self) -> None:
        unknown = [d for d in self.decoders if d not in DECODERS]
        if unknown:
            raise ConfigError(f"decoders: unknown {unknown}; choose from {list(DECODERS)}")
        if self.default_decoder not in self.decoders:
            raise ConfigError(f"default_decoder {self.default_decoder!r} is not in decoders {self.decoders}")
        if self.beam < 1 or self.max_beam < self.beam:
            raise ConfigError(f"need 1 <= beam <= max_beam, got beam {self.beam}, max_beam {self.max_beam}")
        self.max_k = self.beam if self.max_k is None else self.max_k
        if not 1 <= self.max_k <= self.max_beam:
            raise ConfigError(f"max_k must be in 1..max_beam ({self.max_beam}), got {self.max_k}")
        if self.request_timeout_s <= 0 or self.ready_timeout_s <= 0:
            raise ConfigError("request_timeout_s and ready_timeout_s must be > 0")
        for name in ("max_history_items", "max_batch_size", "max_body_bytes", "max_ongoing_requests",
                     "ingress_replicas", "ingress_max_ongoing_requests"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")

    def resolved(self) -> ServeConfig:
        """Absolute checkpoint path; secrets from the environment where the config leaves them out."""
        return dataclasses.replace(
            self, checkpoint=str(FsPath(self.checkpoint).expanduser().resolve()),
            redis_url=self.redis_url or os.environ.get(REDIS_URL_ENV) or None,
            admin_token=self.admin_token or os.environ.get(ADMIN_TOKEN_ENV) or None)


# ---- replies shared by both deployments ---------------------------------------------------------------
def _reply(status: int, body: dict[str, Any], stats: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"status": status, "body": body, "stats": stats}


def _error(status: int, code: str, detail: str, **extra: Any) -> dict[str, Any]:
    return _reply(status, {"error": code, "detail": detail, **extra})


def _pick_device(name: str) -> torch.device:
    if name == "auto":
        # Ray leaves CUDA_VISIBLE_DEVICES alone for replicas given no GPU, so ask Ray what this one got.
        given = bool(ray.get_gpu_ids()) if ray.is_initialized() else True
        return torch.device("cuda" if given and torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda asked for, but this replica sees no GPU (give it num_gpus in ray_actor_options)")
    return device


def _prepared_max_history(meta: dict[str, Any]) -> int | None:
    prepared = meta.get("extra", {}).get("prepared")
    summary = FsPath(prepared) / "prepare.json" if prepared else None
    if summary is None or not summary.is_file():
        return None
    return json.loads(summary.read_text()).get("config", {}).get("max_history")


@dataclass
class _Query:
    decoder: str
    k: int
    history: list[int]  # packed IDs, oldest first, at most max_history
    exclude: frozenset[str]


class Recommender:
    """One decoder replica: the model, a local catalog copy, batched decoding, catalog admin."""

    def __init__(self, cfg: ServeConfig) -> None:
        self.cfg = cfg
        if cfg.torch_threads > 0:
            torch.set_num_threads(cfg.torch_threads)
        self.device = _pick_device(cfg.device)
        meta = read_meta(cfg.checkpoint)
        self.model = load_checkpoint(cfg.checkpoint, self.device, dtype=cfg.dtype)
        catalog = Catalog.load(FsPath(cfg.checkpoint) / "catalog")
        if tuple(self.model.layout.sizes) != catalog.codebook_sizes:
            raise ValueError(f"checkpoint model codebooks {self.model.layout.sizes} differ from its catalog's "
                             f"{catalog.codebook_sizes}")
        self.max_history = cfg.max_history or _prepared_max_history(meta) or 20
        self.decoders = [d for d in cfg.decoders if decoder_available(self.model, d)]
        if not self.decoders:
            raise ValueError(f"the checkpoint serves none of the configured decoders {cfg.decoders} "
                             f"(it has heads for {list(self.model.decoders)})")
        self.local = LocalCatalog.from_catalog(catalog, self.device)
        # On a GPU the draft head's search is launch-bound: replay it from CUDA graphs (one per batch bucket).
        self.graphs = DraftGraphs() if self.device.type == "cuda" else None
        self.follower: CatalogFollower | None = None
        if cfg.redis_url:
            self.store: Any = RedisCatalog(cfg.redis_url, cfg.redis_prefix, cfg.feed_maxlen)
            self.follower = CatalogFollower(RedisCatalog(cfg.redis_url, cfg.redis_prefix, cfg.feed_maxlen,
                                                         socket_timeout=cfg.feed_block_ms / 1000 + 5),
                                            self.local, block_ms=cfg.feed_block_ms)
            self.follower.sync_once()  # start from Redis's view when it is reachable
            self.follower.start()
            log.info("catalog: Redis %s prefix %r (%s), version %d, %d items", redact_url(cfg.redis_url),
                     cfg.redis_prefix, self.local.source, self.local.version, len(self.local))
        else:
            self.store = InProcessStore(self.local)
            self.local.source = "embedded"
            log.warning("catalog: no Redis URL (%s): in-process catalog from the checkpoint; admin changes apply "
                        "to this replica only and are lost on restart", REDIS_URL_ENV)
        self._quantizer_loader = load_quantizer_for(cfg.checkpoint, cfg.quantizer)
        self._quantizer: Any = None
        self._batch_ids = itertools.count()
        self._decode_batch.set_max_batch_size(cfg.max_batch_size)
        self._decode_batch.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
        try:
            self.replica = serve.get_replica_context().replica_id.unique_id
        except RayServeException:  # constructed outside Serve
            self.replica = f"local-{os.getpid()}"
        with torch.inference_mode():  # warm-up: first-call allocations happen before traffic
            decode(self.model, self.decoders[0], [self.local.codes(self.local.lookup(catalog.item_ids[:1])[0])],
                   self.local.verifier, beam=cfg.beam, graphs=self.graphs)
        log.info("replica %s ready: %s on %s, decoders %s, max_history %d", self.replica, cfg.checkpoint,
                 self.device, self.decoders, self.max_history)

    def __del__(self) -> None:
        if getattr(self, "follower", None) is not None:
            self.follower.stop()

    def check_health(self) -> None:
        """Serve's health check: the follower thread must be alive (a Redis outage is not unhealthy)."""
        if self.follower is not None and not self.follower.is_alive():
            raise RuntimeError("the catalog follower thread died")

    # ---- recommendations ---------------------------------------------------------------------------
    async def recommend(self, request: dict[str, Any]) -> dict[str, Any]:
        decoder = request.get("decoder") or self.cfg.default_decoder
        if decoder not in self.decoders:
            return _error(422, "unknown_decoder", f"decoder {decoder!r} is not available; this service offers "
                          f"{', '.join(self.decoders)}", available=self.decoders)
        packed, missing = self.local.lookup(request["history"])
        if missing:
            return _error(422, "unknown_items", f"{len(missing)} history item(s) are not in the catalog (unknown or "
                          f"removed): {', '.join(missing[:20])}", item_ids=missing)
        query = _Query(decoder, request["k"], packed[-self.max_history:], frozenset(request.get("exclude") or ()))
        return await self._decode_batch(query)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _decode_batch(self, queries: list[_Query]) -> list[dict[str, Any]]:
        groups: dict[str, list[int]] = defaultdict(list)
        for i, q in enumerate(queries):
            groups[q.decoder].append(i)
        replies: list[dict[str, Any]] = [{} for _ in queries]
        for decoder, rows in groups.items():
            batch = [queries[i] for i in rows]
            # Decode past k so excluded items can be dropped; one width for the whole group.
            beam = min(self.cfg.max_beam, max(self.cfg.beam, *(q.k + len(q.exclude) for q in batch)))
            start = time.perf_counter()
            # In a thread: the event loop keeps accepting requests, which form the next batch.
            ids, scores, invalid = await asyncio.to_thread(self._decode, decoder, batch, beam)
            decode_s = time.perf_counter() - start
            items, version = self.local.items_of(ids.reshape(-1))
            size = len(self.local)
            batch_id = next(self._batch_ids)
            for pos, (row, q) in enumerate(zip(rows, batch, strict=True)):
                ranked = []
                for j, score in enumerate(scores[pos]):
                    item = items[pos * ids.shape[1] + j]
                    # None: not an item (padding) or removed after this decode began.
                    if item is not None and item not in q.exclude:
                        ranked.append({"item_id": item, "score": round(float(score), 6)})
                        if len(ranked) == q.k:
                            break
                body = {"items": ranked, "decoder": decoder, "k": q.k, "catalog_version": version,
                        "replica": self.replica, "batch": {"id": batch_id, "size": len(batch)}}
                stats = {"decoder": decoder, "first_in_batch": pos == 0, "batch_size": len(batch), "decode_s": decode_s,
                         "invalid": int(invalid[pos]), "replica": self.replica, "catalog_version": version,
                         "catalog_size": size}
                replies[row] = _reply(200, body, stats)
        return replies

    def _decode(self, decoder: str, batch: list[_Query], beam: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        histories = [self.local.codes(q.history) for q in batch]
        with torch.inference_mode():  # thread-local: set in the decoding thread itself
            out = decode(self.model, decoder, histories, self.local.verifier, beam=beam, topk=beam, graphs=self.graphs)
        return out.ids.cpu().numpy(), out.scores.float().cpu().numpy(), out.invalid.cpu().numpy()

    # ---- status --------------------------------------------------------------------------------------
    def ready(self) -> dict[str, Any]:
        """Cheap (no Redis call): model loaded, catalog copy state, and why it may be stale."""
        status = {"ready": True, "replica": self.replica, "device": str(self.device), "decoders": self.decoders,
                  "catalog": {"mode": "redis" if self.follower else "embedded", **self.local.state()},
                  "degraded": self.follower.degraded() if self.follower else []}
        if self.follower is not None:
            h = self.follower.health
            status["follower"] = {"connected": h.connected, "resyncs": h.resyncs, "redis_version": h.remote_version,
                                  "last_ok_s_ago": None if h.last_ok is None else round(time.time() - h.last_ok, 3)}
        return status

    async def catalog_status(self) -> dict[str, Any]:
        status = self.ready()
        try:
            status["store"] = await asyncio.to_thread(self.store.status)
        except StoreUnavailableError as exc:
            status["store"] = {"mode": "redis", "available": False, "error": str(exc)}
        return _reply(200, status)

    # ---- catalog admin -------------------------------------------------------------------------------
    async def add_items(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        return await asyncio.to_thread(self._admin, self._add_items, items)

    async def remove_items(self, item_ids: list[str]) -> dict[str, Any]:
        return await asyncio.to_thread(self._admin, self._remove_items, item_ids)

    def _admin(self, action: Any, arg: Any) -> dict[str, Any]:
        from nezha.semantic_ids.embed import EmbeddingModelError

        try:
            body = action(arg)
        except InvalidItemError as exc:
            return _error(422, "invalid_item", str(exc))
        except CatalogConflictError as exc:
            return _error(409, "conflict", str(exc), item_id=exc.item_id)
        except ItemNotFoundError as exc:
            return _error(404, "not_found", str(exc), item_id=exc.item_id)
        except NoCatalogError as exc:
            return _error(503, "no_catalog", str(exc))
        except StoreUnavailableError as exc:
            return _error(503, "store_unavailable", str(exc))
        except EmbeddingModelError as exc:
            return _error(503, "embedding_unavailable", str(exc))
        # Wait (bounded) for this replica's copy, so the writer can read its own write here at once.
        applied = self.local.wait_for(body["version"], timeout=1.0)
        return _reply(200, {**body, "mode": "redis" if self.follower else "embedded",
                            "applied_on_replica": applied, "replica": self.replica})

    def _add_items(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        new = [NewItem(i["item_id"], i.get("codes"), i.get("text")) for i in items]
        version, pairs = add_new_items(self.store, new, self.local.sizes, self._load_quantizer_once, self._embed)
        return {"version": version, "added": [{"item_id": item, "semantic_id": packed,
                                               "codes": codes_of(packed, self.local.sizes)} for item, packed in pairs]}

    def _remove_items(self, item_ids: list[str]) -> dict[str, Any]:
        return {"version": self.store.remove(item_ids), "removed": item_ids}

    def _load_quantizer_once(self) -> Any:
        if self._quantizer_loader is None:
            raise InvalidItemError("adding items by text needs the quantizer of the checkpoint's prepared dataset, "
                                   "which this service cannot find (set `quantizer`); give explicit `codes`")
        if self._quantizer is None:
            self._quantizer = self._quantizer_loader()
        return self._quantizer

    def _embed(self, texts: list[str]) -> np.ndarray:
        from nezha.semantic_ids.embed import embed_texts

        return embed_texts(texts, self.cfg.embedding_model, show_progress=False)


# ---- HTTP: request models ------------------------------------------------------------------------------
ItemId = Annotated[StrictStr, StringConstraints(min_length=1, max_length=MAX_ITEM_ID_CHARS)]


class RecommendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    history: list[ItemId] = Field(min_length=1, description="item ids the user interacted with, oldest first")
    k: StrictInt = Field(10, description="how many items to return (1..max_k)")
    decoder: StrictStr | None = Field(None, description="nezha (default), mtp, beam, hf-beam, hf-beam-constrained")
    exclude: list[ItemId] = Field(default_factory=list, description="item ids never to return")


class RecommendedItem(BaseModel):
    item_id: str
    score: float = Field(description="cumulative log-probability of the item's semantic ID")


class BatchInfo(BaseModel):
    id: int = Field(description="decode call on that replica")
    size: int = Field(description="requests decoded together in it")


class RecommendResponse(BaseModel):
    items: list[RecommendedItem]
    decoder: str
    k: int
    catalog_version: int
    latency_ms: float = Field(description="server-side time from receiving the request to answering it")
    replica: str
    batch: BatchInfo


class NewItemModel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    item_id: ItemId
    text: Annotated[StrictStr, StringConstraints(min_length=1, max_length=10_000)] | None = None
    codes: list[StrictInt] | None = None

    @model_validator(mode="after")
    def _one_source(self) -> NewItemModel:
        if (self.text is None) == (self.codes is None):
            raise ValueError("give exactly one of `text` (a new ID is assigned) or `codes`")
        return self


class AddItemsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: list[NewItemModel] = Field(min_length=1, max_length=MAX_ADMIN_ITEMS)


# ---- HTTP: errors never carry tracebacks ----------------------------------------------------------------
def _json_error(status: int, code: str, detail: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail, **extra}, status_code=status)


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
        too_large = _json_error(413, "body_too_large", f"request body over {limit} bytes")
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


class Unavailable(Exception):
    """No decoder replica could take the call (backpressure, none running, the replica died): safe to retry."""


class TimedOut(Exception):
    """The decoder replica did not answer within request_timeout_s."""


Forward = Callable[..., Awaitable[dict[str, Any]]]


def create_api(cfg: ServeConfig, forward: Forward, metrics: ServiceMetrics) -> FastAPI:
    """The HTTP API; `forward(method, *args, timeout=seconds)` calls a decoder replica and returns its reply."""
    api = FastAPI(title="NEZHA recommendations", version="1",
                  description="Generative recommendation with the NEZHA decoder over a live item catalog.")
    api.add_middleware(BodySizeLimit, max_bytes=cfg.max_body_bytes,
                       on_reject=lambda: metrics.requests.labels("*", "413").inc())

    def count(request: Request, status: int) -> None:
        # The route template, not the path: paths carry item ids and would explode the label set.
        metrics.requests.labels(getattr(request.scope.get("route"), "path", "unmatched"), str(status)).inc()

    @api.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"field": ".".join(str(p) for p in e["loc"] if p != "body") or "body", "message": e["msg"]}
                  for e in exc.errors()]
        count(request, 422)
        return _json_error(422, "invalid_request", "; ".join(f"{e['field']}: {e['message']}" for e in errors),
                           errors=errors)

    @api.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed"}.get(
            exc.status_code, "http_error")
        count(request, exc.status_code)
        return JSONResponse({"error": code, "detail": str(exc.detail)}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @api.exception_handler(Unavailable)
    async def unavailable(request: Request, exc: Unavailable) -> JSONResponse:
        count(request, 503)
        return _json_error(503, "unavailable", str(exc), retryable=True)

    @api.exception_handler(TimedOut)
    async def timed_out(request: Request, exc: TimedOut) -> JSONResponse:
        count(request, 504)
        return _json_error(504, "timeout", str(exc))

    @api.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        count(request, 500)
        return _json_error(500, "internal_error", "internal error; the server log has the details")

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

    def respond(route: str, start: float, reply: dict[str, Any]) -> JSONResponse:
        body, status = reply["body"], reply["status"]
        if reply["stats"] is not None:
            metrics.observe_decode(reply["stats"])
        elapsed = time.perf_counter() - start
        if status == 200 and route == "/v1/recommend":
            body["latency_ms"] = round(elapsed * 1000, 3)
        metrics.observe_request(route, status, elapsed)
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
            return respond("/v1/recommend", start, _error(422, "invalid_request", problem))
        return respond("/v1/recommend", start, await call("recommend", req.model_dump()))

    @api.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/readyz")
    async def readyz() -> JSONResponse:
        try:
            status = await forward("ready", timeout=cfg.ready_timeout_s)
        except (Unavailable, TimedOut) as exc:
            return _json_error(503, "not_ready", str(exc), ready=False)
        catalog = status["catalog"]
        metrics.observe_catalog(status["replica"], catalog["version"], catalog["size"], bool(status["degraded"]))
        return JSONResponse(status)

    @api.get("/metrics", response_class=Response)
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

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


@serve.deployment(name="Ingress")
@serve.ingress()
class Ingress:
    """HTTP front: validation, auth and metrics here; decoding and catalog work on the Recommender replicas."""

    def __init__(self, recommender: DeploymentHandle, cfg: ServeConfig) -> None:
        self.recommender = recommender
        self.cfg = cfg
        self.metrics = ServiceMetrics()

    def __serve_build_asgi_app__(self) -> FastAPI:  # called by Serve once per replica, after __init__
        return create_api(self.cfg, self._forward, self.metrics)

    async def _forward(self, method: str, *args: Any, timeout: float) -> dict[str, Any]:
        try:
            return await asyncio.wait_for(getattr(self.recommender, method).remote(*args), timeout)
        except asyncio.TimeoutError:
            raise TimedOut(f"the decoder replica did not answer within {timeout} s") from None
        except (BackPressureError, DeploymentUnavailableError, RayActorError, ActorUnavailableError) as exc:
            # Retrying is safe and Serve routes it to a live replica: a recommendation has no effect, and an
            # admin write that did land before the replica died fails its retry (409/404: ids are unique).
            raise Unavailable(f"no decoder replica could take the request ({type(exc).__name__}); "
                              "retry") from None


# ---- building the application ----------------------------------------------------------------------------
def build_app(cfg: ServeConfig) -> serve.Application:
    cfg = cfg.resolved()
    # Refuse a bad checkpoint here, with the reason, before any running replica is replaced by one that fails.
    verify_checkpoint(cfg.checkpoint)
    Catalog.load(FsPath(cfg.checkpoint) / "catalog")
    scaling: dict[str, Any] = {"autoscaling_config": cfg.autoscaling_config}
    if cfg.redis_url is None:
        log.warning("no Redis URL (%s): the catalog lives in-process, so the decoder runs as 1 replica", REDIS_URL_ENV)
        scaling = {"num_replicas": 1, "autoscaling_config": None}
    recommender = serve.deployment(Recommender, name="Recommender").options(
        max_ongoing_requests=cfg.max_ongoing_requests, max_queued_requests=cfg.max_queued_requests,
        health_check_period_s=cfg.health_check_period_s,
        health_check_timeout_s=cfg.health_check_timeout_s, ray_actor_options=cfg.ray_actor_options, **scaling,
    ).bind(cfg)
    return Ingress.options(num_replicas=cfg.ingress_replicas, max_ongoing_requests=cfg.ingress_max_ongoing_requests,
                           ray_actor_options={"num_cpus": cfg.ingress_num_cpus}).bind(recommender, cfg)


def app_builder(args: dict[str, Any]) -> serve.Application:
    """Entry point of `serve run serve.config.yaml` (args: ServeConfig fields)."""
    return build_app(from_dict(ServeConfig, dict(args or {}), source="serve application args"))
