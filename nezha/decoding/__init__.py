"""Decoders: the registry by name (`registry.py`), the shared beam step (`search.py`), NEZHA and MTP
(`draft.py`), KV-cache and Hugging Face beam search (`beam.py`), draft-then-rescore (`rescore.py`, ours),
CUDA-graph replay (`graphs.py`)."""

from nezha.decoding.beam import beam_decode, hf_beam_decode
from nezha.decoding.draft import mtp_decode, nezha_decode
from nezha.decoding.registry import (
    DECODERS,
    SELECTION_ORDER,
    Decoder,
    available_decoders,
    decode,
    decoder_available,
    prompt_for,
)
from nezha.decoding.rescore import rank_candidates, rescore_decode, score_candidates
from nezha.decoding.result import VERIFY_MODES, DecodeResult
from nezha.decoding.search import beam_step, draft_beam_search

__all__ = ["DECODERS", "SELECTION_ORDER", "VERIFY_MODES", "DecodeResult", "Decoder", "available_decoders",
           "beam_decode", "beam_step", "decode", "decoder_available", "draft_beam_search", "hf_beam_decode",
           "mtp_decode", "nezha_decode", "prompt_for", "rank_candidates", "rescore_decode", "score_candidates"]
