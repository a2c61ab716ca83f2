"""Draft-then-rescore (ours, beyond the paper): the draft head proposes, the LM head ranks, in two forwards.

A joint (nezha + lm) model. One prefill of the NEZHA prompt (history + <SP_1..SP_L>) with a KV cache gives
h_0..h_L: the draft head's beam search over them proposes W valid IDs per user (as `nezha_decode` does).
The LM then scores all W full IDs: log p(t_0 | history) from the LM head on h_0, the last history token
(causal attention: the same state the lm objective reads at hidden[:, -L-1] of history + target), and
log p(t_1..t_{L-1} | history, t_0, ...) from ONE forward of t_0..t_{L-2} for all B*W candidates over the
history's cache (the placeholders cropped off; each user's candidates go in as one prefix tree, each distinct
prefix once, under a tree attention mask). Beam search needs L-1 sequential forwards after its prefill; this
needs one, however many candidates.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from nezha.decoding.graphs import DraftGraphs
from nezha.decoding.result import DecodeResult, check_verify_mode, finish
from nezha.decoding.search import draft_beam_search
from nezha.model.backbones import with_cache
from nezha.model.draft_head import Memory
from nezha.model.model import NezhaModel
from nezha.model.tokens import position_ids_from_mask
from nezha.verify.codec import radix_weights, unpack
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
    return prefill_with_memory(model, input_ids, attention_mask)[:4]


def prefill_with_memory(model: NezhaModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        ) -> tuple[torch.Tensor, torch.Tensor | None, DynamicCache, torch.Tensor, Memory | None]:
    """`prefill` plus the draft head's history memory: (states [B, P - L, H], the history's mask) when the
    head reads one (transition "rnn-attn"), else None."""
    cache = DynamicCache()
    out = model.backbone.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                    position_ids=position_ids_from_mask(attention_mask),
                                    **with_cache(model.backbone.base_model, cache),
                                    use_cache=True)
    hidden = out.last_hidden_state
    levels = model.layout.levels if model.prompt_has_placeholders else 0
    history = hidden[:, : hidden.shape[1] - levels]
    history_mask = attention_mask[:, : hidden.shape[1] - levels]
    memory = (history, history_mask) if model.draft_head is not None and model.draft_head.needs_memory else None
    if not model.prompt_has_placeholders:  # the NEZHA-2 ablation: the prompt is the history alone
        return hidden[:, -1], None, cache, history_mask, memory
    cache.crop(-levels)  # drop <SP_1..SP_L>: the LM continues from the last history token
    return hidden[:, -levels - 1], hidden[:, -levels:], cache, history_mask, memory


def _prefix_tree(codes: torch.Tensor, sizes: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The distinct prefixes t_0..t_l (l < L-1) of each user's candidates as nodes of one tree.

    codes: [B, W, L]. Returns (node [B, W, L-1]: the node of each candidate's length-(l+1) prefix; level [n]:
    each node's level, nodes level-major, each level padded to the batch's most distinct prefixes; sees
    [B, n, n]: node i sees node j when j is a prefix of i, or i itself).
    """
    batch, width, levels = codes.shape
    device = codes.device
    weights = torch.tensor(radix_weights(sizes)[:levels], device=device)
    nodes, level_ids, first_node = [], [], 0
    for level in range(levels - 1):
        key = (codes[..., : level + 1] * weights[: level + 1]).sum(-1)  # packed prefix value, [B, W]
        ordered, order = key.sort(dim=1)
        new = torch.ones_like(ordered, dtype=torch.bool)
        new[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
        rank = torch.empty_like(order).scatter_(1, order, new.long().cumsum(1) - 1)  # distinct index per candidate
        distinct = int(new.sum(1).max())  # one host sync per level: the tree's width
        nodes.append(rank + first_node)
        level_ids.append(torch.full((distinct,), level, device=device))
        first_node += distinct
    node = torch.stack(nodes, dim=-1)
    n = first_node
    sees = torch.eye(n, dtype=torch.bool, device=device).repeat(batch, 1, 1)  # padding nodes see themselves only
    later, earlier = torch.tril_indices(levels - 1, levels - 1, device=device)
    users = torch.arange(batch, device=device)[:, None, None]
    sees[users, node[..., later], node[..., earlier]] = True
    return node, torch.cat(level_ids), sees


def lm_log_probs(model: NezhaModel, h0: torch.Tensor, cache: DynamicCache, history_mask: torch.Tensor,
                 codes: torch.Tensor) -> torch.Tensor:
    """[B, W] log p(ID | history) under the LM head for codes [B, W, L], in one forward over `cache`.

    The B x W candidates are not W copies of the history's cache: each user's distinct prefixes
    t_0..t_l (l < L-1) go in once, as one row with a tree mask (a token sees the history and its own
    prefix), each at the position it would have after the history, so candidates that share t_0 share its
    forward. `cache` (as `prefill` leaves it) is consumed: the forward appends to it.
    """
    layout = model.layout
    batch, width, levels = codes.shape
    device = codes.device
    offsets = torch.tensor([layout.code_offset(level) for level in range(levels)], device=device)
    tokens = codes + offsets  # [B, W, L]
    lm_head = model.backbone.get_output_embeddings()
    # Normalised over the whole vocabulary, as beam search and the lm objective's cross-entropy are.
    score = torch.log_softmax(lm_head(h0).float(), dim=-1).gather(1, tokens[..., 0])  # log p(t_0 | history)
    if levels == 1:
        return score
    node, level, tree = _prefix_tree(codes, layout.sizes)
    n = level.numel()
    users = torch.arange(batch, device=device)[:, None, None]
    feed = torch.full((batch, n), layout.pad, dtype=tokens.dtype, device=device)
    feed[users, node] = tokens[..., :-1]  # a node's last token; candidates sharing it write the same value
    sees = torch.cat([history_mask.bool()[:, None, :].expand(batch, n, -1), tree], dim=-1)
    dtype = lm_head.weight.dtype
    # Additive 4D mask: used as given by the eager and SDPA attention alike.
    mask = torch.zeros(sees.shape, dtype=dtype, device=device).masked_fill_(~sees, torch.finfo(dtype).min)
    positions = position_ids_from_mask(history_mask)[:, -1:] + 1 + level  # [B, n]
    out = model.backbone(input_ids=feed, attention_mask=mask[:, None], position_ids=positions,
                         **with_cache(model.backbone, cache), use_cache=True)
    logp = torch.log_softmax(out.logits.float(), dim=-1)  # [B, n, V]
    rest = logp[users, node, tokens[..., 1:]]  # [B, W, L-1]: log p(t_{l+1} | history, t_0..t_l)
    return score + rest.sum(-1)


@dataclass
class Candidates:
    """What the draft head proposed for each user and both heads' scores of it (rank with `rank_candidates`)."""

    ids: torch.Tensor  # [B, W] packed IDs in draft order; -1 where fewer than W survived
    lm: torch.Tensor  # [B, W] log p(ID | history) under the LM head
    draft: torch.Tensor  # [B, W] log p(ID | history) under the draft head; -inf where ids == -1


@torch.inference_mode()
def score_candidates(model: NezhaModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     verifier: PrefixVerifier, beam: int, topk: int | None = None, verify: str = "prefix",
                     candidates: int | None = None, graphs: DraftGraphs | None = None) -> Candidates:
    """The draft head's `candidates` best IDs (default 3 x topk; its beam is max(beam, candidates)), scored
    by the LM too. verify="prefix": only valid IDs are proposed; otherwise the head proposes freely."""
    check_verify_mode(verify)
    _require_joint(model)
    topk = beam if topk is None else topk
    width = CANDIDATES_PER_K * topk if candidates is None else candidates
    if width < 1 or topk < 1:
        raise ValueError(f"candidates and topk must be at least 1, got {width} and {topk}")
    h0, contexts, cache, history_mask, memory = prefill_with_memory(model, input_ids, attention_mask)
    search_width = max(beam, width)
    draft_verify = "prefix" if verify == "prefix" else "none"
    if graphs is not None and h0.is_cuda and contexts is not None and memory is None:
        proposed = graphs.search(model.draft_head, h0, contexts, verifier, search_width, width, draft_verify)
    else:  # a head with a history memory ("rnn-attn") searches eagerly: the graphs do not carry it
        proposed = draft_beam_search(model.draft_head, h0, contexts, verifier, search_width, width, draft_verify,
                                     memory)
    codes = unpack(proposed.ids.clamp(min=0), model.layout.sizes)
    lm = lm_log_probs(model, h0, cache, history_mask, codes)
    return Candidates(proposed.ids, lm, proposed.scores)


def rank_candidates(scored: Candidates, verifier: PrefixVerifier, verify: str, topk: int,
                    mix: float = 1.0) -> DecodeResult:
    """The best `topk` by mix * log p_LM + (1 - mix) * log p_draft (mix 1: the LM alone), finished as every
    decoder's (invalid IDs counted, and dropped unless verify="none"). One `score_candidates` pass serves any
    number of mix values: that is how to choose mix on validation."""
    scores = scored.lm if mix == 1.0 else mix * scored.lm + (1.0 - mix) * scored.draft
    scores = scores.masked_fill(scored.ids < 0, float("-inf"))  # fewer than W survive when the catalog is small
    return finish(scored.ids, scores, verifier, verify, topk)


def rescore_decode(model: NezhaModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   verifier: PrefixVerifier, beam: int, topk: int | None = None, verify: str = "prefix",
                   candidates: int | None = None, mix: float = 1.0,
                   graphs: DraftGraphs | None = None) -> DecodeResult:
    """Draft-then-rescore on NEZHA's prompt (history + placeholders): `score_candidates`, then
    `rank_candidates`; the best `topk` (default `beam`) of the `candidates` (default 3 x topk) come back."""
    topk = beam if topk is None else topk
    scored = score_candidates(model, input_ids, attention_mask, verifier, beam, topk, verify, candidates, graphs)
    return rank_candidates(scored, verifier, verify, topk, mix)
