"""The Ray Serve application: a FastAPI ingress in front of replicated, batching decoder replicas.

    client -> Serve proxy -> Ingress (FastAPI: validation, auth, metrics) -> Recommender replicas
                                                                             (model + local catalog copy)

    serve/config.py   ServeConfig, the one config (the `args` of serve.config.yaml)
    serve/http.py     the HTTP API (create_api), its error envelope, the store-error -> HTTP table
    serve/schemas.py  request and response models
    serve/replica.py  Recommender: one decoder replica (model, catalog copy, batched decoding, admin writes)
    serve/app.py      Ingress and the application builder (this file)

`serve run serve.config.yaml` builds the app with `app_builder(args)`; `build_app(ServeConfig(...))` does
the same from Python (tests, serve/loadtest.py).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from nezha.catalog import Catalog
from nezha.config import from_dict
from nezha.live_catalog import REDIS_URL_ENV
from nezha.model.checkpoint import verify_checkpoint
from serve.config import ServeConfig
from serve.http import TimedOut, Unavailable, create_api
from serve.metrics import ServiceMetrics
from serve.replica import Recommender

__all__ = ["Ingress", "ServeConfig", "app_builder", "build_app"]

log = logging.getLogger("ray.serve.nezha")


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


def build_app(cfg: ServeConfig) -> serve.Application:
    cfg = cfg.resolved()
    # Refuse a bad checkpoint here, with the reason, before any running replica is replaced by one that fails.
    verify_checkpoint(cfg.checkpoint)
    Catalog.load(Path(cfg.checkpoint) / "catalog")
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
