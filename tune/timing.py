"""The driver's latency pass: every swept (checkpoint, width) timed at batch 1 after the search, one at a
time, so every row is measured under the same conditions."""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import torch

from nezha.evaluation import LATENCY_ROUNDS, latency_rounds
from nezha.model.checkpoint import load_checkpoint
from nezha.prepared import load_prepared
from nezha.training import validation_decoder
from tune.search import SearchConfig

log = logging.getLogger("nezha.tune")


def time_finalists(rows: list[dict[str, Any]], cfg: SearchConfig) -> None:
    """Batch-1 p50/p99 of every swept (checkpoint, width), in one pass after the search, one at a time.

    Nothing else of the search runs then, so every row is timed under the same conditions (the benchmark's
    protocol: warm-up, synchronised, interleaved). Each checkpoint's widths are timed in rounds, so a burst
    of outside load spreads over its widths instead of landing on one: median of round p50s, max of p99s.
    """
    torch.set_num_threads(max(1, int(cfg.cpus_per_trial)))  # what one trial had
    catalog, split, _ = load_prepared(cfg.prepared)
    examples = split.valid.subset(cfg.eval_users)
    per_round = max(1, math.ceil(cfg.latency_requests / LATENCY_ROUNDS))
    by_checkpoint: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_checkpoint.setdefault(row["checkpoint"], []).append(row)
    for checkpoint, ckpt_rows in by_checkpoint.items():
        model = load_checkpoint(checkpoint, cfg.device)
        decoder = validation_decoder(model)
        settings = [(model, decoder, row["width"]) for row in ckpt_rows]
        timed = latency_rounds(settings, catalog, catalog.verifier(cfg.device), examples, 1, per_round)
        for row, latency in zip(ckpt_rows, timed, strict=True):
            row["p50_ms"], row["p99_ms"] = latency["p50"], latency["p99"]
            row["within_budget"] = cfg.objective != "ndcg_within_budget" or row["p50_ms"] <= cfg.latency_budget_ms
    log.info("timed %d rows of %d checkpoints after the search (load average %.1f)", len(rows),
             len(by_checkpoint), os.getloadavg()[0])
