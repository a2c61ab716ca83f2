"""The learning-rate multipliers change the size of each group's AdamW step by what the config says."""

import numpy as np
import pytest
import torch

from nezha.config import ConfigError
from nezha.model.checkpoint import create_model
from nezha.model.tokens import build_prompts
from nezha.training import TorchStepper, TrainConfig

SIZES = [4, 4, 4]


def _batch(model, rng):
    layout = model.layout
    histories = [rng.integers(0, 4, (n, 3)) for n in (2, 3, 5, 1)]
    targets = rng.integers(0, 4, (4, 3))
    draft_ids, draft_mask = build_prompts(layout, histories, True)
    lm_ids, lm_mask = build_prompts(layout, histories, False, suffix=layout.codes_to_tokens(targets))
    return {"targets": torch.from_numpy(targets), "draft_input_ids": draft_ids, "draft_mask": draft_mask,
            "lm_input_ids": lm_ids, "lm_mask": lm_mask}


def _largest_step_per_group(embedding_lr_mult: float, head_lr_mult: float) -> dict[str, float]:
    cfg = TrainConfig(backbone="tiny", objectives=["joint", "mtp"], lr=1e-3, grad_clip=0.0, warmup_ratio=0.0,
                      embedding_lr_mult=embedding_lr_mult, head_lr_mult=head_lr_mult)
    model = create_model(cfg.model_config(SIZES), seed=0)
    stepper = TorchStepper(model, cfg, total_steps=10)
    before = {id(p): p.detach().clone() for p in model.parameters()}
    stepper.backward_and_step(stepper.forward(_batch(model, np.random.default_rng(0)))["loss"])
    # AdamW's first step moves every weight with a gradient by lr x sign(gradient): the largest move of a
    # group is its learning rate.
    return {g["name"]: max(float((p.detach() - before[id(p)]).abs().max()) for p in g["params"])
            for g in stepper.optimizer.param_groups}


def test_the_multipliers_scale_each_groups_step():
    plain = _largest_step_per_group(1.0, 1.0)
    assert plain == pytest.approx({"backbone": 1e-3, "embeddings": 1e-3, "heads": 1e-3}, rel=1e-3)
    paper = _largest_step_per_group(100.0, 10.0)
    assert paper == pytest.approx({"backbone": 1e-3, "embeddings": 0.1, "heads": 1e-2}, rel=1e-3)


@pytest.mark.parametrize("name", ["embedding_lr_mult", "head_lr_mult", "lr"])
def test_a_rate_must_be_positive(name):
    with pytest.raises(ConfigError, match=f"{name}: must be > 0"):
        TrainConfig(**{name: 0.0})


def test_a_deepspeed_scheduler_that_would_drop_the_multipliers_is_refused():
    from train.config import RayTrainConfig, build_deepspeed_config

    with_scheduler = {"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": "auto",
                                                                    "warmup_max_lr": "auto"}}}
    plain = RayTrainConfig(batch_size=16, dtype="float32", use_gpu=False)
    assert "scheduler" in build_deepspeed_config(plain, 2, 100, with_scheduler)
    paper = RayTrainConfig(batch_size=16, dtype="float32", use_gpu=False, embedding_lr_mult=100.0, head_lr_mult=10.0)
    with pytest.raises(ConfigError, match="would drop embedding_lr_mult / head_lr_mult"):
        build_deepspeed_config(paper, 2, 100, with_scheduler)
    assert "scheduler" not in build_deepspeed_config(paper, 2, 100, None)  # transformers' schedule keeps them
    tied = RayTrainConfig(batch_size=16, dtype="float32", use_gpu=False, tie_draft_heads=True, zero_stage=3)
    with pytest.raises(ConfigError, match="ZeRO stage 3"):
        build_deepspeed_config(tied, 2, 100, None)
