"""faiss k-means vs scikit-learn MiniBatchKMeans for RQ-KMeans at 1M x 384 (issue 27, item 2).

    PYTHONPATH=. .venv/bin/python docs/measurements/rq-bench/compare_kmeans.py [N] [SAMPLE]

Writes synthetic clustered, L2-normalised float32 embeddings (`make_embeddings`) to /tmp/rq-bench/emb-N.npy once, then runs each library in its own
process: 3 levels x 256 codes fitted on a SAMPLE-row sample (float32), every item assigned in 64k-row
chunks. Peak RSS is measured above the process's RSS once the embeddings are loaded: the kernel's peak
(VmHWM) is reset at that point (/proc/self/clear_refs).
Quality: mean squared reconstruction error of all items and the raw collision rate (items whose greedy
3-level ID an earlier item already has). Result: compare_kmeans-N.json next to this file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

DATA = Path("/tmp/rq-bench")
LEVELS, SIZE, DIM, CHUNK = 3, 256, 384, 65536


def status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def make_embeddings(n: int, seed: int = 0) -> np.ndarray:
    """Item-like embeddings: 100 topics > 5,000 sub-topics > items spread in a 48-d subspace (text embeddings
    have a low intrinsic dimension), a little isotropic noise, 2% exact duplicates; L2-normalised."""
    rng = np.random.default_rng(seed)
    top = rng.standard_normal((100, DIM), dtype=np.float32)
    sub = top[rng.integers(0, 100, 5000)] + 0.5 * rng.standard_normal((5000, DIM), dtype=np.float32)
    basis = rng.standard_normal((48, DIM), dtype=np.float32) / np.sqrt(48)
    x = np.empty((n, DIM), dtype=np.float32)
    for start in range(0, n, CHUNK):
        rows = min(start + CHUNK, n) - start
        x[start:start + rows] = sub[rng.integers(0, 5000, rows)]
        x[start:start + rows] += 1.0 * rng.standard_normal((rows, 48), dtype=np.float32) @ basis
        x[start:start + rows] += 0.05 * rng.standard_normal((rows, DIM), dtype=np.float32)
    dup = rng.choice(n, n // 50, replace=False)
    x[dup] = x[rng.integers(0, n, len(dup))]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def fit_faiss(x: np.ndarray, seed: int) -> tuple[np.ndarray, float, int]:
    import faiss

    km = faiss.Kmeans(x.shape[1], SIZE, niter=25, seed=seed, max_points_per_centroid=len(x) // SIZE + 1)
    km.train(x)
    return km.centroids, float(km.obj[-1]), 25


def fit_minibatch(x: np.ndarray, seed: int) -> tuple[np.ndarray, float, int]:
    from sklearn.cluster import MiniBatchKMeans

    km = MiniBatchKMeans(n_clusters=SIZE, batch_size=4096, n_init="auto", random_state=seed).fit(x)
    return km.cluster_centers_.astype(np.float32), float(km.inertia_), int(km.n_iter_)


def nearest(r: np.ndarray, c: np.ndarray) -> np.ndarray:
    return ((c * c).sum(1) - 2.0 * r @ c.T).argmin(1)


def run_one(method: str, n: int, sample_size: int) -> dict:
    x = np.load(DATA / f"emb-{n}.npy")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    base = status_mb("VmRSS")
    fit = {"faiss": fit_faiss, "minibatch": fit_minibatch}[method]
    start = time.perf_counter()
    cpu0 = time.process_time()
    rng = np.random.default_rng(0)
    residual = x[np.sort(rng.choice(n, min(sample_size, n), replace=False))]
    levels = []
    centroids = []
    for level in range(LEVELS):
        t = time.perf_counter()
        c, inertia, iters = fit(residual, level)
        centroids.append(c)
        for s in range(0, len(residual), CHUNK):
            residual[s:s + CHUNK] -= c[nearest(residual[s:s + CHUNK], c)]
        levels.append({"fit_s": time.perf_counter() - t, "inertia_on_sample": inertia, "iterations": iters})
    fit_s = time.perf_counter() - start
    del residual
    t = time.perf_counter()
    codes = np.empty((n, LEVELS), dtype=np.int64)
    sq_err = 0.0
    for s in range(0, n, CHUNK):
        r = x[s:s + CHUNK].copy()
        for level, c in enumerate(centroids):
            codes[s:s + CHUNK, level] = nearest(r, c)
            r -= c[codes[s:s + CHUNK, level]]
        sq_err += float((r.astype(np.float64) ** 2).sum())
    assign_s = time.perf_counter() - t
    packed = codes[:, 0] + SIZE * codes[:, 1] + SIZE * SIZE * codes[:, 2]
    distinct = len(np.unique(packed))
    return {
        "method": method, "items": n, "dim": DIM, "sample": min(sample_size, n), "levels": LEVELS,
        "codebook_size": SIZE, "fit_s": fit_s, "assign_all_s": assign_s, "wall_s": time.perf_counter() - start,
        "cpu_s": time.process_time() - cpu0, "per_level": levels,
        "rss_with_embeddings_mb": base, "peak_rss_above_embeddings_mb": status_mb("VmHWM") - base,
        "reconstruction_mse": sq_err / n, "raw_collision_rate": (n - distinct) / n,
        "level0_codes_used": len(np.unique(codes[:, 0])),
    }


def main() -> None:
    if sys.argv[1:2] == ["--one"]:
        print(json.dumps(run_one(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))))
        return
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    sample_size = int(sys.argv[2]) if len(sys.argv) > 2 else 200_000
    DATA.mkdir(exist_ok=True)
    path = DATA / f"emb-{n}.npy"
    if not path.exists():
        np.save(path, make_embeddings(n))
    runs = []
    for method in ("faiss", "minibatch"):
        load = os.getloadavg()
        out = subprocess.run([sys.executable, __file__, "--one", method, str(n), str(sample_size)],
                             capture_output=True, text=True, check=True)
        runs.append({**json.loads(out.stdout.splitlines()[-1]), "loadavg_before": load,
                     "loadavg_after": os.getloadavg()})
        print(json.dumps(runs[-1]), flush=True)
    Path(__file__).with_name(f"compare_kmeans-{n}.json").write_text(json.dumps({"cores": os.cpu_count(), "note": "2 cores shared with other jobs; see loadavg",
                               "runs": runs}, indent=2) + "\n")


if __name__ == "__main__":
    main()
