"""Text embeddings on a Ray cluster: Ray Data `map_batches` over a pool of embedding actors, each holding
the sentence-transformers model of nezha/semantic_ids/embed.py once (`embed_texts` on one machine).

One GPU per actor when the cluster has GPUs (the model then runs on it), else `cpus_per_actor` cores each.
The vectors are those of `embed_texts` (same model, same normalisation), up to float rounding: a text's
vector does not depend on the other texts of its batch, since padding is masked out. Rows come back in
input order. With `nezha prepare --embed-on-ray` the driver joins the cluster of `ray.init()` (RAY_ADDRESS,
else a local one); the model folder must be readable on every node (the bundled default is).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pandas as pd
import ray

from nezha.semantic_ids.embed import embed_texts, load_model, model_identity

log = logging.getLogger(__name__)

# Texts per input block at most: a few model batches per task; fewer when needed to give every actor work.
_BLOCK_ROWS = 4096


class _Embedder:
    """One actor of the pool: the model loaded once, a batch of texts -> their embeddings."""

    def __init__(self, model_path: str | None, batch_size: int) -> None:
        self.model = load_model(model_path)
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        emb = self.model.encode(list(batch["text"]), batch_size=self.batch_size, show_progress_bar=False,
                                normalize_embeddings=True, convert_to_numpy=True)
        return {"row": batch["row"], "embedding": np.asarray(emb, dtype=np.float32)}


def embed_texts_on_ray(
    texts: Sequence[str],
    model_path: str | None = None,
    batch_size: int = 256,
    actors: int | None = None,
    use_gpu: bool | None = None,
    cpus_per_actor: float = 1.0,
) -> np.ndarray:
    """[N, D] float32 L2-normalised embeddings of `texts`, in order, computed by `actors` Ray actors
    (default: one per GPU, else one per `cpus_per_actor` cores of the cluster). Starts a local Ray when
    none is initialised."""
    if not texts:
        return embed_texts([], model_path, show_progress=False)
    if not ray.is_initialized():
        ray.init()
    resources = ray.cluster_resources()
    if use_gpu is None:
        use_gpu = resources.get("GPU", 0) >= 1
    if actors is None:
        actors = int(resources["GPU"]) if use_gpu else max(1, int(resources.get("CPU", 1) // cpus_per_actor))
    log.info("embedding %d texts with %s on %d Ray actor(s) (%s, batch %d)", len(texts),
             model_identity(model_path), actors, "GPU" if use_gpu else f"{cpus_per_actor:g} CPU", batch_size)
    frame = pd.DataFrame({"row": np.arange(len(texts)), "text": list(texts)})
    rows = max(1, min(_BLOCK_ROWS, -(-len(texts) // actors)))
    blocks = [frame.iloc[start:start + rows] for start in range(0, len(frame), rows)]
    embedded = ray.data.from_pandas(blocks).map_batches(
        _Embedder,
        fn_constructor_kwargs={"model_path": model_path, "batch_size": batch_size},
        batch_size=batch_size,
        batch_format="numpy",
        concurrency=actors,
        num_gpus=1 if use_gpu else 0,
        num_cpus=cpus_per_actor,
    )
    out: np.ndarray | None = None
    for batch in embedded.iter_batches(batch_size=None, batch_format="numpy"):
        if out is None:
            out = np.empty((len(texts), batch["embedding"].shape[1]), dtype=np.float32)
        out[batch["row"]] = batch["embedding"]
    assert out is not None
    return out
