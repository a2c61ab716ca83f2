"""Text embedding on Ray Data: a pool of embedding actors gives the single-process vectors, in order."""

import numpy as np
import pytest

from nezha.semantic_ids.embed import embed_texts
from nezha.semantic_ids.embed_ray import embed_texts_on_ray

pytestmark = pytest.mark.slow


def titles(n=200, seed=0):
    """Product-like titles of varied length, so batches pad differently on the two paths."""
    rng = np.random.default_rng(seed)
    words = ("red matte lipstick face cream dry skin shampoo argan oil nail polish travel size organic "
             "vitamin serum sunscreen spf hair brush gentle cleanser rose water eye liner waterproof").split()
    return [" ".join(rng.choice(words, rng.integers(2, 25))) + f" {k} ml" for k in range(n)]


def test_ray_actor_pool_embeddings_equal_the_single_process_ones_in_order(ray_session):
    texts = titles()
    single = embed_texts(texts, batch_size=64, show_progress=False)
    on_ray = embed_texts_on_ray(texts, batch_size=16, actors=2)
    assert on_ray.shape == (200, 384) and on_ray.dtype == np.float32
    np.testing.assert_allclose(on_ray, single, atol=2e-5, rtol=0)
    # in input order: each row is nearest to its own single-process vector, not a neighbour's
    assert ((on_ray @ single.T).argmax(1) == np.arange(200)).all()
    assert embed_texts_on_ray([], actors=1).shape == (0, 384)
