"""Transition "rnn-attn" (ours, beyond the paper): the draft head also reads the prefill's history states."""

import numpy as np
import pytest
import torch

from nezha.decoding import decode, draft_beam_search, prompt_for
from nezha.decoding.graphs import DraftGraphs
from nezha.model.checkpoint import create_model, load_checkpoint, save_checkpoint
from nezha.model.model import ModelConfig
from nezha.model.tokens import build_prompts
from nezha.verify import PrefixVerifier, pack, unpack

SIZES = [5, 4, 3]


def _model(objectives=("nezha",), seed=0):
    model = create_model(ModelConfig(backbone="tiny", codebook_sizes=SIZES, objectives=list(objectives),
                                     transition="rnn-attn"), seed=seed)
    torch.manual_seed(seed)
    for read in model.draft_head.reads:  # the value projection starts at zero: make the read do something
        torch.nn.init.normal_(read.value.weight, std=0.5)
    return model.eval()


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(0)
    codes = np.unique(rng.integers(0, 3, (25, 3)) + [0, 1, 0], axis=0)  # a sparse catalog
    verifier = PrefixVerifier(pack(codes, SIZES), SIZES)
    histories = [codes[rng.integers(0, len(codes), n)] for n in (1, 3, 6)]  # mixed lengths: left padding
    return _model(("joint",)), verifier, histories, codes


def test_training_step_runs_and_overfits_a_tiny_batch():
    model = create_model(ModelConfig(backbone="tiny", codebook_sizes=SIZES, objectives=["nezha"],
                                     transition="rnn-attn")).train()
    histories = [np.array([[1, 2, 0], [3, 1, 2]]), np.array([[0, 0, 1]]), np.array([[4, 3, 2]] * 4)]
    targets = np.array([[1, 1, 1], [2, 3, 0], [4, 0, 2]])
    ids, mask = build_prompts(model.layout, histories, True)
    batch = {"targets": torch.from_numpy(targets), "draft_input_ids": ids, "draft_mask": mask}
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(40):
        loss = model(batch)["loss"]
        first = loss.item() if first is None else first
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert model(batch)["loss"].item() < 0.3 * first
    assert all(read.value.weight.abs().sum() > 0 for read in model.draft_head.reads)  # the reads trained


def test_the_read_sees_the_history_and_beam_scores_match_training(setup):
    model, verifier, histories, _ = setup
    ids, mask = prompt_for(model, "nezha", histories, "cpu")
    with torch.inference_mode():
        h0, contexts, memory = model.draft_prefill(ids, mask)
        assert memory[0].shape[:2] == memory[1].shape == (3, ids.shape[1] - len(SIZES))
        result = draft_beam_search(model.draft_head, h0, contexts, verifier, beam=6, memory=memory)
        # The search's scores are the head's teacher-forced log-probabilities of the IDs it returns.
        codes = unpack(result.ids, SIZES)  # [B, 6, L]
        for b in range(3):
            user = (memory[0][b : b + 1].expand(6, -1, -1), memory[1][b : b + 1].expand(6, -1))
            logits = model.draft_head.teacher_forced_logits(h0[b : b + 1].expand(6, -1),
                                                            contexts[b : b + 1].expand(6, -1, -1), codes[b], user)
            logp = sum(torch.log_softmax(lg.float(), -1).gather(1, codes[b, :, i : i + 1]).squeeze(1)
                       for i, lg in enumerate(logits))
            assert torch.allclose(logp, result.scores[b], atol=1e-4)
        without = model.draft_head.teacher_forced_logits(h0, contexts, codes[:, 0])
        with_read = model.draft_head.teacher_forced_logits(h0, contexts, codes[:, 0], memory)
        assert not torch.allclose(without[0], with_read[0])  # level 0 reads the history too
    with pytest.raises(ValueError, match="draft_prefill"):
        model.draft_inputs(ids, mask)
    with pytest.raises(ValueError, match="CUDA graphs"):
        DraftGraphs().search(model.draft_head, h0, contexts, verifier, beam=6)


@pytest.mark.parametrize("decoder", ["nezha", "nezha-rescore"])
def test_decode_is_valid_sorted_and_per_user_equal_to_batch_of_one(setup, decoder):
    model, verifier, histories, _ = setup
    result = decode(model, decoder, histories, verifier, beam=6)
    assert result.ids.shape == (3, 6) and result.invalid.tolist() == [0, 0, 0]
    assert verifier.contains(result.ids).all()
    assert (result.scores[:, :-1] >= result.scores[:, 1:]).all()
    for b, history in enumerate(histories):
        alone = decode(model, decoder, [history], verifier, beam=6)
        assert torch.equal(alone.ids[0], result.ids[b])
        assert torch.allclose(alone.scores[0], result.scores[b], atol=1e-4)


def test_checkpoint_round_trip_decodes_the_same(setup, tmp_path):
    model, verifier, histories, _ = setup
    save_checkpoint(model, tmp_path / "ck")
    loaded = load_checkpoint(tmp_path / "ck").eval()
    assert loaded.config.transition == "rnn-attn"
    for decoder in ("nezha", "nezha-rescore"):
        a = decode(model, decoder, histories, verifier, beam=6)
        b = decode(loaded, decoder, histories, verifier, beam=6)
        assert torch.equal(a.ids, b.ids) and torch.allclose(a.scores, b.scores)
