import json
import logging
import os
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from nezha.config import ConfigError
from nezha.data.datasets import DataError
from nezha.data.split import load_sequences
from nezha.prepare import PrepareConfig, prepare
from nezha.prepared import load_prepared
from nezha.synth import SynthConfig, synthesize
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


def test_prepare_config_validation():
    for kwargs, message in [
        ({"levels": 0}, r"levels: must be >= 1, got 0"),
        ({"codebook_size": 0}, r"codebook_size: must be >= 1"),
        ({"max_history": 0}, r"max_history: must be >= 1"),
        ({"batch_size": -1}, r"batch_size: must be >= 1"),
        ({"semantic_ids": " "}, r"semantic_ids: empty path"),
        ({"resolve_collisions": "merge"}, r"resolve_collisions: unknown rule 'merge'; choose one of"),
        ({"codebook_sizes": [8, 8]}, r"codebook_sizes: only used with semantic_ids"),
        ({"semantic_ids": "ids.json", "codebook_sizes": [8, 0]}, r"codebook_sizes: need one size >= 1 per level"),
        ({"semantic_ids": "ids.json", "codebook_sizes": []}, r"codebook_sizes: need one size >= 1 per level"),
    ]:
        with pytest.raises(ConfigError, match=message):
            PrepareConfig(**kwargs)


# ---- bring-your-own semantic IDs ----------------------------------------------------------------------

ID_FILE = {f"I{i:02d}": [f"<a_{i % 4}>", f"<b_{i // 4 % 5}>", f"<c_{i // 20}>"] for i in range(30)}


@pytest.fixture
def no_embedding(monkeypatch):
    """Fail any embedding: a run with an ID file must not compute one."""

    def refuse(*args, **kwargs):
        raise AssertionError("embed_texts called")

    monkeypatch.setattr("nezha.prepare.embed_texts", refuse)


def fake_embedding(monkeypatch):
    """Deterministic stand-in embeddings (the text path's behaviour, not the model, is under test)."""

    def embed(texts, model=None, batch_size=256):
        return np.stack([np.random.default_rng(abs(hash(t)) % 2**32).normal(size=8) for t in texts]).astype(np.float32)

    monkeypatch.setattr("nezha.prepare.embed_texts", embed)


def write_ids_dataset(root, ids=ID_FILE, items=None):
    """A dataset directory with interactions.json only (plus items.jsonl when given) and an ID file."""
    data = root / "data"
    data.mkdir(parents=True)
    users = {f"U{u}": [f"I{(u + k) % 30:02d}" for k in range(4)] for u in range(12)}
    users["U0"].append("unknown-item")  # not in the ID file: skipped and counted
    (data / "interactions.json").write_text(json.dumps(users))
    if items is not None:
        (data / "items.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    id_file = root / "ids.json"
    id_file.write_text(json.dumps(ids))
    return data, id_file


def test_prepare_with_an_id_file_needs_no_text(tmp_path, no_embedding, caplog):
    data, id_file = write_ids_dataset(tmp_path)
    out = tmp_path / "prep"
    cfg = PrepareConfig(dataset=str(data), out=str(out), semantic_ids=str(id_file), max_history=3)
    with caplog.at_level(logging.WARNING):
        result = prepare(cfg)
    assert "dropping 1 interaction(s) with 1 item id(s) not in the semantic-ID file" in caplog.text
    cat = result.catalog
    assert cat.item_ids == list(ID_FILE) and cat.codebook_sizes == (4, 5, 2)
    assert cat.codes[7].tolist() == [3, 1, 0] and cat.titles[0] == ""
    assert result.quantizer is None and not result.cached
    assert not (out / "quantizer.safetensors").exists() and not (out / "embeddings.npy").exists()
    summary = json.loads((out / "prepare.json").read_text())
    assert summary["id_source"] == "file" and "embedding_model" not in summary
    assert summary["semantic_ids"]["source"] == str(id_file) and not summary["semantic_ids"]["appended_level"]
    assert summary["dataset_stats"]["unknown_item_interactions"] == 1
    assert summary["codebook_sizes"] == [4, 5, 2] and summary["split_sizes"]["test"] == 12

    catalog, split, quantizer = load_prepared(out)  # what training and evaluation read
    assert quantizer is None and catalog.item_ids == cat.item_ids and split.sizes() == result.split.sizes()
    assert prepare(cfg).cached
    # the ID file's bytes and the ID-file fields are part of the fingerprint
    assert not prepare(PrepareConfig(**{**cfg.__dict__, "codebook_sizes": [4, 8, 2]})).cached
    assert load_prepared(out)[0].codebook_sizes == (4, 8, 2)
    assert not prepare(PrepareConfig(**{**cfg.__dict__, "resolve_collisions": "append-level"})).cached
    assert prepare(PrepareConfig(**{**cfg.__dict__, "resolve_collisions": "append-level"})).cached
    id_file.write_text(json.dumps({**ID_FILE, "I00": ["<a_0>", "<b_4>", "<c_1>"]}))
    changed = prepare(PrepareConfig(**{**cfg.__dict__, "resolve_collisions": "append-level"}))
    assert not changed.cached and changed.catalog.codes[0].tolist() == [0, 4, 1]


def test_id_file_collisions_are_refused_or_numbered_in_an_appended_level(tmp_path, no_embedding):
    ids = {**ID_FILE, "I05": ID_FILE["I00"], "I09": ID_FILE["I00"]}  # I00, I05, I09 share one ID
    items = [{"item_id": "I05", "title": "five"}, {"item_id": "gone", "title": "no ID"}]
    data, id_file = write_ids_dataset(tmp_path, ids=ids, items=items)
    cfg = PrepareConfig(dataset=str(data), out=str(tmp_path / "prep"), semantic_ids=str(id_file))
    with pytest.raises(DataError, match=r"1 semantic ID\(s\) are shared by 3 items, e\.g\. \[0, 0, 0\] <- "
                                        r"\['I00', 'I05', 'I09'\]"):
        prepare(cfg)
    result = prepare(PrepareConfig(**{**cfg.__dict__, "resolve_collisions": "append-level"}))
    cat = result.catalog
    assert cat.codebook_sizes == (4, 5, 2, 3) and len(np.unique(cat.packed)) == 30
    assert [cat.codes[cat.index_of(i)].tolist() for i in ("I00", "I05", "I09", "I01")] == [
        [0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 2], [1, 0, 0, 0]]
    assert cat.titles[cat.index_of("I05")] == "five"  # items.jsonl still gives titles
    stats = result.summary["semantic_ids"]
    assert stats["appended_level"] and stats["raw_collisions"] == 2 and stats["levels_in_file"] == 3
    assert result.summary["dataset_stats"]["items_without_semantic_id"] == 1  # "gone"


def test_id_file_errors_through_the_cli(tmp_path, no_embedding, capsys):
    from nezha.cli import main

    data, id_file = write_ids_dataset(tmp_path)
    out = str(tmp_path / "prep")
    assert main(["prepare", "--dataset", str(data), "--out", out, "--semantic-ids", str(id_file),
                 "--codebook-sizes", "256,256,256"]) == 0
    assert "prepared" in capsys.readouterr().out and load_prepared(out)[0].codebook_sizes == (256, 256, 256)
    assert main(["prepare", "--dataset", str(data), "--out", out, "--semantic-ids", str(id_file),
                 "--codebook-sizes", "4,4,2"]) == 2
    assert "item 'I16': code 4 at level 1 is outside its codebook (size 4); 4 item(s)" in capsys.readouterr().err
    assert main(["prepare", "--dataset", str(data), "--out", out, "--semantic-ids", str(tmp_path / "nope.json")]) == 2
    assert "semantic_ids: " in capsys.readouterr().err
    assert main(["prepare", "--dataset", str(data), "--out", out, "--codebook-sizes", "4,4"]) == 2
    assert "codebook_sizes: only used with semantic_ids" in capsys.readouterr().err
    # no items.jsonl and no ID file: the text path has nothing to read
    assert main(["prepare", "--dataset", str(data), "--out", out]) == 2
    assert "missing items.jsonl" in capsys.readouterr().err


def test_switching_between_text_and_id_file_keeps_artifacts_consistent(toy_dir, tmp_path, monkeypatch):
    fake_embedding(monkeypatch)
    out = tmp_path / "prep"
    text = PrepareConfig(dataset="toy", data_dir=str(toy_dir), out=str(out), codebook_size=4)
    assert prepare(text).quantizer is not None and (out / "quantizer.safetensors").exists()
    ids = {f"I{i:03d}": [i % 8, i // 8] for i in range(60)}
    (tmp_path / "ids.json").write_text(json.dumps(ids))
    from_file = prepare(PrepareConfig(**{**text.__dict__, "semantic_ids": str(tmp_path / "ids.json")}))
    # the text run's quantizer would give new items IDs in another code space: it is gone
    assert from_file.quantizer is None and not (out / "quantizer.safetensors").exists()
    assert load_prepared(out)[0].codebook_sizes == (8, 8)
    again = prepare(text)
    assert not again.cached and again.summary["embeddings_cached"]
    assert load_prepared(out)[2].codebook_sizes == (4, 4, 4)
    (out / "quantizer.safetensors").unlink()  # a text-path directory without its quantizer is incomplete
    with pytest.raises(DataError, match=r"missing \['quantizer\.safetensors'\]"):
        load_prepared(out)


# ---- the text path without text ------------------------------------------------------------------------


def write_text_dataset(root, num_items=60, without_text=0):
    root.mkdir(parents=True)
    items = [{"item_id": f"i{i}"} if i < without_text else {"item_id": f"i{i}", "title": f"product {i}"}
             for i in range(num_items)]
    (root / "items.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    rows = ["user_id,item_id,position"] + [f"u{u},i{(u + p) % num_items},{p}" for u in range(10) for p in range(4)]
    (root / "interactions.csv").write_text("\n".join(rows) + "\n")
    return root


def test_text_path_refuses_a_catalog_without_text(tmp_path, no_embedding):
    data = write_text_dataset(tmp_path / "ids-only", without_text=60)
    with pytest.raises(DataError, match=r"none of the 60 items has a title, brand or categories.*--semantic-ids"):
        prepare(PrepareConfig(dataset=str(data), out=str(tmp_path / "prep"), codebook_size=4))


def test_text_path_warns_when_many_items_have_no_text(tmp_path, monkeypatch, caplog):
    fake_embedding(monkeypatch)
    few = write_text_dataset(tmp_path / "few", without_text=3)  # 5 %: normal
    with caplog.at_level(logging.WARNING):
        result = prepare(PrepareConfig(dataset=str(few), out=str(tmp_path / "few-prep"), codebook_size=4))
    assert "no title, brand or categories" not in caplog.text
    assert result.summary["dataset_stats"]["items_without_text"] == 3

    many = write_text_dataset(tmp_path / "many", without_text=4)  # 6.7 %
    with caplog.at_level(logging.WARNING):
        result = prepare(PrepareConfig(dataset=str(many), out=str(tmp_path / "many-prep"), codebook_size=4))
    assert "4 of 60 items (6.7%) have no title, brand or categories" in caplog.text
    assert result.summary["dataset_stats"]["items_without_text"] == 4 and result.quantizer is not None


# ---- atomic outputs -------------------------------------------------------------------------------------


def test_a_failed_prepare_leaves_no_half_written_directory(tmp_path, no_embedding, monkeypatch):
    data, id_file = write_ids_dataset(tmp_path)
    out = tmp_path / "runs" / "prep"
    cfg = PrepareConfig(dataset=str(data), out=str(out), semantic_ids=str(id_file))
    before = prepare(cfg).summary
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # the mode of a directory made by mkdir
    files = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    # a failure after the catalog was written: --out keeps the previous run's files, and no temp dir stays
    monkeypatch.setattr("nezha.prepare.save_sequences", disk_full)
    with pytest.raises(OSError, match="No space left"):
        prepare(PrepareConfig(**{**cfg.__dict__, "max_history": 5}))
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == files
    assert sorted(p.name for p in out.parent.iterdir()) == ["prep"]
    assert prepare(cfg).cached and prepare(cfg).summary == before

    # bad input into a new directory: nothing is created
    (data / "interactions.json").write_text('{"u1": ["I00", 3.5]}')
    with pytest.raises(DataError, match="an item id is a non-empty string or an integer"):
        prepare(PrepareConfig(**{**cfg.__dict__, "out": str(tmp_path / "runs" / "new")}))
    assert sorted(p.name for p in out.parent.iterdir()) == ["prep"]


def test_prepare_reads_a_directory_of_parquet_parts(tmp_path, no_embedding):
    synthesize(SynthConfig(out=str(tmp_path / "syn"), items=40, interactions=600, part_rows=250, clusters=4))
    ids = {f"I{i:02d}": [i % 8, i // 8] for i in range(40)}
    (tmp_path / "ids.json").write_text(json.dumps(ids))
    cfg = PrepareConfig(dataset=str(tmp_path / "syn"), out=str(tmp_path / "prep"), semantic_ids=str(tmp_path / "ids.json"),
                        k_core=2)
    result = prepare(cfg)
    stats = result.summary["dataset_stats"]
    assert stats["parts"] == 3 and stats["order_column"] == "timestamp" and stats["timestamp_unit"] == "seconds"
    assert stats["num_interactions"] + stats["k_core_removed_interactions"] == 600
    assert result.summary["format"] == "nezha-prepared/2"
    assert prepare(cfg).cached
    # the fingerprint covers every part
    part = tmp_path / "syn" / "interactions" / "part-00002.parquet"
    pq.write_table(pq.read_table(part).slice(0, 10), part)
    assert not prepare(cfg).cached
