"""`nezha prepare`: dataset -> text embeddings -> RQ-KMeans semantic IDs (unique) -> leave-one-out split.

Everything lands in `cfg.out`:

    catalog/               Catalog.save (item ids, titles, unique codes)
    quantizer.safetensors  RQ-KMeans centroids (to give new items IDs without refitting)
    embeddings.npy/.json   item text embeddings, cached by (texts, model)
    sequences.npz          per-user item-index sequences + user ids
    split.npz              leave-one-out examples
    prepare.json           config, input fingerprint, timings and statistics; written last

A run whose fingerprint (sha256 of the input files' bytes and of every config field that changes the
outputs) equals the one in prepare.json returns the stored results at once. Embeddings are cached on
their own key, so changing only the codebooks or the split does not re-embed.

Default codebooks are 3 x 256: 256^3 = 16.8M IDs for Beauty's 12,035 items leaves the last level almost
empty (few collisions to resolve), and level 0 averages 12,035 / 256 = 47 items per code, a coarse
category the draft head can learn; 512 codes (the paper's) would leave ~23 items per level-0 code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nezha.catalog import Catalog
from nezha.data.datasets import INTERACTIONS_FILE, ITEMS_FILE, DataError, load_dataset, resolve_dataset_dir
from nezha.data.split import Split, leave_one_out, save_sequences
from nezha.semantic_ids.embed import embed_texts, model_identity
from nezha.semantic_ids.quantizer import ResidualQuantizer, assign_unique_codes

log = logging.getLogger(__name__)

_FORMAT = "nezha-prepared/1"
SUMMARY_FILE = "prepare.json"
CATALOG_DIR = "catalog"
QUANTIZER_FILE = "quantizer.safetensors"
EMBEDDINGS_FILE = "embeddings.npy"
EMBEDDINGS_META_FILE = "embeddings.json"
SEQUENCES_FILE = "sequences.npz"
SPLIT_FILE = "split.npz"
_ARTIFACTS = (CATALOG_DIR, QUANTIZER_FILE, SEQUENCES_FILE, SPLIT_FILE)

# Fields that do not change the outputs: where things are read from/written to (the inputs enter the
# fingerprint by content) and the embedding batch size.
_NOT_FINGERPRINTED = {"dataset", "data_dir", "out", "batch_size"}


@dataclass
class PrepareConfig:
    """Prepare a dataset: embeddings, unique semantic IDs, leave-one-out split."""

    dataset: str = field(default="amazon-beauty", metadata={"help": "dataset name under --data-dir, or a directory"})
    data_dir: str | None = field(default=None, metadata={"help": "data root (else $NEZHA_DATA_DIR, else ../shared/data)"})
    out: str = field(default="runs/prepared", metadata={"help": "output directory"})
    levels: int = field(default=3, metadata={"help": "semantic-ID levels L"})
    codebook_size: int = field(default=256, metadata={"help": "codes per level T"})
    embedding_model: str | None = field(
        default=None, metadata={"help": "local sentence-transformers folder (default: bundled all-MiniLM-L6-v2)"}
    )
    max_history: int = field(default=20, metadata={"help": "items of history per example"})
    seed: int = field(default=0, metadata={"help": "k-means seed"})
    batch_size: int = field(default=256, metadata={"help": "embedding batch size"})


@dataclass
class PrepareResult:
    out_dir: Path
    catalog: Catalog
    split: Split
    quantizer: ResidualQuantizer
    summary: dict[str, Any]  # the content of prepare.json
    cached: bool  # True when an earlier run with the same fingerprint was reused


def _sha256_files(paths: list[Path], extra: str) -> str:
    h = hashlib.sha256()
    for path in paths:
        h.update(path.name.encode() + b"\0")
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    h.update(extra.encode())
    return h.hexdigest()


def _fingerprint(cfg: PrepareConfig, dataset_dir: Path) -> str:
    relevant = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _NOT_FINGERPRINTED}
    relevant["embedding_model"] = model_identity(cfg.embedding_model)
    relevant["format"] = _FORMAT
    return _sha256_files([dataset_dir / ITEMS_FILE, dataset_dir / INTERACTIONS_FILE], json.dumps(relevant, sort_keys=True))


def _embeddings(texts: list[str], cfg: PrepareConfig, out: Path) -> tuple[np.ndarray, bool]:
    """Embeddings of `texts`, reused from `out` when texts and model are unchanged. Returns (emb, cached)."""
    model = model_identity(cfg.embedding_model)
    key = hashlib.sha256("\0".join([model, *texts]).encode()).hexdigest()
    meta_path, emb_path = out / EMBEDDINGS_META_FILE, out / EMBEDDINGS_FILE
    if meta_path.is_file() and emb_path.is_file() and json.loads(meta_path.read_text()).get("key") == key:
        emb = np.load(emb_path, allow_pickle=False)
        if emb.shape[0] == len(texts):
            log.info("reusing cached embeddings %s (%d x %d)", emb_path, *emb.shape)
            return emb, True
    emb = embed_texts(texts, cfg.embedding_model, batch_size=cfg.batch_size)
    np.save(emb_path, emb)
    meta_path.write_text(json.dumps({"key": key, "model": model, "num_texts": len(texts), "dim": int(emb.shape[1])}))
    return emb, False


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False))
    tmp.replace(path)  # atomic: a crashed run never leaves a half-written summary


def prepare(cfg: PrepareConfig) -> PrepareResult:
    start = time.perf_counter()
    dataset_dir = resolve_dataset_dir(cfg.dataset, cfg.data_dir)
    out = Path(cfg.out)
    fingerprint = _fingerprint(cfg, dataset_dir)
    summary_path = out / SUMMARY_FILE
    if summary_path.is_file() and all((out / a).exists() for a in _ARTIFACTS):
        summary = json.loads(summary_path.read_text())
        if summary.get("fingerprint") == fingerprint:
            log.info("%s is already prepared with fingerprint %s: reusing it", out, fingerprint[:12])
            catalog, split, quantizer = load_prepared(out)
            return PrepareResult(out, catalog, split, quantizer, summary, cached=True)
    out.mkdir(parents=True, exist_ok=True)
    summary_path.unlink(missing_ok=True)  # outputs below no longer match any summary until it is rewritten

    timings: dict[str, Any] = {}
    t = time.perf_counter()
    ds = load_dataset(dataset_dir)
    timings["load_s"] = time.perf_counter() - t

    t = time.perf_counter()
    emb, emb_cached = _embeddings(ds.items["text"].tolist(), cfg, out)
    timings["embed_s"] = time.perf_counter() - t

    t = time.perf_counter()
    quantizer = ResidualQuantizer(levels=cfg.levels, codebook_size=cfg.codebook_size, seed=cfg.seed).fit(emb)
    timings["kmeans_s"] = time.perf_counter() - t
    timings["kmeans_per_level_s"] = [s["seconds"] for s in quantizer.fit_stats]

    t = time.perf_counter()
    codes, id_stats = assign_unique_codes(emb, quantizer)
    timings["collisions_s"] = time.perf_counter() - t

    t = time.perf_counter()
    split = leave_one_out(ds.sequences, max_history=cfg.max_history)
    timings["split_s"] = time.perf_counter() - t

    catalog = Catalog(
        item_ids=ds.items["item_id"].tolist(),
        codes=codes,
        codebook_sizes=quantizer.codebook_sizes,
        titles=ds.items["title"].tolist(),
    )
    catalog.save(out / CATALOG_DIR)
    quantizer.save(out / QUANTIZER_FILE)
    save_sequences(out / SEQUENCES_FILE, ds.sequences, ds.user_ids)
    split.save(out / SPLIT_FILE)
    timings["total_s"] = time.perf_counter() - start

    summary = {
        "format": _FORMAT,
        "fingerprint": fingerprint,
        "config": dataclasses.asdict(cfg),
        "dataset_dir": str(dataset_dir),
        "embedding_model": model_identity(cfg.embedding_model),
        "embedding_dim": int(emb.shape[1]),
        "embeddings_cached": emb_cached,
        "num_items": catalog.num_items,
        "num_users": ds.num_users,
        "dataset_stats": ds.stats,
        "codebook_sizes": list(quantizer.codebook_sizes),
        "semantic_ids": id_stats,
        "kmeans": quantizer.fit_stats,
        "skipped_users": split.skipped_users,
        "split_sizes": split.sizes(),
        "timings": timings,
    }
    _write_json(summary_path, summary)
    log.info(
        "prepared %s in %.1f s: %d items, raw collision rate %.4f, split %s, %d users skipped (< 3 items)",
        out, timings["total_s"], catalog.num_items, id_stats["raw_collision_rate"], split.sizes(), split.skipped_users,
    )
    return PrepareResult(out, catalog, split, quantizer, summary, cached=False)


def load_prepared(out_dir: str | Path) -> tuple[Catalog, Split, ResidualQuantizer]:
    out = Path(out_dir)
    missing = [a for a in (SUMMARY_FILE, *_ARTIFACTS) if not (out / a).exists()]
    if missing:
        raise DataError(f"{out} is not a prepared directory (missing {missing}); run `nezha prepare --out {out}` first")
    return Catalog.load(out / CATALOG_DIR), Split.load(out / SPLIT_FILE), ResidualQuantizer.load(out / QUANTIZER_FILE)
