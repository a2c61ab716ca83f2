"""The NEZHA draft head: an L-step autoregressive decoder over the hidden states of one prefill.

Level l's logits come from the placeholder's hidden state h_{l+1} plus a context state s_l that
summarises the tokens already chosen: logits_l = W_l (read(s_l) + h_{l+1}), s_0 = h_0 (the last history
token), s_{l+1} = Transition_l(s_l, E_l[t_l]). With transition "none" the levels are independent
(MTP-like). Without placeholders (the MTP baseline) h_{l+1} is absent and logits_l = W_l read(s_l).

Ours, beyond the paper: E_l and/or W_l may be the LM's own token embeddings of level l's codes (`VocabRows`,
a view of the backbone's input embedding matrix) instead of the head's own weights.

Ours, beyond the paper: transition "rnn-attn" is the RNN cell plus, at every level, a single-head
cross-attention read over the prefill's last-layer states of the history (`memory`: states [B, P, H] and
mask [B, P] of the draft prompt before the placeholders): logits_l = W_l(read(s_l) + h_{l+1} + a_l), with
a_l = Attn_l(query = read(s_l) + h_{l+1}, keys/values = the history states). It lets the deep levels look
at history items that share the chosen prefix, as the LM does when it scores t_0, t_1 in context.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

TRANSITIONS = ("rnn", "gru", "lstm", "mlp", "add", "none", "rnn-attn")
MEMORY_TRANSITIONS = ("rnn-attn",)  # read the prefill's history states (`memory`)

Memory = tuple[torch.Tensor, torch.Tensor]  # (history states [B, P, H], attention mask [B, P]; 0 = padding)


class Transition(nn.Module):
    """s_{l+1} = f(s_l, e_l) for one level. State is a tensor [..., S]; S = 2H for the LSTM (h and c)."""

    def __init__(self, kind: str, hidden: int) -> None:
        super().__init__()
        if kind not in TRANSITIONS:
            raise ValueError(f"unknown transition {kind!r}; choose one of {TRANSITIONS}")
        self.kind = kind
        self.hidden = hidden
        if kind in ("rnn", "rnn-attn"):
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


class HistoryRead(nn.Module):
    """Single-head cross-attention of a level's features over the history states (transition "rnn-attn").

    The value projection starts at zero, so an untrained read adds nothing: training starts from the RNN head.
    """

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.query = nn.Linear(hidden, hidden, bias=False)
        self.key = nn.Linear(hidden, hidden, bias=False)
        self.value = nn.Linear(hidden, hidden, bias=False)
        nn.init.zeros_(self.value.weight)
        self.scale = hidden ** -0.5

    def forward(self, query: torch.Tensor, memory: Memory) -> torch.Tensor:
        """query [B, ..., H] (e.g. [B, H] or [B, beam, H]: all beams of a user read its history at once)."""
        states, mask = memory
        batch, hidden = query.shape[0], query.shape[-1]
        q = self.query(query).reshape(batch, -1, hidden)  # [B, n, H]
        scores = torch.bmm(q, self.key(states).transpose(1, 2)) * self.scale  # [B, n, P]
        # Left padding: padded positions get no weight (every prompt has at least one history token).
        scores = scores.masked_fill(~mask.bool()[:, None, :], float("-inf"))
        read = torch.bmm(torch.softmax(scores.float(), dim=-1).to(q.dtype), self.value(states))
        return read.reshape(query.shape)


class VocabRows:
    """Level l's code rows of a backbone's input embedding matrix, as views of it (the same storage).

    The backbone is held in a plain tuple, not registered as a submodule: the head owns no copy, so
    state_dict, checkpoints and exports hold the matrix once, in the backbone. The matrix is looked up at
    every call (a resized or re-materialised embedding is followed); copy.deepcopy of the whole model maps
    the reference to the copied backbone.
    """

    def __init__(self, backbone: nn.Module, offsets: Sequence[int], sizes: Sequence[int]) -> None:
        self._backbone = (backbone,)
        self.offsets = tuple(int(o) for o in offsets)
        self.sizes = tuple(int(s) for s in sizes)

    def __call__(self, level: int) -> torch.Tensor:
        """[T_level, H] rows of level `level`'s codes."""
        weight = self._backbone[0].get_input_embeddings().weight
        return weight[self.offsets[level] : self.offsets[level] + self.sizes[level]]


class DraftHead(nn.Module):
    def __init__(self, hidden: int, sizes: Sequence[int], transition: str = "rnn",
                 tied_embeddings: VocabRows | None = None, tied_heads: VocabRows | None = None) -> None:
        """`tied_embeddings` / `tied_heads`: use the LM's token embeddings of each level's codes as E_l / W_l
        instead of the head's own (ours, beyond the paper)."""
        super().__init__()
        self.hidden = hidden
        self.sizes = tuple(int(s) for s in sizes)
        self.transition_kind = transition
        uses_tokens = transition != "none"  # "none" never reads the chosen codes
        if tied_embeddings is not None and not uses_tokens:
            raise ValueError("transition none reads no code embeddings, so there are none to tie")
        self.tied_embeddings, self.tied_heads = tied_embeddings, tied_heads
        self.heads = (nn.ModuleList(nn.Linear(hidden, size, bias=False) for size in self.sizes)
                      if tied_heads is None else None)
        # The last level's choice never feeds a transition, so it needs no embedding.
        self.embeddings = (nn.ModuleList(nn.Embedding(size, hidden) for size in self.sizes[:-1])
                           if uses_tokens and tied_embeddings is None else None)
        self.transitions = nn.ModuleList(Transition(transition, hidden) for _ in self.sizes[:-1])
        self.reads = (nn.ModuleList(HistoryRead(hidden) for _ in self.sizes)
                      if transition in MEMORY_TRANSITIONS else None)

    @property
    def needs_memory(self) -> bool:
        """Whether logits read the prefill's history states (`memory`): transition "rnn-attn"."""
        return self.reads is not None

    @property
    def levels(self) -> int:
        return len(self.sizes)

    @property
    def dtype(self) -> torch.dtype:
        return self.head_weight(0).dtype

    def head_weight(self, level: int) -> torch.Tensor:
        """W_l [T_level, H]."""
        return self.heads[level].weight if self.tied_heads is None else self.tied_heads(level)

    def code_embedding(self, level: int) -> torch.Tensor | None:
        """E_l [T_level, H] (None with transition "none")."""
        if self.tied_embeddings is not None:
            return self.tied_embeddings(level)
        return None if self.embeddings is None else self.embeddings[level].weight

    def init_state(self, h0: torch.Tensor) -> torch.Tensor:
        h0 = h0.to(self.dtype)
        if self.transition_kind == "lstm":
            return torch.cat([h0, torch.zeros_like(h0)], dim=-1)
        return h0

    def logits(self, level: int, state: torch.Tensor, context: torch.Tensor | None,
               memory: Memory | None = None) -> torch.Tensor:
        """[..., T_level] logits from the state [B, ..., S], the placeholder hidden state [B, ..., H] (or None)
        and, for transition "rnn-attn", the history `memory` (states [B, P, H], mask [B, P])."""
        features = state[..., : self.hidden]
        if context is not None:
            features = features + context.to(self.dtype)
        if self.reads is not None and memory is not None:  # no memory: no read (NezhaModel insists on one)
            features = features + self.reads[level](features, (memory[0].to(self.dtype), memory[1]))
        return F.linear(features, self.head_weight(level))

    def step(self, level: int, state: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """State after choosing `codes` (shape state.shape[:-1]) at `level`."""
        embedding = self.code_embedding(level)
        if embedding is None:
            return state
        return self.transitions[level](state, F.embedding(codes, embedding))

    def teacher_forced_logits(self, h0: torch.Tensor, contexts: torch.Tensor | None,
                              targets: torch.Tensor, memory: Memory | None = None) -> list[torch.Tensor]:
        """Training: per-level logits [B, T_l] with the true previous codes fed to the transition.

        h0: [B, H]; contexts: [B, L, H] (placeholder hidden states) or None; targets: [B, L] codes;
        memory: the history states and mask (needed by transition "rnn-attn" only).
        """
        state = self.init_state(h0)
        out = []
        for level in range(self.levels):
            context = None if contexts is None else contexts[:, level]
            out.append(self.logits(level, state, context, memory))
            if level + 1 < self.levels:
                state = self.step(level, state, targets[:, level])
        return out
