"""The `nezha export` folder format, and reading such a folder back (the writer is nezha/export.py).

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
import string
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from nezha.model.model import DTYPES, ModelConfig, NezhaModel
from nezha.model.tokens import TokenLayout

EXPORT_FORMAT = "hf-export"
META = "nezha.json"  # the same name as a checkpoint's metadata: `read_meta` finds both
HEADS = "nezha_heads.safetensors"
TOKENS = "added_tokens.json"


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
    config = ModelConfig(**meta["model"])
    if dtype is not None:
        config.dtype = dtype
    backbone = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[config.dtype])
    model = NezhaModel(backbone, TokenLayout(int(meta["base_vocab"]), tuple(config.codebook_sizes)), config)
    load_heads(model, path)
    return model.to(device).eval()
