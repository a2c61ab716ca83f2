import numpy as np
import pytest
from safetensors.numpy import save_file

from nezha.semantic_ids.embed import EmbeddingModelError, embed_texts
from nezha.semantic_ids.quantizer import (
    ResidualQuantizer,
    assign_new_item,
    assign_unique_codes,
    codebook_usage,
    id_space_advice,
    id_space_warning,
)
from nezha.verify.codec import pack
from nezha.verify.verifier import PrefixVerifier


def blobs(n=200, dim=16, centers=10, seed=0):
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centers, dim))
    return (c[rng.integers(0, centers, n)] + 0.1 * rng.normal(size=(n, dim))).astype(np.float32)


@pytest.fixture(scope="module")
def fitted():
    return ResidualQuantizer(levels=3, codebook_size=(8, 8, 8), seed=0).fit(blobs())


def test_fit_encode_save_load(fitted, tmp_path):
    X = blobs()
    codes = fitted.encode(X)
    assert codes.shape == (200, 3) and codes.dtype == np.int64
    assert (codes >= 0).all() and (codes < np.array([8, 8, 8])).all()
    assert len(fitted.fit_stats) == 3

    again = ResidualQuantizer(levels=3, codebook_size=(8, 8, 8), seed=0).fit(X)
    np.testing.assert_array_equal(again.encode(X), codes)  # deterministic for a seed

    fitted.save(tmp_path / "rq.safetensors")
    loaded = ResidualQuantizer.load(tmp_path / "rq.safetensors")
    assert loaded.codebook_sizes == (8, 8, 8) and loaded.seed == 0
    np.testing.assert_array_equal(loaded.encode(X), codes)
    for a, b in zip(loaded.centroids, fitted.centroids, strict=True):
        np.testing.assert_array_equal(a, b)


def test_encode_is_greedy_residual(fitted):
    X = blobs()[:5]
    codes = fitted.encode(X)
    residual = X.astype(np.float64)
    for level in range(3):
        d = ((residual[:, None, :] - fitted.centroids[level][None].astype(np.float64)) ** 2).sum(-1)
        np.testing.assert_array_equal(d.argmin(1), codes[:, level])
        np.testing.assert_allclose(fitted.distances(residual, level), d, rtol=1e-6, atol=1e-6)
        residual = residual - fitted.centroids[level][codes[:, level]]


def test_quantizer_errors(tmp_path):
    with pytest.raises(ValueError, match="smaller codebook size"):
        ResidualQuantizer(levels=2, codebook_size=64).fit(blobs(n=20))
    with pytest.raises(ValueError, match="codebook sizes"):
        ResidualQuantizer(levels=3, codebook_size=(4, 4))
    with pytest.raises(RuntimeError, match="not fitted"):
        ResidualQuantizer().encode(blobs(n=3))
    save_file({"a": np.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a nezha RQ-KMeans file"):
        ResidualQuantizer.load(tmp_path / "other.safetensors")


def test_unique_codes_on_colliding_data(fitted):
    X = blobs()
    X = np.concatenate([X, np.repeat(X[:3], 4, axis=0)])  # 12 exact duplicates must collide
    greedy = fitted.encode(X)
    codes, stats = assign_unique_codes(X, fitted)
    packed = pack(codes, fitted.codebook_sizes)
    assert len(np.unique(packed)) == len(X)
    assert stats["final_collision_rate"] == 0.0
    raw = len(X) - len(np.unique(pack(greedy, fitted.codebook_sizes)))
    assert raw >= 12 and stats["raw_collisions"] == raw
    assert stats["raw_collision_rate"] == pytest.approx(raw / len(X))
    # the first holder of each greedy ID keeps it; everyone else moved
    _, first = np.unique(pack(greedy, fitted.codebook_sizes), return_index=True)
    np.testing.assert_array_equal(codes[first], greedy[first])
    assert stats["codebook_usage"] == codebook_usage(codes, (8, 8, 8))
    assert all(0 < u <= 1 for u in stats["codebook_usage"])


def test_fallback_above_last_level_and_capacity():
    rq = ResidualQuantizer(levels=2, codebook_size=2, seed=0).fit(blobs(n=50))
    X = np.repeat(blobs(n=1, seed=3), 4, axis=0)  # 4 identical items, 2x2 = 4 IDs in all
    codes, stats = assign_unique_codes(X, rq)
    assert len(np.unique(pack(codes, (2, 2)))) == 4
    assert stats["raw_collisions"] == 3
    # the last level holds 2 codes per prefix: 2 of the 3 movers must change level 0
    assert stats["reassigned_beyond_last_level"] == 2
    np.testing.assert_array_equal(codes[0], rq.encode(X[:1])[0])
    np.testing.assert_array_equal(codes[1, 0], codes[0, 0])  # next-nearest last-level code first
    with pytest.raises(ValueError, match="cannot get unique IDs"):
        assign_unique_codes(np.repeat(X[:1], 5, axis=0), rq)


def one_by_one(X, rq):
    """The reference rule: each colliding item in catalog order takes the nearest ID no earlier item holds
    (depth-first in distance order), as assign_unique_codes did before it was vectorised."""
    codes = rq.encode(X)
    packed = pack(codes, rq.codebook_sizes)
    _, first = np.unique(packed, return_index=True)
    used = set(packed[first].tolist())
    for i in sorted(set(range(len(X))) - set(first.tolist())):
        codes[i] = assign_new_item(X[i], rq, used)
        used.add(int(pack(codes[i], rq.codebook_sizes)))
    return codes


def test_vectorised_collisions_match_the_one_by_one_search_while_no_prefix_overflows():
    X = np.random.default_rng(0).normal(size=(400, 16)).astype(np.float32)
    rq = ResidualQuantizer(levels=3, codebook_size=(8, 8, 64), seed=0).fit(X)
    X = np.concatenate([X, np.repeat(X[:40], 3, axis=0)])  # several colliders under many prefixes
    codes, stats = assign_unique_codes(X, rq)
    assert stats["raw_collisions"] > 120 and stats["reassigned_beyond_last_level"] == 0
    np.testing.assert_array_equal(codes, one_by_one(X, rq))


def test_overflowing_prefixes_give_unique_deterministic_ids_near_their_own():
    X = blobs(n=60, centers=3)
    rq = ResidualQuantizer(levels=3, codebook_size=(4, 4, 8), seed=0).fit(X)
    X = np.concatenate([X, np.repeat(X[:2], 20, axis=0)])  # 20 copies: more than 8 last codes per prefix
    codes, stats = assign_unique_codes(X, rq)
    assert len(np.unique(pack(codes, (4, 4, 8)))) == len(X)
    assert stats["reassigned_beyond_last_level"] > 0 and stats["final_collision_rate"] == 0.0
    np.testing.assert_array_equal(assign_unique_codes(X, rq)[0], codes)
    # a full own prefix sends an item to the nearest free ID of the search (here: same as one by one,
    # since the overflowing items' neighbours are not colliders of their own)
    reference = one_by_one(X, rq)
    greedy = rq.encode(X)
    same_level0 = (codes[:, 0] == greedy[:, 0]).mean()
    assert same_level0 >= (reference[:, 0] == greedy[:, 0]).mean() - 0.01


def test_fit_on_a_sample_reads_only_the_sampled_rows_of_a_memory_mapped_array(tmp_path):
    X = blobs(n=2000)
    np.save(tmp_path / "emb.npy", X)
    mapped = np.load(tmp_path / "emb.npy", mmap_mode="r")
    rq = ResidualQuantizer(levels=2, codebook_size=8, seed=1).fit(mapped, sample=300)
    rows = np.sort(np.random.default_rng(1).choice(2000, 300, replace=False))
    on_rows = ResidualQuantizer(levels=2, codebook_size=8, seed=1).fit(X[rows])
    for a, b in zip(rq.centroids, on_rows.centroids, strict=True):
        np.testing.assert_array_equal(a, b)
    assert [s["sample"] for s in rq.fit_stats] == [300, 300]
    np.testing.assert_array_equal(rq.encode(mapped), rq.encode(X))
    with pytest.raises(ValueError, match="a sample of 5 rows cannot fit 8 codes"):
        ResidualQuantizer(levels=2, codebook_size=8).fit(X, sample=5)


def test_id_space_warning_gives_the_numbers_and_the_flags_that_fit():
    message = id_space_warning(10_000_000, 3, 256, {"max_items_per_first_code": 120_000,
                                                    "reassigned_beyond_last_level": 812_345})
    assert message == (
        "semantic-ID space too full: 10,000,000 items fill 59.6% of the 16,777,216 IDs of 3 levels x 256 codes "
        "(warning above 10%); the busiest level-0 code has 120,000 items but only 65,536 IDs under it; "
        "812,345 items (8.1%) had to leave their own level 0..1 prefix because it was full (warning above 1%). "
        "IDs that fit: --levels 4 (4,294,967,296 IDs, 0.2% full) or --codebook-size 512 "
        "(134,217,728 IDs, 7.5% full)."
    )
    quiet = {"max_items_per_first_code": 9_000, "reassigned_beyond_last_level": 100}
    assert id_space_warning(1_000_000, 3, 256, quiet) is None
    crowded_first_code = {"max_items_per_first_code": 70_000, "reassigned_beyond_last_level": 0}
    assert "65,536 IDs under it" in id_space_warning(1_000_000, 3, 256, crowded_first_code)
    assert id_space_advice(100, 2, 4) == ("IDs that fit: --levels 5 (1,024 IDs, 9.8% full) or "
                                          "--codebook-size 32 (1,024 IDs, 9.8% full)")
    assert "bring IDs with --semantic-ids" in id_space_advice(2**62, 3, 2**20)


def test_assign_new_item(fitted):
    X = blobs()
    codes, _ = assign_unique_codes(X, fitted)
    used = set(pack(codes, fitted.codebook_sizes).tolist())
    new = assign_new_item(X[0], fitted, used)  # same embedding as an existing item: must move
    assert new.dtype == np.int64 and new.shape == (3,)
    assert (new < np.array([8, 8, 8])).all()
    assert int(pack(new, fitted.codebook_sizes)) not in used
    np.testing.assert_array_equal(assign_new_item(X[0], fitted, set()), fitted.encode(X[:1])[0])

    verifier = PrefixVerifier(list(used), fitted.codebook_sizes)  # anything with __contains__ works
    np.testing.assert_array_equal(assign_new_item(X[0], fitted, verifier), new)

    full = set(range(8 * 8 * 8))
    with pytest.raises(ValueError, match="no free semantic ID"):
        assign_new_item(X[0], fitted, full)


def test_embed_texts_real_model():
    texts = ["red lipstick", "face cream for dry skin", "red lipstick", "shampoo"]
    emb = embed_texts(texts, show_progress=False)
    assert emb.shape == (4, 384) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(emb[0], emb[2], atol=1e-6)
    assert emb[0] @ emb[3] < 0.9
    assert embed_texts([], show_progress=False).shape == (0, 384)


def test_embed_texts_missing_model(tmp_path):
    with pytest.raises(EmbeddingModelError, match="does not exist"):
        embed_texts(["x"], model_path=str(tmp_path / "no-model"))
    with pytest.raises(EmbeddingModelError, match="cannot load embedding model 'no-such-org/no-such-model' offline"):
        embed_texts(["x"], model_path="no-such-org/no-such-model")
