"""Checks shared by the Ray training tests (in-memory and streamed data)."""

from __future__ import annotations

from pathlib import Path

import torch

from nezha.catalog import Catalog
from nezha.data.split import Split
from nezha.model.checkpoint import create_model, load_checkpoint
from nezha.model.model import NezhaModel
from nezha.prepared import load_prepared
from nezha.training import make_batch


def assert_checkpoint_learned(checkpoint: str | Path, prepared: str | Path) -> tuple[Catalog, Split, NezhaModel]:
    """The checkpoint loads with the library and its loss on training examples is well below a fresh model's."""
    catalog, split, _ = load_prepared(prepared)
    model = load_checkpoint(checkpoint)
    fresh = create_model(model.config, seed=0).eval()
    batch = make_batch(model, catalog, split.train.histories[:64], split.train.targets[:64], "cpu")
    with torch.no_grad():
        assert float(model(batch)["loss"]) < 0.8 * float(fresh(batch)["loss"])
    return catalog, split, model
