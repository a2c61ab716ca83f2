"""The recommendation service end to end: real Ray Serve over HTTP, 2 decoder replicas, a real redis-server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from serve_fixtures import ADMIN, HISTORY, Service, redis_items

from nezha.live_catalog import codes_of

pytestmark = pytest.mark.slow

def test_recommend_round_trip(service: Service) -> None:
    r = service.recommend(k=5)
    assert r.status_code == 200, r.text
    body = r.json()
    items = body["items"]
    assert 1 <= len(items) <= 5 and len({i["item_id"] for i in items}) == len(items)
    assert all(i["item_id"] in service.catalog.item_ids for i in items)
    scores = [i["score"] for i in items]
    assert scores == sorted(scores, reverse=True)
    assert body["decoder"] == "nezha" and body["k"] == 5 and body["catalog_version"] >= 1
    assert body["latency_ms"] > 0 and body["replica"] and body["batch"]["size"] >= 1
    for item in items:  # readable: the catalog's title, and brand/categories from the dataset's items.jsonl
        row = service.catalog.index_of(item["item_id"])
        assert item["title"] == service.catalog.titles[row]
        assert item["brand"] in item["title"] and item["categories"][0] == "Beauty"
    for decoder in ("mtp", "beam"):
        r = service.recommend(decoder=decoder, k=3)
        assert r.status_code == 200 and r.json()["decoder"] == decoder and r.json()["items"], r.text


def test_exclude_is_never_returned(service: Service) -> None:
    top = [i["item_id"] for i in service.recommend(k=3).json()["items"]]
    body = service.recommend(k=3, exclude=top[:2]).json()
    got = [i["item_id"] for i in body["items"]]
    assert not set(got) & set(top[:2]) and len(got) == 3


def test_exclude_history_drops_the_users_own_items(service: Service) -> None:
    history = [f"I{i:03d}" for i in range(30)]  # most of the 48-item catalog: plain answers contain some
    plain = [i["item_id"] for i in service.recommend(history=history, k=10).json()["items"]]
    assert set(plain) & set(history)
    r = service.recommend(history=history, k=10, exclude_history=True)
    got = [i["item_id"] for i in r.json()["items"]]
    assert r.status_code == 200 and len(got) == 10 and not set(got) & set(history)  # the search widened
    # exclude_history is not bounded by max_exclude (20 here): the history already is, by max_history_items.
    assert service.recommend(history=history, k=10, exclude=history[:21]).status_code == 422


def test_batch_recommend_decodes_users_together_and_reports_errors_per_user(service: Service) -> None:
    users = [{"history": ["I001", "I002"], "k": 3}, {"history": ["NOPE"]}, {"history": ["I020"], "k": 99},
             {"history": ["I030", "I031"], "k": 2, "exclude_history": True}, {"history": ["I040"], "decoder": "mtp"}]
    r = service.client.post("/v1/recommend/batch", json={"requests": users})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["status"] for x in results] == [200, 422, 422, 200, 200]
    assert results[1]["error"] == "unknown_items" and results[1]["item_ids"] == ["NOPE"]
    assert results[2]["error"] == "invalid_request" and "k" in results[2]["detail"]
    assert len(results[0]["items"]) == 3 and results[0]["items"][0]["title"]
    assert not {i["item_id"] for i in results[3]["items"]} & {"I030", "I031"}
    nezha = [results[0], results[3]]
    assert nezha[0]["batch"] == nezha[1]["batch"] and nezha[0]["batch"]["size"] >= 2  # one decode call
    too_many = service.client.post("/v1/recommend/batch", json={"requests": [{"history": ["I001"]}] * 9})
    assert too_many.status_code == 422 and "at most 8" in too_many.json()["detail"]
    assert service.client.post("/v1/recommend/batch", json={"requests": []}).status_code == 422


def test_item_lookup(service: Service) -> None:
    r = service.client.get("/v1/items/I007")
    assert r.status_code == 200, r.text
    body = r.json()
    row = service.catalog.index_of("I007")
    assert body["semantic_id"] == int(service.catalog.packed[row])
    assert body["codes"] == service.catalog.codes[row].tolist()
    assert body["title"] == service.catalog.titles[row] and body["brand"] == "Bloom"
    assert body["categories"] == ["Beauty", "Cream"] and body["catalog_version"] >= 1
    missing = service.client.get("/v1/items/NO-SUCH")
    assert missing.status_code == 404 and missing.json()["error"] == "not_found"


def test_concurrent_requests_share_decode_batches(service: Service) -> None:
    bodies = service.burst(24)
    batches = {(b["replica"], b["batch"]["id"]) for b in bodies}
    assert len(batches) < 24 and max(b["batch"]["size"] for b in bodies) > 1


def test_health_and_ready(service: Service) -> None:
    assert service.client.get("/healthz").json() == {"status": "ok"}
    ready = service.client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True and ready.json()["degraded"] == []
    assert ready.json()["catalog"]["mode"] == "redis"
    assert ready.json()["batching"] == {"max_batch_size": 32, "batch_wait_timeout_s": 0.05, "max_pending_requests": 64}
    assert service.client.get("/openapi.json").status_code == 200


LONG = [f"X{i}" for i in range(51)]
BAD_REQUESTS: list[tuple[str, Any, int, str]] = [
    ("unknown item", {"history": ["I001", "NOPE"]}, 422, "NOPE"),
    ("duplicate items", {"history": ["I001", "I002", "I001"]}, 422, "duplicate"),
    ("empty history", {"history": []}, 422, "history"),
    ("history too long", {"history": LONG}, 422, "at most 50"),
    ("history not a list", {"history": "I001"}, 422, "history"),
    ("history of ints", {"history": [1, 2]}, 422, "history"),
    ("empty item id", {"history": [""]}, 422, "history"),
    ("huge item id", {"history": ["x" * 300]}, 422, "history"),
    ("k zero", {"history": ["I001"], "k": 0}, 422, "k"),
    ("k over beam", {"history": ["I001"], "k": 11}, 422, "1..10"),
    ("k as string", {"history": ["I001"], "k": "5"}, 422, "k"),
    ("k as float", {"history": ["I001"], "k": 2.5}, 422, "k"),
    ("k as bool", {"history": ["I001"], "k": True}, 422, "k"),
    ("k enormous", {"history": ["I001"], "k": 10**30}, 422, "k"),
    ("decoder unknown", {"history": ["I001"], "decoder": "greedy"}, 422, "nezha, mtp, beam"),
    ("decoder not offered", {"history": ["I001"], "decoder": "hf-beam"}, 422, "nezha, mtp, beam"),
    ("decoder not a string", {"history": ["I001"], "decoder": 3}, 422, "decoder"),
    ("too many excludes", {"history": ["I001"], "exclude": LONG[:21]}, 422, "exclude"),
    ("exclude not a list", {"history": ["I001"], "exclude": "I002"}, 422, "exclude"),
    ("unknown field", {"history": ["I001"], "user": "u1"}, 422, "user"),
    ("body is a list", ["I001"], 422, "body"),
    ("body is null", None, 422, "body"),
]


@pytest.mark.parametrize(("payload", "status", "needle"), [c[1:] for c in BAD_REQUESTS],
                         ids=[c[0] for c in BAD_REQUESTS])
def test_bad_requests_get_clear_4xx(service: Service, payload: Any, status: int, needle: str) -> None:
    r = service.client.post("/v1/recommend", json=payload)
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) >= {"error", "detail"} and needle in r.text and "Traceback" not in r.text


@pytest.mark.parametrize(("content", "headers", "status"), [
    (b"{not json", {"content-type": "application/json"}, 422),
    (b"", {"content-type": "application/json"}, 422),
    (b'{"history": ["' + b"a" * 20000 + b'"]}', {"content-type": "application/json"}, 413),
    (iter([b'{"history": ["', b"a" * 20000, b'"]}']), {"content-type": "application/json"}, 413),  # chunked
], ids=["invalid json", "empty body", "oversize", "oversize chunked"])
def test_malformed_bodies(service: Service, content: Any, headers: dict[str, str], status: int) -> None:
    r = service.client.post("/v1/recommend", content=content, headers=headers)
    assert r.status_code == status, r.text
    assert "error" in r.json() and "Traceback" not in r.text


def test_wrong_route_and_method_are_json(service: Service) -> None:
    assert service.client.get("/v1/recommend").status_code == 405
    r = service.client.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"] == "not_found"


def test_admin_needs_the_bearer_token(service: Service) -> None:
    assert service.client.get("/v1/catalog").status_code == 401
    assert service.client.get("/v1/catalog", headers={"Authorization": "Basic abc"}).status_code == 401
    assert service.client.get("/v1/catalog", headers={"Authorization": "Bearer wrong"}).status_code == 403
    r = service.client.delete("/v1/catalog/items/I001", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 403 and service.recommend(history=["I001"]).status_code == 200
    status = service.client.get("/v1/catalog", headers=ADMIN).json()
    assert status["store"]["version"] >= 1 and status["store"]["durability"] == "aof-always"


def test_admin_bad_input(service: Service) -> None:
    post = service.client.post
    cases = [
        ({"items": [{"item_id": "Z1", "codes": [0, 0, 0], "text": "both"}]}, 422),
        ({"items": [{"item_id": "Z1"}]}, 422),
        ({"items": [{"item_id": "Z1", "codes": [99, 0, 0]}]}, 422),
        ({"items": [{"item_id": "Z1", "codes": [0, 0]}]}, 422),
        ({"items": []}, 422),
        ({"items": [{"item_id": "I001", "codes": [5, 5, 5]}]}, 409),
    ]
    for payload, status in cases:
        r = post("/v1/catalog/items", json=payload, headers=ADMIN)
        assert r.status_code == status, (payload, r.text)
        assert "Traceback" not in r.text
    r = service.client.delete("/v1/catalog/items/NO-SUCH-ITEM", headers=ADMIN)
    assert r.status_code == 404 and "NO-SUCH-ITEM" in r.json()["detail"]


def test_catalog_changes_reach_both_replicas(service: Service) -> None:
    top = service.recommend(k=1).json()["items"][0]["item_id"]
    codes = codes_of(int(service.catalog.packed[service.catalog.index_of(top)]), service.catalog.codebook_sizes)

    removed = service.client.delete(f"/v1/catalog/items/{top}", headers=ADMIN)
    assert removed.status_code == 200 and removed.json()["applied_on_replica"] is True
    version = removed.json()["version"]
    service.wait_replicas(lambda b: b["catalog_version"] >= version)
    for body in service.burst(16, k=10):  # propagated: never returned again, on any replica
        assert top not in [i["item_id"] for i in body["items"]]
    r = service.recommend(history=[*HISTORY, top])
    assert r.status_code == 422 and top in r.json()["item_ids"]

    meta = {"title": "Back again", "brand": "Phoenix", "categories": ["Beauty", "Returns"]}
    added = service.client.post("/v1/catalog/items", json={"items": [{"item_id": top, "codes": codes, **meta}]},
                                headers=ADMIN)
    assert added.status_code == 200 and added.json()["added"][0] == {
        "item_id": top, "codes": codes, "semantic_id": added.json()["added"][0]["semantic_id"], **meta}
    version = added.json()["version"]
    answers = service.wait_replicas(lambda b: b["catalog_version"] >= version and b["items"][0]["item_id"] == top)
    for body in answers.values():  # every replica shows the metadata given when adding
        assert {k: body["items"][0][k] for k in meta} == meta
    assert {k: service.client.get(f"/v1/items/{top}").json()[k] for k in meta} == meta


def test_text_add_gets_a_new_unique_id(service: Service) -> None:
    r = service.client.post("/v1/catalog/items", headers=ADMIN,
                            json={"items": [{"item_id": "NEW-TEXT-1", "text": "Acme shampoo no. 99"},
                                            {"item_id": "NEW-TEXT-2", "text": "Acme shampoo no. 99"}]})
    assert r.status_code == 200, r.text
    added = r.json()["added"]
    ids = {a["semantic_id"] for a in added}
    assert len(ids) == 2 and not ids & set(service.catalog.packed.tolist())
    version = r.json()["version"]
    service.wait_replicas(lambda b: b["catalog_version"] >= version)
    assert service.recommend(history=["NEW-TEXT-1", "I010"]).status_code == 200


def test_redis_outage_keeps_serving_and_refuses_writes(service: Service) -> None:
    acked = service.client.post("/v1/catalog/items", headers=ADMIN,
                                json={"items": [{"item_id": "ACKED", "codes": service.free_codes()}]})
    assert acked.status_code == 200, acked.text

    free = service.free_codes()
    service.redis.kill()
    refused = service.client.post("/v1/catalog/items", headers=ADMIN,
                                  json={"items": [{"item_id": "REFUSED", "codes": free}]})
    assert refused.status_code == 503 and refused.json()["error"] == "store_unavailable"
    assert "refused" in refused.json()["detail"]
    assert service.recommend().status_code == 200  # served from each replica's copy
    degraded: dict[str, Any] = {}
    for _ in range(100):
        ready = service.client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["ready"] is True
        if ready.json()["degraded"]:
            degraded = ready.json()
            break
    assert "catalog store unavailable" in degraded["degraded"][0]

    service.redis.start()  # the append-only file brings back every acknowledged write
    service.wait_replicas(lambda b: b["catalog_version"] >= acked.json()["version"])
    after = service.client.post("/v1/catalog/items", headers=ADMIN,
                                json={"items": [{"item_id": "AFTER", "codes": free}]})
    assert after.status_code == 200, after.text
    service.wait_replicas(lambda b: b["catalog_version"] >= after.json()["version"])
    assert service.recommend(history=["ACKED", "AFTER"]).status_code == 200
    r = service.recommend(history=["REFUSED"])
    assert r.status_code == 422 and "REFUSED" in r.json()["item_ids"]
    store = redis_items(service.redis.url)
    assert {"ACKED", "AFTER"} <= set(store) and "REFUSED" not in store


def test_embedded_catalog_without_redis(service: Service, monkeypatch: pytest.MonkeyPatch) -> None:
    from ray import serve

    from serve.app import ServeConfig, build_app

    monkeypatch.delenv("NEZHA_REDIS_URL", raising=False)
    used = set(service.catalog.packed.tolist())
    codes = codes_of(next(p for p in range(216) if p not in used), service.catalog.codebook_sizes)
    cfg = ServeConfig(checkpoint=str(service.checkpoint), admin_token="test-admin-token", beam=10)
    serve.run(build_app(cfg, {"Recommender": {"ray_actor_options": {"num_cpus": 0.5}}}), name="embedded",
              route_prefix="/embedded")
    try:
        status = service.client.get("/embedded/v1/catalog", headers=ADMIN).json()
        assert status["catalog"]["mode"] == "embedded" and status["store"]["mode"] == "embedded"
        r = service.client.post("/embedded/v1/catalog/items", headers=ADMIN,
                                json={"items": [{"item_id": "EMB-1", "codes": codes}]})
        assert r.status_code == 200 and r.json()["mode"] == "embedded"
        r = service.client.post("/embedded/v1/recommend", json={"history": ["EMB-1"], "k": 3})
        assert r.status_code == 200 and r.json()["catalog_version"] == 1
        assert service.client.get("/embedded/readyz").json()["degraded"] == []
    finally:
        serve.delete("embedded")


def test_more_than_one_replica_without_redis_is_refused() -> None:
    from ray.serve._private.config import DeploymentConfig

    from serve.replica import check_embedded_single_replica

    check_embedded_single_replica(DeploymentConfig(num_replicas=1))
    with pytest.raises(ValueError, match="must run as one replica.*allow 2"):
        check_embedded_single_replica(DeploymentConfig(num_replicas=2))
    with pytest.raises(ValueError, match="allow 3"):
        check_embedded_single_replica(DeploymentConfig(autoscaling_config={"min_replicas": 1, "max_replicas": 3}))


@pytest.mark.parametrize("path", ["serve.config.yaml", "cluster/serve.gpu.yaml"])
def test_shipped_serve_configs_are_valid(path: str) -> None:
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from nezha.config import from_dict
    from serve.app import ServeConfig
    from serve.config import DEFAULT_OPTIONS, BatchConfig

    config = yaml.safe_load((Path(__file__).resolve().parents[1] / path).read_text())
    ServeDeploySchema.model_validate(config)  # what `serve run` / `serve deploy` check
    (app,) = config["applications"]
    assert app["import_path"] == "serve.app:app_builder"
    cfg = from_dict(ServeConfig, app["args"])
    assert cfg.default_decoder in cfg.decoders and cfg.max_k <= cfg.max_beam
    deployments = {d["name"]: d for d in app["deployments"]}
    assert set(deployments) == set(DEFAULT_OPTIONS) == {"Recommender"}  # it serves HTTP itself: no Ingress
    decoder = deployments["Recommender"]
    batching = from_dict(BatchConfig, decoder["user_config"])
    # The replica, not Serve's queue, turns overload away: Serve must let more requests reach it than it admits.
    assert decoder["max_ongoing_requests"] > batching.max_pending_requests >= batching.max_batch_size
    assert decoder["max_queued_requests"] > 0  # bounded: overload gets a fast 503
    if path == "serve.config.yaml":  # no Redis by default: one decoder replica
        assert config["http_options"]["host"] == "127.0.0.1" and cfg.device == "auto"
        assert decoder["num_replicas"] == 1 and "autoscaling_config" not in decoder


def test_batch_config_errors_name_the_field() -> None:
    from nezha.config import ConfigError, from_dict
    from serve.config import BatchConfig

    with pytest.raises(ConfigError, match="max_batch_size"):
        from_dict(BatchConfig, {"max_batch_size": 0})
    with pytest.raises(ConfigError, match="batch_wait_timeout_s"):
        BatchConfig(batch_wait_timeout_s=-1)
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(BatchConfig, {"max_replicas": 2})


def test_config_errors_are_clear() -> None:
    from nezha.config import ConfigError, from_dict
    from serve.app import ServeConfig

    with pytest.raises(ConfigError, match="unknown"):
        from_dict(ServeConfig, {"decoders": ["nezha", "greedy"]})
    with pytest.raises(ConfigError, match="default_decoder"):
        ServeConfig(decoders=["mtp"])
    with pytest.raises(ConfigError, match="max_k"):
        ServeConfig(beam=10, max_beam=20, max_k=30)
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(ServeConfig, {"replicas": 2})
    assert from_dict(ServeConfig, {"beam": "8", "decoders": "nezha,mtp"}).max_k == 8  # `serve run ... beam=8`
