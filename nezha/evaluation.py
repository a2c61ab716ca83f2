"""`nezha evaluate`: quality (Hit/NDCG@K on full-catalog generation) and latency of each decoder, side by side.

Every decoder gets the same history tokens; latency is wall time per request at batch 1 and per batch in a
batched setting, synchronised on GPU, after warm-up, on the device named in the report.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from nezha.catalog import Catalog, ItemCodes
from nezha.config import ConfigError
from nezha.data.split import Examples, Split, load_sequences
from nezha.decoding import DECODERS, available_decoders, decode, decoder_available
from nezha.decoding.result import check_verify_mode
from nezha.device import device_name, resolve_device
from nezha.metrics import DEFAULT_KS, hit_ndcg, popularity_ranking
from nezha.model.checkpoint import load_checkpoint, prepared_dir_of
from nezha.model.model import NezhaModel
from nezha.prepared import load_prepared
from nezha.timing import latency_stats, timed_ms
from nezha.verify.verifier import PrefixVerifier

log = logging.getLogger(__name__)

# The registry's decoders plus the most-popular floor, which needs no model.
EVAL_DECODERS = (*DECODERS, "popular")
LATENCY_ROUNDS = 5  # rounds of a latency sweep (see latency_rounds)


def rank_examples(model: NezhaModel, decoder: str, catalog: ItemCodes, verifier: PrefixVerifier, examples: Examples,
                  beam: int, topk: int | None = None, batch_size: int = 256, verify: str = "prefix",
                  progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(ranked packed IDs [N, k] with -1 padding, invalid IDs per user [N]) for every example."""
    ranked, invalid = [], []
    starts = range(0, len(examples), batch_size)
    for first in tqdm(starts, desc=decoder, disable=not progress, leave=False):
        histories = [catalog.codes[h] for h in examples.histories[first : first + batch_size]]
        result = decode(model, decoder, histories, verifier, beam, topk, verify)
        ranked.append(result.ids.cpu().numpy())
        invalid.append(result.invalid.cpu().numpy())
    return np.concatenate(ranked), np.concatenate(invalid)


def measure_latency(model: NezhaModel, decoder: str, catalog: ItemCodes, verifier: PrefixVerifier,
                    examples: Examples, beam: int, batch_size: int, repeats: int, warmup: int = 3,
                    verify: str = "prefix") -> dict[str, float]:
    """Wall-clock ms per call of `batch_size` requests (p50, p99, mean) and per request (mean / batch)."""
    device = next(model.parameters()).device
    times = []
    for i in range(warmup + repeats):
        first = (i * batch_size) % max(1, len(examples) - batch_size)
        histories = [catalog.codes[h] for h in examples.histories[first : first + batch_size]]
        _, ms = timed_ms(lambda: decode(model, decoder, histories, verifier, beam, verify=verify), device)  # noqa: B023
        if i >= warmup:
            times.append(ms)
    stats = latency_stats(times)
    return {"batch": batch_size, "p50": stats["p50"], "p99": stats["p99"], "mean": stats["mean"],
            "per_request_mean": stats["mean"] / batch_size}


def sweep_widths(model: NezhaModel, decoder: str, catalog: ItemCodes, verifier: PrefixVerifier, examples: Examples,
                 widths: Sequence[int], topk: int | None = None,
                 ks: Sequence[int] = DEFAULT_KS) -> list[dict[str, float]]:
    """Quality of one model at every beam width: {"width", hit@k, ndcg@k} per width (a width below a k
    returns fewer than k items unless `topk` says otherwise)."""
    targets = catalog.packed[examples.targets]
    rows = []
    for width in widths:
        with torch.inference_mode():
            ranked, _invalid = rank_examples(model, decoder, catalog, verifier, examples, width, topk)
        rows.append({"width": width, **hit_ndcg(ranked, targets, ks)})
    return rows


def latency_rounds(settings: Sequence[tuple[NezhaModel, str, int]], catalog: ItemCodes, verifier: PrefixVerifier,
                   examples: Examples, batch_size: int, repeats: int,
                   rounds: int = LATENCY_ROUNDS) -> list[dict[str, float]]:
    """p50/p99 ms per call of every (model, decoder, width) setting, timed in `rounds` rounds over all of them
    (`repeats` calls each), so a burst of outside load spreads over the settings instead of landing on one:
    the median of the round p50s and the max of the round p99s."""
    timed: list[list[dict[str, float]]] = [[] for _ in settings]
    for r in range(rounds):
        for times, (model, decoder, width) in zip(timed, settings, strict=True):
            times.append(measure_latency(model, decoder, catalog, verifier, examples, width, batch_size, repeats,
                                         warmup=3 if r == 0 else 1))
    return [{"p50": float(np.median([t["p50"] for t in times])), "p99": max(t["p99"] for t in times)}
            for times in timed]


@dataclass
class EvalConfig:
    """Evaluate a checkpoint's decoders on the validation or test split."""

    checkpoint: str = "runs/train/best"
    prepared: str | None = field(default=None, metadata={"help": "prepared dir (default: the one it was trained on)"})
    decoders: list[str] = field(default_factory=lambda: ["nezha", "beam", "hf-beam", "mtp", "popular"])
    split: str = "test"
    beam: int = 20
    verify: str = "prefix"
    batch_size: int = 64
    max_users: int = field(default=0, metadata={"help": "score a random subset of users (0: all)"})
    hf_max_users: int = field(default=0, metadata={
        "help": "users the Hugging Face `generate` rows score (10-50x slower than ours; 0: as max_users)"})
    latency_requests: int = field(default=50, metadata={"help": "timed calls per setting (0: skip latency)"})
    latency_batch: int = 32
    device: str = "auto"
    seed: int = 0
    json: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.split not in ("valid", "test"):
            raise ConfigError(f"split: must be valid or test, got {self.split!r}")
        unknown = [d for d in self.decoders if d not in EVAL_DECODERS]
        if unknown:
            raise ConfigError(f"decoders: unknown decoder(s) {unknown}; choose from {EVAL_DECODERS}")
        check_verify_mode(self.verify)
        for name in ("beam", "batch_size", "latency_batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("max_users", "hf_max_users", "latency_requests"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: may not be negative, got {getattr(self, name)}")


def load_eval_inputs(cfg: EvalConfig) -> tuple[NezhaModel, Catalog, Split, list[np.ndarray], torch.device]:
    device = resolve_device(cfg.device)
    prepared = cfg.prepared or prepared_dir_of(cfg.checkpoint)
    if not prepared:
        raise ValueError("the checkpoint does not say which prepared dataset it was trained on: pass --prepared")
    model = load_checkpoint(cfg.checkpoint, device)
    catalog, split, _ = load_prepared(prepared)
    sequences, _users = load_sequences(Path(prepared) / "sequences.npz")
    return model, catalog, split, sequences, device


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    model, catalog, split, sequences, device = load_eval_inputs(cfg)
    examples = split.valid if cfg.split == "valid" else split.test
    examples = examples.subset(cfg.max_users, cfg.seed)
    verifier = catalog.verifier(device)
    report: dict[str, Any] = {"checkpoint": str(cfg.checkpoint), "split": cfg.split, "users": len(examples),
                              "device": device_name(device), "config": asdict(cfg), "decoders": {}}
    for decoder in cfg.decoders:
        scored = examples
        if cfg.hf_max_users and decoder.startswith("hf-"):
            scored = examples.subset(cfg.hf_max_users, cfg.seed)
        targets = catalog.packed[scored.targets]
        if decoder == "popular":
            ranking = popularity_ranking(sequences, catalog.num_items)[: cfg.beam]
            ranked = np.broadcast_to(catalog.packed[ranking], (len(scored), len(ranking)))
            entry: dict[str, Any] = {**hit_ndcg(ranked, targets), "invalid_rate": 0.0}
        elif not decoder_available(model, decoder):
            log.warning("skipping %s: the checkpoint serves %s", decoder, ", ".join(available_decoders(model)))
            continue
        else:
            start = time.perf_counter()
            ranked, invalid = rank_examples(model, decoder, catalog, verifier, scored, cfg.beam,
                                            batch_size=cfg.batch_size, verify=cfg.verify, progress=cfg.progress)
            entry = {**hit_ndcg(ranked, targets), "invalid_rate": float(invalid.sum() / (len(scored) * cfg.beam)),
                     "quality_pass_seconds": time.perf_counter() - start}
            if cfg.latency_requests:
                single = measure_latency(model, decoder, catalog, verifier, examples, cfg.beam, 1,
                                         cfg.latency_requests, verify=cfg.verify)
                batched = measure_latency(model, decoder, catalog, verifier, examples, cfg.beam, cfg.latency_batch,
                                          max(3, cfg.latency_requests // 5), verify=cfg.verify)
                # Top-level p50/p99 are per request at batch 1 (what a serving call waits).
                entry["latency_ms"] = {"p50": single["p50"], "p99": single["p99"], "mean": single["mean"],
                                       "batch1": single, "batched": batched}
        entry["device"] = report["device"]
        entry["users"] = len(scored)
        report["decoders"][decoder] = entry
        log.info("%s: hit@10 %.4f ndcg@10 %.4f", decoder, entry["hit@10"], entry["ndcg@10"])
    if cfg.json:
        Path(cfg.json).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.json).write_text(json.dumps(report, indent=2))
    return report


def format_table(report: dict[str, Any]) -> str:
    """A plain-text table of a report (one row per decoder)."""
    header = f"{'decoder':<22}{'users':>7}{'H@5':>8}{'H@10':>8}{'N@5':>8}{'N@10':>8}{'invalid':>9}{'b1 p50':>9}{'b1 p99':>9}{'batched/req':>12}"
    lines = [f"split {report['split']}, {report['users']} users, device {report['device']}", header]
    for name, e in report["decoders"].items():
        lat = e.get("latency_ms", {})
        b1 = lat.get("batch1", {})
        batched = lat.get("batched", {})
        fmt = lambda v: f"{v:.2f}" if isinstance(v, float) else "-"  # noqa: E731
        lines.append(f"{name:<22}{e.get('users', report['users']):>7}{e['hit@5']:>8.4f}{e['hit@10']:>8.4f}{e['ndcg@5']:>8.4f}{e['ndcg@10']:>8.4f}"
                     f"{e['invalid_rate']:>9.4f}{fmt(b1.get('p50')):>9}{fmt(b1.get('p99')):>9}"
                     f"{fmt(batched.get('per_request_mean')):>12}")
    lines.append("latency in ms; b1 = one request per call; batched/req = mean call time / batch size")
    return "\n".join(lines)
