"""The tied draft head under the DeepSpeed stepper (a world of one in this process): ZeRO-2 trains the
deep-copied model with the ties intact, ZeRO-3 is refused with a clear error."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from redis_fixtures import free_port

from nezha.config import ConfigError
from nezha.model.checkpoint import create_model
from nezha.model.tokens import build_prompts
from train.config import RayTrainConfig
from train.steppers import DeepSpeedStepper, use_interpreter_tools

SIZES = (5, 6, 7)


@pytest.fixture
def world_of_one(monkeypatch):
    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("PATH", os.environ["PATH"])  # restored afterwards: use_interpreter_tools changes it
    use_interpreter_tools()
    yield
    if torch.distributed.is_initialized():
        # DeepSpeed created it; leave the process as it found it. DeepSpeed's own destroy also drops the groups it
        # cached (a clone of the world): torch's alone left them stale for the next engine in this process.
        import deepspeed.comm  # already loaded by the stepper
        deepspeed.comm.destroy_process_group()


def _config(**overrides) -> RayTrainConfig:
    return RayTrainConfig(backbone="tiny", objectives=["nezha"], dtype="float32", batch_size=4, lr=1e-2,
                          warmup_ratio=0.0, use_gpu=False, torch_adam=True, tie_draft_embeddings=True,
                          tie_draft_heads=True, **overrides)


def test_zero2_trains_the_tied_rows_of_its_own_copy(world_of_one):
    cfg = _config(zero_stage=2)
    model = create_model(cfg.model_config(SIZES))
    stepper = DeepSpeedStepper(model, cfg, total_steps=5, rank=0, world_size=1)
    trained = stepper.engine.module
    vocab = trained.backbone.get_input_embeddings().weight
    level2 = trained.layout.code_offset(2)
    assert trained.draft_head.head_weight(2).data_ptr() == vocab[level2].data_ptr()
    rng = np.random.default_rng(0)
    ids, mask = build_prompts(trained.layout, [rng.integers(0, 5, (3, 3)) for _ in range(4)], True)
    batch = {"targets": torch.from_numpy(rng.integers(0, 5, (4, 3))), "draft_input_ids": ids, "draft_mask": mask}
    unseen = [level2 + 5, level2 + 6]  # in no prompt: only the tied level-2 logit head gives them a gradient
    before = vocab[unseen].detach().clone()
    for _ in range(2):  # transformers' warm-up schedule starts at lr 0
        stepper.backward_and_step(stepper.forward(batch)["loss"])
    after = trained.backbone.get_input_embeddings().weight[unseen].detach()
    assert not torch.allclose(after, before)


def test_zero3_is_refused(world_of_one):
    cfg = _config(zero_stage=3)
    with pytest.raises(ConfigError, match="ZeRO stage 3"):
        DeepSpeedStepper(create_model(cfg.model_config(SIZES)), cfg, total_steps=5, rank=0, world_size=1)
