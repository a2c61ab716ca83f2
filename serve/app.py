"""The Ray Serve application: a FastAPI ingress in front of replicated, batching decoder replicas.

    client -> Serve proxy -> Ingress (FastAPI: validation, auth, metrics) -> Recommender replicas
                                                                             (model + local catalog copy)

    serve/config.py   ServeConfig (the application `args`), BatchConfig (the Recommender's `user_config`)
    serve/http.py     the HTTP API (create_api), its error envelope, the store-error -> HTTP table
    serve/schemas.py  request and response models
    serve/replica.py  Recommender: one decoder replica (model, catalog copy, batched decoding, admin writes)
    serve/metrics.py  metrics through ray.serve.metrics
    serve/app.py      Ingress and the application builder (this file)
    serve/__main__.py `python -m serve run serve.config.yaml`: `serve run` with start-up limits for busy machines

`serve run serve.config.yaml` builds the app with `app_builder(args)` and applies the config's `deployments:`
section (replicas, autoscaling, queue bounds, user_config) on top; `build_app(ServeConfig(...), options)`
does the same from Python (tests, serve/loadtest.py).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from nezha.catalog import Catalog
from nezha.config import from_dict
from nezha.model.checkpoint import verify_checkpoint
from serve.config import DEFAULT_OPTIONS, INGRESS, RECOMMENDER, ServeConfig
from serve.http import TimedOut, Unavailable, create_api
from serve.metrics import IngressMetrics
from serve.replica import Recommender

__all__ = ["Ingress", "ServeConfig", "app_builder", "build_app"]


@serve.deployment(name=INGRESS)
@serve.ingress()
class Ingress:
    """HTTP front: validation, auth and metrics here; decoding and catalog work on the Recommender replicas."""

    def __init__(self, recommender: DeploymentHandle, cfg: ServeConfig) -> None:
        self.recommender = recommender
        self.cfg = cfg
        self.metrics = IngressMetrics()

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


def build_app(cfg: ServeConfig, options: dict[str, dict[str, Any]] | None = None) -> serve.Application:
    """The application; `options`: Serve deployment options by deployment name (the `deployments:` schema),
    on top of DEFAULT_OPTIONS."""
    cfg = cfg.resolved()
    # Refuse a bad checkpoint here, with the reason, before any running replica is replaced by one that fails.
    verify_checkpoint(cfg.checkpoint)
    Catalog.load(Path(cfg.checkpoint) / "catalog")
    unknown = set(options or {}) - {RECOMMENDER, INGRESS}
    if unknown:
        raise ValueError(f"options for unknown deployments {sorted(unknown)}; the app has {RECOMMENDER}, {INGRESS}")

    def merged(name: str) -> dict[str, Any]:
        given = (options or {}).get(name, {})
        opts = {**DEFAULT_OPTIONS[name], **given}
        if "autoscaling_config" in given:  # Serve refuses num_replicas next to autoscaling
            opts.pop("num_replicas")
        return opts

    recommender = serve.deployment(Recommender, name=RECOMMENDER).options(**merged(RECOMMENDER)).bind(cfg)
    return Ingress.options(**merged(INGRESS)).bind(recommender, cfg)


def app_builder(args: dict[str, Any]) -> serve.Application:
    """Entry point of `serve run serve.config.yaml` (args: ServeConfig fields)."""
    return build_app(from_dict(ServeConfig, dict(args or {}), source="serve application args"))
