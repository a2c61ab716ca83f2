import json

import numpy as np
import pytest
import torch

from nezha.decoding import available_decoders
from nezha.model.checkpoint import CheckpointError, create_model, load_checkpoint, save_checkpoint
from nezha.model.draft_head import TRANSITIONS, DraftHead
from nezha.model.model import ModelConfig, normalise_objectives
from nezha.model.tokens import TokenLayout, build_prompts

SIZES = [6, 6, 6]


def _batch(model, histories, targets):
    layout = model.layout
    di, dm = build_prompts(layout, histories, True)
    li, lm = build_prompts(layout, histories, False, suffix=layout.codes_to_tokens(targets))
    return {"targets": torch.from_numpy(targets), "draft_input_ids": di, "draft_mask": dm,
            "lm_input_ids": li, "lm_mask": lm}


def test_layout_and_prompts_are_left_padded_with_placeholders_last():
    layout = TokenLayout(base_vocab=10, sizes=(4, 5))
    assert layout.code_offset(1) == 14 and layout.placeholder(0) == 19 and layout.pad == 21
    ids, mask = build_prompts(layout, [np.array([[1, 2]]), np.array([[0, 0], [3, 4]])], with_placeholders=True)
    assert ids.tolist() == [[21, 21, 11, 16, 19, 20], [10, 14, 13, 18, 19, 20]]
    assert mask.tolist() == [[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]


@pytest.mark.parametrize("transition", TRANSITIONS)
def test_draft_head_shapes_and_dependency_on_previous_tokens(transition):
    torch.manual_seed(0)
    head = DraftHead(16, SIZES, transition)
    h0, ctx = torch.randn(3, 16), torch.randn(3, 3, 16)
    a = head.teacher_forced_logits(h0, ctx, torch.tensor([[0, 1, 2]] * 3))
    b = head.teacher_forced_logits(h0, ctx, torch.tensor([[5, 1, 2]] * 3))
    assert [t.shape for t in a] == [(3, 6)] * 3
    assert torch.equal(a[0], b[0])  # level 0 never depends on chosen tokens
    depends = not torch.allclose(a[1], b[1])
    assert depends == (transition != "none")
    # beam-shaped state works the same as flat
    state = head.init_state(h0).unsqueeze(1).expand(-1, 4, -1)
    assert head.step(0, state, torch.zeros(3, 4, dtype=torch.long)).shape == state.shape


def test_unknown_transition_and_objective_are_clear_errors():
    with pytest.raises(ValueError, match="unknown transition"):
        ModelConfig(transition="transformer")
    with pytest.raises(ValueError, match="unknown objective"):
        ModelConfig(objectives=["nezha", "ranking"])
    assert normalise_objectives(["joint", "mtp", "lm"]) == ("nezha", "lm", "mtp")


def test_left_padding_does_not_change_hidden_states():
    model = create_model(ModelConfig(codebook_sizes=SIZES)).eval()
    short = [np.array([[1, 2, 3]])]
    long = [np.array([[0, 1, 2], [3, 4, 5], [1, 1, 1]]), short[0]]
    alone = model.hidden_states(*build_prompts(model.layout, short, True))
    padded = model.hidden_states(*build_prompts(model.layout, long, True))
    assert torch.allclose(alone[0, -4:], padded[1, -4:], atol=1e-5)


def test_losses_and_checkpoint_round_trip(tmp_path):
    model = create_model(ModelConfig(codebook_sizes=SIZES, objectives=["joint", "mtp"], transition="lstm")).eval()
    batch = _batch(model, [np.array([[1, 2, 3]]), np.array([[0, 0, 0], [5, 5, 5]])], np.array([[1, 1, 1], [2, 3, 4]]))
    losses = model(batch)
    assert set(losses) == {"nezha", "lm", "mtp", "loss"}
    assert torch.isclose(losses["loss"], losses["nezha"] + losses["lm"] + losses["mtp"])
    assert available_decoders(model) == ("nezha", "mtp", "beam", "hf-beam", "hf-beam-constrained", "nezha-rescore")
    save_checkpoint(model, tmp_path / "ck")
    loaded = load_checkpoint(tmp_path / "ck")
    again = loaded(batch)
    for key in losses:
        assert torch.allclose(losses[key], again[key])
    assert loaded.config == model.config


def test_bad_checkpoints_are_refused_with_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="not a nezha checkpoint"):
        load_checkpoint(tmp_path)
    model = create_model(ModelConfig(codebook_sizes=SIZES))
    path = save_checkpoint(model, tmp_path / "ck")
    weights = path / "model.safetensors"
    intact = weights.read_bytes()
    flipped = bytearray(intact)
    flipped[-5] ^= 0xFF  # inside the last tensor: safetensors itself would load this silently
    weights.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="SHA-256 differs"):
        load_checkpoint(path)
    weights.write_bytes(intact[: len(intact) // 2])
    with pytest.raises(CheckpointError, match="SHA-256 differs"):
        load_checkpoint(path)
    meta = json.loads((path / "nezha.json").read_text())
    del meta["weights_sha256"]  # without a checksum safetensors still refuses a truncated file
    (path / "nezha.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="cannot load"):
        load_checkpoint(path)
    (path / "nezha.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupted"):
        load_checkpoint(path)
