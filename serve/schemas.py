"""The HTTP API's request and response models (pydantic): what FastAPI validates and the OpenAPI schema shows."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, StringConstraints, model_validator

from nezha.live_catalog import MAX_ITEM_ID_CHARS

MAX_ADMIN_ITEMS = 1000

ItemId = Annotated[StrictStr, StringConstraints(min_length=1, max_length=MAX_ITEM_ID_CHARS)]


class RecommendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    history: list[ItemId] = Field(min_length=1, description="item ids the user interacted with, oldest first")
    k: StrictInt = Field(10, description="how many items to return (1..max_k)")
    decoder: StrictStr | None = Field(None, description="nezha (default), mtp, beam, hf-beam, hf-beam-constrained")
    exclude: list[ItemId] = Field(default_factory=list, description="item ids never to return")


class RecommendedItem(BaseModel):
    item_id: str
    score: float = Field(description="cumulative log-probability of the item's semantic ID")


class BatchInfo(BaseModel):
    id: int = Field(description="decode call on that replica")
    size: int = Field(description="requests decoded together in it")


class RecommendResponse(BaseModel):
    items: list[RecommendedItem]
    decoder: str
    k: int
    catalog_version: int
    latency_ms: float = Field(description="server-side time from receiving the request to answering it")
    replica: str
    batch: BatchInfo


class NewItemModel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    item_id: ItemId
    text: Annotated[StrictStr, StringConstraints(min_length=1, max_length=10_000)] | None = None
    codes: list[StrictInt] | None = None

    @model_validator(mode="after")
    def _one_source(self) -> NewItemModel:
        if (self.text is None) == (self.codes is None):
            raise ValueError("give exactly one of `text` (a new ID is assigned) or `codes`")
        return self


class AddItemsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: list[NewItemModel] = Field(min_length=1, max_length=MAX_ADMIN_ITEMS)
