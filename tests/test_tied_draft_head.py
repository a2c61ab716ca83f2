"""tie_draft_embeddings / tie_draft_heads (ours, beyond the paper): the draft head reads the LM's token
embeddings of each level's codes, the same storage, through training, checkpoints and the HF export."""

import copy

import numpy as np
import pytest
import torch

from nezha.config import ConfigError
from nezha.decoding import decode
from nezha.export import ExportConfig, export_checkpoint
from nezha.model.checkpoint import create_model, load_checkpoint, save_checkpoint
from nezha.model.model import ModelConfig
from nezha.model.tokens import build_prompts
from nezha.training import TorchStepper, TrainConfig
from nezha.verify import PrefixVerifier, pack

SIZES = [5, 6, 7]
TIED = dict(tie_draft_embeddings=True, tie_draft_heads=True)


def _tied_model(**overrides):
    return create_model(ModelConfig(codebook_sizes=SIZES, objectives=["joint"], **{**TIED, **overrides}))


def _shares_vocab_storage(model, level: int, tensor: torch.Tensor) -> bool:
    vocab = model.backbone.get_input_embeddings().weight
    row = vocab[model.layout.code_offset(level)]
    return tensor.untyped_storage().data_ptr() == vocab.untyped_storage().data_ptr() and \
        tensor[0].data_ptr() == row.data_ptr() and tensor.shape == (SIZES[level], vocab.shape[1])


def _draft_logits(model, seed: int = 0):
    rng = np.random.default_rng(seed)
    histories = [rng.integers(0, 5, (n, 3)) for n in (1, 4, 2)]
    ids, mask = build_prompts(model.layout, histories, True)
    h0, contexts = model.draft_inputs(ids, mask)
    return model.draft_head.teacher_forced_logits(h0, contexts, torch.from_numpy(rng.integers(0, 5, (3, 3))))


def test_tied_weights_are_the_vocabularys_rows_and_the_head_owns_no_copy():
    model = _tied_model()
    head = model.draft_head
    for level in range(3):
        assert _shares_vocab_storage(model, level, head.head_weight(level))
    for level in range(2):
        assert _shares_vocab_storage(model, level, head.code_embedding(level))
    assert head.heads is None and head.embeddings is None
    assert not [k for k in model.state_dict() if k.startswith("draft_head.") and "transitions" not in k]
    # one tie at a time: the other weight stays the head's own
    only_embeddings = _tied_model(tie_draft_heads=False).draft_head
    assert only_embeddings.heads is not None and only_embeddings.embeddings is None
    # a deep copy (the DeepSpeed stepper trains one) ties to the copy's vocabulary, not the original's
    clone = copy.deepcopy(model)
    assert _shares_vocab_storage(clone, 1, clone.draft_head.code_embedding(1))


def _unseen_rows_after_one_step(tie_draft_heads: bool) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = TrainConfig(backbone="tiny", objectives=["nezha"], lr=1e-2, warmup_ratio=0.0,
                      tie_draft_embeddings=True, tie_draft_heads=tie_draft_heads)
    model = create_model(cfg.model_config(SIZES))
    rng = np.random.default_rng(0)
    histories = [rng.integers(0, 5, (3, 3)) for _ in range(4)]  # level-2 codes 5 and 6 never in a prompt
    ids, mask = build_prompts(model.layout, histories, True)
    batch = {"targets": torch.from_numpy(rng.integers(0, 5, (4, 3))), "draft_input_ids": ids, "draft_mask": mask}
    unseen = model.layout.code_offset(2) + np.array([5, 6])
    vocab = model.backbone.get_input_embeddings().weight
    before = vocab[unseen].detach().clone()
    stepper = TorchStepper(model, cfg, total_steps=5)
    stepper.backward_and_step(stepper.forward(batch)["loss"])
    return before, vocab[unseen].detach()


def test_a_training_step_trains_the_tied_rows_through_the_draft_loss():
    # Rows of codes absent from every prompt get a gradient only as classes of the tied level-2 logit head.
    before, after = _unseen_rows_after_one_step(tie_draft_heads=True)
    assert not torch.allclose(after, before)
    before, after = _unseen_rows_after_one_step(tie_draft_heads=False)
    assert torch.equal(after, before)


def test_a_tied_checkpoint_and_its_export_round_trip(tmp_path):
    model = _tied_model().eval()
    with torch.no_grad():
        model.backbone.get_input_embeddings().weight.normal_()  # not the seed's init: a real load is needed
    expected = _draft_logits(model)
    rng = np.random.default_rng(1)
    codes = np.unique(np.stack([rng.integers(0, size, 40) for size in SIZES], axis=1), axis=0)
    verifier = PrefixVerifier(pack(codes, SIZES), SIZES)
    histories = [codes[rng.integers(0, len(codes), n)] for n in (2, 5, 1)]
    with torch.inference_mode():
        decoded = decode(model, "nezha", histories, verifier, beam=4)
    save_checkpoint(model, tmp_path / "ckpt")
    exported = export_checkpoint(ExportConfig(checkpoint=str(tmp_path / "ckpt"), out=str(tmp_path / "hf")))
    for path in (tmp_path / "ckpt", exported):
        loaded = load_checkpoint(path)
        assert loaded.config.tie_draft_heads and loaded.config.tie_draft_embeddings
        assert _shares_vocab_storage(loaded, 0, loaded.draft_head.head_weight(0))
        assert _shares_vocab_storage(loaded, 1, loaded.draft_head.code_embedding(1))
        for got, want in zip(_draft_logits(loaded), expected, strict=True):
            torch.testing.assert_close(got, want)
        with torch.inference_mode():
            again = decode(loaded, "nezha", histories, verifier, beam=4)
        assert torch.equal(again.ids, decoded.ids)  # the NEZHA decoder runs on the tied head, the same way


@pytest.mark.parametrize(("overrides", "message"), [
    (dict(objectives=["lm"], tie_draft_heads=True), "tie_draft_heads: ties the NEZHA draft head"),
    (dict(transition="none", tie_draft_embeddings=True), "tie_draft_embeddings: transition none"),
])
def test_ties_that_make_no_sense_are_clear_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**overrides)
    with pytest.raises(ConfigError, match=message):
        ModelConfig(codebook_sizes=SIZES, **overrides)
