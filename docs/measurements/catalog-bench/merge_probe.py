"""A replica's maps merge beside a decode-like loop on one CPU: `python merge_probe.py NICE [ITEMS]`.

A LocalCatalog of ITEMS (default 10M) synthetic 3x256 items gets 40,000 changes in layers, then one thread
merges them into a new table (`ItemMap.as_table`, what the replica's merge thread runs) at nice NICE while
the main thread times a torch loop (20 matmuls of 256x256, one torch thread) until the merge is done.
Prints the merge's wall time and the loop's p50/p99/max, alone and during the merge. The process runs on
CPU 1 only, so the two threads share one core as on a pinned replica.
"""

from __future__ import annotations

import os
import sys
import threading
import time

import numpy as np
import torch

from nezha.live_catalog import ItemTable, LocalCatalog
from nezha.live_catalog.item_table import StringColumn
from nezha.live_catalog_bench import SyntheticChanges


def main() -> None:
    nice = int(sys.argv[1])
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 10_000_000
    os.sched_setaffinity(0, {1})
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    packed = rng.choice(256**3, size=n + 100_000, replace=False).astype(np.int64)
    ids = StringColumn.from_encoded(b"".join(f"B{i:09d}".encode() for i in range(n)), np.full(n, 10, dtype=np.int64))
    local = LocalCatalog(ItemTable.build(ids, packed[:n]), (256, 256, 256))
    changes = SyntheticChanges(packed, n)
    items = local.view().items
    for _ in range(40):
        items = items.changed([(e.op, i, int(p)) for e in changes(1000) for i, p in e.items], merge=False)[0]
    a = torch.randn(256, 256)

    def work() -> float:
        start = time.perf_counter()
        for _ in range(20):
            a @ a
        return time.perf_counter() - start

    idle = [work() for _ in range(300)]
    done, merge_s = threading.Event(), []

    def merge() -> None:
        if nice:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
        start = time.perf_counter()
        items.as_table()
        merge_s.append(time.perf_counter() - start)
        done.set()

    thread = threading.Thread(target=merge)
    thread.start()
    busy = []
    while not done.is_set():
        busy.append(work())
    thread.join()

    def ms(values: list[float], q: float) -> float:
        return round(float(np.percentile(values, q)) * 1000, 2)

    print(f"nice {nice}: merge {merge_s[0]:.2f} s; loop alone p50/p99/max {ms(idle, 50)}/{ms(idle, 99)}/"
          f"{ms(idle, 100)} ms; during the merge (n={len(busy)}) {ms(busy, 50)}/{ms(busy, 99)}/{ms(busy, 100)} ms")


if __name__ == "__main__":
    main()
