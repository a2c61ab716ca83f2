"""How long a replica's copy takes to apply batches of changes: `python apply_dist.py ITEMS APPLIES [BATCH]`.

A LocalCatalog of ITEMS synthetic 3x256 items applies APPLIES batches of BATCH changes (20: what the batched
follower reads at 1,000 changes/s), alternately adds of fresh IDs and removals of the first items; prints
p50 / p90 / p99 / max / mean in ms and how many applies took over 5 ms, as one JSON line. Used for the
three-layer maps (docs/operations.md, "Catalog size"); run it with nothing else on the machine.
"""

import json
import sys
import time

import numpy as np

from nezha.live_catalog import ItemTable, LocalCatalog
from nezha.live_catalog.item_table import StringColumn
from nezha.live_catalog_bench import SyntheticChanges


def main(n: int, applies: int, batch: int = 20) -> dict[str, float]:
    rng = np.random.default_rng(0)
    packed = rng.choice(256**3, size=n + max(300_000, applies * batch), replace=False)
    ids = StringColumn.from_encoded(b"".join(f"B{i:09d}".encode() for i in range(n)), np.full(n, 10, dtype=np.int64))
    local = LocalCatalog(ItemTable.build(ids, packed[:n]), (256, 256, 256))
    changes = SyntheticChanges(packed, n)
    times = []
    for _ in range(applies):
        entries = changes(batch)
        start = time.perf_counter()
        local.apply(entries)
        times.append((time.perf_counter() - start) * 1e3)
    ms = np.array(times)
    return {"items": n, "applies": applies, "batch": batch, **{f"p{q}": round(float(np.percentile(ms, q)), 3)
                                                               for q in (50, 90, 99)},
            "max": round(float(ms.max()), 2), "mean": round(float(ms.mean()), 3), "over_5ms": int((ms > 5).sum())}


if __name__ == "__main__":
    print(json.dumps(main(*(int(a) for a in sys.argv[1:]))))
