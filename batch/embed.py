"""Item text embeddings on a Ray cluster, written for `nezha prepare --embeddings`:

    python -m batch.embed --dataset data/my-dataset --out runs/emb.parquet
    ray job submit --working-dir . -- python -m batch.embed --dataset "$PWD/data/my-dataset" \\
        --out "$PWD/runs/emb.parquet" --actors 8
    nezha prepare --dataset data/my-dataset --embeddings runs/emb.parquet --out runs/prepared

The text of each item is the one `nezha prepare` embeds (title, brand, categories); the vectors are
those of the single-process path (nezha.semantic_ids.embed_ray, Ray Data `map_batches` over a pool of
embedding actors: one GPU each when the cluster has GPUs). `--out` is a .parquet (item_id + embedding)
or a .npy (rows in catalog order), written atomically. `nezha prepare --embed-on-ray` does the same
inside prepare; this entry keeps the embedding job apart (another cluster, another schedule). See
docs/data.md, "Semantic IDs at scale".
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from nezha.config import ConfigError, add_config_arguments, config_from_args
from nezha.data.datasets import DataError, load_catalog, resolve_dataset_dir
from nezha.semantic_ids.embed_ray import embed_texts_on_ray
from nezha.semantic_ids.precomputed import EMBEDDING_SUFFIXES

log = logging.getLogger("nezha.batch")


@dataclass
class EmbedConfig:
    """Embed every item's text with a pool of Ray Data actors; write the vectors for `nezha prepare --embeddings`."""

    dataset: str = field(default="amazon-beauty", metadata={"help": "dataset name under --data-dir, or a directory"})
    data_dir: str | None = field(default=None, metadata={"help": "data root (else $NEZHA_DATA_DIR, else ../shared/data)"})
    out: str = field(default="runs/embeddings.parquet", metadata={"help": "output .parquet or .npy"})
    embedding_model: str | None = field(
        default=None, metadata={"help": "local sentence-transformers folder (default: bundled all-MiniLM-L6-v2)"}
    )
    batch_size: int = field(default=256, metadata={"help": "texts per model call"})
    actors: int | None = field(default=None, metadata={
        "help": "embedding actors (default: one per GPU, else one per cpus_per_actor cores)"})
    use_gpu: bool | None = field(default=None, metadata={"help": "one GPU per actor (default: when the cluster has GPUs)"})
    cpus_per_actor: float = field(default=1.0, metadata={"help": "CPUs per actor"})

    def __post_init__(self) -> None:
        if Path(self.out).suffix.lower() not in EMBEDDING_SUFFIXES:
            raise ConfigError(f"out: name it *.parquet or *.npy, got {self.out!r}")
        if self.batch_size < 1 or (self.actors is not None and self.actors < 1) or self.cpus_per_actor <= 0:
            raise ConfigError("batch_size and actors must be >= 1 and cpus_per_actor > 0")


def write_embeddings(path: Path, item_ids: list[str], emb: np.ndarray) -> None:
    """`emb` to `path` (.npy rows in item order, or .parquet item_id + embedding), via a temporary file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    if path.suffix.lower() == ".npy":
        with tmp.open("wb") as f:
            np.save(f, emb)
    else:
        vectors = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), emb.shape[1])
        pq.write_table(pa.table({"item_id": item_ids, "embedding": vectors}), tmp)
    tmp.replace(path)


def run(cfg: EmbedConfig) -> Path:
    items, _, _ = load_catalog(resolve_dataset_dir(cfg.dataset, cfg.data_dir))
    emb = embed_texts_on_ray(items["text"].tolist(), cfg.embedding_model, batch_size=cfg.batch_size,
                             actors=cfg.actors, use_gpu=cfg.use_gpu, cpus_per_actor=cfg.cpus_per_actor)
    out = Path(cfg.out)
    write_embeddings(out, items["item_id"].tolist(), emb)
    log.info("wrote %d x %d embeddings to %s", *emb.shape, out)
    return out


def main(argv: list[str] | None = None) -> Path:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=EmbedConfig.__doc__)
    add_config_arguments(parser, EmbedConfig)
    try:
        out = run(config_from_args(EmbedConfig, parser.parse_args(argv)))
    except (ConfigError, DataError) as exc:
        sys.exit(f"error: {exc}")
    print(f"wrote {out}", flush=True)
    return out


if __name__ == "__main__":
    main()
