"""The DeepSpeed JSON config: generated from the run's config, or the user's ds_config.json with its "auto"
values filled from it (the Hugging Face convention). Pure functions, testable without a GPU."""

from __future__ import annotations

import copy
from typing import Any

ZERO_STAGES = (0, 1, 2, 3)
AUTO = "auto"
# Keys the training config decides: a ds_config.json may leave them out or say "auto"; any other value
# must agree with the training config, or the run would silently train with two different settings.
DECIDED_BY_TRAINING = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
                       "gradient_clipping", "bf16.enabled", "fp16.enabled", "optimizer.params.lr",
                       "optimizer.params.weight_decay")


class DeepSpeedConfigError(ValueError):
    pass


def deepspeed_config(*, batch_size: int, lr: float, weight_decay: float, grad_clip: float, dtype: str,
                     zero_stage: int = 2, offload_optimizer: bool = False, offload_param: bool = False,
                     use_gpu: bool = False, world_size: int = 1, torch_adam: bool = False,
                     gradient_accumulation_steps: int = 1) -> dict[str, Any]:
    """ZeRO data parallelism with AdamW from the config; `gradient_accumulation_steps` micro-batches of
    `batch_size` per rank between optimiser steps.

    The per-group learning rates (embeddings, heads, backbone) come from the parameter groups passed to
    `deepspeed.initialize`; `lr` here is only the default for a group without one.
    """
    if zero_stage not in ZERO_STAGES:
        raise ValueError(f"zero_stage must be one of {ZERO_STAGES}, got {zero_stage}")
    if offload_optimizer and zero_stage == 0:
        raise ValueError("offload_optimizer needs ZeRO stage 1, 2 or 3")
    if offload_param and zero_stage != 3:
        raise ValueError("offload_param needs ZeRO stage 3 (only stage 3 partitions the weights)")
    if gradient_accumulation_steps < 1:
        raise ValueError(f"gradient_accumulation_steps must be >= 1, got {gradient_accumulation_steps}")
    zero: dict[str, Any] = {
        "stage": zero_stage,
        "contiguous_gradients": True,
        # Overlapping the gradient reduction with backward needs CUDA streams; on the CPU it only adds copies.
        "overlap_comm": use_gpu,
        "reduce_bucket_size": 5e7,
    }
    if zero_stage in (1, 2):
        zero["allgather_bucket_size"] = 5e7
    if zero_stage == 3:
        zero.update({
            # Full 16-bit weights on save: `engine.save_16bit_model` and consolidated state dicts work.
            "stage3_gather_16bit_weights_on_model_save": True,
            "stage3_prefetch_bucket_size": 5e7,
            "stage3_param_persistence_threshold": 1e5,
        })
    if offload_optimizer:
        # Adam moments and fp32 master weights in pinned host memory; DeepSpeedCPUAdam steps them.
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": use_gpu}
    if offload_param:
        # ZeRO-3 keeps each rank's weight partition in host memory and fetches layers as they run.
        zero["offload_param"] = {"device": "cpu", "pin_memory": use_gpu}
    return {
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps,
        "train_batch_size": batch_size * world_size * gradient_accumulation_steps,
        "gradient_clipping": grad_clip,
        "bf16": {"enabled": dtype == "bfloat16"},
        "fp16": {"enabled": dtype == "float16"},
        "zero_optimization": zero,
        # torch_adam: torch's AdamW instead of DeepSpeed's fused CUDA kernel, which is compiled (nvcc, minutes)
        # on first use where the DeepSpeed install has no prebuilt ops.
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "weight_decay": weight_decay,
                                                   "betas": [0.9, 0.999], "eps": 1e-8, "torch_adam": torch_adam}},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,  # the library logs loss/throughput; DeepSpeed's own step log is noise
        "wall_clock_breakdown": False,
    }


def get_path(config: dict[str, Any], dotted: str) -> Any:
    """config["a"]["b"] for "a.b"; None where a key is missing."""
    for key in dotted.split("."):
        if not isinstance(config, dict) or key not in config:
            return None
        config = config[key]
    return config


def leaf_paths(config: dict[str, Any], prefix: str = "") -> list[str]:
    """The dotted path of every non-dict value."""
    paths = []
    for key, value in config.items():
        path = f"{prefix}{key}"
        paths += leaf_paths(value, path + ".") if isinstance(value, dict) else [path]
    return paths


def set_path(config: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        config = config.setdefault(key, {})
    config[last] = value


def merge_user_config(user: dict[str, Any], generated: dict[str, Any], schedule: dict[str, Any]) -> dict[str, Any]:
    """The user's DeepSpeed config with every "auto" filled from the training config.

    `generated` is `deepspeed_config(...)` for this run: it fills "auto" anywhere it has the same key (batch
    sizes, clipping, precision, optimiser params, ZeRO bucket sizes) and supplies the keys DECIDED_BY_TRAINING
    and the optimizer when the file has none. `schedule` fills "auto" under "scheduler.params" (warm-up and
    total optimiser steps, peak lr). A value that contradicts the training config is an error naming the key.
    """
    merged = copy.deepcopy(user)
    for path in leaf_paths(user):
        value = get_path(user, path)
        ours = get_path(generated, path)
        if path.startswith("scheduler.params."):
            ours = schedule.get(path.removeprefix("scheduler.params."))
        if value == AUTO:
            if ours is None:
                raise DeepSpeedConfigError(f'{path}: "auto" but the training config has no value for it; '
                                           "write the value into the file")
            set_path(merged, path, ours)
        elif path in DECIDED_BY_TRAINING and value != ours:
            raise DeepSpeedConfigError(f"{path}: the file says {value!r} but the training config gives {ours!r}; "
                                       'set it to "auto" or change the training config to match')
    for path in DECIDED_BY_TRAINING:
        if get_path(merged, path) is None and get_path(generated, path) is not None:
            set_path(merged, path, get_path(generated, path))
    if "optimizer" not in merged:
        merged["optimizer"] = copy.deepcopy(generated["optimizer"])
    stage = get_path(merged, "zero_optimization.stage")
    if stage is not None and stage not in ZERO_STAGES:
        raise DeepSpeedConfigError(f"zero_optimization.stage: must be one of {ZERO_STAGES}, got {stage!r}")
    return merged
