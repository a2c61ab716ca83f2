"""The k-means of RQ-KMeans: faiss's k-means (Lloyd iterations on BLAS matrix products, float32,
random-sample init), a fixed number of iterations.

Only fitting imports faiss: `ResidualQuantizer.fit` (nezha/semantic_ids/quantizer.py) imports this
module when called, so loading a quantizer and encoding with it (training, serving, new items) does not.

Why faiss rather than scikit-learn's MiniBatchKMeans (docs/measurements/rq-bench/compare_kmeans-*.json,
2 shared CPU cores, 3 x 256 codes): on 1M x 384 clustered embeddings fitted on a 200k sample, the same
quality (reconstruction error 0.394 vs 0.396, raw collisions 5.9% vs 5.5%) for 125 vs 152 CPU-seconds
(292 vs 239 s wall: MiniBatchKMeans stopped after 3-4 epochs), peak 534 vs 677 MB above the embeddings;
on a 20k catalog (Beauty-sized, where the sample is the whole
catalog) faiss took 10 CPU-s against 142, with the lower error (0.325 vs 0.343). faiss also runs a fixed
number of iterations, in float32 throughout. scikit-learn's full KMeans (used before) fitted every item
in float64: ~11 GB on top of the embeddings at 1M x 384.
"""

from __future__ import annotations

import faiss
import numpy as np


def kmeans_level(residual: np.ndarray, size: int, seed: int, n_init: int,
                 max_iter: int) -> tuple[np.ndarray, int, float]:
    """([size, D] float32 centroids, iterations, inertia) of one level's residuals, all of them used
    (the caller samples: faiss would otherwise subsample to 256 points per centroid)."""
    km = faiss.Kmeans(
        residual.shape[1], size, niter=max_iter, nredo=n_init, seed=seed,
        max_points_per_centroid=-(-len(residual) // size), min_points_per_centroid=1,
    )
    km.train(np.ascontiguousarray(residual, dtype=np.float32))
    return np.array(km.centroids, dtype=np.float32), max_iter, float(km.obj[-1])
