"""NEZHA and MTP decoding: one prefill, then beam search over a light head (no further LM calls)."""

from __future__ import annotations

import torch

from nezha.decoding.graphs import DraftGraphs
from nezha.decoding.result import DecodeResult
from nezha.decoding.search import draft_beam_search
from nezha.model.model import NezhaModel
from nezha.verify.verifier import PrefixVerifier


@torch.inference_mode()
def nezha_decode(model: NezhaModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 verifier: PrefixVerifier, beam: int, topk: int | None = None,
                 verify: str = "prefix", graphs: DraftGraphs | None = None) -> DecodeResult:
    """The prompt ends with the placeholders (`build_prompts(..., with_placeholders=True)`), unless the
    model is the no-placeholder ablation (`model.prompt_has_placeholders` False): then the history alone.

    With `graphs` and a model on a GPU, the head search is replayed from CUDA graphs (same result), except
    for a head that reads the history memory (transition "rnn-attn"): its search runs eagerly.
    """
    if model.draft_head is None:
        raise ValueError("this checkpoint has no draft head (train it with the nezha or joint objective)")
    h0, contexts, memory = model.draft_prefill(input_ids, attention_mask)
    if graphs is not None and h0.is_cuda and contexts is not None and memory is None:
        return graphs.search(model.draft_head, h0, contexts, verifier, beam, topk, verify)
    return draft_beam_search(model.draft_head, h0, contexts, verifier, beam, topk, verify, memory)


@torch.inference_mode()
def mtp_decode(model: NezhaModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               verifier: PrefixVerifier, beam: int, topk: int | None = None,
               verify: str = "prefix") -> DecodeResult:
    """The prompt is the history alone; the heads read only h_0."""
    if model.mtp_head is None:
        raise ValueError("this checkpoint has no MTP heads (train it with the mtp objective)")
    h0 = model.hidden_states(input_ids, attention_mask)[:, -1]
    return draft_beam_search(model.mtp_head, h0, None, verifier, beam, topk, verify)
