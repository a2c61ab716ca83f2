"""Recommendations for every user with Ray Data: a pool of decoder actors over the input, Parquet out.

    python -m batch.run --checkpoint runs/train/best --from-split test --out /tmp/recs.parquet
    ray job submit --working-dir . -- python -m batch.run --checkpoint "$PWD/runs/train/best" \\
        --in "$PWD/histories.jsonl" --out "$PWD/runs/recs.parquet" --actors 4

Rows are those of `nezha recommend` (the same parsing, `nezha.recommend.OfflineRecommender` and output
schema), in no particular order, as a folder of Parquet part files. Each actor loads the checkpoint once
and decodes `batch_size` users per call: one GPU per actor when the cluster has GPUs, else
`cpus_per_actor` cores. The checkpoint and input paths must be readable from every node (shared storage).
See docs/recommend.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import ray
import torch

from nezha.config import ConfigError, add_config_arguments, config_from_args
from nezha.device import resolve_device
from nezha.recommend import (
    INPUT_FORMATS,
    OUTPUT_FORMATS,
    RECS_SCHEMA,
    OfflineRecommender,
    RecommendConfig,
    RecommendStats,
    Skipped,
    UserHistory,
    atomic_path,
    check_checkpoint,
    check_parquet_columns,
    parse_line,
    parse_row,
    split_histories,
)

log = logging.getLogger("nezha.batch")

# Rows per output file at least: one small file per decoded batch would make thousands of files.
ROWS_PER_FILE = 100_000

# What an actor returns per batch: recommendation rows (reason null) and skipped rows (items null) in one
# table, split by the driver into the Parquet output and the .skipped.jsonl report.
RESULT_SCHEMA = pa.schema([*RECS_SCHEMA, pa.field("reason", pa.string()), pa.field("line", pa.int64()),
                           pa.field("detail", pa.string()), pa.field("skipped_items", pa.list_(pa.string()))])


@dataclass
class RayRecommendConfig(RecommendConfig):
    """Top-K recommendations for every user with Ray Data (a pool of decoder actors), written to Parquet."""

    actors: int = field(default=2, metadata={"help": "decoder actors, each with the checkpoint loaded once"})
    use_gpu: bool | None = field(default=None, metadata={
        "help": "one GPU per actor (default: when the cluster has GPUs)"})
    cpus_per_actor: float = field(default=1.0, metadata={"help": "CPUs per actor (= its torch threads on CPU)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if OUTPUT_FORMATS[Path(self.out).suffix.lower()] != "parquet":
            raise ConfigError(f"out: Ray Data writes a folder of Parquet files: name it *.parquet, "
                              f"got {self.out!r}")
        if self.actors < 1:
            raise ConfigError(f"actors: must be >= 1, got {self.actors}")
        if self.cpus_per_actor <= 0:
            raise ConfigError(f"cpus_per_actor: must be > 0, got {self.cpus_per_actor}")


class DecodeActor:
    """Ray Data's callable class: loads the checkpoint once, then turns input batches into result rows."""

    def __init__(self, config: dict[str, Any], cpus: float) -> None:
        gpu = bool(ray.get_gpu_ids())
        if not gpu:
            torch.set_num_threads(max(1, int(cpus)))
        cfg = RecommendConfig(**config)
        self.recommender = OfflineRecommender(cfg, resolve_device(cfg.device, gpu_granted=gpu))

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        if "text" in batch.column_names:  # JSONL lines from read_text; Ray does not say which line
            parsed = [p for p in (parse_line(row["text"]) for row in rows) if p is not None]
        else:
            parsed = [parse_row(row, row.get("line")) for row in rows]
        users = [p for p in parsed if isinstance(p, UserHistory)]
        recs, skipped = self.recommender.recommend(users)
        skipped += [p for p in parsed if isinstance(p, Skipped)]
        result = [{**rec, "reason": None} for rec in recs]
        result += [{"user_id": s.user_id, "items": None, "reason": s.reason, "line": s.line, "detail": s.detail,
                    "skipped_items": s.skipped_items} for s in skipped]
        return pa.Table.from_pylist(result, schema=RESULT_SCHEMA)


def read_input(cfg: RayRecommendConfig) -> ray.data.Dataset:
    if cfg.from_split is not None:
        users = split_histories(cfg.checkpoint, cfg.from_split)
        return ray.data.from_items([dataclasses.asdict(u) for u in users])
    path = cfg.input or ""
    local = "://" not in path
    if local and not Path(path).is_file():
        raise FileNotFoundError(f"input: no such file {path}")
    # Reading only splits the file into blocks: with a CPU of its own it would wait forever when the
    # decoder actors hold every core (2 actors on 2 cores).
    if INPUT_FORMATS[Path(path).suffix.lower()] == "parquet":
        if local:
            check_parquet_columns(Path(path))  # here, not as a failed read task
        return ray.data.read_parquet(path, columns=["user_id", "history"], num_cpus=0)
    # Lines as text, parsed by the actors: pyarrow's JSON reader (read_json) fails the whole read on one
    # bad line or one history of another type, and a bad line must only be reported.
    return ray.data.read_text(path, num_cpus=0)


def _recommendations(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.is_null(batch["reason"])).select(RECS_SCHEMA.names)


def _skipped(batch: pa.Table) -> pa.Table:
    columns = ["reason", "line", "user_id", "detail", "skipped_items"]  # Skipped's fields
    return batch.filter(pc.is_valid(batch["reason"])).select(columns)


def run(cfg: RayRecommendConfig) -> RecommendStats:
    """Recommend for every user of the input on the connected Ray cluster (a local one when none is)."""
    start = time.perf_counter()
    if not ray.is_initialized():
        ray.init()  # RAY_ADDRESS (set by `ray job submit`) connects to the cluster; else a local instance
    gpus = float(ray.cluster_resources().get("GPU", 0))
    use_gpu = gpus > 0 if cfg.use_gpu is None else cfg.use_gpu
    if use_gpu and gpus < 1:
        raise ConfigError("use_gpu: the Ray cluster has no GPU")  # else the actors would wait forever
    ray.data.DataContext.get_current().enable_progress_bars = cfg.progress
    check_checkpoint(cfg)
    dataset = read_input(cfg)
    stats = RecommendStats(load_seconds=time.perf_counter() - start)
    start = time.perf_counter()
    base = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(RecommendConfig)}
    log.info("decoding with %d %s actors", cfg.actors, "GPU" if use_gpu else "CPU")
    results = dataset.map_batches(
        DecodeActor, fn_constructor_kwargs={"config": base, "cpus": cfg.cpus_per_actor}, batch_size=cfg.batch_size,
        batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=cfg.actors), num_cpus=cfg.cpus_per_actor,
        num_gpus=1 if use_gpu else 0,
    ).materialize()  # computed once, read twice: the recommendations and the skipped rows
    recs = results.map_batches(_recommendations, batch_format="pyarrow")
    skipped = [Skipped(**row) for row in results.map_batches(_skipped, batch_format="pyarrow").take_all()]
    skipped.sort(key=lambda s: (s.line or 0, s.user_id or ""))
    with atomic_path(Path(cfg.out)) as tmp:
        recs.write_parquet(str(tmp), min_rows_per_file=ROWS_PER_FILE)
        with atomic_path(cfg.skipped_path) as tmp_skipped, tmp_skipped.open("w", encoding="utf-8") as report:
            for s in skipped:
                report.write(json.dumps(s.to_json(), ensure_ascii=False) + "\n")
    stats.recommended = results.count() - len(skipped)  # a materialised count is free: no second pass
    stats.count(skipped)
    stats.users = stats.recommended + stats.skipped_users
    stats.seconds = time.perf_counter() - start
    return stats


def main(argv: list[str] | None = None) -> RecommendStats:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=RayRecommendConfig.__doc__)
    add_config_arguments(parser, RayRecommendConfig)
    parser.add_argument("--in", dest="input", help="same as --input")  # as `nezha recommend --in`
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(RayRecommendConfig, args)
        stats = run(cfg)
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        sys.exit(f"error: {exc}")
    print(stats.summary(), flush=True)
    print(f"wrote {cfg.out} and {cfg.skipped_path}", flush=True)
    return stats


if __name__ == "__main__":
    main()
