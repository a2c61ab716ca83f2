"""Autoregressive baselines over the LM head: our KV-cache beam search and HF `generate`.

Both take the history-only prompt (the same history tokens NEZHA gets) and generate the L ID tokens.
Ours batches users x beams, keeps one KV cache row per beam (reordered by index each step), restricts
level l to that level's codes, and masks invalid prefixes with the same verifier as NEZHA.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from nezha.decoding.result import DecodeResult, check_verify_mode, finish
from nezha.decoding.search import beam_step
from nezha.model.backbones import with_cache
from nezha.model.model import NezhaModel
from nezha.model.tokens import position_ids_from_mask
from nezha.verify.verifier import PrefixVerifier


def _require_lm(model: NezhaModel) -> None:
    if "lm" not in model.config.objectives:
        raise ValueError("this checkpoint's LM head was not trained for IDs (train with the lm or joint objective)")


@torch.inference_mode()
def beam_decode(model: NezhaModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                verifier: PrefixVerifier, beam: int, topk: int | None = None,
                verify: str = "prefix") -> DecodeResult:
    """K-beam search with KV cache: one prefill, then L-1 forwards of B*K single tokens."""
    check_verify_mode(verify)
    _require_lm(model)
    topk = beam if topk is None else topk
    layout = model.layout
    backbone = model.backbone
    batch = input_ids.shape[0]
    device = input_ids.device
    cache = DynamicCache()
    out = backbone(input_ids=input_ids, attention_mask=attention_mask,
                   position_ids=position_ids_from_mask(attention_mask), **with_cache(backbone, cache),
                   use_cache=True, logits_to_keep=1)
    last_logits = out.logits[:, -1:]  # [B, 1, V]: one beam per user
    mask = attention_mask
    next_position = position_ids_from_mask(attention_mask)[:, -1:] + 1
    scores = torch.zeros(batch, 1, dtype=torch.float32, device=device)
    prefix = torch.zeros(batch, 1, dtype=torch.long, device=device)
    for level, size in enumerate(layout.sizes):
        offset = layout.code_offset(level)
        # Normalise over the whole vocabulary (a proper LM probability), then keep this level's codes.
        logp = torch.log_softmax(last_logits.float(), dim=-1)[..., offset : offset + size]
        width_before = scores.shape[1]
        scores, prefix, parent, code = beam_step(scores, logp, prefix, level, beam, verifier, verify)
        width = scores.shape[1]
        if level + 1 == layout.levels:
            break
        # Cache row of user b, beam j lives at b * width_before + j; pick each new beam's parent row.
        rows = (parent + torch.arange(batch, device=device).unsqueeze(1) * width_before).reshape(-1)
        cache.reorder_cache(rows)
        mask = torch.cat([mask.index_select(0, rows), mask.new_ones(rows.numel(), 1)], dim=1)
        next_position = next_position.index_select(0, rows)
        out = backbone(input_ids=(code + offset).reshape(-1, 1), attention_mask=mask, position_ids=next_position,
                       **with_cache(backbone, cache), use_cache=True)
        next_position = next_position + 1
        last_logits = out.logits[:, -1].reshape(batch, width, -1)
    return finish(prefix, scores, verifier, verify, topk)


@torch.inference_mode()
def hf_beam_decode(model: NezhaModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   verifier: PrefixVerifier, beam: int, topk: int | None = None,
                   constrained: bool = False) -> DecodeResult:
    """Hugging Face `generate(num_beams=K)`: the reference users know. Constrained via
    `prefix_allowed_tokens_fn` (a per-beam Python callback, as HF requires); unconstrained it may emit
    any token, and IDs that are not items are counted invalid and dropped."""
    _require_lm(model)
    topk = beam if topk is None else topk
    layout = model.layout
    levels = layout.levels
    prompt_len = input_ids.shape[1]
    allowed_cache: dict[tuple[int, int], list[int]] = {}

    def allowed(_batch_id: int, sequence: torch.Tensor) -> list[int]:
        generated = sequence[prompt_len:].tolist()
        level = len(generated)
        if level >= levels:
            return [layout.pad]
        prefix_value = 0
        for lvl, token in enumerate(generated):
            prefix_value += (token - layout.code_offset(lvl)) * verifier.weights[lvl]
        key = (level, prefix_value)
        if key not in allowed_cache:
            prefix = torch.tensor([prefix_value], device=verifier.device)  # the tables live on the GPU there
            children = verifier.child_mask(prefix, level)[0].nonzero().flatten()
            allowed_cache[key] = (children + layout.code_offset(level)).tolist()
        return allowed_cache[key]

    out = model.backbone.generate(
        input_ids=input_ids, attention_mask=attention_mask, num_beams=beam, num_return_sequences=beam,
        max_new_tokens=levels, min_new_tokens=levels, do_sample=False, length_penalty=0.0,
        early_stopping=True, pad_token_id=layout.pad, eos_token_id=layout.pad,
        prefix_allowed_tokens_fn=allowed if constrained else None,
        return_dict_in_generate=True, output_scores=True,
    )
    batch = input_ids.shape[0]
    tokens = out.sequences[:, prompt_len : prompt_len + levels].reshape(batch, beam, -1)
    scores = out.sequences_scores.float().reshape(batch, beam)
    offsets = torch.tensor([layout.code_offset(lvl) for lvl in range(levels)], device=tokens.device)
    sizes = torch.tensor(layout.sizes, device=tokens.device)
    codes = tokens - offsets
    structurally_valid = ((codes >= 0) & (codes < sizes)).all(-1) & (tokens.shape[-1] == levels)
    weights = torch.tensor(verifier.weights[:-1], device=tokens.device)
    ids = (codes.clamp(min=0) * weights).sum(-1)
    return finish(ids, scores, verifier, "end", topk, structurally_valid)
