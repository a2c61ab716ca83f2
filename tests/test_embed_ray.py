"""Text embedding on Ray Data: a pool of embedding actors gives the single-process vectors, in order,
and `python -m batch.embed` writes them for `nezha prepare --embeddings`."""

import json

import numpy as np
import pytest

from batch.embed import EmbedConfig, run
from nezha.config import ConfigError
from nezha.data.datasets import load_catalog
from nezha.semantic_ids.embed import embed_texts
from nezha.semantic_ids.embed_ray import embed_texts_on_ray
from nezha.semantic_ids.precomputed import read_embeddings

pytestmark = pytest.mark.slow


def titles(n=200, seed=0):
    """Product-like titles of varied length, so batches pad differently on the two paths."""
    rng = np.random.default_rng(seed)
    words = ("red matte lipstick face cream dry skin shampoo argan oil nail polish travel size organic "
             "vitamin serum sunscreen spf hair brush gentle cleanser rose water eye liner waterproof").split()
    return [" ".join(rng.choice(words, rng.integers(2, 25))) + f" {k} ml" for k in range(n)]


def test_ray_actor_pool_embeddings_equal_the_single_process_ones_in_order(ray_session, tmp_path):
    data = tmp_path / "shop"
    data.mkdir()
    items = [{"item_id": f"I{k:03d}", "title": title, "brand": f"B{k % 3}"} for k, title in enumerate(titles())]
    (data / "items.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    (data / "interactions.csv").write_text("user_id,item_id,position\nU0,I000,0\n")

    out = run(EmbedConfig(dataset=str(data), out=str(tmp_path / "emb.parquet"), batch_size=16, actors=2))
    catalog, _, _ = load_catalog(data)
    on_ray = read_embeddings(out, catalog["item_id"].tolist())
    single = embed_texts(catalog["text"].tolist(), batch_size=64, show_progress=False)
    assert on_ray.shape == (200, 384) and on_ray.dtype == np.float32
    np.testing.assert_allclose(on_ray, single, atol=2e-5, rtol=0)
    # in item order: each row is nearest to its own single-process vector, not a neighbour's
    assert ((on_ray @ single.T).argmax(1) == np.arange(200)).all()
    assert embed_texts_on_ray([], actors=1).shape == (0, 384)


def test_embed_entry_checks_its_output_name():
    with pytest.raises(ConfigError, match=r"out: name it \*\.parquet or \*\.npy, got 'emb\.csv'"):
        EmbedConfig(out="emb.csv")
