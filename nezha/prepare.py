"""`nezha prepare`: dataset -> text embeddings -> RQ-KMeans semantic IDs (unique) -> leave-one-out split.

With `semantic_ids` (a JSON file item -> codes, see nezha.semantic_ids.id_file) the IDs come from that
file instead: no text, no embeddings, no quantizer; the catalog is the file's items.

Everything lands in `cfg.out`, in the format nezha/prepared.py describes (and reads back).

A run whose fingerprint (sha256 of the input files' bytes, the ID file's included, and of every config
field that changes the outputs) equals the one in prepare.json returns the stored results at once.
Embeddings are cached on their own key, so changing only the codebooks or the split does not re-embed.

Default codebooks are 3 x 256: 256^3 = 16.8M IDs for Beauty's 12,035 items leaves the last level almost
empty (few collisions to resolve), and level 0 averages 12,035 / 256 = 47 items per code, a coarse
category the draft head can learn; 512 codes (the paper's) would leave ~23 items per level-0 code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nezha.catalog import Catalog
from nezha.config import ConfigError
from nezha.data.datasets import (
    ITEMS_FILE,
    DataError,
    Dataset,
    input_files,
    load_dataset,
    resolve_dataset_dir,
)
from nezha.data.split import Split, leave_one_out, save_sequences
from nezha.prepared import (
    ARTIFACTS,
    CATALOG_DIR,
    EMBEDDINGS_FILE,
    EMBEDDINGS_META_FILE,
    FORMAT,
    ID_SOURCE_FILE,
    ID_SOURCE_TEXT,
    QUANTIZER_FILE,
    SEQUENCES_FILE,
    SPLIT_FILE,
    SUMMARY_FILE,
    artifacts,
    load_prepared,
)
from nezha.semantic_ids.embed import embed_texts, model_identity
from nezha.semantic_ids.id_file import COLLISION_RULES, make_unique, read_semantic_ids
from nezha.semantic_ids.precomputed import EMBEDDING_SUFFIXES, read_embeddings
from nezha.semantic_ids.quantizer import (
    ResidualQuantizer,
    assign_unique_codes,
    id_space_advice,
    id_space_warning,
)

log = logging.getLogger(__name__)


# Fields that do not change the outputs: where things are read from/written to (the inputs, the ID file
# included, enter the fingerprint by content), the embedding batch size and where embedding runs.
_NOT_FINGERPRINTED = {"dataset", "data_dir", "out", "batch_size", "semantic_ids", "embeddings", "embed_on_ray"}
# Fields only one way of making IDs reads; leaving the other way's out keeps text-path fingerprints
# (and so existing prepared directories) as they were before ID files existed.
_TEXT_ONLY = {"levels", "codebook_size", "embedding_model", "seed", "rq_sample"}
_ID_FILE_ONLY = {"codebook_sizes", "resolve_collisions"}

# A few items without metadata are normal; beyond this share the text path mostly embeds item ids.
_MAX_SHARE_WITHOUT_TEXT = 0.05


@dataclass
class PrepareConfig:
    """Prepare a dataset: embeddings, unique semantic IDs, leave-one-out split."""

    dataset: str = field(default="amazon-beauty", metadata={"help": "dataset name under --data-dir, or a directory"})
    data_dir: str | None = field(default=None, metadata={"help": "data root (else $NEZHA_DATA_DIR, else ../shared/data)"})
    out: str = field(default="runs/prepared", metadata={"help": "output directory"})
    levels: int = field(default=3, metadata={"help": "semantic-ID levels L (text path)"})
    codebook_size: int = field(default=256, metadata={"help": "codes per level T (text path)"})
    embedding_model: str | None = field(
        default=None, metadata={"help": "local sentence-transformers folder (default: bundled all-MiniLM-L6-v2)"}
    )
    max_history: int = field(default=20, metadata={"help": "items of history per example"})
    k_core: int = field(default=0, metadata={
        "help": "drop users and items with fewer interactions, repeatedly (0: keep all; items stay in the catalog)"})
    seed: int = field(default=0, metadata={"help": "k-means seed (text path)"})
    rq_sample: int = field(default=200_000, metadata={
        "help": "items the RQ-KMeans codebooks are fitted on (a seeded random sample; every item is then "
                "assigned) (text path)"})
    embeddings: str | None = field(default=None, metadata={
        "help": "precomputed item embeddings instead of embedding item text: FILE.npy (one row per item, "
                "items.jsonl order) or FILE.parquet (item_id + one list-of-floats column)"})
    embed_on_ray: bool = field(default=False, metadata={
        "help": "embed item text with a pool of Ray Data actors (GPU actors when the Ray cluster has GPUs)"})
    batch_size: int = field(default=256, metadata={"help": "embedding batch size"})
    semantic_ids: str | None = field(default=None, metadata={
        "help": "JSON file item -> codes ([\"<a_12>\", \"<b_3>\", ...] or [12, 3, ...]) to use instead of text "
                "embeddings + RQ-KMeans; items then need no text"})
    codebook_sizes: list[int] | None = field(default=None, metadata={
        "help": "with --semantic-ids: codes per level, e.g. 256,256,256 (default: largest code + 1 per level)"})
    resolve_collisions: str = field(default="refuse", metadata={
        "help": "with --semantic-ids, items sharing an ID: refuse (list them), or append-level (add a level "
                "numbering them)"})

    def __post_init__(self) -> None:
        for name in ("levels", "codebook_size", "max_history", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.k_core < 0:
            raise ConfigError(f"k_core: must be >= 0, got {self.k_core}")
        if self.rq_sample < self.codebook_size:
            raise ConfigError(f"rq_sample: must be >= codebook_size ({self.codebook_size}), got {self.rq_sample}")
        if self.embeddings is not None:
            if self.semantic_ids is not None:
                raise ConfigError("embeddings: only used to build IDs from embeddings; with semantic_ids leave it unset")
            if self.embed_on_ray:
                raise ConfigError("embed_on_ray: nothing to embed with precomputed embeddings; leave it unset")
            if Path(self.embeddings).suffix.lower() not in EMBEDDING_SUFFIXES:
                raise ConfigError(f"embeddings: {self.embeddings!r} is neither a .npy nor a .parquet file")
        if self.semantic_ids is not None and not self.semantic_ids.strip():
            raise ConfigError("semantic_ids: empty path; leave it unset to build IDs from item text")
        if self.resolve_collisions not in COLLISION_RULES:
            raise ConfigError(
                f"resolve_collisions: unknown rule {self.resolve_collisions!r}; choose one of {COLLISION_RULES}"
            )
        if self.codebook_sizes is not None:
            if self.semantic_ids is None:
                raise ConfigError(
                    "codebook_sizes: only used with semantic_ids; IDs built from text have levels x codebook_size codes"
                )
            if not self.codebook_sizes or min(self.codebook_sizes) < 1:
                raise ConfigError(f"codebook_sizes: need one size >= 1 per level, got {self.codebook_sizes}")


@dataclass
class PrepareResult:
    out_dir: Path
    catalog: Catalog
    split: Split
    quantizer: ResidualQuantizer | None  # None when the IDs came from a file
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
    unused = _ID_FILE_ONLY if cfg.semantic_ids is None else _TEXT_ONLY
    relevant = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _NOT_FINGERPRINTED | unused}
    relevant["format"] = FORMAT
    files = input_files(dataset_dir, items_required=cfg.semantic_ids is None)
    if cfg.embeddings is not None:
        if not Path(cfg.embeddings).is_file():
            raise DataError(f"embeddings: {cfg.embeddings} is not a file")
        relevant["embedding_model"] = "precomputed"
        files.append(Path(cfg.embeddings))
    elif cfg.semantic_ids is None:
        relevant["embedding_model"] = model_identity(cfg.embedding_model)
    else:
        id_file = Path(cfg.semantic_ids)
        if not id_file.is_file():
            raise DataError(f"semantic_ids: {id_file} is not a file")
        files.append(id_file)
    return _sha256_files(files, json.dumps(relevant, sort_keys=True))


def _embeddings(texts: list[str], cfg: PrepareConfig, out: Path, cache: Path) -> tuple[np.ndarray, bool]:
    """Embeddings of `texts`, reused from `cache` (the previous output) when texts and model are unchanged,
    written to `out`. Returns (emb, cached)."""
    model = model_identity(cfg.embedding_model)
    key = hashlib.sha256("\0".join([model, *texts]).encode()).hexdigest()
    meta_path, emb_path = cache / EMBEDDINGS_META_FILE, cache / EMBEDDINGS_FILE
    if meta_path.is_file() and emb_path.is_file() and json.loads(meta_path.read_text()).get("key") == key:
        emb = np.load(emb_path, allow_pickle=False)
        if emb.shape[0] == len(texts):
            log.info("reusing cached embeddings %s (%d x %d)", emb_path, *emb.shape)
            return emb, True
    if cfg.embed_on_ray:
        # Imported here: Ray Data is needed only for this option, and importing it slows every CLI start.
        from nezha.semantic_ids.embed_ray import embed_texts_on_ray

        emb = embed_texts_on_ray(texts, cfg.embedding_model, batch_size=cfg.batch_size)
    else:
        emb = embed_texts(texts, cfg.embedding_model, batch_size=cfg.batch_size)
    meta_path, emb_path = out / EMBEDDINGS_META_FILE, out / EMBEDDINGS_FILE
    np.save(emb_path, emb)
    meta_path.write_text(json.dumps({"key": key, "model": model, "num_texts": len(texts), "dim": int(emb.shape[1])}))
    return emb, False


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False))
    tmp.replace(path)  # atomic: a crashed run never leaves a half-written summary


def _check_item_text(ds: Dataset, dataset_dir: Path) -> None:
    """Refuse a catalog without any item text, warn when many items lack it: an item without title, brand
    and categories is embedded as its bare item id, so its semantic ID says nothing about the item."""
    without = ds.stats["items_without_text"]
    if without == ds.num_items:
        raise DataError(
            f"{dataset_dir / ITEMS_FILE}: none of the {without} items has a title, brand or categories, so semantic "
            "IDs built from text would encode nothing but the item ids; add item text, or bring your own IDs "
            "with --semantic-ids FILE.json"
        )
    if without > _MAX_SHARE_WITHOUT_TEXT * ds.num_items:
        log.warning(
            "%s: %d of %d items (%.1f%%) have no title, brand or categories: each is embedded as its item id, so "
            "its semantic ID carries no content (items_without_text in prepare.json); add text or use --semantic-ids",
            dataset_dir / ITEMS_FILE, without, ds.num_items, 100 * without / ds.num_items,
        )


def _check_id_space(num_items: int, cfg: PrepareConfig) -> None:
    """Refuse, before embedding and fitting, a catalog with more items than levels x codebook_size IDs."""
    ids = cfg.codebook_size**cfg.levels
    if num_items > ids:
        raise DataError(
            f"{num_items:,} items cannot get unique semantic IDs from {cfg.levels} levels x {cfg.codebook_size} "
            f"codes ({ids:,} IDs); {id_space_advice(num_items, cfg.levels, cfg.codebook_size)}"
        )


@dataclass
class _SemanticIds:
    codes: np.ndarray  # [N, L], unique rows, in the dataset's item order
    codebook_sizes: tuple[int, ...]
    stats: dict[str, Any]  # prepare.json "semantic_ids"
    quantizer: ResidualQuantizer | None = None
    summary: dict[str, Any] = field(default_factory=dict)  # further top-level prepare.json entries


def _ids_from_text(
    cfg: PrepareConfig, dataset_dir: Path, out: Path, cache: Path, timings: dict[str, Any]
) -> tuple[Dataset, _SemanticIds]:
    t = time.perf_counter()
    ds = load_dataset(dataset_dir, k_core_min=cfg.k_core)
    timings["load_s"] = time.perf_counter() - t
    if cfg.embeddings is None:
        _check_item_text(ds, dataset_dir)
    _check_id_space(ds.num_items, cfg)

    t = time.perf_counter()
    if cfg.embeddings is not None:
        emb, emb_cached = read_embeddings(cfg.embeddings, ds.items["item_id"].tolist()), False
    else:
        emb, emb_cached = _embeddings(ds.items["text"].tolist(), cfg, out, cache)
    timings["embed_s"] = time.perf_counter() - t

    t = time.perf_counter()
    quantizer = ResidualQuantizer(levels=cfg.levels, codebook_size=cfg.codebook_size, seed=cfg.seed)
    quantizer.fit(emb, sample=cfg.rq_sample)
    timings["kmeans_s"] = time.perf_counter() - t
    timings["kmeans_per_level_s"] = [s["seconds"] for s in quantizer.fit_stats]

    t = time.perf_counter()
    codes, id_stats = assign_unique_codes(emb, quantizer)
    timings["collisions_s"] = time.perf_counter() - t
    id_stats["id_space_warning"] = id_space_warning(ds.num_items, cfg.levels, cfg.codebook_size, id_stats)
    if id_stats["id_space_warning"]:
        log.warning("%s", id_stats["id_space_warning"])
    summary = {
        "embedding_model": (f"precomputed: {cfg.embeddings}" if cfg.embeddings is not None
                            else model_identity(cfg.embedding_model)),
        "embedding_dim": int(emb.shape[1]),
        "embeddings_cached": emb_cached,
        "kmeans": quantizer.fit_stats,
    }
    return ds, _SemanticIds(codes, quantizer.codebook_sizes, id_stats, quantizer, summary)


def _ids_from_file(
    cfg: PrepareConfig, id_file: str, dataset_dir: Path, timings: dict[str, Any]
) -> tuple[Dataset, _SemanticIds]:
    t = time.perf_counter()
    item_ids, codes, sizes = read_semantic_ids(id_file, cfg.codebook_sizes)
    codes, sizes, id_stats = make_unique(item_ids, codes, sizes, cfg.resolve_collisions, id_file)
    timings["semantic_ids_s"] = time.perf_counter() - t
    if id_stats["appended_level"]:
        log.warning(
            "%s: %d semantic ID(s) were shared by several items; appended level %d (size %d) numbers them",
            id_file, id_stats["shared_ids"], len(sizes) - 1, sizes[-1],
        )

    t = time.perf_counter()
    ds = load_dataset(dataset_dir, item_ids=item_ids, k_core_min=cfg.k_core)  # the ID file's items, in its order
    timings["load_s"] = time.perf_counter() - t
    return ds, _SemanticIds(codes, sizes, id_stats)


def prepare(cfg: PrepareConfig) -> PrepareResult:
    start = time.perf_counter()
    dataset_dir = resolve_dataset_dir(cfg.dataset, cfg.data_dir)
    out = Path(cfg.out)
    fingerprint = _fingerprint(cfg, dataset_dir)
    summary_path = out / SUMMARY_FILE
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        if summary.get("fingerprint") == fingerprint and all((out / a).exists() for a in artifacts(summary)):
            log.info("%s is already prepared with fingerprint %s: reusing it", out, fingerprint[:12])
            catalog, split, quantizer = load_prepared(out)
            return PrepareResult(out, catalog, split, quantizer, summary, cached=True)
    # Everything is written to a temporary directory beside `out` and moved in when complete, so a failed
    # run leaves `out` as it was (and no half-written directory).
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    work.chmod(0o777 & ~umask)  # mkdtemp's 0700 would become --out's mode
    try:
        result = _prepare_into(cfg, dataset_dir, fingerprint, work, out, start)
        _publish(work, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return result


def _prepare_into(
    cfg: PrepareConfig, dataset_dir: Path, fingerprint: str, work: Path, out: Path, start: float
) -> PrepareResult:
    timings: dict[str, Any] = {}
    if cfg.semantic_ids is None:
        ds, ids = _ids_from_text(cfg, dataset_dir, work, out, timings)
    else:
        ds, ids = _ids_from_file(cfg, cfg.semantic_ids, dataset_dir, timings)

    t = time.perf_counter()
    split = leave_one_out(ds.sequences, max_history=cfg.max_history)
    timings["split_s"] = time.perf_counter() - t

    t = time.perf_counter()
    catalog = Catalog(
        item_ids=ds.items["item_id"].tolist(),
        codes=ids.codes,
        codebook_sizes=ids.codebook_sizes,
        titles=ds.items["title"].tolist(),
    )
    catalog.save(work / CATALOG_DIR)
    if ids.quantizer is not None:
        ids.quantizer.save(work / QUANTIZER_FILE)
    save_sequences(work / SEQUENCES_FILE, ds.sequences, ds.user_ids)
    split.save(work / SPLIT_FILE)
    timings["write_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - start

    summary = {
        "format": FORMAT,
        "fingerprint": fingerprint,
        "config": dataclasses.asdict(cfg),
        "dataset_dir": str(dataset_dir),
        "id_source": ID_SOURCE_TEXT if ids.quantizer is not None else ID_SOURCE_FILE,
        **ids.summary,
        "num_items": catalog.num_items,
        "num_users": ds.num_users,
        "dataset_stats": ds.stats,
        "codebook_sizes": list(catalog.codebook_sizes),
        "semantic_ids": ids.stats,
        "skipped_users": split.skipped_users,
        "split_sizes": split.sizes(),
        "timings": timings,
    }
    _write_json(work / SUMMARY_FILE, summary)
    log.info(
        "prepared %s in %.1f s: %d items, raw collision rate %.4f, split %s, %d users skipped (< 3 items)",
        out, timings["total_s"], catalog.num_items, ids.stats["raw_collision_rate"], split.sizes(), split.skipped_users,
    )
    return PrepareResult(out, catalog, split, ids.quantizer, summary, cached=False)


def _publish(work: Path, out: Path) -> None:
    """Move a complete prepared directory from `work` to `out`. A new `out` is one rename. Into an existing
    one, prepare.json is removed first and put back last, each artifact replaces its old version, and an
    artifact this run did not make (the quantizer after a run with an ID file) is removed; other files
    (the embedding cache of another run, anything of yours) stay."""
    if not out.exists():
        work.rename(out)
        return
    (out / SUMMARY_FILE).unlink(missing_ok=True)
    for name in ARTIFACTS:
        if not (work / name).exists():
            _remove(out / name)
    for path in work.iterdir():
        if path.name != SUMMARY_FILE:
            if path.is_dir() and (out / path.name).exists():
                _remove(out / path.name)
            path.replace(out / path.name)
    (work / SUMMARY_FILE).replace(out / SUMMARY_FILE)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)

