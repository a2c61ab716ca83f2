"""Operating the service: deployed from a Serve config (`deployments:` section) the way `serve run` / `serve
deploy` do, then reconfigured live, scraped for metrics across replicas, written to, and flooded.

Real Ray Serve over HTTP, a real redis-server, Recommender replicas that serve HTTP themselves. Each test prints one `OPS ...` line with its
figures (run with `-s`; docs/serving.md quotes them).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis_fixtures import RedisServer, free_port
from serve_fixtures import ADMIN, HISTORY, free_codes, service_settings

from nezha.catalog import Catalog
from nezha.live_catalog import RedisCatalog, load_item_metadata

pytestmark = pytest.mark.slow

APP = "ops"
RECOMMENDER = {"autoscaling_config": {"min_replicas": 1, "max_replicas": 1}, "ray_actor_options": {"num_cpus": 0.5},
               "max_ongoing_requests": 32, "max_queued_requests": 64,
               "user_config": {"max_batch_size": 4, "batch_wait_timeout_s": 0.05, "max_pending_requests": 16}}
TWO_DECODERS = {**RECOMMENDER, "autoscaling_config": {"min_replicas": 2, "max_replicas": 2},
                "user_config": {"max_batch_size": 16, "batch_wait_timeout_s": 0.1, "max_pending_requests": 48}}


@dataclass
class Ops:
    client: httpx.Client
    redis: RedisServer
    catalog: Catalog
    deploy: Callable[[dict[str, Any]], None]

    def ready_by_replica(self, predicate: Callable[[dict[str, Any]], bool], replicas: int,
                         timeout: float = 120.0) -> dict[str, dict[str, Any]]:
        """/readyz until `replicas` distinct decoder replicas answered with a status satisfying `predicate`."""
        seen: dict[str, dict[str, Any]] = {}
        deadline = time.monotonic() + timeout
        while len(seen) < replicas:
            assert time.monotonic() < deadline, f"only {sorted(seen)} of {replicas} replicas in {timeout} s"
            r = self.client.get("/readyz")
            if r.status_code == 200 and predicate(r.json()):
                seen[r.json()["replica"]] = r.json()
        return seen


def serve_config(args: dict[str, Any], recommender: dict[str, Any]) -> dict[str, Any]:
    """A Serve config like serve.config.yaml: model and limits in `args`, Serve's options in `deployments:`."""
    return {"applications": [{"name": APP, "route_prefix": "/", "import_path": "serve.app:app_builder", "args": args,
                              "deployments": [{"name": "Recommender", **recommender}]}]}


def decoder_replica_actors() -> set[str]:
    import ray

    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == "serve" and a["name"].split("::")[-1].startswith(f"{APP}#Recommender#")}


@pytest.fixture(scope="module")
def ops(ray_session: Any, tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ops]:
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    redis = RedisServer(tmp_path_factory.mktemp("ops-redis"))
    redis.start()
    try:
        catalog = Catalog.load(tiny_checkpoint / "catalog")
        RedisCatalog(redis.url).push(catalog, item_meta=load_item_metadata(tiny_checkpoint, catalog))
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 60})
        # A request admitted within the bounds may wait out a busy machine: only refusals should be quick.
        args = {**service_settings(tiny_checkpoint, redis.url), "request_timeout_s": 50}

        def deploy(recommender: dict[str, Any]) -> None:
            client = _get_global_client()
            client.deploy_apps(ServeDeploySchema.model_validate(serve_config(args, recommender)))  # as `serve deploy`
            client._wait_for_application_running(APP, timeout_s=300)

        deploy(RECOMMENDER)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            yield Ops(client, redis, catalog, deploy)
    finally:
        serve.shutdown()
        redis.kill()


def test_scaling_and_batch_size_change_without_restarting_replicas(ops: Ops) -> None:
    (before,) = ops.ready_by_replica(lambda s: True, replicas=1).values()
    actors_before = decoder_replica_actors()
    assert len(actors_before) == 1 and before["batching"] == RECOMMENDER["user_config"]

    new_batching = TWO_DECODERS["user_config"]
    ops.deploy(TWO_DECODERS)
    after = ops.ready_by_replica(lambda s: s["batching"] == new_batching, replicas=2)
    actors_after = decoder_replica_actors()
    assert actors_before < actors_after and len(actors_after) == 2  # the first replica kept serving; one added
    same = after[before["replica"]]
    assert (same["pid"], same["loaded_at"]) == (before["pid"], before["loaded_at"])  # no model reload
    with ThreadPoolExecutor(24) as pool:  # the new max_batch_size is in force: batches above the old 4
        bodies = [r.json() for r in pool.map(lambda _: ops.client.post(
            "/v1/recommend", json={"history": HISTORY, "k": 3}), range(24))]
    assert max(b["batch"]["size"] for b in bodies) > 4
    print(f"\nOPS reconfigure: replica actors before {sorted(actors_before)} after {sorted(actors_after)}; "
          f"replica {before['replica']} pid {before['pid']} loaded_at {before['loaded_at']:.3f} unchanged; "
          f"batching {new_batching} on both; largest batch after {max(b['batch']['size'] for b in bodies)}")


def scrape_totals(metric: str, labels: dict[str, str]) -> tuple[float, dict[str, float]]:
    """(sum over every replica's series of `metric` with `labels`, value by replica) from Ray's metrics port."""
    import ray

    total, by_replica = 0.0, {}
    for node in ray.nodes():
        text = httpx.get(f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics").text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name.endswith(metric) and all(sample.labels.get(k) == v for k, v in labels.items()):
                    total += sample.value
                    replica = sample.labels.get("replica", "?")
                    by_replica[replica] = by_replica.get(replica, 0.0) + sample.value
    return total, by_replica


def test_metrics_add_up_over_two_replicas(ops: Ops) -> None:
    ops.deploy(TWO_DECODERS)
    ops.ready_by_replica(lambda s: True, replicas=2)
    # Series no other test feeds (the batch route, the mtp decoder): earlier traffic may still be unexported.
    requests = ("nezha_requests_total", {"route": "/v1/recommend/batch", "status": "200", "application": APP})
    decoded = ("nezha_decoded_requests_total", {"decoder": "mtp", "application": APP})
    base_requests, base_decoded = scrape_totals(*requests)[0], scrape_totals(*decoded)[0]
    sent, body = 60, {"requests": [{"history": HISTORY, "k": 3, "decoder": "mtp"}]}
    with ThreadPoolExecutor(12) as pool:
        statuses = list(pool.map(lambda _: ops.client.post("/v1/recommend/batch", json=body).status_code, range(sent)))
    assert statuses == [200] * sent
    deadline = time.monotonic() + 90  # Ray's metrics agent exports every few seconds
    while True:
        (total, by_replica), (total_decoded, by_decoder) = scrape_totals(*requests), scrape_totals(*decoded)
        if total - base_requests == sent and total_decoded - base_decoded == sent or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert total - base_requests == sent and total_decoded - base_decoded == sent
    assert len([v for v in by_replica.values() if v > 0]) == 2  # both replicas answered some over HTTP
    assert len([v for v in by_decoder.values() if v > 0]) == 2
    print(f"\nOPS metrics: sent {sent}; nezha_requests_total by replica {by_replica} (sum {total:.0f}); "
          f"nezha_decoded_requests_total by decoder replica {by_decoder} (sum {total_decoded:.0f})")


def test_catalog_changes_reach_every_replica_within_milliseconds(ops: Ops) -> None:
    """Time from an admin write's answer to every decoder replica serving its version, over 100 writes."""
    ops.deploy(TWO_DECODERS)
    (codes,) = free_codes(ops.redis.url, ops.catalog.codebook_sizes)
    lags_ms: list[float] = []
    for i in range(100):
        if i % 2 == 0:
            r = ops.client.post("/v1/catalog/items", headers=ADMIN, json={"items": [{"item_id": "PROP", "codes": codes}]})
        else:
            r = ops.client.delete("/v1/catalog/items/PROP", headers=ADMIN)
        answered = time.time()
        assert r.status_code == 200, r.text
        version = r.json()["version"]
        replicas = ops.ready_by_replica(lambda s, v=version: s["catalog"]["version"] >= v, replicas=2, timeout=30)
        assert {s["catalog"]["version"] for s in replicas.values()} == {version}
        # Negative: the replica served it before the writer had its answer (the writing replica always does).
        lags_ms.append(max(s["catalog"]["applied_at"] - answered for s in replicas.values()) * 1000)
    quantiles = statistics.quantiles(lags_ms, n=100)
    p50, p99 = statistics.median(lags_ms), quantiles[98]
    assert p99 < 1000
    print(f"\nOPS propagation: 100 writes, 2 replicas; answer -> every replica serving the version: p50 "
          f"{p50:.1f} ms, p99 {p99:.1f} ms, max {max(lags_ms):.1f} ms")


def test_a_flood_past_the_pending_bound_gets_fast_retryable_503s(ops: Ops) -> None:
    # Tight limits, applied live: 2 replicas admit 4 requests each and decode 2 at a time in slow batches;
    # Serve lets 64 per replica reach them, so the replicas themselves turn the rest away.
    ops.deploy({**RECOMMENDER, "autoscaling_config": {"min_replicas": 2, "max_replicas": 2},
                "max_ongoing_requests": 64, "max_queued_requests": 64,
                "user_config": {"max_batch_size": 2, "batch_wait_timeout_s": 0.2, "max_pending_requests": 4}})
    clients, per_client = 100, 3

    def client_run(_: int) -> list[tuple[int, float, httpx.Response]]:
        out = []
        with httpx.Client(base_url=str(ops.client.base_url), timeout=60) as client:
            for _ in range(per_client):
                start = time.perf_counter()
                r = client.post("/v1/recommend", json={"history": HISTORY, "k": 3})
                out.append((r.status_code, time.perf_counter() - start, r))
        return out

    with ThreadPoolExecutor(clients) as pool:
        results = [x for run in pool.map(client_run, range(clients)) for x in run]
    statuses = [s for s, _, _ in results]
    refused = [(seconds, r) for s, seconds, r in results if s == 503]
    assert len(results) == clients * per_client and set(statuses) <= {200, 503}  # none lost, no other 5xx
    assert statuses.count(200) > 0 and refused
    for _, r in refused:
        assert r.json()["error"] == "unavailable" and r.json()["retryable"] is True
        assert r.headers["Retry-After"] == "1" and "max_pending_requests" in r.json()["detail"]
    ok_s = sorted(seconds for s, seconds, _ in results if s == 200)
    refused_s = sorted(seconds for seconds, _ in refused)
    # How fast a refusal comes back depends on how fast Serve's proxy and the replica's event loop get to the
    # request (~5 ms of CPU each on 2 cores shared with 100 client threads): the figures below say it.
    print(f"\nOPS overload: sent {len(results)} ({clients} clients x {per_client}), 200 {len(ok_s)}, "
          f"503 {len(refused)}, other 0; 503 latency p50 {statistics.median(refused_s) * 1000:.0f} ms, p99 "
          f"{statistics.quantiles(refused_s, n=100)[98] * 1000:.0f} ms, slowest {refused_s[-1] * 1000:.0f} ms; "
          f"200 latency p50 {statistics.median(ok_s) * 1000:.0f} ms, slowest {ok_s[-1] * 1000:.0f} ms; "
          f"load average {os.getloadavg()[0]:.1f}")
