"""The Ray Serve application: replicated, batching Recommender replicas that serve the HTTP API themselves.

    client -> Serve proxy -> Recommender replica (FastAPI: validation, auth, metrics; model + local catalog copy)

    serve/app.py      the application builder (this file)
    serve/config.py   ServeConfig (the application `args`), BatchConfig (the Recommender's `user_config`)
    serve/replica.py  Recommender: one replica (request checks, model, catalog copy, batched decoding)
    serve/batcher.py  DecodeBatcher: the next batch forms when the decoder is free
    serve/admin.py    CatalogAdmin: the replica's catalog writes
    serve/http.py     the HTTP API (create_api) over a replica: routes, typed error -> HTTP status, body limit
    serve/errors.py   the error envelope and the typed errors a replica raises
    serve/schemas.py  request and response models
    serve/metrics.py  metrics through ray.serve.metrics
    serve/loadtest.py load test of a running (or started here) service over loopback HTTP
    serve/__main__.py `python -m serve run serve.config.yaml`: `serve run` with start-up limits for busy machines

`serve run serve.config.yaml` builds the app with `app_builder(args)` and applies the config's `deployments:`
section (replicas, autoscaling, queue bounds, user_config) on top; `build_app(ServeConfig(...), options)`
does the same from Python (tests, serve/loadtest.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray import serve

from nezha.catalog import Catalog
from nezha.config import from_dict
from nezha.model.checkpoint import verify_checkpoint
from serve.config import DEFAULT_OPTIONS, RECOMMENDER, ServeConfig
from serve.replica import Recommender

__all__ = ["ServeConfig", "app_builder", "build_app"]


def build_app(cfg: ServeConfig, options: dict[str, dict[str, Any]] | None = None) -> serve.Application:
    """The application; `options`: Serve deployment options by deployment name (the `deployments:` schema),
    on top of DEFAULT_OPTIONS."""
    cfg = cfg.resolved()
    # Refuse a bad checkpoint here, with the reason, before any running replica is replaced by one that fails.
    verify_checkpoint(cfg.checkpoint)
    Catalog.load(Path(cfg.checkpoint) / "catalog")
    unknown = set(options or {}) - {RECOMMENDER}
    if unknown:
        raise ValueError(f"options for unknown deployments {sorted(unknown)}: the app has one deployment, "
                         f"{RECOMMENDER}, which serves HTTP itself (there is no separate Ingress deployment)")
    given = (options or {}).get(RECOMMENDER, {})
    opts = {**DEFAULT_OPTIONS[RECOMMENDER], **given}
    if "autoscaling_config" in given:  # Serve refuses num_replicas next to autoscaling
        opts.pop("num_replicas")
    # Late-bound ingress: Serve calls Recommender.__serve_build_asgi_app__ on each replica after __init__.
    return serve.deployment(serve.ingress()(Recommender), name=RECOMMENDER).options(**opts).bind(cfg)


def app_builder(args: dict[str, Any]) -> serve.Application:
    """Entry point of `serve run serve.config.yaml` (args: ServeConfig fields)."""
    return build_app(from_dict(ServeConfig, dict(args or {}), source="serve application args"))
