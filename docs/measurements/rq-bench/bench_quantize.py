"""RQ quantisation of 1M x 384 embeddings with nezha's own code (issue 27 goal: peak RSS <= 3 GB above the
embeddings, <= 5 minutes on 2 cores): `ResidualQuantizer.fit(sample=200k)` + `assign_unique_codes`.

    PYTHONPATH=. .venv/bin/python docs/measurements/rq-bench/bench_quantize.py [N] [SAMPLE]

Uses the embeddings of compare_kmeans.py (/tmp/rq-bench/emb-N.npy, made there). Peak RSS above the embeddings:
the kernel's peak (VmHWM) is reset once the embeddings are loaded (/proc/self/clear_refs), so the figure is
what fitting and assignment add. Also times the one-by-one collision search that assign_unique_codes
replaced (the old rule, `assign_new_item` per colliding item) on the first 2,000 colliding items.
Result: quantize-1m.json next to this file (the machine's load average before and after included).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from nezha.semantic_ids.quantizer import ResidualQuantizer, assign_new_item, assign_unique_codes
from nezha.verify.codec import pack

OUT = Path(__file__).with_name("quantize-1m.json")


def status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    sample = int(sys.argv[2]) if len(sys.argv) > 2 else 200_000
    load_before = os.getloadavg()
    x = np.load(f"/tmp/rq-bench/emb-{n}.npy")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    base = status_mb("VmRSS")
    wall, cpu = time.perf_counter(), time.process_time()
    rq = ResidualQuantizer(levels=3, codebook_size=256, seed=0).fit(x, sample=sample)
    fit_wall, fit_cpu = time.perf_counter() - wall, time.process_time() - cpu
    codes, stats = assign_unique_codes(x, rq)
    total_wall, total_cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak_above = status_mb("VmHWM") - base
    assert len(np.unique(pack(codes, rq.codebook_sizes))) == n

    greedy = rq.encode(x[:200_000])
    packed = pack(greedy, rq.codebook_sizes)
    _, first = np.unique(packed, return_index=True)
    used = set(packed[first].tolist())
    colliders = np.setdiff1d(np.arange(len(greedy)), first)[:2000]
    start = time.perf_counter()
    for i in colliders.tolist():
        used.add(int(pack(assign_new_item(x[i], rq, used), rq.codebook_sizes)))
    one_by_one_ms = 1000 * (time.perf_counter() - start) / max(len(colliders), 1)

    result = {
        "items": n, "dim": x.shape[1], "sample": sample, "levels": 3, "codebook_size": 256,
        "embeddings_mb": x.nbytes / 2**20, "rss_with_embeddings_mb": base, "peak_rss_above_embeddings_mb": peak_above,
        "fit_wall_s": fit_wall, "fit_cpu_s": fit_cpu, "fit_per_level": rq.fit_stats,
        "encode_wall_s": stats["encode_s"], "resolve_wall_s": stats["resolve_s"],
        "total_wall_s": total_wall, "total_cpu_s": total_cpu,
        "raw_collisions": stats["raw_collisions"], "raw_collision_rate": stats["raw_collision_rate"],
        "reassigned_beyond_last_level": stats["reassigned_beyond_last_level"],
        "max_items_per_first_code": stats["max_items_per_first_code"],
        "resolve_ms_per_colliding_item": 1000 * stats["resolve_s"] / max(stats["raw_collisions"], 1),
        "one_by_one_search_ms_per_colliding_item": one_by_one_ms,
        "cores": os.cpu_count(), "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        "note": "2 cores shared with other jobs during the run: wall times grow with the load average; "
                "CPU seconds are the process's own",
    }
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
