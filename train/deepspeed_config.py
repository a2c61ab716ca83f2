"""The DeepSpeed JSON config, generated from the run's config (a pure function, testable without a GPU)."""

from __future__ import annotations

from typing import Any

ZERO_STAGES = (0, 1, 2, 3)


def deepspeed_config(*, batch_size: int, lr: float, weight_decay: float, grad_clip: float, dtype: str,
                     zero_stage: int = 2, offload_optimizer: bool = False, use_gpu: bool = False,
                     world_size: int = 1, torch_adam: bool = False) -> dict[str, Any]:
    """ZeRO data parallelism with AdamW from the config; one micro-batch of `batch_size` per rank and step.

    The per-group learning rates (embeddings, heads, backbone) come from the parameter groups passed to
    `deepspeed.initialize`; `lr` here is only the default for a group without one.
    """
    if zero_stage not in ZERO_STAGES:
        raise ValueError(f"zero_stage must be one of {ZERO_STAGES}, got {zero_stage}")
    if offload_optimizer and zero_stage == 0:
        raise ValueError("offload_optimizer needs ZeRO stage 1, 2 or 3")
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
    return {
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": batch_size * world_size,
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
