"""train/ (run.py and its modules): the DeepSpeed config (generated or the user's JSON), the resolved run config, and 2-worker
Ray Train jobs on the CPU.

The jobs run DeepSpeed ZeRO-2 over gloo in two Ray workers on the tiny dataset: one end to end (full-state
checkpoints, the best model scores what was measured), then one whose rank 1 fails after step 25, which
Ray restarts from the step-20 state and which ends where the uninterrupted one did. The multi-node runs
are in test_train_cluster.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from redis_fixtures import free_port
from train_fixtures import assert_checkpoint_learned

from nezha.config import ConfigError, parse_config
from nezha.evaluation import rank_examples
from nezha.metrics import hit_ndcg
from nezha.model.checkpoint import load_checkpoint
from nezha.prepared import load_prepared
from nezha.training import LoopState, Plan, steps_per_epoch, train
from train.config import RayTrainConfig, build_deepspeed_config, resolve_config
from train.deepspeed_config import deepspeed_config, get_path, leaf_paths
from train.run import run, summary_line
from train.state import load_full_state, save_full_state
from train.steppers import TorchStateStepper
from train.zero_probe import main as zero_probe_main

REPO = Path(__file__).resolve().parents[1]


def ds(**overrides: Any) -> dict[str, Any]:
    args: dict[str, Any] = dict(batch_size=32, lr=1e-5, weight_decay=0.0, grad_clip=1.0, dtype="float32")
    return deepspeed_config(**{**args, **overrides})


def test_deepspeed_config_defaults_to_zero2_with_one_micro_batch_per_rank():
    config = ds(world_size=4)
    assert config["zero_optimization"]["stage"] == 2
    assert "offload_optimizer" not in config["zero_optimization"]
    assert config["train_micro_batch_size_per_gpu"] == 32
    assert config["gradient_accumulation_steps"] == 1
    assert config["train_batch_size"] == 128
    assert config["gradient_clipping"] == 1.0
    assert config["optimizer"]["type"] == "AdamW" and config["optimizer"]["params"]["lr"] == 1e-5
    assert not config["bf16"]["enabled"] and not config["fp16"]["enabled"]
    assert not config["zero_optimization"]["overlap_comm"]  # CPU: no CUDA streams to overlap with
    assert config["optimizer"]["params"]["torch_adam"] is False  # DeepSpeed's fused Adam where it has one
    assert ds(torch_adam=True)["optimizer"]["params"]["torch_adam"] is True


def test_deepspeed_config_for_3b_on_gpus_zero3_offload_bf16():
    config = ds(zero_stage=3, offload_optimizer=True, use_gpu=True, dtype="bfloat16")
    zero = config["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert zero["stage3_gather_16bit_weights_on_model_save"]
    assert zero["overlap_comm"]
    assert config["bf16"]["enabled"] and not config["fp16"]["enabled"]


@pytest.mark.parametrize("overrides", [dict(zero_stage=4), dict(zero_stage=0, offload_optimizer=True)])
def test_deepspeed_config_rejects_impossible_settings(overrides):
    with pytest.raises(ValueError):
        ds(**overrides)


def test_deepspeed_config_accumulates_gradients_and_offloads_zero3_weights():
    config = ds(world_size=2, gradient_accumulation_steps=4, zero_stage=3, offload_param=True, use_gpu=True)
    assert config["gradient_accumulation_steps"] == 4 and config["train_batch_size"] == 32 * 2 * 4
    assert config["zero_optimization"]["offload_param"] == {"device": "cpu", "pin_memory": True}
    with pytest.raises(ValueError, match="offload_param needs ZeRO stage 3"):
        ds(zero_stage=2, offload_param=True)


USER_DS_CONFIG = REPO / "train" / "configs" / "ds_config.json"


def test_users_ds_config_gets_its_auto_values_from_the_training_config():
    """The Hugging Face style ds_config.json: every "auto" filled, every concrete value kept."""
    user = json.loads(USER_DS_CONFIG.read_text())
    cfg = RayTrainConfig(batch_size=16, lr=2e-3, weight_decay=0.01, grad_clip=0.5, dtype="bfloat16",
                         gradient_accumulation_steps=2, warmup_ratio=0.1, use_gpu=False)
    config = build_deepspeed_config(cfg, world_size=2, total_steps=200, user=user)
    assert not [k for k in leaf_paths(config) if get_path(config, k) == "auto"]
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"],
            config["train_batch_size"]) == (16, 2, 64)
    assert config["gradient_clipping"] == 0.5 and config["bf16"]["enabled"] and not config["fp16"]["enabled"]
    assert config["optimizer"]["params"] == {"lr": 2e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01}
    # 200 micro-batch steps = 100 optimiser steps, 10% of them warm-up; the file's own ratios kept.
    assert config["scheduler"] == {"type": "WarmupCosineLR", "params": {
        "warmup_num_steps": 10, "total_num_steps": 100, "warmup_min_ratio": 0.0, "cos_min_ratio": 0.0}}
    zero = config["zero_optimization"]
    assert zero["stage"] == 2 and zero["reduce_bucket_size"] == 5e7 and zero["overlap_comm"] is False
    assert zero["reduce_scatter"] is True  # the file's, not ours


@pytest.mark.parametrize("key, value, message", [
    ("train_micro_batch_size_per_gpu", 8, "train_micro_batch_size_per_gpu: the file says 8 but the training "
                                          "config gives 16"),
    ("gradient_accumulation_steps", 4, "gradient_accumulation_steps: the file says 4"),
    ("optimizer", {"type": "AdamW", "params": {"lr": 0.1}}, "optimizer.params.lr: the file says 0.1"),
    ("bf16", {"enabled": True}, "bf16.enabled: the file says True but the training config gives False"),
    ("zero_optimization", {"stage": 5}, "zero_optimization.stage: must be one of"),
    ("scheduler", {"type": "WarmupLR", "params": {"warmup_type": "auto"}}, 'scheduler.params.warmup_type: "auto" but the training config has no value'),
])
def test_users_ds_config_conflicts_are_errors_naming_the_key(key, value, message):
    user = {**json.loads(USER_DS_CONFIG.read_text()), key: value}
    cfg = RayTrainConfig(batch_size=16, dtype="float32", use_gpu=False)
    with pytest.raises(ConfigError, match="deepspeed_config: " + message):
        build_deepspeed_config(cfg, world_size=2, total_steps=100, user=user)


def test_resolve_config_takes_the_zero_stage_of_the_users_file(tiny_prepared, tmp_path):
    zero3 = tmp_path / "ds.json"
    zero3.write_text(json.dumps({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}},
                                 "train_micro_batch_size_per_gpu": "auto"}))
    cfg = resolve_config(RayTrainConfig(prepared=str(tiny_prepared), storage_path=str(tmp_path),
                                        deepspeed_config=str(zero3)), 0)
    assert cfg.zero_stage == 3
    with pytest.raises(ConfigError, match="deepspeed_config: cannot read"):
        resolve_config(RayTrainConfig(prepared=str(tiny_prepared), deepspeed_config=str(tmp_path / "no.json")), 0)


@pytest.mark.parametrize("overrides, message", [
    (dict(checkpoint_every=3, gradient_accumulation_steps=2), "checkpoint_every: must be a multiple"),
    (dict(gradient_accumulation_steps=2, strategy="ddp"), "gradient_accumulation_steps: only the deepspeed"),
    (dict(checkpoint_every=-1), "checkpoint_every: may not be negative"),
    (dict(num_workers=0), "num_workers: must be >= 1"),
])
def test_ray_train_config_names_the_bad_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        RayTrainConfig(**overrides)


def test_train_configs_parse_and_flags_override():
    cfg = parse_config(RayTrainConfig, ["--config", str(REPO / "train/configs/quickstart.yaml"),
                                        "--num-workers", "1", "--zero-stage", "3", "--use-gpu", "false"])
    assert (cfg.backbone, cfg.num_workers, cfg.zero_stage, cfg.use_gpu) == ("small", 1, 3, False)
    assert cfg.strategy == "deepspeed" and cfg.max_steps == 300


def test_resolve_config_fills_every_auto_value(tiny_prepared, tmp_path):
    _, split, _ = load_prepared(tiny_prepared)
    cfg = resolve_config(RayTrainConfig(prepared=str(tiny_prepared), storage_path=str(tmp_path), batch_size=16), 0)
    assert cfg.use_gpu is False and cfg.dtype == "float32" and cfg.device == "cpu"
    assert cfg.eval_every == steps_per_epoch(len(split.train), 2, 16) == (len(split.train) // 2) // 16
    assert cfg.name.startswith("nezha-") and cfg.out == str(tmp_path / cfg.name)
    assert cfg.checkpoint_every == cfg.eval_every  # a full state at every validation unless told otherwise
    gpu = resolve_config(RayTrainConfig(prepared=str(tiny_prepared), storage_path="s3://bucket/runs", name="x"), 8)
    assert gpu.use_gpu is True and gpu.dtype == "bfloat16" and gpu.storage_path == "s3://bucket/runs"
    assert gpu.out.endswith("runs/ray/x")


@pytest.mark.parametrize("overrides, message", [
    (dict(prepared="/nonexistent/prepared"), "--prepared"),
    (dict(strategy="fsdp"), "strategy"),
    (dict(strategy="none"), "num_workers 1"),
    (dict(use_gpu=True), "GPUs"),
])
def test_resolve_config_errors_say_what_to_do(tiny_prepared, overrides, message):
    with pytest.raises(ConfigError, match=message):  # at construction or when resolved against the cluster
        resolve_config(RayTrainConfig(**{"prepared": str(tiny_prepared), **overrides}), 0)


def test_full_state_resume_mid_epoch_gives_the_uninterrupted_run(tiny_prepared, tmp_path):
    """The library loop with the torch full state (strategy none), no Ray: save after step 7 (mid-epoch 0 of
    8 batches), start a new loop from it, and get the same LR, losses, validations and weights."""
    cfg = RayTrainConfig(prepared=str(tiny_prepared), out=str(tmp_path / "full"), backbone="tiny", max_steps=12,
                         batch_size=16, lr=3e-3, eval_every=6, eval_beam=5, strategy="none", num_workers=1,
                         dtype="float32", device="cpu")
    steppers: list[TorchStateStepper] = []
    lrs: dict[str, list[float]] = {"full": [], "resumed": []}

    def factory(run: str):
        def make(model, plan: Plan) -> TorchStateStepper:
            steppers.append(TorchStateStepper(model, cfg, plan.total_steps, rank=0))
            return steppers[-1]
        return make

    def on_step(run: str):
        def record(state: LoopState) -> None:
            lrs[run].append(steppers[-1].current_lr())
            if run == "full" and state.step == 7:
                assert (state.epoch, state.batch_in_epoch) == (0, 7)
                save_full_state(steppers[-1], tmp_path / "state", 0, state)
        return record

    full = train(cfg, stepper_factory=factory("full"), on_step=on_step("full"))
    resumed = train(dataclasses.replace(cfg, out=str(tmp_path / "resumed")), stepper_factory=factory("resumed"),
                    on_step=on_step("resumed"), resume=lambda: load_full_state(steppers[-1], tmp_path / "state", 0))
    assert lrs["resumed"] == lrs["full"][7:]
    same = ("step", "loss", "hit@10", "ndcg@10")
    assert [{k: h[k] for k in same} for h in resumed.history] == [{k: h[k] for k in same} for h in full.history]
    a, b = weights(full.last_checkpoint), weights(resumed.last_checkpoint)
    assert all(torch.equal(a[k], b[k]) for k in a)

    with pytest.raises(ConfigError, match="resume with the batch size and number of workers"):
        train(dataclasses.replace(cfg, batch_size=32), stepper_factory=factory("other"),
              resume=lambda: load_full_state(steppers[-1], tmp_path / "state", 0))


def job_config(prepared: Path, storage: Path, **overrides: Any) -> RayTrainConfig:
    args: dict[str, Any] = dict(prepared=str(prepared), storage_path=str(storage), name="tiny", backbone="tiny",
                                max_steps=30, batch_size=16, lr=3e-3, eval_every=15, checkpoint_every=10,
                                eval_beam=5, log_every=10, num_workers=2, cpus_per_worker=0.5, keep_checkpoints=2)
    return RayTrainConfig(**{**args, **overrides})


@pytest.fixture(scope="module")
def first_run(ray_session, tiny_prepared: Path, tmp_path_factory: pytest.TempPathFactory
              ) -> tuple[dict[str, Any], Path]:
    storage = tmp_path_factory.mktemp("ray")
    return run(job_config(tiny_prepared, storage)), storage


def weights(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    return dict(load_checkpoint(checkpoint).state_dict())


@pytest.mark.slow
def test_two_worker_deepspeed_job_keeps_full_states_and_the_best_model(first_run, tiny_prepared):
    summary, storage = first_run
    assert [h["step"] for h in summary["history"]] == [15, 30]
    best = max(summary["history"], key=lambda h: h["ndcg@10"])
    assert summary["best_metrics"]["ndcg@10"] == pytest.approx(best["ndcg@10"])
    assert summary["resumed_from"] is None and summary["resumed_step"] is None
    # Full states at 10, 20, 30 (and 15 is a validation without one); the latest two are kept.
    states = sorted(p.name for p in (storage / "tiny").glob("state_step*") if p.is_dir())
    assert states == ["state_step00000020", "state_step00000030"]
    assert summary["latest_state"].endswith("state_step00000030")
    latest = storage / "tiny" / "state_step00000030"
    assert {"loop_rank0.pt", "loop_rank1.pt"} <= {p.name for p in latest.iterdir()}
    assert len(list((latest / "state").glob("*optim_states.pt"))) == 2  # each rank's ZeRO-2 partition
    assert "hit@10" in summary_line(summary) and len(summary["validation_wait_s"]) == 2

    # The best model loads with the library, has lower loss than a fresh model, and scores on the
    # validation split exactly what the sharded validation measured.
    catalog, split, model = assert_checkpoint_learned(summary["best_checkpoint"], tiny_prepared)
    verifier = catalog.verifier()
    ranked, _ = rank_examples(model, "nezha", catalog, verifier, split.valid, beam=5)
    metrics = hit_ndcg(ranked, catalog.packed[split.valid.targets], ks=(1, 5, 10))
    assert metrics["hit@10"] == pytest.approx(best["hit@10"])
    assert metrics["ndcg@10"] == pytest.approx(best["ndcg@10"])
    assert metrics["hit@10"] > 10 / catalog.num_items  # better than a random top-10


# A restarted run repeats the same float operations in the same order (same data, RNG, optimiser state),
# so it matches to float32 rounding; the bound leaves room for gloo's reduction order and nothing more.
RESUME_TOLERANCE = 1e-5


@pytest.mark.slow
def test_injected_failure_resumes_at_the_saved_step_and_matches_the_uninterrupted_run(first_run, tiny_prepared):
    """Rank 1 raises after step 25; Ray restarts both workers from the full state saved at step 20."""
    first, storage = first_run
    cfg = job_config(tiny_prepared, storage, name="failing", fail_at_step=25, max_failures=1,
                     shard_validation=False)  # validation mode cannot change training
    summary = run(cfg)
    assert summary["resumed_step"] == 20
    assert Path(summary["resumed_from"]).name == "state_step00000020"
    assert [h["step"] for h in summary["history"]] == [15, 30]  # the history of the first attempt was restored
    resumed_loss, uninterrupted_loss = summary["history"][-1]["loss"], first["history"][-1]["loss"]
    print(f"resumed at step {summary['resumed_step']}: final loss {resumed_loss:.7f} vs uninterrupted "
          f"{uninterrupted_loss:.7f} (tolerance {RESUME_TOLERANCE})")
    assert resumed_loss == pytest.approx(uninterrupted_loss, abs=RESUME_TOLERANCE)
    resumed, uninterrupted = weights(summary["last_checkpoint"]), weights(first["last_checkpoint"])
    gap = max(float((resumed[k] - uninterrupted[k]).abs().max()) for k in uninterrupted)
    print(f"largest weight difference {gap:.2e}")
    assert gap <= RESUME_TOLERANCE
    assert summary["history"][-1]["hit@10"] == pytest.approx(first["history"][-1]["hit@10"])


@pytest.mark.slow
def test_zero_probe_reports_throughput_of_deepspeed_steps(tmp_path, monkeypatch):
    # A world of one in this process; monkeypatch removes the variables again afterwards.
    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("PATH", os.environ["PATH"])  # restored afterwards: the probe puts the venv's bin/ first

    out = tmp_path / "probe.json"
    assert zero_probe_main(["--backbone", "tiny", "--dtype", "float32", "--batch-size", "4", "--steps", "2", "--warmup", "1",
                 "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["parameters"] > 0 and report["config"]["zero_stage"] == 2
    assert report["tokens_per_step"] == 4 * 2 * 63  # 4 NEZHA prompts + 4 LM prompts of 20 items x 3 + 3 tokens
    assert report["tokens_per_s"] > 0 and report["step_ms_p50"] > 0
    assert not torch.distributed.is_initialized()
