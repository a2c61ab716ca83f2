"""Decoders by name, all over the same batched history input and returning a DecodeResult.

`DECODERS` is the one list of decoders: name -> the heads (training objectives) it needs, its prompt rule and
its decode function. Everything that names decoders (evaluation, serving, training's model selection)
reads it from here (through `nezha.decoding`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from nezha.decoding.beam import beam_decode, hf_beam_decode
from nezha.decoding.draft import mtp_decode, nezha_decode
from nezha.decoding.graphs import DraftGraphs
from nezha.decoding.rescore import rescore_decode
from nezha.decoding.result import DecodeResult
from nezha.model.model import NezhaModel
from nezha.model.tokens import build_prompts
from nezha.verify.verifier import PrefixVerifier


class DecodeFn(Protocol):
    """How `decode` runs every decoder; each takes what applies to it and ignores the rest."""

    def __call__(self, model: NezhaModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                 verifier: PrefixVerifier, beam: int, topk: int | None, verify: str,
                 graphs: DraftGraphs | None) -> DecodeResult: ...


def run_nezha(model: NezhaModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
              verifier: PrefixVerifier, beam: int, topk: int | None, verify: str,
              graphs: DraftGraphs | None) -> DecodeResult:
    return nezha_decode(model, input_ids, attention_mask, verifier, beam, topk, verify, graphs)


def run_mtp(model: NezhaModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
            verifier: PrefixVerifier, beam: int, topk: int | None, verify: str,
            graphs: DraftGraphs | None) -> DecodeResult:
    return mtp_decode(model, input_ids, attention_mask, verifier, beam, topk, verify)


def run_beam(model: NezhaModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
             verifier: PrefixVerifier, beam: int, topk: int | None, verify: str,
             graphs: DraftGraphs | None) -> DecodeResult:
    return beam_decode(model, input_ids, attention_mask, verifier, beam, topk, verify)


def run_hf_beam(model: NezhaModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                verifier: PrefixVerifier, beam: int, topk: int | None, verify: str,
                graphs: DraftGraphs | None) -> DecodeResult:
    return hf_beam_decode(model, input_ids, attention_mask, verifier, beam, topk)


def run_hf_beam_constrained(model: NezhaModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                            verifier: PrefixVerifier, beam: int, topk: int | None, verify: str,
                            graphs: DraftGraphs | None) -> DecodeResult:
    return hf_beam_decode(model, input_ids, attention_mask, verifier, beam, topk, constrained=True)


def run_rescore(model: NezhaModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                verifier: PrefixVerifier, beam: int, topk: int | None, verify: str,
                graphs: DraftGraphs | None) -> DecodeResult:
    return rescore_decode(model, input_ids, attention_mask, verifier, beam, topk, verify, graphs=graphs)


@dataclass(frozen=True)
class Decoder:
    name: str
    needs: tuple[str, ...]  # the training objectives whose heads it reads (nezha, lm, mtp): all of them
    placeholders: bool  # whether its prompt ends with <SP_1>..<SP_L> (history alone otherwise)
    run: DecodeFn
    about: str

    def missing(self, objectives: Sequence[str]) -> tuple[str, ...]:
        """The heads it needs that a model trained with `objectives` lacks (empty: it can serve)."""
        return tuple(need for need in self.needs if need not in objectives)

    def missing_heads_error(self, objectives: Sequence[str], where: str = "this checkpoint") -> str:
        """One line: which heads `where` lacks for this decoder, and what it serves instead."""
        missing = self.missing(objectives)
        serves = [name for name, d in DECODERS.items() if not d.missing(objectives)]
        return (f"decoder {self.name!r} needs the {' and '.join(missing)} head{'s' if len(missing) > 1 else ''}, "
                f"which {where} was not trained with (objectives {'+'.join(self.needs)}; it serves "
                f"{', '.join(serves) or 'no decoder'})")


DECODERS: dict[str, Decoder] = {d.name: d for d in (
    Decoder("nezha", ("nezha",), True, run_nezha,
            "one prefill of history + placeholders, beam search over the draft head (the product)"),
    Decoder("mtp", ("mtp",), False, run_mtp,
            "one prefill of the history, beam search over independent heads (baseline)"),
    Decoder("beam", ("lm",), False, run_beam,
            "KV-cache beam search over the LM head, constrained by the verifier (baseline)"),
    Decoder("hf-beam", ("lm",), False, run_hf_beam,
            "Hugging Face generate(num_beams), unconstrained, as users know it"),
    Decoder("hf-beam-constrained", ("lm",), False, run_hf_beam_constrained,
            "Hugging Face generate(num_beams) with prefix_allowed_tokens_fn"),
    Decoder("nezha-rescore", ("nezha", "lm"), True, run_rescore,
            "ours, beyond the paper: the draft head proposes 3 x k IDs, the LM ranks them in one more forward"),
)}
# Which decoder scores a model's checkpoints when nobody says: the product first, then the baselines.
# nezha-rescore comes last so `auto` never picks it (a model with its heads has nezha's); naming it in
# select_by chooses it.
SELECTION_ORDER = ("nezha", "mtp", "beam", "nezha-rescore")


def available_decoders(model: NezhaModel) -> tuple[str, ...]:
    """The decoders this model has the heads for, in registry order."""
    return tuple(name for name, d in DECODERS.items() if not d.missing(model.config.objectives))


def decoder_available(model: NezhaModel, decoder: str) -> bool:
    return decoder in DECODERS and not DECODERS[decoder].missing(model.config.objectives)


def prompt_for(model: NezhaModel, decoder: str, histories: Sequence[np.ndarray],
               device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Every decoder sees the same history tokens; NEZHA's prompt adds its placeholders (not in the
    no-placeholder ablation)."""
    placeholders = DECODERS[decoder].placeholders and model.prompt_has_placeholders
    return build_prompts(model.layout, histories, with_placeholders=placeholders, device=device)


def decode(model: NezhaModel, decoder: str, histories: Sequence[np.ndarray], verifier: PrefixVerifier,
           beam: int, topk: int | None = None, verify: str = "prefix",
           graphs: DraftGraphs | None = None) -> DecodeResult:
    """Decode a batch of histories ([n_i, L] code arrays, oldest first) with the named decoder.

    `graphs` (nezha on a GPU): replay the draft head's search from CUDA graphs (`nezha.decoding.graphs`).
    """
    if decoder not in DECODERS:
        raise ValueError(f"unknown decoder {decoder!r}; choose one of {tuple(DECODERS)}")
    if not decoder_available(model, decoder):
        raise ValueError(DECODERS[decoder].missing_heads_error(model.config.objectives))
    device = next(model.parameters()).device
    input_ids, attention_mask = prompt_for(model, decoder, histories, device)
    return DECODERS[decoder].run(model, input_ids, attention_mask, verifier=verifier, beam=beam, topk=topk,
                                 verify=verify, graphs=graphs)
