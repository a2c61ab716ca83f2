"""The k-means of RQ-KMeans: scikit-learn's full (Lloyd) KMeans, k-means++ init, fitted in float64.

Only fitting imports scikit-learn: `ResidualQuantizer.fit` (nezha/semantic_ids/quantizer.py) imports this
module when called, so loading a quantizer and encoding with it (training, serving, new items) does not.

Measured on Beauty (12,035 x 384, T=256, 2 CPU cores), CPU seconds for one level: float64 input
~9 s (k-means++ ~6 s of it, inertia 4586); float32 input ~33 s, because sklearn's k-means++ upcasts
float32 distances chunk by chunk. MiniBatchKMeans was no faster here and worse (inertia 4648), and
n_init=3 bought 0.1% inertia for 2-3x the time, so the default is full KMeans with n_init=1.
"""

from __future__ import annotations

import numpy as np
from sklearn.cluster import KMeans


def kmeans_level(residual: np.ndarray, size: int, seed: int, n_init: int,
                 max_iter: int) -> tuple[np.ndarray, int, float]:
    """([size, D] float32 centroids, iterations, inertia) of one level's residuals."""
    km = KMeans(n_clusters=size, n_init=n_init, max_iter=max_iter, random_state=seed).fit(residual.astype(np.float64))
    return km.cluster_centers_.astype(np.float32), int(km.n_iter_), float(km.inertia_)
