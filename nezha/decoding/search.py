"""The beam step every decoder shares, and the beam search over a light head (NEZHA's draft head, MTP's heads).

One step extends each live beam by every code of the level, scores the children (parent score + log p),
masks children whose prefix no valid item has (verify="prefix"), keeps the best `beam` and returns which
parent each survivor came from (so the caller can reorder its own state: a head's context state, a KV cache).
"""

from __future__ import annotations

import torch

from nezha.decoding.result import DecodeResult, check_verify_mode, finish
from nezha.model.draft_head import DraftHead, Memory
from nezha.verify.verifier import PrefixVerifier


def beam_step(scores: torch.Tensor, logp: torch.Tensor, prefix: torch.Tensor, level: int, beam: int,
              verifier: PrefixVerifier, verify: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scores [B, k'], prefix [B, k'], parent [B, k'], code [B, k']) after level `level`.

    scores/prefix: [B, k] of the live beams (packed prefix values); logp: [B, k, T_level] log-probabilities.
    """
    size = logp.shape[-1]
    candidates = scores.unsqueeze(-1) + logp
    if verify == "prefix":
        candidates = torch.where(verifier.child_mask(prefix, level), candidates, float("-inf"))
    width = min(beam, candidates.shape[1] * size)
    scores, flat = candidates.flatten(1).topk(width, dim=-1)
    parent, code = flat // size, flat % size
    prefix = prefix.gather(1, parent) + code * verifier.weights[level]
    return scores, prefix, parent, code


def draft_beam_search(head: DraftHead, h0: torch.Tensor, contexts: torch.Tensor | None,
                      verifier: PrefixVerifier, beam: int, topk: int | None = None,
                      verify: str = "prefix", memory: Memory | None = None) -> DecodeResult:
    """Beam search of width `beam` over the head's L levels, batched over users and beams.

    h0: [B, H]; contexts: [B, L, H] placeholder states (None for MTP); memory: the history states and mask
    (`NezhaModel.draft_prefill`; transition "rnn-attn" only: all beams of a user read it at once). With verify="prefix", a branch
    whose prefix no valid item has is masked before top-k at every level, so every returned ID is valid;
    "end" checks only the finished IDs (the paper's text); "none" returns what the head produced.
    """
    check_verify_mode(verify)
    topk = beam if topk is None else topk
    batch = h0.shape[0]
    state = head.init_state(h0).unsqueeze(1)  # [B, 1, S]: one beam per user before level 0
    scores = h0.new_zeros(batch, 1, dtype=torch.float32)
    prefix = torch.zeros(batch, 1, dtype=torch.long, device=h0.device)
    for level in range(head.levels):
        context = None if contexts is None else contexts[:, level : level + 1]
        logp = torch.log_softmax(head.logits(level, state, context, memory).float(), dim=-1)  # [B, k, T]
        scores, prefix, parent, code = beam_step(scores, logp, prefix, level, beam, verifier, verify)
        if level + 1 < head.levels:
            state = state.gather(1, parent.unsqueeze(-1).expand(-1, -1, state.shape[-1]))
            state = head.step(level, state, code)
    return finish(prefix, scores, verifier, verify, topk)
