"""The Recommender deployment: one replica serves the HTTP API itself (serve/http.py) over the model, a local
catalog copy, batched decoding and the catalog admin writes.

There is no separate ingress deployment: the proxy routes each HTTP request straight to a replica, so a
request costs one hop and no second (de)serialisation, and no ingress process competes with decoding for
the cores (docs/serving.md has the profile that chose this). Each replica loads the safetensors checkpoint
and catalog once, on the GPU when Ray gave it one, and groups concurrent requests (serve/batcher.py) into one `nezha.decoding.decode` call per decoder (one prefill +
one draft-head beam search for NEZHA). Its catalog copy is followed from Redis by a background thread
(`nezha.live_catalog.CatalogFollower`) or, without Redis, lives in-process (one replica).

Batch size, batch wait and the pending-request bound are its `user_config` (`BatchConfig`), applied by
`reconfigure` on running replicas. Past the bound a request gets a fast 503 `unavailable` from the replica.

Its methods take validated requests (serve/schemas.py) and return results, or raise the typed errors of
serve/errors.py; `_query` is the one place a user's request is checked against the service's limits.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from fastapi import FastAPI
from ray import serve
from ray.serve.exceptions import RayServeException

from nezha.catalog import Catalog
from nezha.config import from_dict
from nezha.decoding import available_decoders, decode, decoder_available
from nezha.decoding.graphs import DraftGraphs
from nezha.device import resolve_device
from nezha.live_catalog import (
    REDIS_URL_ENV,
    CatalogFollower,
    CatalogStore,
    CatalogView,
    InProcessStore,
    LocalCatalog,
    RedisCatalog,
    StoreUnavailableError,
    codes_of,
    freeze_heap,
    load_item_metadata,
    redact_url,
)
from nezha.model.checkpoint import load_checkpoint
from nezha.ranking import max_history_of, search_width, top_k
from serve.admin import CatalogAdmin
from serve.batcher import DecodeBatcher
from serve.config import BatchConfig, ServeConfig
from serve.errors import InvalidRequest, NotFound, ServiceError, Unavailable, UnknownDecoder, UnknownItems
from serve.http import create_api
from serve.metrics import DecoderMetrics, HttpMetrics
from serve.schemas import (
    BatchInfo,
    ItemResponse,
    NewItemModel,
    Recommendation,
    RecommendedItem,
    RecommendRequest,
)

# Under "ray.serve" so Serve writes these lines to each replica's log file.
log = logging.getLogger("ray.serve.nezha")


def max_replicas_of(deployment_config: Any) -> int:
    """The most replicas a deployment config lets Serve run (num_replicas, or autoscaling's max_replicas)."""
    autoscaling = getattr(deployment_config, "autoscaling_config", None)
    if autoscaling is not None:
        return int(autoscaling.max_replicas)
    return int(deployment_config.num_replicas or 1)


def check_embedded_single_replica(deployment_config: Any) -> None:
    """Without Redis each replica would hold its own diverging catalog: refuse more than one replica."""
    most = max_replicas_of(deployment_config)
    if most > 1:
        raise ValueError(f"no Redis URL ({REDIS_URL_ENV}): the catalog lives in-process, so the Recommender must "
                         f"run as one replica, but its deployment options allow {most}; set num_replicas: 1 "
                         f"(no autoscaling_config) in the `deployments:` section, or give it a Redis URL")


@dataclass
class _Query:
    decoder: str
    k: int
    history: list[int]  # packed IDs, oldest first, at most max_history
    exclude: frozenset[str]


class Recommender:
    """One replica: the HTTP API, the model, a local catalog copy, batched decoding, catalog admin."""

    def __init__(self, cfg: ServeConfig) -> None:
        self.cfg = cfg
        try:
            context = serve.get_replica_context()
            self.replica, deployment_config = context.replica_id.unique_id, context._deployment_config
        except RayServeException:  # constructed outside Serve
            self.replica, deployment_config = f"local-{os.getpid()}", None
        if not cfg.redis_url and deployment_config is not None:
            check_embedded_single_replica(deployment_config)
        if cfg.torch_threads > 0:
            torch.set_num_threads(cfg.torch_threads)
        # Ray leaves CUDA_VISIBLE_DEVICES alone for replicas given no GPU, so ask Ray what this one got.
        self.device = resolve_device(cfg.device, gpu_granted=bool(ray.get_gpu_ids()) if ray.is_initialized() else True)
        self.model = load_checkpoint(cfg.checkpoint, self.device, dtype=cfg.dtype)
        self.loaded_at = time.time()
        # The Ray node this replica runs on: which replica is where when they spread over nodes.
        self.node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
        catalog = Catalog.load(Path(cfg.checkpoint) / "catalog")
        if tuple(self.model.layout.sizes) != catalog.codebook_sizes:
            raise ValueError(f"checkpoint model codebooks {self.model.layout.sizes} differ from its catalog's "
                             f"{catalog.codebook_sizes}")
        self.max_history = max_history_of(cfg.checkpoint, cfg.max_history)
        self.decoders = [d for d in cfg.decoders if decoder_available(self.model, d)]
        if not self.decoders:
            raise ValueError(f"the checkpoint serves none of the configured decoders {cfg.decoders} "
                             f"(it has heads for {list(available_decoders(self.model))})")
        # With Redis the copy starts from Redis's snapshot; the checkpoint's own copy (its maps, verifier and
        # a metadata dict per item: seconds and gigabytes at millions of items) only when Redis has none.
        self.local = LocalCatalog({}, catalog.codebook_sizes, self.device) if cfg.redis_url else \
            LocalCatalog.from_catalog(catalog, self.device, load_item_metadata(cfg.checkpoint, catalog))
        # On a GPU the draft head's search is launch-bound: replay it from CUDA graphs (one per batch bucket).
        self.graphs = DraftGraphs() if self.device.type == "cuda" else None
        self.metrics = DecoderMetrics()
        self.http_metrics = HttpMetrics()
        self._pending = 0  # recommendation queries decoding or waiting for a batch on this replica
        self.follower: CatalogFollower | None = None
        if cfg.redis_url:
            self.store: CatalogStore = RedisCatalog(cfg.redis_url, cfg.redis_prefix, cfg.feed_maxlen)
            self.follower = CatalogFollower(RedisCatalog(cfg.redis_url, cfg.redis_prefix, cfg.feed_maxlen,
                                                         socket_timeout=cfg.feed_block_ms / 1000 + 5),
                                            self.local, block_ms=cfg.feed_block_ms, batch_ms=cfg.feed_batch_ms,
                                            logger=logging.getLogger("ray.serve.nezha.catalog"))
            self.follower.sync_once()  # start from Redis's view when it is reachable
            if self.local.source != "redis":  # unreachable or empty: serve the checkpoint's catalog meanwhile
                own = LocalCatalog.from_catalog(catalog, self.device, load_item_metadata(cfg.checkpoint, catalog))
                self.local.replace(own.view().items.table, own.version, "checkpoint", meta=own.view().meta)
            self.follower.start()
            log.info("catalog: Redis %s prefix %r (%s), version %d, %d items", redact_url(cfg.redis_url),
                     cfg.redis_prefix, self.local.source, self.local.version, len(self.local))
        else:
            self.store = InProcessStore(self.local)
            self.local.source = "embedded"
            log.warning("catalog: no Redis URL (%s): in-process catalog from the checkpoint; admin changes apply "
                        "to this replica only and are lost on restart", REDIS_URL_ENV)
        self.admin = CatalogAdmin(self.store, self.local, cfg, "redis" if self.follower else "embedded",
                                  self.replica, on_change=self._observe_catalog)
        self._batch_ids = itertools.count()
        self.batcher = DecodeBatcher(self._decode_batch, BatchConfig.max_batch_size, BatchConfig.batch_wait_timeout_s)
        self.reconfigure({})  # BatchConfig defaults until Serve passes the deployment's user_config
        with torch.inference_mode():  # warm-up: first-call allocations happen before traffic
            view = self.local.view()
            decode(self.model, self.decoders[0], [self.local.codes(view.lookup(catalog.item_ids[:1])[0])],
                   view.verifier, beam=cfg.beam, graphs=self.graphs)
        # The model and catalog out of the cyclic GC's full collections, which the follower's allocations
        # trigger and which hold the GIL for ~0.25 s at 1M items: a stall for the decodes then.
        frozen = freeze_heap()
        log.info("replica %s ready: %s on %s, decoders %s, max_history %d (%d objects frozen out of the GC)",
                 self.replica, cfg.checkpoint, self.device, self.decoders, self.max_history, frozen)

    def __serve_build_asgi_app__(self) -> FastAPI:  # called by Serve once per replica, after __init__
        return create_api(self.cfg, self, self.http_metrics)

    def reconfigure(self, user_config: dict[str, Any] | None) -> None:
        """Serve calls this with the deployment's `user_config` at start and whenever it changes."""
        self.batching = from_dict(BatchConfig, dict(user_config or {}), source="Recommender user_config")
        self.batcher.configure(self.batching.max_batch_size, self.batching.batch_wait_timeout_s)
        log.info("replica %s batching: %s", self.replica, self.batching)

    def __del__(self) -> None:
        if getattr(self, "follower", None) is not None:
            self.follower.stop()
        if getattr(self, "batcher", None) is not None:
            self.batcher.stop()

    def check_health(self) -> None:
        """Serve's health check: the follower thread must be alive (a Redis outage is not unhealthy)."""
        if self.follower is not None and not self.follower.is_alive():
            raise RuntimeError("the catalog follower thread died")
        self._observe_catalog()

    # ---- recommendations ---------------------------------------------------------------------------
    def _query(self, request: RecommendRequest) -> _Query:
        """The decode query of one user's request; raises the ServiceError that refuses it. Pydantic checked
        the types; this checks the limits of the config, the decoder and the items."""
        cfg = self.cfg
        if len(request.history) > cfg.max_history_items:
            raise InvalidRequest(f"history: {len(request.history)} items; at most {cfg.max_history_items} "
                                 "(the model reads the last ones)")
        seen: set[str] = set()
        dups = sorted({i for i in request.history if i in seen or seen.add(i)})
        if dups:
            raise InvalidRequest(f"history: duplicate item ids {dups[:20]}")
        if not 1 <= request.k <= cfg.max_k:
            raise InvalidRequest(f"k: {request.k} is out of range 1..{cfg.max_k}")
        if len(request.exclude) > cfg.max_exclude:
            raise InvalidRequest(f"exclude: {len(request.exclude)} items; at most {cfg.max_exclude}")
        decoder = request.decoder or cfg.default_decoder
        if decoder not in self.decoders:
            raise UnknownDecoder(f"decoder {decoder!r} is not available; this service offers "
                                 f"{', '.join(self.decoders)}", available=self.decoders)
        packed, missing = self.local.lookup(request.history)
        if missing:
            raise UnknownItems(f"{len(missing)} history item(s) are not in the catalog (unknown or removed): "
                               f"{', '.join(missing[:20])}", item_ids=missing)
        exclude = set(request.exclude)
        if request.exclude_history:
            exclude.update(request.history)
        return _Query(decoder, request.k, packed[-self.max_history:], frozenset(exclude))

    async def recommend(self, request: RecommendRequest) -> Recommendation:
        query = self._query(request)
        with self._admitted(1):
            return await self.batcher.submit(query)

    async def recommend_many(self, requests: list[RecommendRequest]) -> list[Recommendation | ServiceError]:
        """Many users at once, in order: their queries enter the batcher together, so they decode in one call
        where max_batch_size allows; a user's refusal is that user's result."""
        if len(requests) > self.cfg.max_batch_users:
            raise InvalidRequest(f"requests: {len(requests)} users; at most {self.cfg.max_batch_users}")
        queries: list[_Query | ServiceError] = []
        for request in requests:
            try:
                queries.append(self._query(request))
            except ServiceError as refusal:
                queries.append(refusal)
        valid = [q for q in queries if isinstance(q, _Query)]
        with self._admitted(len(valid)):
            decoded = iter(await asyncio.gather(*(self.batcher.submit(q) for q in valid)))
        return [next(decoded) if isinstance(q, _Query) else q for q in queries]

    @contextlib.contextmanager
    def _admitted(self, count: int) -> Iterator[None]:
        """Count `count` queries as pending while they decode; refuse them at once (503, retryable) when they
        would take this replica past max_pending_requests, instead of queueing into a timeout."""
        limit = self.batching.max_pending_requests
        if self._pending + count > limit:
            raise Unavailable(f"replica {self.replica} has {self._pending} requests pending (max_pending_requests "
                              f"{limit}); retry", retry_after_s=self.cfg.retry_after_s)
        self._pending += count
        try:
            yield
        finally:
            self._pending -= count

    async def _decode_batch(self, queries: list[_Query]) -> list[Recommendation]:
        groups: dict[str, list[int]] = defaultdict(list)
        for i, q in enumerate(queries):
            groups[q.decoder].append(i)
        answers: dict[int, Recommendation] = {}
        for decoder, rows in groups.items():
            batch = [queries[i] for i in rows]
            # Decode past k so excluded items can be dropped; one width for the whole group: the widest need.
            beam = max(search_width(self.cfg.beam, q.k, len(q.exclude), self.cfg.max_beam) for q in batch)
            # One catalog version for the whole call: the search and the id mapping read the same view.
            view = self.local.view()
            start = time.perf_counter()
            # In a thread: the event loop keeps accepting requests, which form the next batch.
            ids, scores, invalid = await asyncio.to_thread(self._decode, decoder, batch, beam, view)
            decode_s = time.perf_counter() - start
            items = view.items_of(ids.reshape(-1))
            batch_id = next(self._batch_ids)
            self.metrics.observe_batch(decoder, len(batch), decode_s, int(invalid.sum()))
            info = BatchInfo(id=batch_id, size=len(batch))
            width = ids.shape[1]
            kept = [top_k(items[pos * width:(pos + 1) * width], scores[pos].tolist(), q.exclude, q.k)
                    for pos, q in enumerate(batch)]
            # The answered items' metadata in one read for the whole batch (one Redis round trip where the
            # catalog lives in Redis), off the event loop.
            metas = iter(await asyncio.to_thread(view.metas_of, [item for answer in kept for item, _ in answer]))
            for row, q, answer in zip(rows, batch, kept, strict=True):
                ranked = [RecommendedItem(item_id=item, score=round(score, 6), **next(metas)) for item, score in answer]
                answers[row] = Recommendation(items=ranked, decoder=decoder, k=q.k, catalog_version=view.version,
                                              replica=self.replica, batch=info)
        return [answers[row] for row in range(len(queries))]

    def _decode(self, decoder: str, batch: list[_Query], beam: int,
                view: CatalogView) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        histories = [self.local.codes(q.history) for q in batch]
        with torch.inference_mode():  # thread-local: set in the decoding thread itself
            out = decode(self.model, decoder, histories, view.verifier, beam=beam, topk=beam, graphs=self.graphs)
        return out.ids.cpu().numpy(), out.scores.float().cpu().numpy(), out.invalid.cpu().numpy()

    def item(self, item_id: str) -> ItemResponse:
        """One item as this replica's catalog copy has it: semantic ID, codes, metadata."""
        view = self.local.view()
        packed = view.item_to_id.get(item_id)
        if packed is None:
            raise NotFound(f"item {item_id!r} is not in the catalog", item_id=item_id)
        return ItemResponse(item_id=item_id, semantic_id=packed, codes=codes_of(packed, self.local.sizes),
                            **view.meta_of(item_id), catalog_version=view.version, replica=self.replica)

    # ---- status --------------------------------------------------------------------------------------
    def _observe_catalog(self) -> None:
        state = self.local.state()
        degraded = bool(self.follower.degraded()) if self.follower else False
        health = self.follower.health if self.follower else None
        self.metrics.observe_catalog(state["version"], state["size"], degraded,
                                     resyncs=health.resyncs if health else 0, forks=health.forks if health else 0)

    def ready(self) -> dict[str, Any]:
        """Cheap (no Redis call): model loaded, catalog copy state, batching in force, why the copy may be stale."""
        status = {"ready": True, "replica": self.replica, "node_id": self.node_id, "pid": os.getpid(),
                  "loaded_at": self.loaded_at,
                  "device": str(self.device), "decoders": self.decoders,
                  "batching": asdict(self.batching), "pending": self._pending,
                  "catalog": {"mode": self.admin.mode, **self.local.state()},
                  "degraded": self.follower.degraded() if self.follower else []}
        if self.follower is not None:
            h = self.follower.health
            status["follower"] = {"connected": h.connected, "resyncs": h.resyncs, "forks": h.forks,
                                  "redis_version": h.remote_version,
                                  "last_ok_s_ago": None if h.last_ok is None else round(time.time() - h.last_ok, 3)}
        return status

    async def catalog_status(self) -> dict[str, Any]:
        status = self.ready()
        try:
            status["store"] = await asyncio.to_thread(self.store.status)
        except StoreUnavailableError as exc:
            status["store"] = {"mode": "redis", "available": False, "error": str(exc)}
        return status

    # ---- catalog admin (serve/admin.py) -------------------------------------------------------------
    async def add_items(self, items: list[NewItemModel]) -> dict[str, Any]:
        return await asyncio.to_thread(self.admin.add, items)

    async def remove_items(self, item_ids: list[str]) -> dict[str, Any]:
        return await asyncio.to_thread(self.admin.remove, item_ids)
