"""The HTTP API's request and response models (pydantic): what FastAPI validates and the OpenAPI schema shows."""

from __future__ import annotations

from typing import Annotated

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    StringConstraints,
    model_validator,
)

from nezha.live_catalog import MAX_ITEM_ID_CHARS

MAX_ADMIN_ITEMS = 1000

ItemId = Annotated[StrictStr, StringConstraints(min_length=1, max_length=MAX_ITEM_ID_CHARS)]


class RecommendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    history: list[ItemId] = Field(min_length=1, description="item ids the user interacted with, oldest first")
    k: StrictInt = Field(10, description="how many items to return (1..max_k)")
    decoder: StrictStr | None = Field(None, description="nezha (default), mtp, beam, hf-beam, hf-beam-constrained")
    exclude: list[ItemId] = Field(default_factory=list, description="item ids never to return")
    exclude_history: StrictBool = Field(False, description="never return the items of `history` either")


class BatchRecommendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    requests: list[RecommendRequest] = Field(min_length=1, description="one request per user (at most "
                                             "max_batch_users), decoded together")


class ItemMetadata(BaseModel):
    title: str | None = None
    brand: str | None = None
    categories: list[str] = Field(default_factory=list)


class RecommendedItem(ItemMetadata):
    item_id: str
    score: float = Field(description="cumulative log-probability of the item's semantic ID")


class BatchInfo(BaseModel):
    id: int = Field(description="decode call on that replica")
    size: int = Field(description="requests decoded together in it")


class Recommendation(BaseModel):
    """One user's recommendation as the replica decoded it."""

    items: list[RecommendedItem]
    decoder: str
    k: int
    catalog_version: int
    replica: str
    batch: BatchInfo


class RecommendResponse(Recommendation):
    latency_ms: float = Field(description="server-side time from receiving the request to answering it")


class UserResult(BaseModel):
    """One user's answer in a batch: `status` 200 with the fields of a recommendation, or an error (fields
    that do not apply are absent, not null)."""

    model_config = ConfigDict(extra="allow")

    status: int
    items: list[RecommendedItem] | None = None
    error: str | None = None
    detail: str | None = None


class BatchRecommendResponse(BaseModel):
    results: list[UserResult] = Field(description="one per request, in order")
    latency_ms: float


class ItemResponse(ItemMetadata):
    item_id: str
    semantic_id: int = Field(description="packed semantic ID")
    codes: list[int] = Field(description="one code per level")
    catalog_version: int
    replica: str


class NewItemModel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    item_id: ItemId
    text: Annotated[StrictStr, StringConstraints(min_length=1, max_length=10_000)] | None = None
    codes: list[StrictInt] | None = None
    title: Annotated[StrictStr, StringConstraints(max_length=1000)] | None = None
    brand: Annotated[StrictStr, StringConstraints(max_length=200)] | None = None
    categories: list[Annotated[StrictStr, StringConstraints(max_length=200)]] | None = Field(None, max_length=20)

    @model_validator(mode="after")
    def _one_source(self) -> NewItemModel:
        if (self.text is None) == (self.codes is None):
            raise ValueError("give exactly one of `text` (a new ID is assigned) or `codes`")
        return self


class AddItemsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: list[NewItemModel] = Field(min_length=1, max_length=MAX_ADMIN_ITEMS)
