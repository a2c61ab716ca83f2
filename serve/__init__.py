"""Ray Serve recommendation service: FastAPI ingress + batched decoder replicas over a live catalog.

`serve run serve.config.yaml` (see docs/serving.md); the application builder is `serve.app:app_builder`.
"""
