"""nezha-rescore: the draft head proposes, the LM head ranks from the prefill's KV cache (nezha/decoding/rescore.py)."""

import copy

import numpy as np
import pytest
import torch

from nezha.decoding import DECODERS, SELECTION_ORDER, available_decoders, decode, prompt_for, rescore_decode
from nezha.decoding.rescore import _prefix_tree, lm_log_probs, prefill, rank_candidates, score_candidates
from nezha.model.checkpoint import create_model
from nezha.model.model import ModelConfig
from nezha.model.tokens import build_prompts, position_ids_from_mask
from nezha.verify import PrefixVerifier, pack, unpack

SIZES = [5, 4, 3]


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(0)
    codes = np.unique(rng.integers(0, 3, (25, 3)) + [0, 1, 0], axis=0)  # a sparse catalog
    verifier = PrefixVerifier(pack(codes, SIZES), SIZES)
    model = create_model(ModelConfig(backbone="tiny", codebook_sizes=SIZES, objectives=["joint"]), seed=3).eval()
    histories = [codes[rng.integers(0, len(codes), n)] for n in (1, 4, 7)]  # mixed lengths: left padding
    return model, verifier, histories, codes


def _uncached_lm_scores(model, history: np.ndarray, candidates: np.ndarray) -> torch.Tensor:
    """log p(ID | history) as the lm objective computes it: one full forward of history + ID, no cache."""
    layout = model.layout
    levels = layout.levels
    ids, mask = build_prompts(layout, [history] * len(candidates), False, suffix=layout.codes_to_tokens(candidates))
    with torch.inference_mode():
        logits = model.backbone(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    logp = torch.log_softmax(logits[:, -levels - 1 : -1].float(), dim=-1)
    return logp.gather(2, ids[:, -levels:].unsqueeze(-1)).squeeze(-1).sum(-1)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])  # the tree mask is a custom 4D mask: both must take it
def test_cached_lm_scores_equal_a_full_uncached_forward_of_history_plus_id(setup, attention):
    model, verifier, histories, codes = setup
    model = copy.deepcopy(model)
    model.backbone.set_attn_implementation(attention)
    ids, mask = prompt_for(model, "nezha-rescore", histories, "cpu")
    rng = np.random.default_rng(1)
    picked = np.stack([codes[rng.choice(len(codes), 6, replace=False)] for _ in histories])  # [B, W, L]
    with torch.inference_mode():
        h0, contexts, cache, history_mask = prefill(model, ids, mask)
        cached = lm_log_probs(model, h0, cache, history_mask, torch.from_numpy(picked))
    assert contexts.shape == (len(histories), len(SIZES), h0.shape[-1])
    for b, history in enumerate(histories):
        expected = _uncached_lm_scores(model, history, picked[b])
        assert torch.allclose(cached[b], expected, atol=1e-4), (b, cached[b], expected)


def test_candidates_sharing_a_prefix_share_its_node():
    codes = torch.tensor([[[0, 1, 2], [0, 1, 0], [0, 2, 2], [1, 1, 1]],
                          [[2, 0, 0], [2, 0, 0], [2, 0, 1], [2, 0, 2]]])
    node, level, sees = _prefix_tree(codes, (3, 3, 3))
    # level 0: user 0 has t_0 in {0, 1}, user 1 only 2 -> 2 nodes; level 1: {01, 02, 11} and {20} -> 3 nodes
    assert level.tolist() == [0, 0, 1, 1, 1]
    assert node[0].tolist() == [[0, 2], [0, 2], [0, 4], [1, 3]]  # ordered by packed value: 01 < 11 < 02
    assert node[1].tolist() == [[0, 2]] * 4
    assert sees[0].long().tolist() == [[1, 0, 0, 0, 0], [0, 1, 0, 0, 0], [1, 0, 1, 0, 0], [0, 1, 0, 1, 0],
                                       [1, 0, 0, 0, 1]]
    assert sees[1, 2].tolist() == [True, False, True, False, False] and sees[1, 3:].sum() == 2  # padding nodes


def test_results_are_valid_sorted_and_a_batch_answers_as_single_users(setup):
    model, verifier, histories, _ = setup
    batched = decode(model, "nezha-rescore", histories, verifier, beam=4, topk=4)
    assert batched.ids.shape == batched.scores.shape == (3, 4)
    assert batched.invalid.tolist() == [0, 0, 0]
    assert verifier.contains(batched.ids).all()
    assert (batched.scores[:, :-1] >= batched.scores[:, 1:]).all()
    for b, history in enumerate(histories):
        alone = decode(model, "nezha-rescore", [history], verifier, beam=4, topk=4)
        assert torch.equal(alone.ids[0], batched.ids[b])
        assert torch.allclose(alone.scores[0], batched.scores[b], atol=1e-4)


def test_as_many_candidates_as_k_reranks_the_nezha_top_k(setup):
    model, verifier, histories, _ = setup
    ids, mask = prompt_for(model, "nezha-rescore", histories, "cpu")
    nezha = decode(model, "nezha", histories, verifier, beam=5)
    rescored = rescore_decode(model, ids, mask, verifier, beam=5, topk=5, candidates=5)
    for b in range(len(histories)):
        assert sorted(rescored.ids[b].tolist()) == sorted(nezha.ids[b].tolist())
    # mix 0 ranks by the draft head alone: exactly the nezha decoder's list and scores
    draft_only = rescore_decode(model, ids, mask, verifier, beam=5, topk=5, candidates=5, mix=0.0)
    assert torch.equal(draft_only.ids, nezha.ids)
    assert torch.allclose(draft_only.scores, nezha.scores, atol=1e-5)


def test_one_scoring_pass_ranks_for_every_mix(setup):
    model, verifier, histories, _ = setup
    ids, mask = prompt_for(model, "nezha-rescore", histories, "cpu")
    scored = score_candidates(model, ids, mask, verifier, beam=4, topk=4)
    assert scored.ids.shape == scored.lm.shape == scored.draft.shape == (3, 12)  # 3 x topk candidates
    orders = set()
    for mix in (0.0, 0.3, 0.7, 1.0):
        ranked = rank_candidates(scored, verifier, "prefix", 4, mix)
        direct = rescore_decode(model, ids, mask, verifier, beam=4, topk=4, mix=mix)
        assert torch.equal(ranked.ids, direct.ids) and torch.allclose(ranked.scores, direct.scores)
        orders.add(tuple(ranked.ids.flatten().tolist()))
    assert len(orders) > 1  # the mix matters: the two heads disagree on a random-init model


@pytest.mark.parametrize("placeholders", [True, False])  # False: the NEZHA-2 ablation's history-only prompt
def test_every_valid_id_as_a_candidate_gives_exhaustive_beam_search(setup, placeholders):
    """With the whole catalog proposed, the LM ranking is the exact LM ranking: beam search at full width."""
    model, verifier, histories, codes = setup
    if not placeholders:
        model = create_model(ModelConfig(backbone="tiny", codebook_sizes=SIZES, objectives=["joint"],
                                         placeholders=False), seed=3).eval()
    full = int(np.prod(SIZES))
    ids, mask = prompt_for(model, "nezha-rescore", histories, "cpu")
    rescored = rescore_decode(model, ids, mask, verifier, beam=full, topk=10, candidates=full)
    beam = decode(model, "beam", histories, verifier, beam=full, topk=10)
    assert torch.allclose(rescored.scores, beam.scores, atol=1e-4)
    assert torch.equal(rescored.ids, beam.ids)
    assert len(codes) < full  # candidates beyond the catalog come back as -1 and are never ranked


def test_unverified_modes_count_invalid_candidates(setup):
    model, verifier, histories, _ = setup
    free = decode(model, "nezha-rescore", histories, verifier, beam=8, verify="none")
    end = decode(model, "nezha-rescore", histories, verifier, beam=8, verify="end")
    assert free.invalid.sum() > 0 and torch.equal(free.invalid, end.invalid)
    assert verifier.contains(end.ids[end.ids >= 0]).all()


def test_rescore_needs_both_heads_and_is_never_picked_by_auto(setup):
    _, verifier, histories, _ = setup
    assert DECODERS["nezha-rescore"].needs == ("nezha", "lm")
    assert SELECTION_ORDER.index("nezha-rescore") > SELECTION_ORDER.index("nezha")
    nezha_only = create_model(ModelConfig(backbone="tiny", codebook_sizes=SIZES))
    assert "nezha-rescore" not in available_decoders(nezha_only)
    with pytest.raises(ValueError, match=r"needs the lm head, .*serves nezha\)$"):
        decode(nezha_only, "nezha-rescore", histories, verifier, beam=4)
    lm_only = create_model(ModelConfig(backbone="tiny", codebook_sizes=SIZES, objectives=["lm"]))
    with pytest.raises(ValueError, match="needs the nezha head"):
        decode(lm_only, "nezha-rescore", histories, verifier, beam=4)
    ids, mask = prompt_for(lm_only, "nezha-rescore", histories, "cpu")
    with pytest.raises(ValueError, match="joint model"):
        rescore_decode(lm_only, ids, mask, verifier, beam=4)


def test_decoded_candidates_unpack_to_catalog_codes(setup):
    model, verifier, histories, codes = setup
    result = decode(model, "nezha-rescore", histories, verifier, beam=3, topk=3)
    catalog = {tuple(r) for r in codes.tolist()}
    assert all(tuple(r) in catalog for r in unpack(result.ids.reshape(-1), SIZES).tolist())
