"""NezhaModel: an HF causal-LM backbone plus the heads its objectives need.

Objectives (any combination, "joint" = nezha + lm):
- nezha: prompt = history + <SP_1..SP_L>; draft head trained with teacher forcing (mean CE over levels).
- lm:    prompt = history + target ID; next-token CE on the L target tokens (the beam-search baseline).
- mtp:   L parallel heads on h_0 alone, no placeholders and no transition (the MTP baseline).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from nezha.config import ConfigError
from nezha.model.draft_head import TRANSITIONS, DraftHead, Memory, VocabRows
from nezha.model.tokens import TokenLayout, position_ids_from_mask

OBJECTIVES = ("nezha", "lm", "mtp")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def normalise_objectives(objectives: Iterable[str]) -> tuple[str, ...]:
    chosen: list[str] = []
    for name in objectives:
        for part in ("nezha", "lm") if name == "joint" else (name,):
            if part not in OBJECTIVES:
                raise ValueError(f"unknown objective {name!r}; choose from {OBJECTIVES + ('joint',)}")
            if part not in chosen:
                chosen.append(part)
    if not chosen:
        raise ValueError("at least one objective is needed")
    return tuple(chosen)


@dataclass
class ModelConfig:
    backbone: str = "tiny"
    codebook_sizes: list[int] = field(default_factory=lambda: [256, 256, 256])
    transition: str = "rnn"
    objectives: list[str] = field(default_factory=lambda: ["nezha"])
    dtype: str = "float32"
    # False = the paper's NEZHA-2 ablation: no <SP_l> in the prompt, the draft head reads h_0 only
    # (its transition still runs); the default is the paper's model.
    placeholders: bool = True
    # Ours, beyond the paper: the draft head's code embeddings E_l / logit heads W_l are the backbone's input
    # token embeddings of level l's codes (one matrix shared with the history's tokens) instead of its own.
    tie_draft_embeddings: bool = False
    tie_draft_heads: bool = False

    def __post_init__(self) -> None:
        if self.transition not in TRANSITIONS:
            raise ConfigError(f"transition: unknown transition {self.transition!r}; choose one of {TRANSITIONS}")

        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype: unknown dtype {self.dtype!r}; choose one of {tuple(DTYPES)}")
        self.objectives = list(normalise_objectives(self.objectives))
        check_ties(self)


def check_ties(config: Any) -> None:
    """The tie_draft_* options of a ModelConfig or TrainConfig (objectives already valid) make sense."""
    if config.tie_draft_embeddings and config.transition == "none":
        raise ConfigError("tie_draft_embeddings: transition none reads no code embeddings; "
                          "use another transition or leave it false")
    for name in ("tie_draft_embeddings", "tie_draft_heads"):
        if getattr(config, name) and "nezha" not in normalise_objectives(config.objectives):
            raise ConfigError(f"{name}: ties the NEZHA draft head, which only the nezha objective trains; "
                              "add nezha (or joint) to objectives or leave it false")


class NezhaModel(nn.Module):
    def __init__(self, backbone: PreTrainedModel, layout: TokenLayout, config: ModelConfig) -> None:
        super().__init__()
        self.backbone = backbone
        self.layout = layout
        self.config = config
        hidden = backbone.config.hidden_size
        objectives = config.objectives
        self.draft_head = self._draft_head(hidden) if "nezha" in objectives else None
        self.mtp_head = DraftHead(hidden, layout.sizes, "none") if "mtp" in objectives else None
        dtype = backbone.get_input_embeddings().weight.dtype
        for head in (self.draft_head, self.mtp_head):
            if head is not None:
                head.to(dtype)  # one dtype end to end: no silent bf16/fp32 mixing

    def _draft_head(self, hidden: int) -> DraftHead:
        vocab = VocabRows(self.backbone, self.layout.offsets(), self.layout.sizes)
        return DraftHead(hidden, self.layout.sizes, self.config.transition,
                         tied_embeddings=vocab if self.config.tie_draft_embeddings else None,
                         tied_heads=vocab if self.config.tie_draft_heads else None)

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Last-layer hidden states [B, P, H] of one prefill (the LM head is not applied)."""
        out = self.backbone.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                       position_ids=position_ids_from_mask(attention_mask), use_cache=False)
        return out.last_hidden_state

    @property
    def prompt_has_placeholders(self) -> bool:
        """Whether the draft-head prompt ends with <SP_1>..<SP_L> (not in the NEZHA-2 ablation)."""
        return self.config.placeholders

    def draft_inputs(self, input_ids: torch.Tensor,
                     attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(h_0 [B, H], placeholder states h_1..h_L [B, L, H]) from a left-padded draft prompt.

        Without placeholders the prompt is the history alone: h_0 is its last state and there are no
        placeholder states (None).
        """
        if self.draft_head is not None and self.draft_head.needs_memory:
            raise ValueError(f"transition {self.config.transition} also reads the history states: use "
                             "draft_prefill, which returns them")
        h0, contexts, _ = self.draft_prefill(input_ids, attention_mask)
        return h0, contexts

    def draft_prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      ) -> tuple[torch.Tensor, torch.Tensor | None, Memory | None]:
        """`draft_inputs` plus the draft head's history memory: (history states [B, P, H], mask [B, P]) of the
        prompt before the placeholders, only when the head reads it (transition "rnn-attn"), else None."""
        hidden = self.hidden_states(input_ids, attention_mask)
        levels = self.layout.levels if self.prompt_has_placeholders else 0
        memory = None
        if self.draft_head is not None and self.draft_head.needs_memory:
            memory = (hidden[:, : hidden.shape[1] - levels], attention_mask[:, : hidden.shape[1] - levels])
        if not self.prompt_has_placeholders:
            return hidden[:, -1], None, memory
        return hidden[:, -levels - 1], hidden[:, -levels:], memory

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Training forward = the losses (so DDP/DeepSpeed wrappers see one forward call)."""
        return self.losses(batch)

    def losses(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-objective mean CE and their sum under "loss".

        batch: targets [B, L] codes; draft_input_ids/draft_mask (history + placeholders) when nezha or
        mtp is trained; lm_input_ids/lm_mask (history + target tokens) when lm is trained.
        """
        targets = batch["targets"]
        out: dict[str, torch.Tensor] = {}
        if self.draft_head is not None or self.mtp_head is not None:
            h0, contexts, memory = self.draft_prefill(batch["draft_input_ids"], batch["draft_mask"])
            if self.draft_head is not None:
                logits = self.draft_head.teacher_forced_logits(h0, contexts, targets, memory)
                out["nezha"] = _level_ce(logits, targets)
            if self.mtp_head is not None:
                out["mtp"] = _level_ce(self.mtp_head.teacher_forced_logits(h0, None, targets), targets)
        if "lm" in self.config.objectives:
            levels = self.layout.levels
            hidden = self.hidden_states(batch["lm_input_ids"], batch["lm_mask"])
            logits = self.backbone.get_output_embeddings()(hidden[:, -levels - 1 : -1]).float()
            labels = batch["lm_input_ids"][:, -levels:]
            out["lm"] = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        out["loss"] = torch.stack(list(out.values())).sum()
        return out


def _level_ce(logits: list[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    return torch.stack([F.cross_entropy(lg.float(), targets[:, i]) for i, lg in enumerate(logits)]).mean()
