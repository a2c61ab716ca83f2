"""Throughput and memory of DeepSpeed ZeRO training steps on one device, without Ray.

Sizes a GPU before a cluster run: a random-init backbone preset (weights do not change speed or memory)
with every head, Beauty-shaped synthetic batches (histories of 20 items from 12,035 unique 3x256 IDs),
and the same `DeepSpeedStepper` (train/steppers.py) and DeepSpeed config as `train/run.py`. It prints one
JSON line (tokens/s, examples/s, step time, peak memory) and writes it with --json.

    python train/zero_probe.py --backbone 1b --batch-size 32 --zero-stage 2 --steps 20 --json OUT.json
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):  # `python train/zero_probe.py`: make the `train` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nezha.catalog import Catalog  # noqa: E402
from nezha.config import parse_config  # noqa: E402
from nezha.model.checkpoint import create_model  # noqa: E402
from nezha.training import make_batch  # noqa: E402
from nezha.verify import random_packed_ids, unpack  # noqa: E402
from train.config import RayTrainConfig  # noqa: E402
from train.steppers import DeepSpeedStepper, use_interpreter_tools  # noqa: E402


@dataclass
class ZeroProbeConfig:
    """Time DeepSpeed ZeRO training steps of a preset backbone on one device."""

    backbone: str = field(default="1b", metadata={"help": "preset: tiny, small, 30m, 0.6b, 1b, 3b"})
    objectives: list[str] = field(default_factory=lambda: ["nezha", "lm", "mtp"])
    batch_size: int = 32
    history: int = field(default=20, metadata={"help": "items per history"})
    zero_stage: int = 2
    offload_optimizer: bool = False
    gradient_checkpointing: bool = False
    torch_adam: bool = field(default=False, metadata={"help": "torch's AdamW instead of DeepSpeed's fused Adam"})
    dtype: str = field(default="bfloat16", metadata={"help": "bfloat16 on GPUs; float32 on CPUs"})
    steps: int = field(default=20, metadata={"help": "timed steps"})
    warmup: int = field(default=3, metadata={"help": "untimed steps first"})
    seed: int = 0
    json: str | None = None


def run_probe(cfg: ZeroProbeConfig) -> dict[str, object]:
    use_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if use_gpu else "cpu")
    use_interpreter_tools()  # the ninja that Ray workers build DeepSpeed's ops with: one build cache for both
    # One process is a world of one; DeepSpeed still wants the usual torch.distributed variables.
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "29511"}.items():
        os.environ.setdefault(key, value)
    train_cfg = RayTrainConfig(backbone=cfg.backbone, objectives=list(cfg.objectives), dtype=cfg.dtype,
                               batch_size=cfg.batch_size, use_gpu=use_gpu, zero_stage=cfg.zero_stage,
                               offload_optimizer=cfg.offload_optimizer, torch_adam=cfg.torch_adam,
                               gradient_checkpointing=cfg.gradient_checkpointing)
    rng = np.random.default_rng(cfg.seed)
    sizes = (256, 256, 256)
    packed = random_packed_ids(12_035, sizes, rng)
    catalog = Catalog([f"I{i}" for i in range(len(packed))], unpack(packed, sizes), sizes, [""] * len(packed))
    model = create_model(train_cfg.model_config(sizes), seed=cfg.seed).to(device)
    if cfg.gradient_checkpointing:
        model.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    parameters = sum(p.numel() for p in model.parameters())
    total = cfg.warmup + cfg.steps
    started = time.perf_counter()
    stepper = DeepSpeedStepper(model, train_cfg, total_steps=total, rank=0, world_size=1)
    init_s = time.perf_counter() - started
    model.to("cpu")  # the engine trains its own copy; this one is only validated in real runs

    def batch() -> tuple[dict[str, torch.Tensor], int]:
        histories = [rng.choice(len(packed), cfg.history, replace=False) for _ in range(cfg.batch_size)]
        targets = rng.integers(0, len(packed), cfg.batch_size)
        tensors = make_batch(stepper.engine.module, catalog, histories, targets, device)
        tokens = sum(int(v.sum()) for k, v in tensors.items() if k.endswith("_mask"))
        return tensors, tokens

    if use_gpu:
        torch.cuda.reset_peak_memory_stats()
    times, tokens_seen, losses = [], 0, []
    for step in range(total):
        tensors, tokens = batch()  # built (and copied to the device) before the clock starts
        if use_gpu:
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = stepper.forward(tensors)["loss"]
        stepper.backward_and_step(loss)
        if use_gpu:
            torch.cuda.synchronize()
        if step >= cfg.warmup:
            times.append(time.perf_counter() - start)
            tokens_seen += tokens
        losses.append(float(loss.detach()))
    # DeepSpeed created it; leave the process as it found it. DeepSpeed's own destroy also drops the groups it
    # cached (a clone of the world): torch's alone left them stale for the next engine in this process.
    import deepspeed.comm  # already loaded by the stepper

    deepspeed.comm.destroy_process_group()
    elapsed = sum(times)
    report: dict[str, object] = {
        "config": dataclasses.asdict(cfg),
        "device": torch.cuda.get_device_name() if use_gpu else "cpu",
        "torch": torch.__version__,
        "parameters": parameters,
        "deepspeed_init_s": round(init_s, 2),
        "step_ms_p50": round(float(np.median(times)) * 1000, 2),
        "tokens_per_s": round(tokens_seen / elapsed, 1),
        "examples_per_s": round(cfg.batch_size * len(times) / elapsed, 2),
        "tokens_per_step": tokens_seen // max(1, len(times)),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if use_gpu else None,
        "device_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if use_gpu else None,
        "loss_first_last": [round(losses[0], 4), round(losses[-1], 4)],
    }
    return report


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    cfg = parse_config(ZeroProbeConfig, argv)
    report = run_probe(cfg)
    line = json.dumps(report)
    print(line)
    if cfg.json:
        Path(cfg.json).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.json).write_text(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
