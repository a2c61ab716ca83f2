"""Hugging Face export of a nezha checkpoint, and loading an exported folder back.

    nezha export --checkpoint runs/train/best --out runs/hf/nezha-beauty

The folder is a plain Hugging Face causal LM (`config.json` + safetensors from `save_pretrained`, its
vocabulary already extended by our tokens), which `transformers.AutoModelForCausalLM.from_pretrained`
loads, plus what only nezha reads:

- `added_tokens.json`: the name -> id of every token nezha added (semantic-ID codes `<a_12>`, `<b_3>`, ...
  with the level as the letter, the placeholders `<SP_1>`..`<SP_L>`, the padding token);
- `nezha_heads.safetensors`: the draft head and the MTP heads;
- `nezha.json`: the model config and token layout (and the training metadata of the source checkpoint);
- `catalog/`: the item catalog of the source checkpoint, when it has one.

`nezha.model.checkpoint.load_checkpoint` loads such a folder (evaluation, serving), and
`--backbone FOLDER` starts a new fine-tuning from it (heads included where they fit).
"""

from __future__ import annotations

import json
import logging
import shutil
import string
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from nezha.config import ConfigError
from nezha.model.tokens import TokenLayout

log = logging.getLogger(__name__)

EXPORT_FORMAT = "hf-export"
META = "nezha.json"  # the same name as a checkpoint's metadata: `read_meta` finds both
HEADS = "nezha_heads.safetensors"
TOKENS = "added_tokens.json"


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


def token_names(layout: TokenLayout) -> dict[str, int]:
    """Name -> id of the tokens nezha adds (the TIGER/LETTER spelling of semantic-ID codes)."""
    if layout.levels > len(string.ascii_lowercase):
        raise ValueError(f"{layout.levels} levels: token names have one letter per level")
    names = {f"<{string.ascii_lowercase[level]}_{code}>": layout.code_offset(level) + code
             for level, size in enumerate(layout.sizes) for code in range(size)}
    names.update({f"<SP_{level + 1}>": layout.placeholder(level) for level in range(layout.levels)})
    names["<nezha_pad>"] = layout.pad
    return names


def is_export(path: str | Path) -> bool:
    meta = Path(path) / META
    return meta.is_file() and json.loads(meta.read_text()).get("format") == EXPORT_FORMAT


def export_checkpoint(cfg: ExportConfig) -> Path:
    """Write the Hugging Face folder of `cfg.checkpoint`; returns it."""
    from nezha.model.checkpoint import load_checkpoint, read_meta

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


def load_heads(model: torch.nn.Module, path: str | Path, strict: bool = True) -> list[str]:
    """Load the exported heads into `model`; returns the heads loaded. Not strict: only the tensors whose
    name and shape the model has (a fine-tuning may train other objectives than the export had)."""
    saved = load_file(str(Path(path) / HEADS), device=str(next(model.parameters()).device))
    own = model.state_dict()
    if strict:
        expected = {k for k in own if not k.startswith("backbone.")}
        if set(saved) != expected:
            raise ValueError(f"{path / HEADS}: heads {sorted(set(saved) ^ expected)} differ from the model's")
    usable = {k: v for k, v in saved.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(usable, strict=False)
    return sorted({k.split(".")[0] for k in usable})


def load_exported(path: str | Path, meta: dict[str, Any], device: str | torch.device = "cpu",
                  dtype: str | None = None) -> torch.nn.Module:
    """The NezhaModel of an exported folder (`load_checkpoint` calls this for one)."""
    from transformers import AutoModelForCausalLM

    from nezha.model.model import DTYPES, ModelConfig, NezhaModel

    config = ModelConfig(**meta["model"])
    if dtype is not None:
        config.dtype = dtype
    backbone = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[config.dtype])
    model = NezhaModel(backbone, TokenLayout(int(meta["base_vocab"]), tuple(config.codebook_sizes)), config)
    load_heads(model, path)
    return model.to(device).eval()
