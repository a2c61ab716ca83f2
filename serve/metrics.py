"""The service's metrics, through Ray Serve's metrics API (`ray.serve.metrics`).

Each replica records what it did (HTTP requests and their latency; batches, decode time, invalid IDs, its
catalog copy), tagged by Serve with application, deployment and replica. Ray exports them on every node's
metrics port (`ray start --metrics-export-port`, 8080 in cluster/), named `ray_nezha_*`, so totals over N
replicas are a `sum` in Prometheus and a scrape never depends on which replica a load balancer picked. Grafana: cluster/grafana-nezha.json.
"""

from __future__ import annotations

from ray.serve.metrics import Counter, Gauge, Histogram

LATENCY_BUCKETS = [0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0]
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256]


class HttpMetrics:
    """HTTP requests by route template (paths carry item ids and would explode the series) and status."""

    def __init__(self) -> None:
        self.requests = Counter("nezha_requests", "HTTP requests by route and status", tag_keys=("route", "status"))
        self.latency = Histogram("nezha_request_latency_seconds", "server-side latency of answered requests",
                                 boundaries=LATENCY_BUCKETS, tag_keys=("route",))

    def count(self, route: str, status: int) -> None:
        self.requests.inc(tags={"route": route, "status": str(status)})

    def observe(self, route: str, status: int, seconds: float) -> None:
        self.count(route, status)
        self.latency.observe(seconds, tags={"route": route})


class DecoderMetrics:
    """A replica's batches and catalog copy."""

    def __init__(self) -> None:
        self.batches = Counter("nezha_decode_batches", "batched decode calls", tag_keys=("decoder",))
        self.decoded = Counter("nezha_decoded_requests", "requests answered by a decode", tag_keys=("decoder",))
        self.batch_size = Histogram("nezha_decode_batch_size", "requests decoded together in one call",
                                    boundaries=BATCH_BUCKETS, tag_keys=("decoder",))
        self.decode_latency = Histogram("nezha_decode_latency_seconds", "one batched decode call (prefill + search)",
                                        boundaries=LATENCY_BUCKETS, tag_keys=("decoder",))
        self.invalid = Counter("nezha_invalid_ids_dropped", "generated IDs that are not catalog items, dropped",
                               tag_keys=("decoder",))
        self.catalog_version = Gauge("nezha_catalog_version", "catalog version of this replica's copy")
        self.catalog_size = Gauge("nezha_catalog_size", "items in this replica's catalog copy")
        self.catalog_degraded = Gauge("nezha_catalog_degraded",
                                      "1 while this replica's copy may be stale (Redis unreachable or without a catalog)")
        self.catalog_resyncs = Gauge("nezha_catalog_resyncs", "full resyncs of this replica's copy from Redis so far")
        self.catalog_forks = Gauge("nezha_catalog_forks", "resyncs because Redis's history forked from this copy's "
                                                          "(a failover lost changes the copy had applied)")

    def observe_batch(self, decoder: str, size: int, seconds: float, invalid: int) -> None:
        tags = {"decoder": decoder}
        self.batches.inc(tags=tags)
        self.decoded.inc(size, tags=tags)
        self.batch_size.observe(size, tags=tags)
        self.decode_latency.observe(seconds, tags=tags)
        if invalid:
            self.invalid.inc(invalid, tags=tags)

    def observe_catalog(self, version: int, size: int, degraded: bool, resyncs: int = 0, forks: int = 0) -> None:
        self.catalog_version.set(version)
        self.catalog_size.set(size)
        self.catalog_degraded.set(int(degraded))
        self.catalog_resyncs.set(resyncs)
        self.catalog_forks.set(forks)
