"""The k-means of RQ-KMeans: faiss's k-means (Lloyd iterations on BLAS matrix products, float32,
random-sample init), a fixed number of iterations.

Only fitting imports faiss: `ResidualQuantizer.fit` (nezha/semantic_ids/quantizer.py) imports this
module when called, so loading a quantizer and encoding with it (training, serving, new items) does not.

Why faiss (docs/measurements/rq-bench/compare_kmeans.json, 2 shared CPU cores, T=256, 3 levels):
on 20k x 384 clustered embeddings faiss fitted the three levels in 19 s (10 CPU-s) with a reconstruction
error of 0.325, scikit-learn's MiniBatchKMeans (batch 4096) in 452 s (142 CPU-s) with 0.343 and nearly twice
the collisions; the 1M x 384 run with a 200k sample is in that file. scikit-learn's full KMeans (used
before) works in float64 on every item: ~11 GB at 1M x 384.
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
