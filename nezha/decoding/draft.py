"""NEZHA and MTP decoding: one prefill, then beam search over a light head (no further LM calls)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from nezha.decoding.result import DecodeResult, check_verify_mode, finish
from nezha.model.draft_head import DraftHead
from nezha.model.model import NezhaModel
from nezha.verify.verifier import PrefixVerifier

if TYPE_CHECKING:
    from nezha.decoding.graphs import DraftGraphs


def draft_beam_search(head: DraftHead, h0: torch.Tensor, contexts: torch.Tensor | None,
                      verifier: PrefixVerifier, beam: int, topk: int | None = None,
                      verify: str = "prefix") -> DecodeResult:
    """Beam search of width `beam` over the head's L levels, batched over users and beams.

    h0: [B, H]; contexts: [B, L, H] placeholder states (None for MTP). With verify="prefix", a branch
    whose prefix no valid item has is masked before top-k at every level, so every returned ID is valid;
    "end" checks only the finished IDs (the paper's text); "none" returns what the head produced.
    """
    check_verify_mode(verify)
    topk = beam if topk is None else topk
    batch = h0.shape[0]
    weights = verifier.weights
    state = head.init_state(h0).unsqueeze(1)  # [B, 1, S]: one beam per user before level 0
    scores = h0.new_zeros(batch, 1, dtype=torch.float32)
    prefix = torch.zeros(batch, 1, dtype=torch.long, device=h0.device)
    for level, size in enumerate(head.sizes):
        context = None if contexts is None else contexts[:, level : level + 1]
        logits = head.logits(level, state, context)  # [B, k, T]
        candidates = scores.unsqueeze(-1) + torch.log_softmax(logits.float(), dim=-1)
        if verify == "prefix":
            candidates = torch.where(verifier.child_mask(prefix, level), candidates, float("-inf"))
        width = min(beam, candidates.shape[1] * size)
        scores, flat = candidates.flatten(1).topk(width, dim=-1)
        parent, code = flat // size, flat % size
        prefix = prefix.gather(1, parent) + code * weights[level]
        if level + 1 < head.levels:
            state = state.gather(1, parent.unsqueeze(-1).expand(-1, -1, state.shape[-1]))
            state = head.step(level, state, code)
    return finish(prefix, scores, verifier, verify, topk)


@torch.inference_mode()
def nezha_decode(model: NezhaModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 verifier: PrefixVerifier, beam: int, topk: int | None = None,
                 verify: str = "prefix", graphs: DraftGraphs | None = None) -> DecodeResult:
    """The prompt ends with the placeholders (`build_prompts(..., with_placeholders=True)`), unless the
    model is the no-placeholder ablation (`model.prompt_has_placeholders` False): then the history alone.

    With `graphs` and a model on a GPU, the head search is replayed from CUDA graphs (same result).
    """
    if model.draft_head is None:
        raise ValueError("this checkpoint has no draft head (train it with the nezha or joint objective)")
    h0, contexts = model.draft_inputs(input_ids, attention_mask)
    if graphs is not None and h0.is_cuda and contexts is not None:
        return graphs.search(model.draft_head, h0, contexts, verifier, beam, topk, verify)
    return draft_beam_search(model.draft_head, h0, contexts, verifier, beam, topk, verify)


@torch.inference_mode()
def mtp_decode(model: NezhaModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               verifier: PrefixVerifier, beam: int, topk: int | None = None,
               verify: str = "prefix") -> DecodeResult:
    """The prompt is the history alone; the heads read only h_0."""
    if model.mtp_head is None:
        raise ValueError("this checkpoint has no MTP heads (train it with the mtp objective)")
    h0 = model.hidden_states(input_ids, attention_mask)[:, -1]
    return draft_beam_search(model.mtp_head, h0, None, verifier, beam, topk, verify)
