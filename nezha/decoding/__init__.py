"""Decoders by name, all over the same batched history input and returning a DecodeResult.

- nezha: one prefill of history + placeholders, beam search over the draft head (the product).
- mtp: one prefill of the history, beam search over independent heads (baseline).
- beam: KV-cache beam search over the LM head (baseline), constrained by the verifier.
- hf-beam / hf-beam-constrained: Hugging Face generate(num_beams), as users know it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from nezha.decoding.beam import beam_decode, hf_beam_decode
from nezha.decoding.draft import draft_beam_search, mtp_decode, nezha_decode
from nezha.decoding.result import VERIFY_MODES, DecodeResult
from nezha.model.model import NezhaModel
from nezha.model.tokens import build_prompts
from nezha.verify.verifier import PrefixVerifier

if TYPE_CHECKING:
    from nezha.decoding.graphs import DraftGraphs

DECODERS = ("nezha", "mtp", "beam", "hf-beam", "hf-beam-constrained")


def decoder_available(model: NezhaModel, decoder: str) -> bool:
    family = "hf-beam" if decoder.startswith("hf-beam") else decoder
    return family in model.decoders


def prompt_for(model: NezhaModel, decoder: str, histories: Sequence[np.ndarray],
               device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Every decoder sees the same history tokens; NEZHA's prompt adds its placeholders."""
    placeholders = decoder == "nezha" and model.prompt_has_placeholders
    return build_prompts(model.layout, histories, with_placeholders=placeholders, device=device)


def decode(model: NezhaModel, decoder: str, histories: Sequence[np.ndarray], verifier: PrefixVerifier,
           beam: int, topk: int | None = None, verify: str = "prefix",
           graphs: DraftGraphs | None = None) -> DecodeResult:
    """Decode a batch of histories ([n_i, L] code arrays, oldest first) with the named decoder.

    `graphs` (nezha on a GPU): replay the draft head's search from CUDA graphs (`nezha.decoding.graphs`).
    """
    if decoder not in DECODERS:
        raise ValueError(f"unknown decoder {decoder!r}; choose one of {DECODERS}")
    if not decoder_available(model, decoder):
        raise ValueError(f"decoder {decoder!r} needs a head this checkpoint was not trained with "
                         f"(it serves {', '.join(model.decoders)})")
    device = next(model.parameters()).device
    input_ids, attention_mask = prompt_for(model, decoder, histories, device)
    if decoder == "nezha":
        return nezha_decode(model, input_ids, attention_mask, verifier, beam, topk, verify, graphs)
    if decoder == "mtp":
        return mtp_decode(model, input_ids, attention_mask, verifier, beam, topk, verify)
    if decoder == "beam":
        return beam_decode(model, input_ids, attention_mask, verifier, beam, topk, verify)
    return hf_beam_decode(model, input_ids, attention_mask, verifier, beam, topk,
                          constrained=decoder == "hf-beam-constrained")


__all__ = ["DECODERS", "VERIFY_MODES", "DecodeResult", "beam_decode", "decode", "decoder_available",
           "draft_beam_search", "hf_beam_decode", "mtp_decode", "nezha_decode", "prompt_for"]
