"""Checkpoints: `model.safetensors` + `nezha.json` (+ a copy of the catalog). Loading never unpickles."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from nezha.model.backbones import BackboneError, backbone_from_config, build_backbone
from nezha.model.hf_export import EXPORT_FORMAT, is_export, load_exported, load_heads
from nezha.model.model import DTYPES, ModelConfig, NezhaModel
from nezha.model.tokens import TokenLayout

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
META = "nezha.json"


class CheckpointError(ValueError):
    pass


def create_model(config: ModelConfig, seed: int = 0) -> NezhaModel:
    """A fresh model: a preset (random init) or local-path backbone with our tokens added."""
    sizes = tuple(config.codebook_sizes)
    num_new = TokenLayout(0, sizes).num_new_tokens
    backbone, base_vocab = build_backbone(config.backbone, num_new, DTYPES[config.dtype], seed=seed)
    torch.manual_seed(seed + 1)
    model = NezhaModel(backbone, TokenLayout(base_vocab, sizes), config)
    if is_export(config.backbone):
        # Fine-tuning a `nezha export` folder: its heads too, wherever this model has the same ones.
        loaded = load_heads(model, config.backbone, strict=False)
        log.info("loaded the exported heads %s of %s", ", ".join(loaded) or "(none match)", config.backbone)
    return model


def save_checkpoint(model: NezhaModel, out_dir: str | Path, catalog_dir: str | Path | None = None,
                    extra: dict[str, Any] | None = None) -> Path:
    """Write weights + config atomically enough for readers: a temp dir renamed over the target."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / WEIGHTS))
    backbone_config = model.backbone.config.to_dict()
    meta = {
        "format": 1,
        "weights_sha256": _sha256(tmp / WEIGHTS),
        "model": asdict(model.config),
        "base_vocab": model.layout.base_vocab,
        "backbone_config": backbone_config,
        "extra": extra or {},
    }
    (tmp / META).write_text(json.dumps(meta, indent=2, default=str))
    if catalog_dir is not None:
        shutil.copytree(catalog_dir, tmp / "catalog")
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_meta(path: str | Path) -> dict[str, Any]:
    """The metadata of a checkpoint or of a `nezha export` folder (whose weights are Hugging Face's files)."""
    path = Path(path)
    meta_path = path / META
    not_a_checkpoint = CheckpointError(f"{path} is not a nezha checkpoint (needs {META} and {WEIGHTS}); "
                                       "train one with `nezha train` or `nezha quickstart`")
    if not meta_path.is_file():
        raise not_a_checkpoint
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{meta_path} is corrupted: {exc}") from None
    if meta.get("format") != EXPORT_FORMAT and not (path / WEIGHTS).is_file():
        raise not_a_checkpoint
    return meta


def prepared_dir_of(checkpoint: str | Path) -> Path | None:
    """The prepared dataset a checkpoint was trained on (recorded at training time), or None."""
    prepared = read_meta(checkpoint).get("extra", {}).get("prepared")
    return Path(prepared) if prepared else None


def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint's metadata, after checking its weights against the checksum saved with them."""
    path = Path(path)
    meta = read_meta(path)
    # safetensors notices a truncated file but not flipped bytes inside a tensor: the checksum does.
    expected = meta.get("weights_sha256")
    if expected is not None and _sha256(path / WEIGHTS) != expected:
        raise CheckpointError(f"{path / WEIGHTS} is corrupted: its SHA-256 differs from the one in {META}")
    return meta


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu",
                    dtype: str | None = None) -> NezhaModel:
    path = Path(path)
    meta = verify_checkpoint(path)
    try:
        if meta.get("format") == EXPORT_FORMAT:
            return load_exported(path, meta, device, dtype)
        config = ModelConfig(**meta["model"])
        if dtype is not None:
            config.dtype = dtype
        backbone = backbone_from_config(meta["backbone_config"], DTYPES[config.dtype])
        model = NezhaModel(backbone, TokenLayout(int(meta["base_vocab"]), tuple(config.codebook_sizes)), config)
        load_model(model, str(path / WEIGHTS), strict=True, device=str(device))
    except (KeyError, TypeError, ValueError, BackboneError, SafetensorError, RuntimeError, OSError) as exc:
        raise CheckpointError(f"cannot load checkpoint {path}: {type(exc).__name__}: {exc}") from None
    return model.to(device).eval()
