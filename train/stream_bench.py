"""The training feed, in memory vs streamed: one short Ray Train run each on the same prepared split.

    python train/stream_bench.py --prepared /tmp/beauty --out docs/measurements/data-bench/stream-beauty.json

Each run is train/run.py's `run` with `data: in_memory` then `data: stream` (same model, steps, batch size
and workers); recorded per run: training examples/s per worker (the loop's rate, validation included, over
the number of workers), every worker's peak RSS, and the machine's load average before and after, since
on a shared machine the rates move with it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import ray

if __package__ in (None, ""):  # `python train/stream_bench.py`: make the `train` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train.config import RayTrainConfig  # noqa: E402
from train.data import count_examples  # noqa: E402
from train.run import run  # noqa: E402

MODES = ("in_memory", "stream")


def measure(cfg: RayTrainConfig) -> dict[str, Any]:
    load_before = os.getloadavg()
    summary = run(cfg)
    return {"data": cfg.data, "steps": summary["steps"], "train_seconds": round(summary["train_seconds"], 1),
            "examples_per_second_per_worker": round(summary["examples_per_second"] / cfg.num_workers, 1),
            "worker_peak_rss_mb": summary["worker_peak_rss_mb"],
            "validation_ndcg@10": round(summary["history"][-1]["ndcg@10"], 4),
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepared", required=True)
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cpus-per-worker", type=float, default=0.5)
    parser.add_argument("--backbone", default="tiny")
    parser.add_argument("--eval-users", type=int, default=200)
    args = parser.parse_args(argv)
    ray.init(include_dashboard=False, log_to_driver=False)
    runs = []
    with tempfile.TemporaryDirectory(prefix="nezha-stream-bench-") as storage:
        for mode in args.modes.split(","):
            cfg = RayTrainConfig(prepared=args.prepared, storage_path=storage, name=f"bench-{mode}",
                                 backbone=args.backbone, max_steps=args.max_steps, batch_size=args.batch_size,
                                 eval_every=args.max_steps, eval_users=args.eval_users, eval_beam=5,
                                 num_workers=args.workers, cpus_per_worker=args.cpus_per_worker,
                                 strategy="ddp", data=mode)
            runs.append(measure(cfg))
            print(json.dumps(runs[-1]), flush=True)
    report = {"prepared": str(Path(args.prepared).resolve()), "train_examples": count_examples(args.prepared),
              "config": {k: v for k, v in dataclasses.asdict(cfg).items()
                         if k in ("backbone", "max_steps", "batch_size", "num_workers", "cpus_per_worker",
                                  "strategy", "shuffle_buffer", "eval_users")},
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
              "date": time.strftime("%Y-%m-%d %H:%M"), "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
