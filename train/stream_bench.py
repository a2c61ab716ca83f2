"""The training feed, in memory vs streamed: one short Ray Train run each on the same prepared split.

    python train/stream_bench.py --prepared /tmp/beauty --out docs/measurements/data-bench/stream-beauty.json

Each run is train/run.py's `run` with `data: in_memory` then `data: stream` (same model, steps, batch size
and workers; `--modes in_memory,stream,stream,in_memory` repeats and interleaves them, so a drift in the
machine's load falls on both); recorded per run: training examples/s per worker (the loop's rate, validation included, over
the number of workers), every worker's peak RSS, and the machine's load average before and after, since
on a shared machine the rates move with it.

With `--feed-step-seconds S` there is no model: each worker takes `--epochs` epochs of its batches from the
same data classes (InMemoryData, StreamData), sleeping S seconds per batch in place of a training step
that leaves the CPUs to the feed, and the driver samples the CPU time of every process of the local Ray
instance (all descendants of the driver). Recorded per run: each rank's wall time per epoch and the CPU
seconds per process title (ray::SplitCoordinator, ray::IDLE for the read tasks' processes, ...): where the
feed's CPU goes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import psutil
import ray
import ray.train
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

if __package__ in (None, ""):  # `python train/stream_bench.py`: make the `train` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nezha.data.split import Split  # noqa: E402
from nezha.prepared import SPLIT_FILE  # noqa: E402
from nezha.training import InMemoryData, TrainingData  # noqa: E402
from train.config import RayTrainConfig  # noqa: E402
from train.data import StreamData, count_examples, train_dataset, valid_examples  # noqa: E402
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


def feed_worker(config: dict[str, Any]) -> None:
    """Ray Train worker of the feed run: `epochs` epochs of this rank's batches, a sleep per batch."""
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    prepared, batch_size, seed = config["prepared"], config["batch_size"], config["seed"]
    data: TrainingData
    if config["data"] == "stream":
        data = StreamData(ray.train.get_dataset_shard("train"), valid_examples(prepared, 5), count_examples(prepared),
                          batch_size, config["shuffle_buffer"], seed, rank, world_size, epochs=config["epochs"])
    else:
        data = InMemoryData(Split.load(Path(prepared) / SPLIT_FILE), batch_size, seed, rank, world_size)
    epochs = []
    for epoch in range(config["epochs"]):
        start, cpu = time.perf_counter(), time.process_time()
        batches = 0
        for _ in data.batches(epoch):
            batches += 1
            time.sleep(config["step_seconds"])
        epochs.append({"epoch": epoch, "batches": batches, "seconds": round(time.perf_counter() - start, 2),
                       "worker_cpu_seconds": round(time.process_time() - cpu, 2)})
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps(epochs))


def process_cpu(stop: threading.Event, seen: dict[int, tuple[str, float]]) -> None:
    """Every 0.5 s: the CPU seconds and title of the driver and each of its descendants (Ray's processes)."""
    me = psutil.Process()
    while not stop.wait(0.5):
        for proc in [me, *me.children(recursive=True)]:
            try:
                with proc.oneshot():
                    times = proc.cpu_times()
                    title = " ".join(proc.cmdline())
            except psutil.Error:
                continue
            if title.startswith("ray::"):
                title = title.split()[0].split(".")[0]  # ray::TrainController.run -> ray::TrainController
            else:
                title = Path(title.split()[0]).name if title else "?"
            seen[proc.pid] = (title, times.user + times.system)


def measure_feed(args: argparse.Namespace, mode: str, storage: str) -> dict[str, Any]:
    seen: dict[int, tuple[str, float]] = {}
    stop = threading.Event()
    sampler = threading.Thread(target=process_cpu, args=(stop, seen), daemon=True)
    sampler.start()
    time.sleep(1.0)
    before = {pid: cpu for pid, (_, cpu) in seen.items()}  # Ray's own start is not the feed's
    load_before = os.getloadavg()
    out = Path(storage, f"feed-{mode}")
    out.mkdir()
    config = {"prepared": str(Path(args.prepared).resolve()), "data": mode, "batch_size": args.batch_size,
              "seed": 0, "shuffle_buffer": args.shuffle_buffer, "epochs": args.epochs,
              "step_seconds": args.feed_step_seconds, "out": str(out)}
    start = time.perf_counter()
    TorchTrainer(feed_worker, train_loop_config=config,
                 datasets={"train": train_dataset(args.prepared, 0)} if mode == "stream" else None,
                 scaling_config=ScalingConfig(num_workers=args.workers,
                                              resources_per_worker={"CPU": args.cpus_per_worker}),
                 run_config=RunConfig(storage_path=storage, name=f"feed-{mode}")).fit()
    seconds = time.perf_counter() - start
    time.sleep(1.0)
    stop.set()
    sampler.join()
    by_title: dict[str, list[float]] = defaultdict(list)
    for pid, (title, cpu) in seen.items():
        by_title[title].append(round(cpu - before.get(pid, 0.0), 2))
    return {"data": mode, "seconds": round(seconds, 1),
            "epochs_per_rank": [json.loads((out / f"rank{r}.json").read_text()) for r in range(args.workers)],
            "cpu_seconds_total": round(sum(sum(v) for v in by_title.values()), 1),
            "cpu_seconds_by_process": {t: sorted(v, reverse=True) for t, v in
                                       sorted(by_title.items(), key=lambda kv: -sum(kv[1]))},
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
    parser.add_argument("--shuffle-buffer", type=int, default=RayTrainConfig.shuffle_buffer)
    parser.add_argument("--feed-step-seconds", type=float, default=None,
                        help="no model: each batch is a sleep of this many seconds (see the docstring)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs of the feed run")
    args = parser.parse_args(argv)
    ray.init(include_dashboard=False, log_to_driver=False)
    runs = []
    with tempfile.TemporaryDirectory(prefix="nezha-stream-bench-") as storage:
        for mode in args.modes.split(","):
            if args.feed_step_seconds is not None:
                runs.append(measure_feed(args, mode, storage))
                print(json.dumps(runs[-1]), flush=True)
                continue
            cfg = RayTrainConfig(prepared=args.prepared, storage_path=storage, name=f"bench-{len(runs)}-{mode}",
                                 backbone=args.backbone, max_steps=args.max_steps, batch_size=args.batch_size,
                                 eval_every=args.max_steps, eval_users=args.eval_users, eval_beam=5,
                                 num_workers=args.workers, cpus_per_worker=args.cpus_per_worker,
                                 strategy="ddp", data=mode, shuffle_buffer=args.shuffle_buffer)
            runs.append(measure(cfg))
            print(json.dumps(runs[-1]), flush=True)
    report = {"prepared": str(Path(args.prepared).resolve()), "train_examples": count_examples(args.prepared),
              "config": {k: v for k, v in vars(args).items() if k not in ("prepared", "out", "modes")},
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
              "date": time.strftime("%Y-%m-%d %H:%M"), "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
