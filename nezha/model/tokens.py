"""Where semantic-ID tokens, placeholders and padding live in the backbone's vocabulary, and prompt building.

Our tokens are appended after the backbone's own vocabulary (`base_vocab`; 0 for a from-scratch backbone):
level-0 codes, level-1 codes, ..., then the placeholders <SP_1>..<SP_L>, then one padding token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class TokenLayout:
    base_vocab: int
    sizes: tuple[int, ...]

    @property
    def levels(self) -> int:
        return len(self.sizes)

    @property
    def num_new_tokens(self) -> int:
        return sum(self.sizes) + self.levels + 1

    def code_offset(self, level: int) -> int:
        return self.base_vocab + sum(self.sizes[:level])

    def placeholder(self, level: int) -> int:
        return self.base_vocab + sum(self.sizes) + level

    @property
    def pad(self) -> int:
        return self.base_vocab + sum(self.sizes) + self.levels

    def offsets(self) -> np.ndarray:
        return np.asarray([self.code_offset(level) for level in range(self.levels)], dtype=np.int64)

    def codes_to_tokens(self, codes: np.ndarray) -> np.ndarray:
        """[..., L] codes -> [..., L] token ids."""
        return np.asarray(codes, dtype=np.int64) + self.offsets()


def build_prompts(
    layout: TokenLayout,
    histories: Sequence[np.ndarray],
    with_placeholders: bool,
    device: torch.device | str = "cpu",
    suffix: Sequence[np.ndarray] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded (input_ids, attention_mask) for a batch of histories.

    Each history is an [n, L] array of semantic-ID codes (oldest first). The prompt is the history's
    tokens, then <SP_1>..<SP_L> when `with_placeholders`, then the optional per-row `suffix` tokens
    (the target ID when training the LM objective). Left padding puts every row's last token at the
    same position, so h_0..h_L are at fixed negative indices whatever the history length.
    """
    placeholders = np.asarray([layout.placeholder(level) for level in range(layout.levels)], dtype=np.int64)
    rows = []
    for i, history in enumerate(histories):
        parts = [layout.codes_to_tokens(history).reshape(-1)]
        if with_placeholders:
            parts.append(placeholders)
        if suffix is not None:
            parts.append(np.asarray(suffix[i], dtype=np.int64).reshape(-1))
        rows.append(np.concatenate(parts))
    width = max(len(r) for r in rows)
    input_ids = np.full((len(rows), width), layout.pad, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row) :] = row
        mask[i, width - len(row) :] = 1
    return torch.from_numpy(input_ids).to(device), torch.from_numpy(mask).to(device)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that start at 0 on each row's first real token (left padding must not shift them)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
