"""The NEZHA draft head: an L-step autoregressive decoder over the hidden states of one prefill.

Level l's logits come from the placeholder's hidden state h_{l+1} plus a context state s_l that
summarises the tokens already chosen: logits_l = W_l (read(s_l) + h_{l+1}), s_0 = h_0 (the last history
token), s_{l+1} = Transition_l(s_l, E_l[t_l]). With transition "none" the levels are independent
(MTP-like). Without placeholders (the MTP baseline) h_{l+1} is absent and logits_l = W_l read(s_l).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

TRANSITIONS = ("rnn", "gru", "lstm", "mlp", "add", "none")


class Transition(nn.Module):
    """s_{l+1} = f(s_l, e_l) for one level. State is a tensor [..., S]; S = 2H for the LSTM (h and c)."""

    def __init__(self, kind: str, hidden: int) -> None:
        super().__init__()
        if kind not in TRANSITIONS:
            raise ValueError(f"unknown transition {kind!r}; choose one of {TRANSITIONS}")
        self.kind = kind
        self.hidden = hidden
        if kind == "rnn":
            self.cell: nn.Module = nn.RNNCell(hidden, hidden)
        elif kind == "gru":
            self.cell = nn.GRUCell(hidden, hidden)
        elif kind == "lstm":
            self.cell = nn.LSTMCell(hidden, hidden)
        elif kind == "mlp":
            self.cell = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, state: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        if self.kind == "none":
            return state
        if self.kind == "add":
            return state + embedding
        if self.kind == "mlp":
            return self.cell(torch.cat([state, embedding], dim=-1))
        lead = state.shape[:-1]
        flat_state = state.reshape(-1, state.shape[-1])
        flat_emb = embedding.reshape(-1, embedding.shape[-1])
        if self.kind == "lstm":
            h, c = self.cell(flat_emb, (flat_state[:, : self.hidden], flat_state[:, self.hidden :]))
            return torch.cat([h, c], dim=-1).reshape(*lead, 2 * self.hidden)
        return self.cell(flat_emb, flat_state).reshape(*lead, self.hidden)


class DraftHead(nn.Module):
    def __init__(self, hidden: int, sizes: Sequence[int], transition: str = "rnn") -> None:
        super().__init__()
        self.hidden = hidden
        self.sizes = tuple(int(s) for s in sizes)
        self.transition_kind = transition
        self.heads = nn.ModuleList(nn.Linear(hidden, size, bias=False) for size in self.sizes)
        # The last level's choice never feeds a transition, so it needs no embedding.
        uses_tokens = transition != "none"
        self.embeddings = nn.ModuleList(nn.Embedding(size, hidden) for size in self.sizes[:-1]) if uses_tokens else None
        self.transitions = nn.ModuleList(Transition(transition, hidden) for _ in self.sizes[:-1])

    @property
    def levels(self) -> int:
        return len(self.sizes)

    @property
    def dtype(self) -> torch.dtype:
        return self.heads[0].weight.dtype

    def init_state(self, h0: torch.Tensor) -> torch.Tensor:
        h0 = h0.to(self.dtype)
        if self.transition_kind == "lstm":
            return torch.cat([h0, torch.zeros_like(h0)], dim=-1)
        return h0

    def logits(self, level: int, state: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        """[..., T_level] logits from the state [..., S] and the placeholder hidden state [..., H] (or None)."""
        features = state[..., : self.hidden]
        if context is not None:
            features = features + context.to(self.dtype)
        return self.heads[level](features)

    def step(self, level: int, state: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """State after choosing `codes` (shape state.shape[:-1]) at `level`."""
        if self.embeddings is None:
            return state
        return self.transitions[level](state, self.embeddings[level](codes))

    def teacher_forced_logits(self, h0: torch.Tensor, contexts: torch.Tensor | None,
                              targets: torch.Tensor) -> list[torch.Tensor]:
        """Training: per-level logits [B, T_l] with the true previous codes fed to the transition.

        h0: [B, H]; contexts: [B, L, H] (placeholder hidden states) or None; targets: [B, L] codes.
        """
        state = self.init_state(h0)
        out = []
        for level in range(self.levels):
            context = None if contexts is None else contexts[:, level]
            out.append(self.logits(level, state, context))
            if level + 1 < self.levels:
                state = self.step(level, state, targets[:, level])
        return out
