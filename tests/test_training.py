import json

import numpy as np
import pytest
import torch

from nezha.catalog import Catalog
from nezha.evaluation import EvalConfig, evaluate, format_table, rank_examples
from nezha.metrics import hit_ndcg
from nezha.model.checkpoint import create_model, load_checkpoint, read_meta
from nezha.model.model import ModelConfig
from nezha.prepare import load_prepared
from nezha.training import TrainConfig, make_batch, param_groups, train, warmup_cosine
from nezha.verify import PrefixVerifier


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
    verifier = PrefixVerifier(catalog.packed, catalog.codebook_sizes)
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


def test_evaluate_writes_the_table_and_json(tiny_checkpoint, tmp_path):
    out = tmp_path / "eval.json"
    report = evaluate(EvalConfig(checkpoint=str(tiny_checkpoint), beam=5, latency_requests=3, latency_batch=4,
                                 decoders=["nezha", "beam", "hf-beam", "hf-beam-constrained", "mtp", "popular"],
                                 json=str(out), progress=False))
    saved = json.loads(out.read_text())
    assert set(saved["decoders"]) == {"nezha", "beam", "hf-beam", "hf-beam-constrained", "mtp", "popular"}
    for name, entry in saved["decoders"].items():
        for key in ("hit@5", "hit@10", "ndcg@5", "ndcg@10", "invalid_rate", "device"):
            assert key in entry, (name, key)
        if name != "popular":
            assert entry["latency_ms"]["p99"] >= entry["latency_ms"]["p50"] > 0
    for name in ("nezha", "beam", "hf-beam-constrained", "mtp"):
        assert saved["decoders"][name]["invalid_rate"] == 0.0
    table = format_table(report)
    assert "nezha" in table and "popular" in table


def test_evaluate_rejects_bad_arguments(tiny_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="unknown decoder"):
        evaluate(EvalConfig(checkpoint=str(tiny_checkpoint), decoders=["greedy"]))
    with pytest.raises(ValueError, match="split"):
        evaluate(EvalConfig(checkpoint=str(tiny_checkpoint), split="train"))
    with pytest.raises(ValueError, match="not a nezha checkpoint"):
        evaluate(EvalConfig(checkpoint=str(tmp_path)))


def test_cli_reports_errors_without_a_traceback(tmp_path, capsys):
    from nezha.cli import main

    assert main(["evaluate", "--checkpoint", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "not a nezha checkpoint" in err and "Traceback" not in err
    assert main(["train", "--prepared", str(tmp_path / "nothing"), "--progress", "false"]) == 2
    assert "not a prepared directory" in capsys.readouterr().err
    assert main(["train", "--batch-size", "many"]) == 2
    assert "batch_size: expected int" in capsys.readouterr().err


def test_popularity_ranking_and_metrics_by_hand():
    from nezha.metrics import popularity_ranking, target_ranks

    ranking = popularity_ranking([np.array([2, 2, 1, 0, 0]), np.array([3, 1, 3])], num_items=4, holdout=2)
    # counts without the last 2 per user: item 2 twice, items 1 and 3 once (tie: smaller index first)
    assert ranking.tolist() == [2, 1, 3, 0]
    ranked = np.array([[5, 7, 9], [9, 8, -1], [1, 2, 3]])
    assert target_ranks(ranked, np.array([7, 9, 4])).tolist() == [1, 0, -1]
    m = hit_ndcg(ranked, np.array([7, 9, 4]), ks=(1, 2))
    assert m["hit@1"] == pytest.approx(1 / 3) and m["hit@2"] == pytest.approx(2 / 3)
    assert m["ndcg@2"] == pytest.approx((1 / np.log2(3) + 1) / 3)


def test_epoch_batches_bucket_by_length_and_cover_each_rank_once():
    from nezha.training import epoch_batches

    lengths = np.random.default_rng(0).integers(1, 21, 1000)
    per_rank = [epoch_batches(lengths, 32, seed=3, rank=r, world_size=2, bucket_batches=4) for r in (0, 1)]
    assert len(per_rank[0]) == len(per_rank[1]) == 500 // 32
    seen = np.concatenate([b for batches in per_rank for b in batches])
    assert len(seen) == len(set(seen.tolist()))  # no example twice in an epoch, across ranks
    # bucketing: a batch's length spread is far below the global spread
    spread = np.mean([lengths[b].max() - lengths[b].min() for b in per_rank[0]])
    assert spread < 10
    assert all(len(b) == 32 for b in per_rank[0])
