"""`nezha prepare` with precomputed embeddings (--embeddings .npy / .parquet) and the ID-space checks."""

import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nezha.config import ConfigError
from nezha.data.datasets import DataError
from nezha.prepare import PrepareConfig, prepare
from nezha.semantic_ids.quantizer import ResidualQuantizer, assign_unique_codes

NUM_ITEMS = 60


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """60 items without any text (precomputed embeddings need none) and 40 users."""
    data = tmp_path_factory.mktemp("data") / "toy"
    data.mkdir()
    (data / "items.jsonl").write_text("".join(json.dumps({"item_id": f"I{i:03d}"}) + "\n" for i in range(NUM_ITEMS)))
    rng = np.random.default_rng(0)
    rows = ["user_id,item_id,position"]
    for u in range(40):
        for p, i in enumerate(rng.choice(NUM_ITEMS, size=int(rng.integers(3, 9)), replace=False)):
            rows.append(f"U{u},I{i:03d},{p}")
    (data / "interactions.csv").write_text("\n".join(rows) + "\n")
    return data


@pytest.fixture(scope="module")
def vectors():
    return np.random.default_rng(1).normal(size=(NUM_ITEMS, 12)).astype(np.float32)


@pytest.fixture
def no_text_embedding(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("embed_texts called")

    monkeypatch.setattr("nezha.prepare.embed_texts", refuse)


def write_parquet(path, item_ids, vecs):
    table = pa.table({"item_id": item_ids, "vec": pa.array(list(vecs), type=pa.list_(pa.float32()))})
    pq.write_table(table, path, row_group_size=16)  # several record batches
    return path


def config(data_dir, out, **kwargs):
    return PrepareConfig(dataset=str(data_dir), out=str(out), codebook_size=4, max_history=3, **kwargs)


def test_npy_and_parquet_embeddings_give_the_ids_of_those_vectors(data_dir, vectors, tmp_path, no_text_embedding):
    np.save(tmp_path / "emb.npy", vectors)
    from_npy = prepare(config(data_dir, tmp_path / "a", embeddings=str(tmp_path / "emb.npy")))
    rq = ResidualQuantizer(levels=3, codebook_size=4, seed=0).fit(vectors)
    expected, _ = assign_unique_codes(vectors, rq)
    np.testing.assert_array_equal(from_npy.catalog.codes, expected)
    assert from_npy.summary["embedding_model"] == f"precomputed: {tmp_path / 'emb.npy'}"
    assert from_npy.summary["embedding_dim"] == 12

    order = np.random.default_rng(2).permutation(NUM_ITEMS)  # any row order, and one unknown item more
    ids = [f"I{i:03d}" for i in order] + ["not-in-catalog"]
    parquet = write_parquet(tmp_path / "emb.parquet", ids, np.concatenate([vectors[order], vectors[:1]]))
    from_parquet = prepare(config(data_dir, tmp_path / "b", embeddings=str(parquet)))
    np.testing.assert_array_equal(from_parquet.catalog.codes, expected)

    # the file's content is part of the fingerprint
    np.save(tmp_path / "emb.npy", vectors[::-1].copy())
    assert not prepare(config(data_dir, tmp_path / "a", embeddings=str(tmp_path / "emb.npy"))).cached


def test_bad_embedding_files_say_what_is_wrong(data_dir, vectors, tmp_path, no_text_embedding):
    ids = [f"I{i:03d}" for i in range(NUM_ITEMS)]
    cases = {
        "rows.npy": (vectors[:-1], r"has 59 rows but the catalog has 60 items; a \.npy needs one row per item"),
        "flat.npy": (vectors[:, 0], r"holds a float32 array of shape \(60,\); expected a 2-d float array"),
        "nan.npy": (np.where(np.arange(NUM_ITEMS)[:, None] == 7, np.nan, vectors), r"row 7 has a NaN or infinite"),
        "missing.parquet": ((ids[2:], vectors[2:]), r"has no vector for 2 of the 60 catalog items, e.g. \['I000', 'I001'\]"),
        "twice.parquet": ((ids + ids[:1], np.concatenate([vectors, vectors[:1]])), r"item 'I000' has 2 rows"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name
        if name.endswith(".npy"):
            np.save(path, content)
        else:
            write_parquet(path, *content)
        with pytest.raises(DataError, match=message):
            prepare(config(data_dir, tmp_path / "out", embeddings=str(path)))
    pq.write_table(pa.table({"id": ids, "vec": pa.array(list(vectors))}), tmp_path / "noid.parquet")
    with pytest.raises(DataError, match=r"has no item_id column \(columns: \['id', 'vec'\]\)"):
        prepare(config(data_dir, tmp_path / "out", embeddings=str(tmp_path / "noid.parquet")))
    with pytest.raises(DataError, match="is not a file"):
        prepare(config(data_dir, tmp_path / "out", embeddings=str(tmp_path / "none.npy")))
    with pytest.raises(ConfigError, match=r"embeddings: 'emb\.csv' is neither a \.npy nor a \.parquet file"):
        config(data_dir, tmp_path / "out", embeddings="emb.csv")
    with pytest.raises(ConfigError, match="rq_sample: must be >= codebook_size"):
        config(data_dir, tmp_path / "out", rq_sample=3)
    assert not (tmp_path / "out").exists()


def test_a_too_full_id_space_is_reported_with_the_flags_that_fit(data_dir, vectors, tmp_path, no_text_embedding,
                                                                 caplog):
    np.save(tmp_path / "emb.npy", vectors)
    with caplog.at_level(logging.WARNING, logger="nezha.prepare"):
        result = prepare(PrepareConfig(dataset=str(data_dir), out=str(tmp_path / "p"), levels=2, codebook_size=8,
                                       max_history=3, embeddings=str(tmp_path / "emb.npy")))
    warning = result.summary["semantic_ids"]["id_space_warning"]
    assert warning.startswith("semantic-ID space too full: 60 items fill 93.8% of the 64 IDs of 2 levels x 8 codes "
                              "(warning above 10%)")
    assert warning.endswith("IDs that fit: --levels 4 (4,096 IDs, 1.5% full) or --codebook-size 32 "
                            "(1,024 IDs, 5.9% full).")
    assert warning in caplog.text

    with pytest.raises(DataError, match=r"60 items cannot get unique semantic IDs from 2 levels x 4 codes \(16 IDs\); "
                                        r"IDs that fit: --levels 5 \(1,024 IDs, 5\.9% full\) or --codebook-size 32"):
        prepare(PrepareConfig(dataset=str(data_dir), out=str(tmp_path / "q"), levels=2, codebook_size=4,
                              max_history=3, embeddings=str(tmp_path / "emb.npy")))
