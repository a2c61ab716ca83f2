"""What every decoder returns, and the shared final step: verify, drop, sort."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nezha.config import ConfigError
from nezha.verify.verifier import PrefixVerifier

VERIFY_MODES = ("prefix", "end", "none")


@dataclass
class DecodeResult:
    ids: torch.Tensor  # [B, k] packed semantic IDs, best first; -1 where fewer than k survive
    scores: torch.Tensor  # [B, k] cumulative log-probabilities; -inf where ids == -1
    invalid: torch.Tensor  # [B] generated IDs that are not items (dropped unless verify="none")


def check_verify_mode(verify: str) -> None:
    if verify not in VERIFY_MODES:
        raise ConfigError(f"verify: unknown verify mode {verify!r}; choose one of {VERIFY_MODES}")


def finish(ids: torch.Tensor, scores: torch.Tensor, verifier: PrefixVerifier, verify: str,
           topk: int, structurally_valid: torch.Tensor | None = None) -> DecodeResult:
    """Count invalid IDs among the final beams, drop them (unless verify="none"), keep the best `topk`.

    `structurally_valid` marks beams whose tokens were all codes of the right level (HF generate may emit
    other tokens); the rest are invalid whatever their packed value.
    """
    alive = torch.isfinite(scores)
    valid = verifier.contains(ids.clamp(min=0), verifier.levels) & alive
    if structurally_valid is not None:
        valid &= structurally_valid
    invalid = (alive & ~valid).sum(-1)
    if verify != "none":
        scores = scores.masked_fill(~valid, float("-inf"))
    scores, order = scores.sort(dim=-1, descending=True)
    ids = ids.gather(-1, order)
    ids, scores = ids[:, :topk], scores[:, :topk]
    ids = ids.masked_fill(~torch.isfinite(scores), -1)
    return DecodeResult(ids, scores, invalid)
