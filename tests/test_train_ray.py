"""train/run.py: the DeepSpeed config, the resolved run config, and 2-worker Ray Train jobs on the CPU.

The jobs run DeepSpeed over gloo in two Ray workers on the tiny dataset: ZeRO-2 end to end (loss, kept
checkpoints, the copied best checkpoint scores what Ray recorded), then ZeRO-3 resuming the first run.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from redis_fixtures import free_port

from nezha.config import ConfigError, parse_config
from nezha.evaluation import rank_examples
from nezha.metrics import hit_ndcg
from nezha.model.checkpoint import create_model, load_checkpoint
from nezha.prepare import load_prepared
from nezha.training import make_batch, steps_per_epoch
from nezha.verify import PrefixVerifier
from train.deepspeed_config import deepspeed_config
from train.run import RayTrainConfig, resolve_config, run, summary_line

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


def job_config(prepared: Path, storage: Path, **overrides: Any) -> RayTrainConfig:
    return RayTrainConfig(prepared=str(prepared), storage_path=str(storage), name="tiny", backbone="tiny",
                          max_steps=30, batch_size=16, lr=3e-3, eval_every=15, eval_beam=5, log_every=10,
                          num_workers=2, cpus_per_worker=0.5, keep_checkpoints=1, **overrides)


@pytest.fixture(scope="module")
def first_run(ray_session, tiny_prepared: Path, tmp_path_factory: pytest.TempPathFactory
              ) -> tuple[dict[str, Any], Path]:
    storage = tmp_path_factory.mktemp("ray")
    return run(job_config(tiny_prepared, storage)), storage


@pytest.mark.slow
def test_two_worker_deepspeed_job_trains_and_keeps_the_best_checkpoint(first_run, tiny_prepared):
    summary, storage = first_run
    assert [h["step"] for h in summary["history"]] == [15, 30]
    best = max(summary["history"], key=lambda h: h["ndcg@10"])
    assert summary["best_metrics"]["ndcg@10"] == pytest.approx(best["ndcg@10"])
    assert summary["resumed_from"] is None
    assert len([p for p in (storage / "tiny").glob("checkpoint_*") if p.is_dir()]) == 1  # keep_checkpoints
    assert "hit@10" in summary_line(summary)

    # The copied best checkpoint loads with the library, has lower loss than a fresh model, and scores
    # on the validation split exactly what rank 0 measured before reporting it.
    catalog, split, _ = load_prepared(tiny_prepared)
    model = load_checkpoint(summary["best_checkpoint"])
    fresh = create_model(model.config, seed=0).eval()
    batch = make_batch(model, catalog, split.train.histories[:64], split.train.targets[:64], "cpu")
    with torch.no_grad():
        assert float(model(batch)["loss"]) < 0.8 * float(fresh(batch)["loss"])
    verifier = PrefixVerifier(catalog.packed, catalog.codebook_sizes)
    ranked, _ = rank_examples(model, "nezha", catalog, verifier, split.valid, beam=5)
    metrics = hit_ndcg(ranked, catalog.packed[split.valid.targets], ks=(1, 5, 10))
    assert metrics["hit@10"] == pytest.approx(best["hit@10"])
    assert metrics["ndcg@10"] == pytest.approx(best["ndcg@10"])
    assert metrics["hit@10"] > 10 / catalog.num_items  # better than a random top-10


@pytest.mark.slow
def test_zero3_run_resumes_from_the_latest_ray_checkpoint(first_run, tiny_prepared):
    """Reusing a run name makes Ray hand the workers its latest checkpoint, as after a worker failure."""
    first, storage = first_run
    cfg = dataclasses.replace(job_config(tiny_prepared, storage), zero_stage=3, max_steps=10, eval_every=10)
    summary = run(cfg)
    assert summary["resumed_from"] and Path(summary["resumed_from"]).parent == storage / "tiny"
    assert summary["history"][0]["loss"] < first["history"][0]["loss"]  # it starts from trained weights
    assert load_checkpoint(summary["best_checkpoint"]).config.backbone == "tiny"


@pytest.mark.slow
def test_zero_probe_reports_throughput_of_deepspeed_steps(tmp_path, monkeypatch):
    from train.zero_probe import main

    # A world of one in this process; monkeypatch removes the variables again afterwards.
    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(name, value)

    out = tmp_path / "probe.json"
    assert main(["--backbone", "tiny", "--dtype", "float32", "--batch-size", "4", "--steps", "2", "--warmup", "1",
                 "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["parameters"] > 0 and report["config"]["zero_stage"] == 2
    assert report["tokens_per_step"] == 4 * 2 * 63  # 4 NEZHA prompts + 4 LM prompts of 20 items x 3 + 3 tokens
    assert report["tokens_per_s"] > 0 and report["step_ms_p50"] > 0
    assert not torch.distributed.is_initialized()
