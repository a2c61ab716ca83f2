import json
import time

import numpy as np
import pytest

from nezha.data.datasets import DataError
from nezha.data.split import load_sequences
from nezha.prepare import PrepareConfig, load_prepared, prepare
from nezha.verify.codec import pack

# ---- prepare ----------------------------------------------------------------------------------------

WORDS = ["red", "matte", "hydrating", "organic", "vanilla", "argan", "mint", "rose", "charcoal", "gold"]
KINDS = ["lipstick", "shampoo", "face cream", "nail polish", "perfume", "mascara"]


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    (root / "toy").mkdir()
    rng = np.random.default_rng(0)
    items = [
        {"item_id": f"I{i:03d}", "title": f"{WORDS[i % 10]} {KINDS[i % 6]} {i}", "brand": f"B{i % 4}",
         "categories": ["Beauty", KINDS[i % 6].title()]}
        for i in range(60)
    ]
    (root / "toy" / "items.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    rows = ["user_id,item_id,position"]
    for u in range(40):
        for p, i in enumerate(rng.choice(60, size=int(rng.integers(2, 9)), replace=False)):
            rows.append(f"U{u},I{i:03d},{p}")
    (root / "toy" / "interactions.csv").write_text("\n".join(rows) + "\n")
    return root


def test_prepare_and_cache(toy_dir, tmp_path):
    cfg = PrepareConfig(dataset="toy", data_dir=str(toy_dir), out=str(tmp_path / "prep"), codebook_size=8, max_history=3)
    first = prepare(cfg)
    assert not first.cached
    out = tmp_path / "prep"
    for name in ("catalog/catalog.json", "catalog/codes.npy", "quantizer.safetensors", "embeddings.npy",
                 "embeddings.json", "split.npz", "sequences.npz", "prepare.json"):
        assert (out / name).exists(), name
    summary = json.loads((out / "prepare.json").read_text())
    assert summary["num_items"] == 60 and summary["codebook_sizes"] == [8, 8, 8]
    assert summary["semantic_ids"]["final_collision_rate"] == 0.0
    assert len(summary["semantic_ids"]["codebook_usage"]) == 3
    assert summary["split_sizes"]["test"] == 40 - summary["skipped_users"]
    assert set(summary["timings"]) >= {"embed_s", "kmeans_s", "kmeans_per_level_s", "total_s"}

    cat = first.catalog
    assert len(np.unique(pack(cat.codes, cat.codebook_sizes))) == 60
    assert cat.item_ids[:2] == ["I000", "I001"] and cat.titles[0] == "red lipstick 0"
    assert max(len(h) for h in first.split.train.histories) <= 3
    seqs, users = load_sequences(out / "sequences.npz")
    assert len(users) == 40 and seqs[0].dtype == np.int64

    start = time.perf_counter()
    second = prepare(cfg)
    assert second.cached and time.perf_counter() - start < 2.0
    np.testing.assert_array_equal(second.catalog.codes, cat.codes)
    np.testing.assert_array_equal(second.split.test.targets, first.split.test.targets)
    assert second.summary == summary

    # another output-irrelevant field (batch size) keeps the cache; a new codebook size re-quantizes
    # but reuses the embeddings
    assert prepare(PrepareConfig(**{**cfg.__dict__, "batch_size": 7})).cached
    third = prepare(PrepareConfig(**{**cfg.__dict__, "codebook_size": 4}))
    assert not third.cached and third.summary["embeddings_cached"]
    assert third.catalog.codebook_sizes == (4, 4, 4)

    catalog, split, quantizer = load_prepared(out)
    np.testing.assert_array_equal(catalog.codes, third.catalog.codes)
    assert split.sizes() == third.split.sizes() and quantizer.codebook_sizes == (4, 4, 4)


def test_load_prepared_errors(tmp_path):
    with pytest.raises(DataError, match=r"is not a prepared directory .* run `nezha prepare --out"):
        load_prepared(tmp_path)


def test_prepare_unknown_dataset(toy_dir, tmp_path):
    with pytest.raises(DataError, match=r"dataset 'nope' not found .* available: \['toy'\]"):
        prepare(PrepareConfig(dataset="nope", data_dir=str(toy_dir), out=str(tmp_path)))
