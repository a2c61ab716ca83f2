"""`nezha bench latency` and `nezha bench serve`: how fast NEZHA decodes, against its floor and baselines.

latency: a random-init backbone (weights do not change latency) with every head, a random catalog of unique
semantic IDs, and for each (batch, beam) setting the wall time of
  prefill  one forward pass over the NEZHA prompt (`model.draft_inputs`): the floor NEZHA cannot beat,
  head     the draft head's beam search alone, on that prefill's hidden states,
  nezha    prefill + head (`nezha_decode`), the product,
  beam     our KV-cache beam search over the LM head, constrained by the same verifier,
  hf-beam  Hugging Face `generate(num_beams)`, unconstrained (what users know), and constrained,
  mtp      prefill of the history + independent heads.
Each repeat runs every decoder once, in a rotating order, on the same fresh batch of histories, so load
drift on the machine hits all decoders alike; GPU work is synchronised before and after every call.

serve: throughput and p50/p99 latency of a running Serve app (`POST /v1/recommend`) at fixed concurrency
levels, each bounded in requests and seconds, on loopback only.
"""

from __future__ import annotations

import argparse
import gc
import http.client
import ipaddress
import json
import logging
import os
import platform
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import numpy as np
import torch
import transformers

from nezha.catalog import Catalog
from nezha.config import add_config_arguments, config_from_args
from nezha.decoding import (
    beam_decode,
    draft_beam_search,
    hf_beam_decode,
    mtp_decode,
    nezha_decode,
    prompt_for,
)
from nezha.decoding.graphs import GraphedDraftSearch
from nezha.evaluation import device_name, resolve_device, synchronize
from nezha.model.checkpoint import create_model
from nezha.model.model import ModelConfig, NezhaModel
from nezha.verify import PrefixVerifier, unpack

log = logging.getLogger(__name__)

BENCH_DECODERS = ("prefill", "head", "nezha", "beam", "hf-beam", "hf-beam-constrained", "mtp")
# Rows every report needs: the ratios are relative to them.
REQUIRED_DECODERS = ("prefill", "nezha")
RATIOS = {  # name -> (numerator row, denominator row), both p50
    "nezha_over_prefill": ("nezha", "prefill"),
    "head_over_prefill": ("head", "prefill"),
    "beam_over_nezha": ("beam", "nezha"),
    "hf_over_nezha": ("hf-beam", "nezha"),
    "hf_constrained_over_nezha": ("hf-beam-constrained", "nezha"),
    "mtp_over_nezha": ("mtp", "nezha"),
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
            raise ValueError(f"unknown decoder(s) {unknown}; choose from {BENCH_DECODERS}")
        missing = [d for d in REQUIRED_DECODERS if d not in self.decoders]
        if missing:
            raise ValueError(f"decoders must include {list(REQUIRED_DECODERS)} (the ratios need them); missing {missing}")
        for name in ("history", "codebook_size", "levels", "catalog_items", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.warmup < 0 or self.threads < 0:
            raise ValueError("warmup and threads may not be negative")
        if not self.batch or not self.beam or min(self.batch) < 1 or min(self.beam) < 1:
            raise ValueError(f"batch and beam need positive values, got batch {self.batch}, beam {self.beam}")
        if self.catalog_items > self.codebook_size**self.levels:
            raise ValueError(f"{self.catalog_items} items do not fit in {self.levels} levels of "
                             f"{self.codebook_size} codes")
        if self.history > self.catalog_items:
            raise ValueError(f"history {self.history} is longer than the catalog ({self.catalog_items} items)")


def latency_stats(times_ms: Sequence[float]) -> dict[str, float]:
    arr = np.asarray(times_ms, dtype=np.float64)
    return {"p50": float(np.percentile(arr, 50)), "p99": float(np.percentile(arr, 99)), "mean": float(arr.mean()),
            "min": float(arr.min()), "n": int(arr.size)}


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


def _cpu_model() -> str:
    """The CPU's marketing name on Linux (platform.processor() is often empty there)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def random_catalog(num_items: int, sizes: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    """`num_items` distinct packed IDs drawn uniformly from the ID space (unique, as real catalogs must be)."""
    space = int(np.prod(sizes))
    return np.sort(rng.choice(space, size=num_items, replace=False)).astype(np.int64)


@dataclass
class _Inputs:
    """One batch of histories as every decoder sees it, plus the head's inputs from an untimed prefill."""

    nezha_ids: torch.Tensor
    nezha_mask: torch.Tensor
    lm_ids: torch.Tensor
    lm_mask: torch.Tensor
    h0: torch.Tensor
    contexts: torch.Tensor


def _make_inputs(model: NezhaModel, codes: np.ndarray, batch: int, history: int, rng: np.random.Generator,
                 device: torch.device) -> _Inputs:
    histories = [codes[rng.choice(len(codes), history, replace=False)] for _ in range(batch)]
    nezha_ids, nezha_mask = prompt_for(model, "nezha", histories, device)
    lm_ids, lm_mask = prompt_for(model, "beam", histories, device)
    h0, contexts = model.draft_inputs(nezha_ids, nezha_mask)
    return _Inputs(nezha_ids, nezha_mask, lm_ids, lm_mask, h0, contexts)


def _decoder_calls(model: NezhaModel, verifier: PrefixVerifier, beam: int) -> dict[str, Callable[[_Inputs], object]]:
    graphed = GraphedDraftSearch(model.draft_head, verifier, beam)  # captured on its first (warm-up) call
    return {
        "head-graph": lambda x: graphed(x.h0, x.contexts),
        "nezha-graph": lambda x: graphed(*model.draft_inputs(x.nezha_ids, x.nezha_mask)),
        "prefill": lambda x: model.draft_inputs(x.nezha_ids, x.nezha_mask),
        "head": lambda x: draft_beam_search(model.draft_head, x.h0, x.contexts, verifier, beam),
        "nezha": lambda x: nezha_decode(model, x.nezha_ids, x.nezha_mask, verifier, beam),
        "beam": lambda x: beam_decode(model, x.lm_ids, x.lm_mask, verifier, beam),
        "hf-beam": lambda x: hf_beam_decode(model, x.lm_ids, x.lm_mask, verifier, beam),
        "hf-beam-constrained": lambda x: hf_beam_decode(model, x.lm_ids, x.lm_mask, verifier, beam, constrained=True),
        "mtp": lambda x: mtp_decode(model, x.lm_ids, x.lm_mask, verifier, beam),
    }


def _bench_setting(model: NezhaModel, verifier: PrefixVerifier, codes: np.ndarray, cfg: LatencyBenchConfig,
                   batch: int, beam: int, rng: np.random.Generator, device: torch.device) -> dict[str, Any]:
    calls = _decoder_calls(model, verifier, beam)
    names = list(cfg.decoders) + (list(GRAPH_DECODERS) if device.type == "cuda" and cfg.cuda_graph else [])
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
    packed = random_catalog(cfg.catalog_items, sizes, rng)
    verifier = PrefixVerifier(packed, sizes, device=device)
    codes = unpack(packed, sizes)
    backbone_config = model.backbone.config
    report: dict[str, Any] = {
        "device": device_name(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "host": {"cpu": _cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()},
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


# ---- serve -----------------------------------------------------------------------------------------------
@dataclass
class ServeBenchConfig:
    """Throughput and p50/p99 latency of a running Serve app at fixed concurrency levels (loopback only)."""

    checkpoint: str = field(default="runs/train/best", metadata={"help": "checkpoint whose catalog gives item ids"})
    url: str = field(default="http://127.0.0.1:8000", metadata={"help": "the app's base URL (loopback)"})
    concurrency: list[int] = field(default_factory=lambda: [1, 4, 16], metadata={"help": "clients in flight"})
    requests: int = field(default=200, metadata={"help": "at most this many requests per concurrency level"})
    max_seconds: float = field(default=30.0, metadata={"help": "and at most this long per level"})
    warmup: int = field(default=5, metadata={"help": "untimed requests before the first level"})
    history: int = 20
    k: int = 10
    decoder: str | None = field(default=None, metadata={"help": "decoder to ask for (default: the app's)"})
    timeout_s: float = field(default=30.0, metadata={"help": "per-request timeout"})
    seed: int = 0
    json: str | None = None


def validate_serve_config(cfg: ServeBenchConfig) -> None:
    """Reject what would load something other than a local test server, or run unbounded."""
    parts = urlsplit(cfg.url)
    if parts.scheme != "http":
        raise ValueError(f"url must be http://HOST:PORT on loopback, got {cfg.url!r}")
    host = parts.hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"url host {host!r} is not loopback (127.0.0.1, ::1 or localhost): the bench only "
                         "loads a local app")
    if not cfg.concurrency or min(cfg.concurrency) < 1:
        raise ValueError(f"concurrency levels must be positive, got {cfg.concurrency}")
    if cfg.requests < 1 or cfg.warmup < 0 or cfg.history < 1 or cfg.k < 1:
        raise ValueError("requests, history and k must be at least 1 and warmup at least 0")
    if cfg.max_seconds <= 0 or cfg.timeout_s <= 0:
        raise ValueError("max_seconds and timeout_s must be positive")


def sample_histories(item_ids: Sequence[str], count: int, length: int, rng: np.random.Generator) -> list[list[str]]:
    """`count` histories of `length` distinct items (the app rejects duplicates), capped at the catalog size."""
    length = min(length, len(item_ids))
    return [[item_ids[i] for i in rng.choice(len(item_ids), length, replace=False)] for _ in range(count)]


def summarize_level(concurrency: int, latencies_ms: Sequence[float], statuses: Counter[str],
                    wall_s: float) -> dict[str, Any]:
    """One concurrency level's throughput (successful requests / wall time) and latency of the successes."""
    ok = len(latencies_ms)
    sent = sum(statuses.values())
    out: dict[str, Any] = {"concurrency": concurrency, "requests": sent, "ok": ok, "errors": sent - ok,
                           "statuses": dict(sorted(statuses.items())), "wall_s": wall_s,
                           "throughput_rps": ok / wall_s if wall_s > 0 else 0.0}
    if ok:
        out.update({f"{k}_ms": v for k, v in latency_stats(latencies_ms).items() if k != "n"})
    return out


class _Client:
    """One keep-alive HTTP connection; reconnects after a failure."""

    def __init__(self, url: str, timeout_s: float) -> None:
        parts = urlsplit(url)
        self._host, self._port = parts.hostname or "127.0.0.1", parts.port or 80
        self._path = parts.path.rstrip("/") + "/v1/recommend"
        self._timeout = timeout_s
        self._conn: http.client.HTTPConnection | None = None

    def post(self, body: bytes) -> str:
        """The response's status code as a string, or the exception's name."""
        try:
            if self._conn is None:
                self._conn = http.client.HTTPConnection(self._host, self._port, timeout=self._timeout)
            self._conn.request("POST", self._path, body=body, headers={"Content-Type": "application/json"})
            response = self._conn.getresponse()
            response.read()
            return str(response.status)
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            return type(exc).__name__

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def run_level(url: str, bodies: Sequence[bytes], concurrency: int, max_requests: int, max_seconds: float,
              timeout_s: float) -> dict[str, Any]:
    """`concurrency` closed-loop clients send `bodies` round-robin until `max_requests` or `max_seconds`."""
    lock = threading.Lock()
    sent = 0
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    deadline = time.perf_counter() + max_seconds

    def worker() -> None:
        nonlocal sent
        client = _Client(url, timeout_s)
        try:
            while True:
                with lock:
                    if sent >= max_requests or time.perf_counter() >= deadline:
                        return
                    index = sent
                    sent += 1
                start = time.perf_counter()
                status = client.post(bodies[index % len(bodies)])
                elapsed = (time.perf_counter() - start) * 1000.0
                with lock:
                    statuses[status] += 1
                    if status == "200":
                        latencies.append(elapsed)
        finally:
            client.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return summarize_level(concurrency, latencies, statuses, time.perf_counter() - start)


def run_serve_bench(cfg: ServeBenchConfig) -> dict[str, Any]:
    validate_serve_config(cfg)
    catalog = Catalog.load(Path(cfg.checkpoint) / "catalog")
    rng = np.random.default_rng(cfg.seed)
    request = {"k": cfg.k} if cfg.decoder is None else {"k": cfg.k, "decoder": cfg.decoder}
    bodies = [json.dumps({"history": h, **request}).encode()
              for h in sample_histories(catalog.item_ids, max(cfg.requests, 64), cfg.history, rng)]
    if cfg.warmup:
        warm = run_level(cfg.url, bodies, 1, cfg.warmup, cfg.max_seconds, cfg.timeout_s)
        if warm["ok"] == 0:
            raise ValueError(f"no successful warm-up request to {cfg.url}/v1/recommend (statuses {warm['statuses']}); "
                             "is the app running (`serve run serve.config.yaml`)?")
    levels = []
    for concurrency in cfg.concurrency:
        level = run_level(cfg.url, bodies, concurrency, cfg.requests, cfg.max_seconds, cfg.timeout_s)
        log.info("concurrency %d: %.1f req/s, p50 %s ms, %d errors", concurrency, level["throughput_rps"],
                 _fmt(level.get("p50_ms")), level["errors"])
        levels.append(level)
    report = {"url": cfg.url, "config": asdict(cfg), "catalog_items": catalog.num_items, "levels": levels}
    if cfg.json:
        Path(cfg.json).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.json).write_text(json.dumps(report, indent=2))
    return report


def format_serve_table(report: dict[str, Any]) -> str:
    lines = [f"{report['url']}/v1/recommend, {report['catalog_items']} catalog items, history "
             f"{report['config']['history']}, k {report['config']['k']}",
             f"{'concurrency':>11}{'requests':>10}{'errors':>8}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'mean ms':>9}"]
    for lv in report["levels"]:
        lines.append(f"{lv['concurrency']:>11}{lv['requests']:>10}{lv['errors']:>8}{lv['throughput_rps']:>9.1f}"
                     f"{_fmt(lv.get('p50_ms')):>9}{_fmt(lv.get('p99_ms')):>9}{_fmt(lv.get('mean_ms')):>9}")
    return "\n".join(lines)


# ---- CLI -------------------------------------------------------------------------------------------------
def _latency_cli(args: argparse.Namespace) -> None:
    cfg = config_from_args(LatencyBenchConfig, args)
    report = run_latency_bench(cfg)
    print(format_latency_table(report))
    for path in (cfg.json, cfg.plot):
        if path:
            print(f"wrote {path}")


def _serve_cli(args: argparse.Namespace) -> None:
    cfg = config_from_args(ServeBenchConfig, args)
    report = run_serve_bench(cfg)
    print(format_serve_table(report))
    if cfg.json:
        print(f"wrote {cfg.json}")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `nezha bench latency` and `nezha bench serve`."""
    bench = subparsers.add_parser("bench", help="decoder latency and serving throughput benchmarks",
                                  description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    for name, cls, handler in (("latency", LatencyBenchConfig, _latency_cli), ("serve", ServeBenchConfig, _serve_cli)):
        doc = (cls.__doc__ or "").strip()
        parser = sub.add_parser(name, help=doc.splitlines()[0], description=doc)
        add_config_arguments(parser, cls)
        parser.set_defaults(handler=handler)
