"""`nezha export`: a Hugging Face folder that transformers loads, and that nezha loads back unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from nezha.cli import main as cli
from nezha.config import ConfigError
from nezha.evaluation import EvalConfig, evaluate
from nezha.export import ExportConfig, export_checkpoint
from nezha.model.backbones import BackboneError
from nezha.model.checkpoint import create_model, load_checkpoint
from nezha.model.hf_export import HEADS, TOKENS, token_names
from nezha.model.model import ModelConfig
from nezha.prepared import load_prepared
from nezha.training import TrainConfig, make_batch, train


@pytest.fixture(scope="module")
def exported(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("hf") / "nezha-tiny"
    assert cli(["export", "--checkpoint", str(tiny_checkpoint), "--out", str(out)]) == 0
    return out


def tiny_batch(model, tiny_prepared: Path) -> dict[str, torch.Tensor]:
    catalog, split, _ = load_prepared(tiny_prepared)
    return make_batch(model, catalog, split.valid.histories[:16], split.valid.targets[:16], "cpu")


def test_export_writes_a_hugging_face_folder_with_the_heads_and_tokens(exported, tiny_checkpoint, tiny_prepared):
    original = load_checkpoint(tiny_checkpoint)
    files = {p.name for p in exported.iterdir()}
    assert {"config.json", "model.safetensors", HEADS, TOKENS, "nezha.json", "catalog"} <= files
    tokens = json.loads((exported / TOKENS).read_text())
    assert tokens == token_names(original.layout)
    layout = original.layout
    assert tokens["<a_0>"] == layout.code_offset(0) and tokens["<b_5>"] == layout.code_offset(1) + 5
    assert tokens["<SP_1>"] == layout.placeholder(0) and tokens["<nezha_pad>"] == layout.pad

    # transformers alone loads the backbone: the same logits as inside nezha.
    hf = AutoModelForCausalLM.from_pretrained(exported).eval()
    batch = tiny_batch(original, tiny_prepared)
    ids, mask = batch["draft_input_ids"], batch["draft_mask"]
    with torch.no_grad():
        expected = original.backbone(input_ids=ids, attention_mask=mask).logits
        assert torch.equal(hf(input_ids=ids, attention_mask=mask).logits, expected)


def test_nezha_loads_the_export_back_with_the_same_outputs(exported, tiny_checkpoint, tiny_prepared):
    original, loaded = load_checkpoint(tiny_checkpoint), load_checkpoint(exported)
    assert loaded.config == original.config and loaded.layout == original.layout
    batch = tiny_batch(original, tiny_prepared)
    with torch.no_grad():
        before, after = original(batch), loaded(batch)
    assert before.keys() == after.keys() and {"nezha", "lm", "mtp"} <= set(before)
    for name in before:
        assert torch.equal(before[name], after[name]), name

    # Evaluation reads it like a checkpoint (catalog and prepared dataset from its metadata).
    users = 20
    reports = [evaluate(EvalConfig(checkpoint=str(c), split="valid", max_users=users, beam=5, decoders=["nezha"],
                                   latency_requests=0)) for c in (tiny_checkpoint, exported)]
    quality = [{k: v for k, v in r["decoders"]["nezha"].items() if "@" in k} for r in reports]
    assert quality[0] == quality[1]


def test_fine_tuning_starts_from_an_export(exported, tiny_checkpoint, tiny_prepared, tmp_path):
    original = load_checkpoint(tiny_checkpoint)
    config = ModelConfig(backbone=str(exported), codebook_sizes=list(original.config.codebook_sizes),
                         objectives=original.config.objectives, transition=original.config.transition)
    start = create_model(config).eval()  # backbone and heads of the export
    batch = tiny_batch(original, tiny_prepared)
    with torch.no_grad():
        assert torch.equal(start(batch)["loss"], original(batch)["loss"])
    result = train(TrainConfig(prepared=str(tiny_prepared), out=str(tmp_path), backbone=str(exported),
                               objectives=["nezha"], max_steps=2, batch_size=8, eval_every=2, eval_beam=5,
                               progress=False))
    assert load_checkpoint(result.best_checkpoint).layout == original.layout

    with pytest.raises(BackboneError, match="semantic-ID tokens"):
        create_model(ModelConfig(backbone=str(exported), codebook_sizes=[4, 4, 4]))


def test_export_refuses_to_overwrite_and_names_the_field(exported, tiny_checkpoint):
    with pytest.raises(ConfigError, match="out: .* exists"):
        export_checkpoint(ExportConfig(checkpoint=str(tiny_checkpoint), out=str(exported)))
    with pytest.raises(ConfigError, match="checkpoint:"):
        ExportConfig(checkpoint="")
