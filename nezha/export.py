"""Hugging Face export of a nezha checkpoint (the folder format and its reader: nezha/model/hf_export.py).

    nezha export --checkpoint runs/train/best --out runs/hf/nezha-beauty
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from safetensors.torch import save_file

from nezha.config import ConfigError
from nezha.model.checkpoint import load_checkpoint, read_meta
from nezha.model.hf_export import EXPORT_FORMAT, HEADS, META, TOKENS, token_names

log = logging.getLogger(__name__)


@dataclass
class ExportConfig:
    """Export a nezha checkpoint as a Hugging Face model folder (+ the draft/MTP heads beside it)."""

    checkpoint: str = field(default="runs/train/best", metadata={"help": "a nezha checkpoint folder"})
    out: str = field(default="runs/hf", metadata={"help": "the Hugging Face folder to write"})
    overwrite: bool = field(default=False, metadata={"help": "replace OUT when it exists"})

    def __post_init__(self) -> None:
        if not self.checkpoint:
            raise ConfigError("checkpoint: give the nezha checkpoint folder to export")
        if not self.out:
            raise ConfigError("out: give the folder to write")


def export_checkpoint(cfg: ExportConfig) -> Path:
    """Write the Hugging Face folder of `cfg.checkpoint`; returns it."""
    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise ConfigError(f"out: {out} exists and is not empty (pass --overwrite true to replace it)")
    source = read_meta(cfg.checkpoint)
    model = load_checkpoint(cfg.checkpoint)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.backbone.save_pretrained(tmp, safe_serialization=True)
    heads = {k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("backbone.")}
    save_file(heads, str(tmp / HEADS))
    (tmp / TOKENS).write_text(json.dumps(token_names(model.layout), indent=1))
    meta = {"format": EXPORT_FORMAT, "model": asdict(model.config), "base_vocab": model.layout.base_vocab,
            "source_checkpoint": str(Path(cfg.checkpoint).resolve()), "extra": source.get("extra", {})}
    (tmp / META).write_text(json.dumps(meta, indent=2, default=str))
    catalog = Path(cfg.checkpoint) / "catalog"
    if catalog.is_dir():
        shutil.copytree(catalog, tmp / "catalog")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    log.info("exported %s to %s (%d added tokens, heads: %s)", cfg.checkpoint, out, len(token_names(model.layout)),
             ", ".join(sorted({k.split(".")[0] for k in heads})) or "none")
    return out
