"""Draft-then-rescore (ours, beyond the paper): the draft head proposes, the LM head ranks, in two forwards.

A joint (nezha + lm) model. One prefill of the NEZHA prompt (history + <SP_1..SP_L>) with a KV cache gives
h_0..h_L: the draft head's beam search over them proposes W valid IDs per user (as `nezha_decode` does).
The LM then scores all W full IDs: log p(t_0 | history) from the LM head on h_0, the last history token
(causal attention: the same state the lm objective reads at hidden[:, -L-1] of history + target), and
log p(t_1..t_{L-1} | history, t_0, ...) from ONE forward of t_0..t_{L-2} for all B*W candidates over the
history's cache (the placeholders cropped off, the cache repeated W times). Beam search needs L-1
sequential forwards after its prefill; this needs one, however many candidates.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from nezha.decoding.graphs import DraftGraphs
from nezha.decoding.result import DecodeResult, check_verify_mode, finish
from nezha.decoding.search import draft_beam_search
from nezha.model.model import NezhaModel
from nezha.model.tokens import position_ids_from_mask
from nezha.verify.codec import unpack
from nezha.verify.verifier import PrefixVerifier

CANDIDATES_PER_K = 3  # default W = 3 x topk


def _require_joint(model: NezhaModel) -> None:
    missing = [o for o in ("nezha", "lm") if o not in model.config.objectives]
    if missing:
        raise ValueError(f"nezha-rescore needs a joint model (nezha + lm heads); this checkpoint lacks "
                         f"{' and '.join(missing)} (train it with the joint objective)")


def prefill(model: NezhaModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
            ) -> tuple[torch.Tensor, torch.Tensor | None, DynamicCache, torch.Tensor]:
    """One cached forward of the draft prompt: (h_0 [B, H], placeholder states [B, L, H] or None, the KV
    cache of the history alone, the history's attention mask [B, P - L])."""
    cache = DynamicCache()
    out = model.backbone.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                    position_ids=position_ids_from_mask(attention_mask), past_key_values=cache,
                                    use_cache=True)
    hidden = out.last_hidden_state
    if not model.prompt_has_placeholders:  # the NEZHA-2 ablation: the prompt is the history alone
        return hidden[:, -1], None, cache, attention_mask
    levels = model.layout.levels
    cache.crop(-levels)  # drop <SP_1..SP_L>: the LM continues from the last history token
    return hidden[:, -levels - 1], hidden[:, -levels:], cache, attention_mask[:, :-levels]


def lm_log_probs(model: NezhaModel, h0: torch.Tensor, cache: DynamicCache, history_mask: torch.Tensor,
                 codes: torch.Tensor) -> torch.Tensor:
    """[B, W] log p(ID | history) under the LM head for codes [B, W, L], in one forward over `cache`.

    `cache` holds the history of B users (as `prefill` leaves it) and is consumed: it is repeated W times
    and extended by the candidates' tokens.
    """
    layout = model.layout
    batch, width, levels = codes.shape
    offsets = torch.tensor([layout.code_offset(level) for level in range(levels)], device=codes.device)
    tokens = (codes + offsets).reshape(batch * width, levels)
    lm_head = model.backbone.get_output_embeddings()
    # Normalised over the whole vocabulary, as beam search and the lm objective's cross-entropy are.
    first = torch.log_softmax(lm_head(h0).float(), dim=-1)  # [B, V]
    score = first.gather(1, tokens.reshape(batch, width, levels)[..., 0])  # [B, W]
    if levels == 1:
        return score
    cache.batch_repeat_interleave(width)  # row b * W + w is user b's history
    mask = history_mask.repeat_interleave(width, dim=0)
    last = position_ids_from_mask(mask)[:, -1:]
    feed = tokens[:, :-1]  # t_0..t_{L-2}
    positions = last + torch.arange(1, levels, device=codes.device)
    out = model.backbone(input_ids=feed, attention_mask=torch.cat([mask, mask.new_ones(feed.shape)], dim=1),
                         position_ids=positions, past_key_values=cache, use_cache=True)
    rest = torch.log_softmax(out.logits.float(), dim=-1).gather(2, tokens[:, 1:].unsqueeze(-1)).squeeze(-1)
    return score + rest.sum(-1).reshape(batch, width)


@torch.inference_mode()
def rescore_decode(model: NezhaModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   verifier: PrefixVerifier, beam: int, topk: int | None = None, verify: str = "prefix",
                   candidates: int | None = None, mix: float = 1.0,
                   graphs: DraftGraphs | None = None) -> DecodeResult:
    """The draft head proposes `candidates` IDs (default 3 x topk; its beam is max(beam, candidates)), the LM
    ranks them by mix * log p_LM + (1 - mix) * log p_draft (mix 1: the LM alone); the best `topk` come back.

    The prompt is NEZHA's (history + placeholders). verify="prefix": only valid IDs are proposed; "end" and
    "none": the head proposes freely and the finished IDs are checked (dropped for "end"), as elsewhere.
    """
    check_verify_mode(verify)
    _require_joint(model)
    topk = beam if topk is None else topk
    width = CANDIDATES_PER_K * topk if candidates is None else candidates
    if width < 1 or topk < 1:
        raise ValueError(f"candidates and topk must be at least 1, got {width} and {topk}")
    h0, contexts, cache, history_mask = prefill(model, input_ids, attention_mask)
    search_width = max(beam, width)
    draft_verify = "prefix" if verify == "prefix" else "none"
    if graphs is not None and h0.is_cuda and contexts is not None:
        proposed = graphs.search(model.draft_head, h0, contexts, verifier, search_width, width, draft_verify)
    else:
        proposed = draft_beam_search(model.draft_head, h0, contexts, verifier, search_width, width, draft_verify)
    alive = proposed.ids >= 0  # fewer than W survive when the catalog is small
    codes = unpack(proposed.ids.clamp(min=0), model.layout.sizes)
    lm = lm_log_probs(model, h0, cache, history_mask, codes)
    scores = lm if mix == 1.0 else mix * lm + (1.0 - mix) * proposed.scores
    scores = scores.masked_fill(~alive, float("-inf"))
    return finish(proposed.ids, scores, verifier, verify, topk)
