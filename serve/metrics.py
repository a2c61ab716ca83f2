"""Prometheus metrics of one ingress replica, in the text format served at GET /metrics.

Decoder replicas report what they did with each answer (batch, decode time, invalid IDs, catalog
version), so the ingress that routed a request records everything about it in one registry; every
request passes through an ingress replica, so with the default single ingress replica /metrics covers
all traffic. With several ingress replicas each serves its own share: sum them in Prometheus.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

__all__ = ["CONTENT_TYPE_LATEST", "ServiceMetrics"]


class ServiceMetrics:
    def __init__(self) -> None:
        disable_created_metrics()  # no *_created series: they double the output and nobody graphs them
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("nezha_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.latency = Histogram("nezha_request_latency_seconds", "server-side latency of answered requests",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.decode_latency = Histogram("nezha_decode_latency_seconds", "one batched decode call (prefill + search)",
                                        ["decoder"], buckets=LATENCY_BUCKETS, registry=r)
        self.batches = Counter("nezha_decode_batches", "batched decode calls", ["decoder"], registry=r)
        self.batch_size = Histogram("nezha_decode_batch_size", "requests decoded together in one call",
                                    ["decoder"], buckets=BATCH_BUCKETS, registry=r)
        self.invalid = Counter("nezha_invalid_ids_dropped", "generated IDs that are not catalog items, dropped",
                               ["decoder"], registry=r)
        self.catalog_version = Gauge("nezha_catalog_version", "catalog version a decoder replica served last",
                                     ["replica"], registry=r)
        self.catalog_size = Gauge("nezha_catalog_size", "items in a decoder replica's catalog copy",
                                  ["replica"], registry=r)
        self.catalog_degraded = Gauge("nezha_catalog_degraded", "1 while a replica's catalog copy may be stale "
                                      "(Redis unreachable or without a catalog), from the last readiness check",
                                      ["replica"], registry=r)

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def observe_decode(self, stats: dict) -> None:
        """Per answered recommendation: `stats` from the decoder replica (see Recommender._answer)."""
        decoder = stats["decoder"]
        if stats["first_in_batch"]:  # count each batch once, by its first request
            self.batches.labels(decoder).inc()
            self.batch_size.labels(decoder).observe(stats["batch_size"])
            self.decode_latency.labels(decoder).observe(stats["decode_s"])
        self.invalid.labels(decoder).inc(stats["invalid"])
        self.observe_catalog(stats["replica"], stats["catalog_version"], stats["catalog_size"])

    def observe_catalog(self, replica: str, version: int, size: int, degraded: bool | None = None) -> None:
        self.catalog_version.labels(replica).set(version)
        self.catalog_size.labels(replica).set(size)
        if degraded is not None:
            self.catalog_degraded.labels(replica).set(int(degraded))

    def render(self) -> bytes:
        return generate_latest(self.registry)
