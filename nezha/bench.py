"""Decoder latency against its floor (`nezha bench latency`): how fast NEZHA decodes, beside its baselines.

A random-init backbone (weights do not change latency) with every head, a random catalog of unique
semantic IDs, and for each (batch, beam) setting the wall time of
  prefill  one forward pass over the NEZHA prompt (`model.draft_inputs`): the floor NEZHA cannot beat,
  head     the draft head's beam search alone, on that prefill's hidden states,
  nezha    prefill + head (`nezha_decode`), the product,
  beam     our KV-cache beam search over the LM head, constrained by the same verifier,
  hf-beam  Hugging Face `generate(num_beams)`, unconstrained (what users know), and constrained,
  mtp      prefill of the history + independent heads,
  nezha-rescore  ours, beyond the paper: nezha's cached prefill and head propose `rescore_candidates` IDs (3 x beam),
           the LM ranks them in one more forward over the history's KV cache (`rescore_decode`).
Each repeat runs every decoder once, in a rotating order, on the same fresh batch of histories, so load
drift on the machine hits all decoders alike; GPU work is synchronised before and after every call.

The HTTP side (`nezha bench serve`) is `nezha.loadgen`.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import transformers

from nezha.config import ConfigError
from nezha.decoding import (
    beam_decode,
    draft_beam_search,
    hf_beam_decode,
    mtp_decode,
    nezha_decode,
    prompt_for,
    rescore_decode,
)
from nezha.decoding.graphs import GraphedDraftSearch
from nezha.device import cpu_model, device_name, resolve_device
from nezha.model.checkpoint import create_model
from nezha.model.draft_head import Memory
from nezha.model.model import ModelConfig, NezhaModel
from nezha.timing import latency_stats, synchronize
from nezha.verify import PrefixVerifier, random_packed_ids, unpack

log = logging.getLogger(__name__)

BENCH_DECODERS = ("prefill", "head", "nezha", "beam", "hf-beam", "hf-beam-constrained", "mtp", "nezha-rescore")
# Rows every report needs: the ratios are relative to them.
REQUIRED_DECODERS = ("prefill", "nezha")
RATIOS = {  # name -> (numerator row, denominator row), both p50
    "nezha_over_prefill": ("nezha", "prefill"),
    "head_over_prefill": ("head", "prefill"),
    "beam_over_nezha": ("beam", "nezha"),
    "hf_over_nezha": ("hf-beam", "nezha"),
    "hf_constrained_over_nezha": ("hf-beam-constrained", "nezha"),
    "mtp_over_nezha": ("mtp", "nezha"),
    "rescore_over_nezha": ("nezha-rescore", "nezha"),
    "beam_over_rescore": ("beam", "nezha-rescore"),  # worth shipping only at >= 2 (batch 1)
    # CUDA only: the head replayed from a CUDA graph (nezha.decoding.graphs)
    "nezha_graph_over_prefill": ("nezha-graph", "prefill"),
    "hf_over_nezha_graph": ("hf-beam", "nezha-graph"),
}
GRAPH_DECODERS = ("head-graph", "nezha-graph")


# ---- latency ---------------------------------------------------------------------------------------------
@dataclass
class LatencyBenchConfig:
    """Decoder latency against one prefill (the floor), interleaved, on a random-init backbone."""

    backbone: str = field(default="30m", metadata={"help": "preset (tiny, small, 30m, 0.6b, 1b, 3b) or a local HF dir"})
    batch: list[int] = field(default_factory=lambda: [1], metadata={"help": "batch sizes, comma list to sweep"})
    beam: list[int] = field(default_factory=lambda: [10], metadata={"help": "beam widths, comma list to sweep"})
    history: int = field(default=20, metadata={"help": "items per user history"})
    codebook_size: int = 256
    levels: int = 3
    catalog_items: int = field(default=12035, metadata={"help": "random catalog size (Amazon Beauty has 12035)"})
    decoders: list[str] = field(default_factory=lambda: list(BENCH_DECODERS))
    transition: str = "rnn"
    rescore_candidates: int = field(default=0, metadata={
        "help": "IDs the draft head proposes to nezha-rescore's LM ranking (0: 3 x beam)"})
    repeats: int = field(default=20, metadata={"help": "timed calls per decoder and setting"})
    warmup: int = field(default=3, metadata={"help": "untimed calls per decoder and setting first"})
    device: str = "auto"
    dtype: str = "float32"
    cuda_graph: bool = field(default=True, metadata={
        "help": "on CUDA also time the head and NEZHA with the head replayed from a CUDA graph"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0: torch's default)"})
    seed: int = 0
    json: str | None = field(default=None, metadata={"help": "write the report here"})
    plot: str | None = field(default=None, metadata={"help": "write a latency-vs-batch PNG here"})

    def __post_init__(self) -> None:
        unknown = [d for d in self.decoders if d not in BENCH_DECODERS]
        if unknown:
            raise ConfigError(f"decoders: unknown decoder(s) {unknown}; choose from {BENCH_DECODERS}")
        missing = [d for d in REQUIRED_DECODERS if d not in self.decoders]
        if missing:
            raise ConfigError(f"decoders: must include {list(REQUIRED_DECODERS)} (the ratios need them); missing {missing}")
        for name in ("history", "codebook_size", "levels", "catalog_items", "repeats"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be at least 1, got {getattr(self, name)}")
        if self.warmup < 0 or self.threads < 0 or self.rescore_candidates < 0:
            raise ConfigError("warmup, threads, rescore_candidates: may not be negative")
        if not self.batch or not self.beam or min(self.batch) < 1 or min(self.beam) < 1:
            raise ConfigError(f"batch, beam: need positive values, got batch {self.batch}, beam {self.beam}")
        if self.catalog_items > self.codebook_size**self.levels:
            raise ConfigError(f"catalog_items: {self.catalog_items} items do not fit in {self.levels} levels of "
                             f"{self.codebook_size} codes")
        if self.history > self.catalog_items:
            raise ConfigError(f"history: {self.history} is longer than the catalog ({self.catalog_items} items)")


def latency_ratios(latency_ms: dict[str, dict[str, float]], verifier_ms: float | None,
                   stat: str = "p50") -> dict[str, float | None]:
    """Ratios of one statistic of the rows (None where a row was not measured); verifier_share = verifier
    time / NEZHA time (`verifier_ms` being the same statistic of the verifier's time)."""
    def value(name: str) -> float | None:
        return latency_ms[name][stat] if name in latency_ms else None

    ratios: dict[str, float | None] = {}
    for name, (num, den) in RATIOS.items():
        a, b = value(num), value(den)
        ratios[name] = a / b if a is not None and b else None
    nezha = value("nezha")
    ratios["verifier_share"] = verifier_ms / nezha if verifier_ms is not None and nezha else None
    return ratios


class _TimedVerifier:
    """A PrefixVerifier stand-in that adds up the (synchronised) wall time of the decoder's verifier calls."""

    def __init__(self, verifier: PrefixVerifier, device: torch.device) -> None:
        self._verifier = verifier
        self._device = device
        self.ms = 0.0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._verifier, name)

    def _timed(self, fn: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
        synchronize(self._device)
        start = time.perf_counter()
        out = fn(*args)
        synchronize(self._device)
        self.ms += (time.perf_counter() - start) * 1000.0
        return out

    # child_mask calls the wrapped verifier's own contains, so nothing is counted twice.
    def child_mask(self, prefix_values: torch.Tensor, length: int) -> torch.Tensor:
        return self._timed(self._verifier.child_mask, prefix_values, length)

    def contains(self, values: torch.Tensor, length: int | None = None) -> torch.Tensor:
        return self._timed(self._verifier.contains, values, length)


@dataclass
class _Inputs:
    """One batch of histories as every decoder sees it, plus the head's inputs from an untimed prefill."""

    nezha_ids: torch.Tensor
    nezha_mask: torch.Tensor
    lm_ids: torch.Tensor
    lm_mask: torch.Tensor
    h0: torch.Tensor
    contexts: torch.Tensor
    memory: Memory | None  # the history states, for a head that reads them (transition "rnn-attn")


def _make_inputs(model: NezhaModel, codes: np.ndarray, batch: int, history: int, rng: np.random.Generator,
                 device: torch.device) -> _Inputs:
    histories = [codes[rng.choice(len(codes), history, replace=False)] for _ in range(batch)]
    nezha_ids, nezha_mask = prompt_for(model, "nezha", histories, device)
    lm_ids, lm_mask = prompt_for(model, "beam", histories, device)
    h0, contexts, memory = model.draft_prefill(nezha_ids, nezha_mask)
    return _Inputs(nezha_ids, nezha_mask, lm_ids, lm_mask, h0, contexts, memory)


def _decoder_calls(model: NezhaModel, verifier: PrefixVerifier, beam: int,
                   rescore_candidates: int) -> dict[str, Callable[[_Inputs], object]]:
    graphed = GraphedDraftSearch(model.draft_head, verifier, beam)  # captured on its first (warm-up) call
    candidates = rescore_candidates or None  # None: rescore_decode's default, 3 x beam
    return {
        "head-graph": lambda x: graphed(x.h0, x.contexts),
        "nezha-graph": lambda x: graphed(*model.draft_inputs(x.nezha_ids, x.nezha_mask)),
        "prefill": lambda x: model.draft_prefill(x.nezha_ids, x.nezha_mask),
        "head": lambda x: draft_beam_search(model.draft_head, x.h0, x.contexts, verifier, beam, memory=x.memory),
        "nezha": lambda x: nezha_decode(model, x.nezha_ids, x.nezha_mask, verifier, beam),
        "beam": lambda x: beam_decode(model, x.lm_ids, x.lm_mask, verifier, beam),
        "hf-beam": lambda x: hf_beam_decode(model, x.lm_ids, x.lm_mask, verifier, beam),
        "hf-beam-constrained": lambda x: hf_beam_decode(model, x.lm_ids, x.lm_mask, verifier, beam, constrained=True),
        "mtp": lambda x: mtp_decode(model, x.lm_ids, x.lm_mask, verifier, beam),
        "nezha-rescore": lambda x: rescore_decode(model, x.nezha_ids, x.nezha_mask, verifier, beam,
                                                  candidates=candidates),
    }


def _bench_setting(model: NezhaModel, verifier: PrefixVerifier, codes: np.ndarray, cfg: LatencyBenchConfig,
                   batch: int, beam: int, rng: np.random.Generator, device: torch.device) -> dict[str, Any]:
    calls = _decoder_calls(model, verifier, beam, cfg.rescore_candidates)
    # The graphs do not carry a history memory: a head that reads one ("rnn-attn") is timed eagerly only.
    graphable = device.type == "cuda" and cfg.cuda_graph and not model.draft_head.needs_memory
    names = list(cfg.decoders) + (list(GRAPH_DECODERS) if graphable else [])
    times: dict[str, list[float]] = {name: [] for name in names}
    verifier_ms: list[float] = []
    gc.collect()
    gc.disable()  # a collection inside one timed call would be charged to whichever decoder ran then
    try:
        for i in range(cfg.warmup + cfg.repeats):
            inputs = _make_inputs(model, codes, batch, cfg.history, rng, device)
            shift = i % len(names)  # rotate the order: no decoder always runs first (cold caches) or last
            for name in names[shift:] + names[:shift]:
                synchronize(device)
                start = time.perf_counter()
                calls[name](inputs)
                synchronize(device)
                if i >= cfg.warmup:
                    times[name].append((time.perf_counter() - start) * 1000.0)
            # Separate, untimed-as-NEZHA call: per-call syncs inside the verifier would slow NEZHA's own row.
            timer = _TimedVerifier(verifier, device)
            nezha_decode(model, inputs.nezha_ids, inputs.nezha_mask, cast(PrefixVerifier, timer), beam)
            if i >= cfg.warmup:
                verifier_ms.append(timer.ms)
    finally:
        gc.enable()
    latency_ms = {name: latency_stats(t) for name, t in times.items()}
    verifier = latency_stats(verifier_ms)
    # On a shared machine the fastest call is the least disturbed one: min ratios estimate the intrinsic cost.
    return {"batch": batch, "beam": beam, "latency_ms": latency_ms, "verifier_ms": verifier,
            "ratios": latency_ratios(latency_ms, verifier["p50"]),
            "ratios_min": latency_ratios(latency_ms, verifier["min"], stat="min")}


def run_latency_bench(cfg: LatencyBenchConfig) -> dict[str, Any]:
    """Every (batch, beam) setting of `cfg`; the report's top-level latency_ms/ratios are the first setting's."""
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _run_latency_bench(cfg)
    finally:
        torch.set_num_threads(threads)  # a process-wide setting: leave the caller's as it was


def _run_latency_bench(cfg: LatencyBenchConfig) -> dict[str, Any]:
    device = resolve_device(cfg.device)
    sizes = [cfg.codebook_size] * cfg.levels
    start = time.perf_counter()
    model = create_model(ModelConfig(backbone=cfg.backbone, codebook_sizes=sizes, transition=cfg.transition,
                                     objectives=["nezha", "lm", "mtp"], dtype=cfg.dtype), seed=cfg.seed)
    model = model.to(device).eval()
    log.info("built %s backbone in %.1f s on %s", cfg.backbone, time.perf_counter() - start, device_name(device))
    rng = np.random.default_rng(cfg.seed)
    packed = random_packed_ids(cfg.catalog_items, sizes, rng)
    verifier = PrefixVerifier(packed, sizes, device=device)
    codes = unpack(packed, sizes)
    backbone_config = model.backbone.config
    report: dict[str, Any] = {
        "device": device_name(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "host": {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        # Other work on the machine inflates every row; the 1-minute load average says how busy it was.
        "load_average_1m": {"start": os.getloadavg()[0]},
        "config": asdict(cfg),
        "model": {"backbone": cfg.backbone, "parameters": sum(p.numel() for p in model.backbone.parameters()),
                  "hidden_size": backbone_config.hidden_size, "layers": backbone_config.num_hidden_layers,
                  "vocab_size": backbone_config.vocab_size, "codebook_sizes": sizes,
                  "nezha_prompt_tokens": cfg.history * cfg.levels + cfg.levels,
                  "history_prompt_tokens": cfg.history * cfg.levels},
        "results": [],
    }
    with torch.inference_mode():
        for batch in cfg.batch:
            for beam in cfg.beam:
                t0 = time.perf_counter()
                result = _bench_setting(model, verifier, codes, cfg, batch, beam, rng, device)
                log.info("batch %d beam %d: nezha p50 %.2f ms, prefill p50 %.2f ms (%.1f s)", batch, beam,
                         result["latency_ms"]["nezha"]["p50"], result["latency_ms"]["prefill"]["p50"],
                         time.perf_counter() - t0)
                report["results"].append(result)
    report["load_average_1m"]["end"] = os.getloadavg()[0]
    headline = report["results"][0]
    report["latency_ms"] = headline["latency_ms"]
    report["ratios"] = headline["ratios"]
    report["ratios_min"] = headline["ratios_min"]
    report["verifier_ms"] = headline["verifier_ms"]
    if cfg.json:
        Path(cfg.json).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.json).write_text(json.dumps(report, indent=2))
    if cfg.plot:
        plot_latency_vs_batch(report, cfg.plot)
    return report


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def format_latency_table(report: dict[str, Any]) -> str:
    """Plain-text tables: one per setting, a row per decoder, then its ratios."""
    m = report["model"]
    lines = [f"{m['backbone']} backbone ({m['parameters'] / 1e6:.1f}M parameters), history {report['config']['history']} "
             f"items ({m['nezha_prompt_tokens']}-token NEZHA prompt), {report['config']['catalog_items']} items, "
             f"device {report['device']} on {report['host']['cpu']} ({report['host']['cpu_count']} cores), "
             f"torch {report['torch']}, load average {report['load_average_1m']['start']:.1f}"
             f" -> {report['load_average_1m']['end']:.1f}"]
    for result in report["results"]:
        lat = result["latency_ms"]
        floor = lat["prefill"]["p50"]
        lines += ["", f"batch {result['batch']}, beam {result['beam']}",
                  f"{'decoder':<22}{'p50 ms':>10}{'p99 ms':>10}{'mean ms':>10}{'min ms':>10}{'p50/prefill':>12}"
                  f"{'p50/request':>12}"]
        for name, s in lat.items():
            lines.append(f"{name:<22}{s['p50']:>10.2f}{s['p99']:>10.2f}{s['mean']:>10.2f}{s['min']:>10.2f}"
                         f"{s['p50'] / floor:>12.3f}{s['p50'] / result['batch']:>12.2f}")
        v = result["verifier_ms"]
        lines.append(f"{'(verifier in nezha)':<22}{v['p50']:>10.3f}{v['p99']:>10.3f}{v['mean']:>10.3f}{v['min']:>10.3f}")
        for key, label in (("ratios", "ratios (p50)"), ("ratios_min", "ratios (min)")):
            lines.append(f"{label}: " + ", ".join(f"{k} {_fmt(r, '.3f')}" for k, r in result[key].items()))
    return "\n".join(lines)


def plot_latency_vs_batch(report: dict[str, Any], path: str | Path) -> Path:
    """p50 latency per call and per request against batch size, one line per decoder (first beam width)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    beam = report["results"][0]["beam"]
    results = sorted((r for r in report["results"] if r["beam"] == beam), key=lambda r: r["batch"])
    batches = [r["batch"] for r in results]
    fig, (per_call, per_request) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in results[0]["latency_ms"]:
        p50 = np.asarray([r["latency_ms"][name]["p50"] for r in results])
        style = dict(marker="o", linestyle="--" if name in ("prefill", "head") else "-")
        per_call.plot(batches, p50, label=name, **style)
        per_request.plot(batches, p50 / np.asarray(batches), label=name, **style)
    m = report["model"]
    for ax, title in ((per_call, "per call (p50)"), (per_request, "per request (p50 / batch)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.set_xlabel("batch size (users per call)")
        ax.set_ylabel("latency, ms")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    per_call.legend(fontsize=8)
    fig.suptitle(f"{m['backbone']} backbone ({m['parameters'] / 1e6:.1f}M parameters), beam {beam}, history "
                 f"{report['config']['history']}, {report['device']}", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
