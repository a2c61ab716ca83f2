import numpy as np
import pytest
from safetensors.numpy import save_file

from nezha.semantic_ids.embed import EmbeddingModelError, embed_texts
from nezha.semantic_ids.quantizer import (
    ResidualQuantizer,
    assign_new_item,
    assign_unique_codes,
    codebook_usage,
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
