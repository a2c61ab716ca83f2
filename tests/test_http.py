"""serve/http.py: each typed error of a replica -> its HTTP status and envelope, the declared response models
enforced, and what the metrics record. The unit is the HTTP layer, so the replica here is a fake."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from serve.config import ServeConfig
from serve.errors import (
    Conflict,
    EmbeddingUnavailable,
    InvalidItem,
    InvalidRequest,
    NoCatalog,
    NotFound,
    ServiceError,
    StoreUnavailable,
    TimedOut,
    Unavailable,
    UnknownDecoder,
    UnknownItems,
)
from serve.http import ERROR_STATUS, create_api
from serve.schemas import BatchInfo, ItemResponse, Recommendation, RecommendedItem

ADMIN = {"Authorization": "Bearer tok"}
RECOMMENDATION = Recommendation(
    items=[RecommendedItem(item_id="I002", score=-0.5, title="Soap", brand=None, categories=["Beauty"])],
    decoder="nezha", k=1, catalog_version=3, replica="r1", batch=BatchInfo(id=7, size=2))
ITEM = ItemResponse(item_id="I002", semantic_id=12, codes=[0, 2, 0], title="Soap", brand=None, categories=[],
                    catalog_version=3, replica="r1")


class FakeReplica:
    """Answers every call with `answer` (or its `results` for many users), or raises `error`, after `delay_s`."""

    def __init__(self) -> None:
        self.error: Exception | None = None
        self.delay_s = 0.0
        self.results: list[Recommendation | ServiceError] = []

    async def _answer(self, answer: Any) -> Any:
        await asyncio.sleep(self.delay_s)
        if self.error is not None:
            raise self.error
        return answer

    async def recommend(self, request: Any) -> Recommendation:
        return await self._answer(RECOMMENDATION)

    async def recommend_many(self, requests: list[Any]) -> list[Recommendation | ServiceError]:
        return await self._answer(self.results)

    def item(self, item_id: str) -> ItemResponse:
        if self.error is not None:
            raise self.error
        return ITEM

    def ready(self) -> dict[str, Any]:
        return {"ready": True, "last_ok_s_ago": None}

    async def catalog_status(self) -> dict[str, Any]:
        return await self._answer({"ready": True, "store": {"mode": "embedded"}})

    async def add_items(self, items: list[Any]) -> dict[str, Any]:
        return await self._answer({"version": 4, "added": [{"item_id": i.item_id} for i in items]})

    async def remove_items(self, item_ids: list[str]) -> dict[str, Any]:
        return await self._answer({"version": 5, "removed": item_ids})


class RecordedMetrics:
    """HttpMetrics' interface, recording: `counted` (route, status) without a latency, `timed` with one."""

    def __init__(self) -> None:
        self.counted: list[tuple[str, int]] = []
        self.timed: list[tuple[str, int]] = []

    def count(self, route: str, status: int) -> None:
        self.counted.append((route, status))

    def observe(self, route: str, status: int, seconds: float) -> None:
        assert seconds >= 0
        self.timed.append((route, status))


@pytest.fixture
def api() -> Iterator[tuple[TestClient, FakeReplica, RecordedMetrics]]:
    replica, metrics = FakeReplica(), RecordedMetrics()
    cfg = ServeConfig(admin_token="tok", request_timeout_s=0.2, retry_after_s=3)
    with TestClient(create_api(cfg, replica, metrics), raise_server_exceptions=False) as client:
        yield client, replica, metrics


ERRORS: list[tuple[ServiceError, int]] = [
    (InvalidRequest("k: 0 is out of range 1..20"), 422),
    (UnknownDecoder("decoder 'x' is not available", available=["nezha"]), 422),
    (UnknownItems("1 history item(s) are not in the catalog", item_ids=["NOPE"]), 422),
    (InvalidItem("bad codes"), 422),
    (NotFound("item 'Z' is not in the catalog", item_id="Z"), 404),
    (Conflict("item 'Z' is already in the catalog", item_id="Z"), 409),
    (NoCatalog("no catalog under 'nezha'"), 503),
    (StoreUnavailable("catalog store unavailable"), 503),
    (EmbeddingUnavailable("cannot load embedding model"), 503),
    (Unavailable("replica r1 has 64 requests pending", retry_after_s=3), 503),
    (TimedOut("the decode did not finish within 5 s"), 504),
]


def all_service_errors(cls: type[ServiceError] = ServiceError) -> set[type[ServiceError]]:
    return {sub for direct in cls.__subclasses__() for sub in {direct, *all_service_errors(direct)}}


def test_every_typed_error_has_a_status_and_is_tested() -> None:
    assert set(ERROR_STATUS) == all_service_errors() == {type(error) for error, _ in ERRORS}


@pytest.mark.parametrize(("error", "status"), ERRORS, ids=[type(e).__name__ for e, _ in ERRORS])
def test_a_typed_error_gets_its_status_and_envelope(api: tuple[TestClient, FakeReplica, RecordedMetrics],
                                                    error: ServiceError, status: int) -> None:
    client, replica, _ = api
    replica.error = error
    r = client.post("/v1/recommend", json={"history": ["I001"]})
    assert r.status_code == status == ERROR_STATUS[type(error)]
    assert r.json() == {"error": error.code, "detail": error.detail, **error.extra}
    if isinstance(error, Unavailable | StoreUnavailable):  # the retryable ones
        assert r.headers["Retry-After"] == str(error.retry_after_s) and r.json()["retryable"] is True
    else:
        assert "Retry-After" not in r.headers


def test_a_slow_replica_call_gets_504_timeout(api: tuple[TestClient, FakeReplica, RecordedMetrics]) -> None:
    client, replica, metrics = api
    replica.delay_s = 1.0
    r = client.post("/v1/recommend", json={"history": ["I001"]})
    assert r.status_code == 504 and r.json() == {"error": "timeout",
                                                 "detail": "the decode did not finish within 0.2 s"}
    assert metrics.counted == [("/v1/recommend", 504)] and metrics.timed == []


def test_an_unexpected_error_is_a_500_envelope_without_a_traceback(
        api: tuple[TestClient, FakeReplica, RecordedMetrics]) -> None:
    client, replica, _ = api
    replica.error = RuntimeError("boom at line 42")
    r = client.get("/v1/items/I002")
    assert r.status_code == 500 and r.json() == {"error": "internal_error",
                                                 "detail": "internal error; the server log has the details"}


def test_a_recommendation_is_answered_as_the_declared_model_with_its_latency(
        api: tuple[TestClient, FakeReplica, RecordedMetrics]) -> None:
    client, _, metrics = api
    r = client.post("/v1/recommend", json={"history": ["I001"], "k": 1})
    assert r.status_code == 200
    body = r.json()
    assert list(body) == ["items", "decoder", "k", "catalog_version", "replica", "batch", "latency_ms"]
    assert {k: v for k, v in body.items() if k != "latency_ms"} == RECOMMENDATION.model_dump()
    assert body["items"][0]["brand"] is None  # metadata the catalog lacks is null, not absent
    assert body["latency_ms"] >= 0 and metrics.timed == [("/v1/recommend", 200)]


def test_a_response_that_breaks_its_model_is_a_500_not_a_wrong_body(
        api: tuple[TestClient, FakeReplica, RecordedMetrics], monkeypatch: pytest.MonkeyPatch) -> None:
    client, replica, _ = api
    broken = {"item_id": "I002", "semantic_id": "twelve", "catalog_version": 3, "replica": "r1"}  # no codes
    monkeypatch.setattr(replica, "item", lambda item_id: broken)
    r = client.get("/v1/items/I002")
    assert r.status_code == 500 and r.json()["error"] == "internal_error"


def test_batch_results_keep_fields_that_do_not_apply_absent(
        api: tuple[TestClient, FakeReplica, RecordedMetrics]) -> None:
    client, replica, _ = api
    replica.results = [RECOMMENDATION, UnknownItems("1 history item(s) are not in the catalog", item_ids=["NOPE"]),
                       InvalidRequest("k: 99 is out of range 1..20")]
    r = client.post("/v1/recommend/batch", json={"requests": [{"history": ["I001"]}] * 3})
    assert r.status_code == 200
    ok, unknown, invalid = r.json()["results"]
    assert ok == {"status": 200, **RECOMMENDATION.model_dump()}  # no error, detail nor latency_ms
    assert unknown == {"status": 422, "error": "unknown_items", "detail": "1 history item(s) are not in the catalog",
                       "item_ids": ["NOPE"]}  # no items
    assert invalid == {"status": 422, "error": "invalid_request", "detail": "k: 99 is out of range 1..20"}
    assert r.json()["latency_ms"] >= 0


def test_refusals_for_load_or_time_are_counted_and_other_answers_timed(
        api: tuple[TestClient, FakeReplica, RecordedMetrics]) -> None:
    client, replica, metrics = api
    client.get("/v1/items/I002")
    client.delete("/v1/catalog/items/I002", headers=ADMIN)
    replica.error = NotFound("item 'Z' is not in the catalog", item_id="Z")
    client.get("/v1/items/Z")
    replica.error = Unavailable("busy", retry_after_s=1)
    client.post("/v1/recommend", json={"history": ["I001"]})
    client.post("/v1/recommend", json={"history": "I001"})  # invalid body: the replica is never called
    client.get("/v1/catalog")  # no token
    assert metrics.timed == [("/v1/items/{item_id}", 200), ("/v1/catalog/items", 200), ("/v1/items/{item_id}", 404)]
    assert metrics.counted == [("/v1/recommend", 503), ("/v1/recommend", 422), ("/v1/catalog", 401)]


def test_admin_routes_pass_validated_items_and_answer_the_replicas_body(
        api: tuple[TestClient, FakeReplica, RecordedMetrics]) -> None:
    client, _, _ = api
    r = client.post("/v1/catalog/items", headers=ADMIN, json={"items": [{"item_id": "N1", "codes": [0, 1, 2]}]})
    assert r.status_code == 200 and r.json() == {"version": 4, "added": [{"item_id": "N1"}]}
    assert client.delete("/v1/catalog/items/N1", headers=ADMIN).json() == {"version": 5, "removed": ["N1"]}
    assert client.get("/v1/catalog", headers=ADMIN).json()["store"] == {"mode": "embedded"}
    assert client.get("/readyz").json() == {"ready": True, "last_ok_s_ago": None}
