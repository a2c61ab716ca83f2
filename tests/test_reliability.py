"""Faults, bad input and secrets against the real service on 127.0.0.1 (Ray Serve, 2 replicas, redis-server).

Each fault test prints one `FAULT ...` line with its figures (run with `-s` to see them; docs/operations.md
quotes them).
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis_fixtures import RedisServer
from serve_fixtures import ADMIN, Service, free_codes, redis_items

from nezha.catalog import CatalogError
from nezha.live_catalog import RedisCatalog, StoreUnavailableError
from nezha.model.checkpoint import CheckpointError

pytestmark = pytest.mark.slow


def until_accepted(send: Callable[[], Any], deadline_s: float = 60.0,
                   crashed: list[str] | None = None) -> tuple[Any, int]:
    """Send until 200, retrying only answers the API marks safe to retry; returns (response, refused tries).

    `crashed`: a replica is being killed; Serve's proxy answers the requests that were in flight on it with its
    own plain-text 500 (the app has no hop left to turn that into a 503): count those in it and retry them.
    """
    refused = 0
    deadline = time.monotonic() + deadline_s
    while True:
        r = send()
        if r.status_code == 200:
            return r, refused
        if crashed is not None and r.status_code == 500 and r.text == "Internal Server Error":
            crashed.append(r.text)
        else:
            assert r.status_code == 503, r.text  # never a 5xx other than "unavailable, retry"
            assert "Traceback" not in r.text and r.json()["error"] in {"unavailable", "store_unavailable"}
        refused += 1
        assert time.monotonic() < deadline, f"still refused after {deadline_s} s: {r.text}"
        time.sleep(0.1)


def decoder_replica_actors() -> list[str]:
    import ray

    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == "serve" and "#Recommender#" in a["name"]]


def test_a_replica_killed_under_load_is_replaced_and_retries_succeed(service: Service) -> None:
    import ray

    victims = decoder_replica_actors()
    assert len(victims) == 2
    sent, first_try_failed, statuses, crashed = 240, [], [], []

    def one_request(_: int) -> None:
        r, refused = until_accepted(lambda: service.recommend(k=5), crashed=crashed)
        statuses.append(r.status_code)
        if refused:
            first_try_failed.append(refused)

    with ThreadPoolExecutor(8) as pool:
        load = pool.map(one_request, range(sent))
        time.sleep(1.0)  # traffic is flowing on both replicas
        ray.kill(ray.get_actor(victims[0], namespace="serve"), no_restart=True)
        list(load)
    assert statuses == [200] * sent

    killed = victims[0].rsplit("#", 1)[-1]
    replicas = service.wait_replicas(lambda b: True, replicas=2, timeout=180)
    assert killed not in replicas  # Serve started a new replica in its place
    # Only what was in flight on the killed replica can be lost with it (its pending bound, 64 by default).
    assert len(crashed) <= 64
    print(f"\nFAULT replica-kill: sent {sent}, failed on first try {len(first_try_failed)} "
          f"({len(crashed)} proxy 500s for requests in flight on the killed replica, "
          f"{sum(first_try_failed) - len(crashed)} 503 retryable), failed after retry 0, replicas serving 2")


def test_redis_restart_with_changes_during_the_outage_loses_none(service: Service) -> None:
    n = 12
    new = [f"OUTAGE-{i}" for i in range(n)]
    changes: list[tuple[str, Callable[[], Any]]] = []
    for item, codes in zip(new, free_codes(service.redis.url, service.catalog.codebook_sizes, n), strict=True):
        changes.append((f"add {item}", lambda item=item, codes=codes: service.client.post(
            "/v1/catalog/items", headers=ADMIN, json={"items": [{"item_id": item, "codes": codes}]})))
    for item in new[:4]:
        changes.append((f"remove {item}", lambda item=item: service.client.delete(
            f"/v1/catalog/items/{item}", headers=ADMIN)))
    acked: list[int] = []
    refused_total = 0

    def writer() -> None:
        nonlocal refused_total
        for _, send in changes:
            r, refused = until_accepted(send)
            refused_total += refused
            acked.append(r.json()["version"])
            time.sleep(0.1)

    thread = threading.Thread(target=writer)
    thread.start()
    while len(acked) < 3:
        time.sleep(0.02)
    service.redis.kill()  # kill -9 mid-stream; writes during the outage are refused, the writer retries
    time.sleep(2.0)
    service.redis.start()
    thread.join(timeout=90)
    assert not thread.is_alive() and len(acked) == len(changes)
    assert acked == sorted(acked) and refused_total > 0  # the outage really refused some writes

    store = redis_items(service.redis.url)
    lost = [i for i in new[4:] if i not in store] + [i for i in new[:4] if i in store]
    assert lost == []
    final = acked[-1]
    versions = service.wait_replicas(lambda b: b["catalog_version"] >= final)
    assert {b["catalog_version"] for b in versions.values()} == {final}  # both replicas converged
    for body in service.burst(8, history=new[4:]):  # each replica knows every added item
        assert not {i["item_id"] for i in body["items"]} & set(new[:4])
    print(f"\nFAULT redis-restart: changes made {len(changes)}, refused during outage {refused_total} "
          f"(retried), lost 0, replicas converged to version {final}")


def _flip_weight_byte(ck: Path) -> None:
    data = bytearray((ck / "model.safetensors").read_bytes())
    data[-3] ^= 0x5A
    (ck / "model.safetensors").write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE: list[tuple[str, Callable[[Path], None], str]] = [
    ("flipped weight byte", _flip_weight_byte, "SHA-256 differs"),
    ("truncated weights", lambda ck: _truncate(ck / "model.safetensors"), "SHA-256 differs"),
    ("garbled config", lambda ck: (ck / "nezha.json").write_text('{"format": 1, '), "corrupted"),
    ("truncated catalog codes", lambda ck: _truncate(ck / "catalog" / "codes.npy"), "cannot read"),
    ("missing weights", lambda ck: (ck / "model.safetensors").unlink(), "not a nezha checkpoint"),
]


@pytest.mark.parametrize(("damage", "message"), [d[1:] for d in DAMAGE], ids=[d[0] for d in DAMAGE])
def test_a_damaged_checkpoint_is_refused_and_the_old_replicas_keep_serving(
        service: Service, tmp_path: Path, damage: Callable[[Path], None], message: str) -> None:
    from ray import serve

    from serve.app import ServeConfig, build_app

    bad = tmp_path / "checkpoint"
    shutil.copytree(service.checkpoint, bad)
    damage(bad)
    with pytest.raises((CheckpointError, CatalogError), match=message):
        serve.run(build_app(ServeConfig(checkpoint=str(bad), redis_url=service.redis.url)), name="nezha",
                  route_prefix="/")
    assert service.recommend().status_code == 200


def test_a_slow_request_gets_504_and_the_replica_keeps_serving(service: Service,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from ray import serve

    from serve.app import ServeConfig, build_app

    monkeypatch.delenv("NEZHA_REDIS_URL", raising=False)
    # A lone request waits batch_wait_timeout_s (0.4 s) for company: far past the 0.05 s request timeout.
    cfg = ServeConfig(checkpoint=str(service.checkpoint), beam=10, request_timeout_s=0.05)
    options = {"Recommender": {"ray_actor_options": {"num_cpus": 0.3}, "user_config": {"batch_wait_timeout_s": 0.4}}}
    serve.run(build_app(cfg, options), name="slow", route_prefix="/slow")
    try:
        sent, responses = 5, []
        for _ in range(sent):
            responses.append(service.client.post("/slow/v1/recommend", json={"history": ["I010"], "k": 3}))
            time.sleep(0.5)  # let the abandoned batch finish, so the next request waits alone again
        assert [r.status_code for r in responses] == [504] * sent, responses[0].text
        assert all(r.json()["error"] == "timeout" and "0.05 s" in r.json()["detail"] for r in responses)
        assert service.client.get("/slow/readyz").json()["ready"] is True  # the replica is still alive
    finally:
        serve.delete("slow")
    print(f"\nFAULT slow-request: sent {sent}, 504 timeout {sent}, replica alive after")


# ---- bad input generated from the OpenAPI schema ------------------------------------------------------------
def _openapi_schema() -> Any:
    from serve.config import ServeConfig
    from serve.http import create_api
    from serve.metrics import HttpMetrics

    class NoReplica:
        def __getattr__(self, name: str) -> Any:
            raise AssertionError("the schema is read, never called")

    # The same app Serve runs (same routes, models and limits); only its schema is used here.
    return schemathesis.openapi.from_dict(create_api(ServeConfig(), NoReplica(), HttpMetrics()).openapi())


SCHEMA = _openapi_schema()
# Positive cases follow the schema, negative ones break it; the GET routes take no input to break.
SWEEP_CASES = [(op, mode) for op in (result.ok() for result in SCHEMA.get_all_operations())
               for mode in schemathesis.GenerationMode
               if mode is schemathesis.GenerationMode.POSITIVE or op.method.upper() != "GET"]


@pytest.mark.parametrize(("operation", "mode"), SWEEP_CASES,
                         ids=[f"{mode.value} {op.method.upper()} {op.path}" for op, mode in SWEEP_CASES])
def test_generated_requests_never_get_a_5xx_or_a_traceback(service: Service, operation: Any, mode: Any) -> None:
    base_url = f"http://127.0.0.1:{service.port}"
    statuses: list[int] = []

    @settings(max_examples=40, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def check(case: Any) -> None:
        response = case.call(base_url=base_url, headers=ADMIN, timeout=30)
        statuses.append(response.status_code)
        assert response.status_code < 500, (case.body, response.text)
        assert "Traceback" not in response.text and 'File "' not in response.text
        if response.status_code >= 400:
            assert set(response.json()) >= {"error", "detail"}, response.text

    check()
    assert statuses
    print(f"\nSWEEP {mode.value} {operation.method.upper()} {operation.path}: {len(statuses)} requests, "
          f"5xx {sum(s >= 500 for s in statuses)}, statuses {sorted(set(statuses))}")


def test_generated_requests_over_real_items_decode_or_get_a_clear_4xx(service: Service) -> None:
    """The schema sweep's random ids are unknown items; here histories are real, so decoding runs."""
    items = service.catalog.item_ids
    statuses: list[int] = []

    @settings(max_examples=60, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(history=st.lists(st.sampled_from(items), min_size=1, max_size=60, unique=True),
           k=st.integers(-1, 12), decoder=st.sampled_from(["nezha", "mtp", "beam", "hf-beam", "greedy"]),
           exclude=st.lists(st.sampled_from(items), max_size=25, unique=True))
    def check(history: list[str], k: int, decoder: str, exclude: list[str]) -> None:
        r = service.client.post("/v1/recommend", json={"history": history, "k": k, "decoder": decoder,
                                                       "exclude": exclude})
        statuses.append(r.status_code)
        assert r.status_code in (200, 422), r.text
        if r.status_code == 200:
            got = [i["item_id"] for i in r.json()["items"]]
            # (the catalog may hold more than `items`: the schema sweep adds items with random ids)
            assert 1 <= len(got) <= k and len(set(got)) == len(got) and not set(got) & set(exclude)
        else:
            assert set(r.json()) >= {"error", "detail"} and "Traceback" not in r.text

    check()
    assert 200 in statuses and 422 in statuses
    print(f"\nSWEEP real-item histories POST /v1/recommend: {len(statuses)} requests, "
          f"5xx {sum(s >= 500 for s in statuses)}, 200 {statuses.count(200)}, 422 {statuses.count(422)}")


# ---- secrets ---------------------------------------------------------------------------------------------------
def test_a_tls_redis_with_a_password_works_and_the_password_never_reaches_logs(
        ray_session: None, tiny_checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from nezha.catalog import Catalog
    from serve.config import ServeConfig
    from serve.replica import Recommender

    secret = "s3cret-pw-0042"
    redis = RedisServer(tmp_path / "redis", password=secret, tls=True)
    redis.start()
    try:
        assert redis.url.startswith("rediss://")
        with pytest.raises(StoreUnavailableError):  # the plain protocol is refused: TLS only
            RedisCatalog(redis.url.replace("rediss://", "redis://").split("?")[0]).remote_state()
        RedisCatalog(redis.url).push(Catalog.load(tiny_checkpoint / "catalog"), source="test")
        cfg = ServeConfig(checkpoint=str(tiny_checkpoint), redis_url=redis.url, admin_token="admin-tok-0042",
                          beam=10).resolved()
        assert secret not in repr(cfg) and "admin-tok-0042" not in repr(cfg)
        with caplog.at_level(logging.DEBUG):
            replica = Recommender(cfg)
            try:
                assert replica.local.source == "redis" and replica.local.version >= 1
                redis.kill()
                time.sleep(0.5)  # the follower notices the outage and logs it
            finally:
                replica.follower.stop()
        assert "catalog: Redis rediss://:***@127.0.0.1" in caplog.text
        assert secret not in caplog.text and "admin-tok-0042" not in caplog.text
    finally:
        redis.kill()
