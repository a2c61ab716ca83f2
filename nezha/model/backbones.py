"""Backbones: named random-init shapes (for tests, the CPU quickstart and latency benchmarks) or a local
Hugging Face checkpoint directory (real weights; nothing is downloaded)."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from nezha.model.hf_export import META, is_export

# Shapes of the models the paper and users run; weights do not change latency, so random init is
# enough for benchmarks. base_vocab keeps the real vocabulary size so the LM head costs what it costs.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, base_vocab=0),
    "small": dict(model_type="llama", hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, base_vocab=0),
    "30m": dict(model_type="llama", hidden_size=512, intermediate_size=1792, num_hidden_layers=8,
                num_attention_heads=8, num_key_value_heads=4, base_vocab=0),
    "qwen-tiny": dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, base_vocab=0),
    "0.6b": dict(model_type="qwen3", hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=128, base_vocab=151936,
                 tie_word_embeddings=True),
    "1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, base_vocab=128256, tie_word_embeddings=True),
    "3b": dict(model_type="llama", hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
               num_attention_heads=24, num_key_value_heads=8, base_vocab=128256, tie_word_embeddings=True),
}


class BackboneError(ValueError):
    pass


def preset_config(name: str, num_new_tokens: int, pad_token: int | None = None) -> tuple[Any, int]:
    """(HF config, base_vocab) of a preset, its vocabulary extended by our tokens."""
    spec = dict(PRESETS[name])
    model_type = spec.pop("model_type")
    base_vocab = spec.pop("base_vocab")
    vocab = base_vocab + num_new_tokens
    pad = vocab - 1 if pad_token is None else pad_token
    config = AutoConfig.for_model(model_type, vocab_size=vocab, max_position_embeddings=2048,
                                  bos_token_id=pad, eos_token_id=pad, pad_token_id=pad,
                                  tie_word_embeddings=spec.pop("tie_word_embeddings", False), **spec)
    return config, base_vocab


def build_backbone(spec: str, num_new_tokens: int, dtype: torch.dtype = torch.float32,
                   seed: int = 0) -> tuple[PreTrainedModel, int]:
    """(model, base_vocab): a preset name builds a random-init model; a directory loads real weights."""
    if spec in PRESETS:
        config, base_vocab = preset_config(spec, num_new_tokens)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        return model, base_vocab
    path = Path(spec)
    if not path.is_dir() or not (path / "config.json").is_file():
        raise BackboneError(
            f"backbone {spec!r} is neither a preset ({', '.join(PRESETS)}) nor a local Hugging Face "
            "checkpoint directory with a config.json (models are never downloaded at run time)")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    rows = model.get_input_embeddings().weight.shape[0]
    exported_base = exported_base_vocab(path)
    if exported_base is None:
        base_vocab = rows
        model.resize_token_embeddings(base_vocab + num_new_tokens)
    elif rows != exported_base + num_new_tokens:
        # A `nezha export` folder already holds our tokens, for the codebooks it was trained with.
        raise BackboneError(f"backbone {spec!r} is a nezha export with {rows - exported_base} semantic-ID tokens; "
                            f"this dataset's codebooks need {num_new_tokens}")
    else:
        base_vocab = exported_base
    pad = base_vocab + num_new_tokens - 1
    model.config.pad_token_id = pad
    model.generation_config.pad_token_id = pad
    return model, base_vocab


def exported_base_vocab(path: Path) -> int | None:
    """The base vocabulary of a `nezha export` folder (whose embeddings already hold our tokens), else None."""
    if not is_export(path):
        return None
    return int(json.loads((path / META).read_text())["base_vocab"])


def backbone_from_config(config_dict: dict[str, Any], dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """An empty backbone of a saved checkpoint's architecture (weights are loaded afterwards)."""
    config_dict = dict(config_dict)
    model_type = config_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **config_dict)
    return AutoModelForCausalLM.from_config(config, dtype=dtype)


def with_cache(module: torch.nn.Module, cache: Any) -> dict[str, Any]:
    """The keyword argument that hands a KV cache to `module.forward`: `cache` where the installed
    transformers names it so (the old `past_key_values` warns there and is going away), else `past_key_values`
    (the releases before the rename, which pyproject still allows)."""
    name = "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"
    return {name: cache}
