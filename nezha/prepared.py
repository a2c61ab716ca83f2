"""The prepared-dataset format: what `nezha prepare` writes, and reading it back.

Light on purpose: it imports no embedding or k-means code, so training, evaluation, serving and the CLI
can open a prepared directory without the pipeline that made it (nezha/prepare.py).

    catalog/               Catalog.save (item ids, titles, unique codes)
    quantizer.safetensors  RQ-KMeans centroids (to give new items IDs without refitting); text path only
    embeddings.npy/.json   item text embeddings, cached by (texts, model); text path only
    sequences.npz          per-user item-index sequences + user ids
    split.npz              leave-one-out examples: (start, end, target) each, offsets into one sequence array
    prepare.json           config, input fingerprint, timings and statistics; written last
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from nezha.catalog import Catalog
from nezha.config import ConfigError
from nezha.data.datasets import DataError
from nezha.data.split import Split
from nezha.semantic_ids.quantizer import ResidualQuantizer

FORMAT = "nezha-prepared/2"  # 2: split.npz holds offsets into one sequence array
SUMMARY_FILE = "prepare.json"
CATALOG_DIR = "catalog"
QUANTIZER_FILE = "quantizer.safetensors"
EMBEDDINGS_FILE = "embeddings.npy"
EMBEDDINGS_META_FILE = "embeddings.json"
SEQUENCES_FILE = "sequences.npz"
SPLIT_FILE = "split.npz"
ARTIFACTS = (CATALOG_DIR, QUANTIZER_FILE, SEQUENCES_FILE, SPLIT_FILE)
ID_SOURCE_TEXT, ID_SOURCE_FILE = "rq-kmeans", "file"  # prepare.json "id_source"


def read_summary(out_dir: str | Path) -> dict[str, Any]:
    """prepare.json of a prepared directory; {} when there is none (yet)."""
    path = Path(out_dir) / SUMMARY_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def artifacts(summary: dict[str, Any]) -> tuple[str, ...]:
    """The files besides prepare.json that a prepared directory holds: no quantizer when the IDs came from a file."""
    if summary.get("id_source") == ID_SOURCE_FILE:
        return tuple(a for a in ARTIFACTS if a != QUANTIZER_FILE)
    return ARTIFACTS


def require_prepared(prepared: str | Path, hint: str = "") -> Path:
    """The absolute path of a prepared dataset, or a ConfigError that says how to make one (`hint` appended)."""
    path = Path(prepared).expanduser().resolve()
    if not (path / SPLIT_FILE).is_file():
        raise ConfigError(f"no prepared dataset at {path}: run `nezha prepare --out {prepared}` first{hint}")
    return path


def load_prepared(out_dir: str | Path) -> tuple[Catalog, Split, ResidualQuantizer | None]:
    """Catalog, split and quantizer of a prepared directory. The quantizer is None when the IDs came from a
    file (`--semantic-ids`): such a dataset cannot give new items IDs from their text."""
    out = Path(out_dir)
    present = artifacts(read_summary(out))
    missing = [a for a in (SUMMARY_FILE, *present) if not (out / a).exists()]
    if missing:
        raise DataError(f"{out} is not a prepared directory (missing {missing}); run `nezha prepare --out {out}` first")
    quantizer = ResidualQuantizer.load(out / QUANTIZER_FILE) if QUANTIZER_FILE in present else None
    return Catalog.load(out / CATALOG_DIR), Split.load(out / SPLIT_FILE), quantizer
