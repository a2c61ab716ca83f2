"""Why one decoder loses to another: per-level teacher-forced scores, and hits split by history overlap.

`level_scores` scores every head a checkpoint has on the same examples with the true previous codes fed
(teacher forcing): for each level l, the mean cross-entropy and top-1 accuracy of the target's code over
that level's codebook. The draft head (nezha) and the LM head (beam search's scorer) are compared on equal
terms: the LM's logits are restricted to level l's code tokens, as the constrained beam search sees them.

`hits_by_first_code_seen` splits test hits by whether the target's first-level code occurs anywhere in the
user's history (a "familiar region" of the catalog or a new one).

    nezha diagnose --experiment runs/exp/games-v2 --dataset games --seed 0 --methods nezha,beam
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from nezha.catalog import Catalog
from nezha.config import ConfigError
from nezha.data.split import Examples
from nezha.model.model import NezhaModel
from nezha.training import make_batch


@dataclass
class DiagnoseConfig:
    """Why one decoder loses to another: per-level teacher-forced scores and hits by first code seen."""

    experiment: str = field(default="", metadata={"help": "an `nezha experiment` output directory"})
    dataset: str = field(default="", metadata={"help": "the dataset key of that experiment"})
    seed: int = 0
    methods: list[str] = field(default_factory=lambda: ["nezha", "beam"])
    users: int = field(default=5000, metadata={"help": "test users for the level scores (0: all)"})
    out: str | None = field(default=None, metadata={"help": "write the JSON report here (else stdout)"})

    def __post_init__(self) -> None:
        if not self.experiment or not self.dataset:
            raise ConfigError("experiment and dataset: give an `nezha experiment` output directory and its dataset")


@torch.inference_mode()
def level_scores(model: NezhaModel, catalog: Catalog, examples: Examples,
                 batch_size: int = 512) -> dict[str, list[dict[str, float]]]:
    """{head: [{level, ce, accuracy}, ...]} for each head the model has ("nezha", "mtp", "lm")."""
    model.eval()
    layout = model.layout
    sums: dict[str, np.ndarray] = {}  # head -> [L, 2] summed (ce, correct)
    for first in range(0, len(examples), batch_size):
        histories = list(examples.histories[first : first + batch_size])
        batch = make_batch(model, catalog, histories, examples.targets[first : first + batch_size], "cpu")
        targets = batch["targets"]
        per_head: dict[str, list[torch.Tensor]] = {}
        if model.draft_head is not None or model.mtp_head is not None:
            h0, contexts, memory = model.draft_prefill(batch["draft_input_ids"], batch["draft_mask"])
            if model.draft_head is not None:
                per_head["nezha"] = model.draft_head.teacher_forced_logits(h0, contexts, targets, memory)
            if model.mtp_head is not None:
                per_head["mtp"] = model.mtp_head.teacher_forced_logits(h0, None, targets)
        if "lm" in model.config.objectives:
            hidden = model.hidden_states(batch["lm_input_ids"], batch["lm_mask"])
            logits = model.backbone.get_output_embeddings()(hidden[:, -layout.levels - 1 : -1]).float()
            per_head["lm"] = [logits[:, level, layout.code_offset(level) : layout.code_offset(level) + size]
                              for level, size in enumerate(layout.sizes)]
        for head, level_logits in per_head.items():
            total = sums.setdefault(head, np.zeros((layout.levels, 2)))
            for level, lg in enumerate(level_logits):
                lg = lg.float()
                total[level, 0] += F.cross_entropy(lg, targets[:, level], reduction="sum").item()
                total[level, 1] += (lg.argmax(dim=-1) == targets[:, level]).sum().item()
    n = len(examples)
    return {head: [{"level": level, "ce": float(total[level, 0] / n), "accuracy": float(total[level, 1] / n)}
                   for level in range(layout.levels)] for head, total in sums.items()}


def first_code_seen(catalog: Catalog, examples: Examples) -> np.ndarray:
    """[N] bool: the target's level-0 code occurs among the level-0 codes of the user's history."""
    first_codes = catalog.codes[:, 0]
    seen = np.zeros(len(examples), dtype=bool)
    for i, history in enumerate(examples.histories):
        seen[i] = first_codes[examples.targets[i]] in first_codes[history]
    return seen


def hits_by_first_code_seen(ranks: np.ndarray, seen: np.ndarray, k: int = 10) -> dict[str, dict[str, float]]:
    """hit@k among users whose target's first code is in their history ("seen") and the others ("new")."""
    hit = (ranks >= 0) & (ranks < k)
    return {name: {"users": int(mask.sum()), f"hit@{k}": float(hit[mask].mean()) if mask.any() else 0.0}
            for name, mask in (("seen", seen), ("new", ~seen))}


def diagnose(experiment: Path, dataset: str, seed: int, methods: list[str], users: int) -> dict[str, Any]:
    """Level scores (on `users` test users) and hit splits (on every scored test user) for each method's run."""
    from nezha.experiment import RANKS_FILE, RESULT_FILE, ExperimentConfig, prepared_dir
    from nezha.model.checkpoint import load_checkpoint
    from nezha.prepared import load_prepared

    cfg_values = json.loads((experiment / "experiment.json").read_text())
    cfg = ExperimentConfig(**cfg_values)
    catalog, split, _ = load_prepared(prepared_dir(cfg, dataset))
    report: dict[str, Any] = {"experiment": str(experiment), "dataset": dataset, "seed": seed, "methods": {}}
    for method in methods:
        run_dir = experiment / "runs" / f"{dataset}__{method}__s{seed}"
        result = json.loads((run_dir / RESULT_FILE).read_text())
        examples = split.test.subset(result["test_users"] if cfg.eval_users else 0)
        seen = first_code_seen(catalog, examples)
        stored = np.load(run_dir / RANKS_FILE)
        model = load_checkpoint(run_dir / "train" / "best")
        report["methods"][method] = {
            "levels": level_scores(model, catalog, examples.subset(users)),
            "hits_by_first_code": {row: hits_by_first_code_seen(stored[row], seen) for row in stored.files},
        }
    return report
