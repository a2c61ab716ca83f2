"""Collision resolution when a level-0 subtree overflows: 200k items of compare_kmeans.py's 1M set plus 70,000
copies of one item (more than the 65,536 IDs under one level-0 code of 3 x 256).

    PYTHONPATH=. .venv/bin/python docs/measurements/rq-bench/bench_overflow.py

Times `assign_unique_codes` (vectorised rounds + the pruned search for items whose prefix is full) and,
for comparison, the one-by-one search it replaced (`assign_new_item` against every other item's ID) for
the last 100 copies, when the copies' level-0 subtree is full. Result: overflow.json next to this file.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from nezha.semantic_ids.quantizer import ResidualQuantizer, assign_new_item, assign_unique_codes
from nezha.verify.codec import pack

COPIES = 70_000


def main() -> None:
    load_before = os.getloadavg()
    base = np.load("/tmp/rq-bench/emb-1000000.npy", mmap_mode="r")[:200_000]
    x = np.concatenate([base, np.repeat(base[:1], COPIES, axis=0)])
    rq = ResidualQuantizer(levels=3, codebook_size=256, seed=0).fit(x, sample=50_000)
    start, cpu = time.perf_counter(), time.process_time()
    codes, stats = assign_unique_codes(x, rq)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    packed = pack(codes, rq.codebook_sizes)
    assert len(np.unique(packed)) == len(x)

    used = set(packed[:-100].tolist())
    start = time.perf_counter()
    for i in range(len(x) - 100, len(x)):
        used.add(int(pack(assign_new_item(x[i], rq, used), rq.codebook_sizes)))
    one_by_one_ms = 1000 * (time.perf_counter() - start) / 100

    result = {
        "items": len(x), "copies_of_one_item": COPIES, "raw_collisions": stats["raw_collisions"],
        "reassigned_beyond_last_level": stats["reassigned_beyond_last_level"],
        "encode_wall_s": stats["encode_s"], "resolve_wall_s": stats["resolve_s"],
        "assign_unique_codes_wall_s": wall, "assign_unique_codes_cpu_s": cpu,
        "resolve_ms_per_colliding_item": 1000 * stats["resolve_s"] / stats["raw_collisions"],
        "resolve_ms_per_item_moved_beyond_last_level":
            1000 * stats["resolve_s"] / max(stats["reassigned_beyond_last_level"], 1),
        "one_by_one_search_ms_per_item_in_a_full_level0_subtree": one_by_one_ms,
        "cores": os.cpu_count(), "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
    }
    Path(__file__).with_name("overflow.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
