import json

import numpy as np
import pytest
import torch

from nezha.catalog import Catalog
from nezha.cli import main as cli_main
from nezha.evaluation import rank_examples
from nezha.metrics import hit_ndcg
from nezha.model.checkpoint import create_model, load_checkpoint, read_meta
from nezha.model.model import ModelConfig
from nezha.prepared import load_prepared
from nezha.training import TrainConfig, epoch_batches, make_batch, param_groups, plan, train, warmup_cosine


def test_training_lowers_the_loss_and_beats_chance(tiny_prepared, tmp_path):
    catalog, split, _ = load_prepared(tiny_prepared)
    cfg = TrainConfig(prepared=str(tiny_prepared), out=str(tmp_path), backbone="tiny", objectives=["joint"],
                      max_steps=40, batch_size=16, lr=3e-3, eval_every=20, eval_beam=5, progress=False)
    torch.manual_seed(0)
    model = create_model(cfg.model_config(catalog.codebook_sizes))
    batch = make_batch(model, catalog, split.train.histories[:64], split.train.targets[:64], "cpu")
    before = float(model(batch)["loss"].detach())
    result = train(cfg)
    trained = load_checkpoint(result.best_checkpoint)
    after = float(trained(batch)["loss"].detach())
    assert after < 0.7 * before
    assert [h["step"] for h in result.history] == [20, 40]
    assert (tmp_path / "last" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "history.json").read_text())[-1]["step"] == 40
    # the next-item pattern (item i -> i + 1) is learnable: far above the 5/48 of a random guess
    verifier = catalog.verifier()
    ranked, invalid = rank_examples(trained, "nezha", catalog, verifier, split.train, beam=5)
    assert hit_ndcg(ranked, catalog.packed[split.train.targets])["hit@5"] > 0.3
    assert invalid.sum() == 0
    meta = read_meta(result.best_checkpoint)
    assert meta["extra"]["validation"]["step"] in (20, 40)
    assert Catalog.load(result.best_checkpoint / "catalog").num_items == catalog.num_items


def test_param_groups_apply_the_multipliers_without_overlap():
    model = create_model(ModelConfig(codebook_sizes=[4, 4, 4], objectives=["joint", "mtp"]))
    groups = {g["name"]: g for g in param_groups(model, 1e-3, 100.0, 10.0, 0.0)}
    assert groups["embeddings"]["lr"] == pytest.approx(0.1) and groups["heads"]["lr"] == pytest.approx(0.01)
    ids = [id(p) for g in groups.values() for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    by_group = {name: {id(p) for p in g["params"]} for name, g in groups.items()}
    assert id(model.backbone.get_input_embeddings().weight) in by_group["embeddings"]
    assert {id(p) for p in model.draft_head.parameters()} <= by_group["heads"]


def test_warmup_cosine_schedule():
    factor = warmup_cosine(100, 0.1)
    assert factor(0) == pytest.approx(0.1) and factor(9) == pytest.approx(1.0)
    assert factor(55) == pytest.approx(0.5) and factor(100) == pytest.approx(0.0)


def test_plan_counts_whole_batches_per_rank_and_validates_each_epoch_and_at_the_end():
    run = plan(1000, batch_size=32, epochs=2.5, world_size=2)  # 500 examples per rank: 15 batches
    assert (run.steps_per_epoch, run.total_steps, run.eval_every) == (15, 38, 15)
    assert [s for s in range(1, 39) if run.is_validation_step(s)] == [15, 30, 38]
    fixed = TrainConfig(max_steps=7, eval_every=3, batch_size=32).plan(1000)
    assert (fixed.total_steps, fixed.eval_every) == (7, 3)
    assert [s for s in range(1, 8) if fixed.is_validation_step(s)] == [3, 6, 7]


def test_cli_reports_errors_without_a_traceback(tmp_path, capsys):
    assert cli_main(["evaluate", "--checkpoint", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "not a nezha checkpoint" in err and "Traceback" not in err
    assert cli_main(["train", "--prepared", str(tmp_path / "nothing"), "--progress", "false"]) == 2
    assert "not a prepared directory" in capsys.readouterr().err
    assert cli_main(["train", "--batch-size", "many"]) == 2
    assert "batch_size: expected int" in capsys.readouterr().err


def test_epoch_batches_bucket_by_length_and_cover_each_rank_once():
    lengths = np.random.default_rng(0).integers(1, 21, 1000)
    per_rank = [epoch_batches(lengths, 32, seed=3, rank=r, world_size=2, bucket_batches=4) for r in (0, 1)]
    assert len(per_rank[0]) == len(per_rank[1]) == 500 // 32
    seen = np.concatenate([b for batches in per_rank for b in batches])
    assert len(seen) == len(set(seen.tolist()))  # no example twice in an epoch, across ranks
    # bucketing: a batch's length spread is far below the global spread
    spread = np.mean([lengths[b].max() - lengths[b].min() for b in per_rank[0]])
    assert spread < 10
    assert all(len(b) == 32 for b in per_rank[0])
