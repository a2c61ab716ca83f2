"""Probe (issue 23): the longest Redis command while N items are written into the three maps, one hash per
map vs `shards` hashes per map (crc32 of the field mod shards, as nezha's push does), 2,000 items per
pipelined round trip, each layout on its own fresh redis-server; one JSON line per layout.

    python docs/measurements/catalog-bench/shard_probe.py 10000000 1,64 \
        > docs/measurements/catalog-bench/shard-probe-10m.jsonl

(The committed shard-probe-10m.jsonl came from a first version that put a packed ID in shard `packed mod
shards` rather than crc32's; both spread random IDs evenly. Run on 2026-12-06 with the machine otherwise idle.)
"""

from __future__ import annotations

import json
import os
import random
import socket
import string
import subprocess
import sys
import time
import zlib

import redis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def probe(items: list[str], packed: list[int], title: str, shards: int, chunk: int) -> dict:
    port = free_port()
    server = subprocess.Popen(["redis-server", "--port", str(port), "--save", "", "--appendonly", "no",
                               "--slowlog-log-slower-than", "5000", "--slowlog-max-len", "100000"],
                              stdout=subprocess.DEVNULL)
    time.sleep(0.5)
    client = redis.Redis(port=port)
    meta = json.dumps({"title": title})
    start = time.time()
    try:
        with client.pipeline(transaction=False) as pipe:
            for lo in range(0, len(items), chunk):
                writes: dict[str, dict] = {}
                for item, pid in zip(items[lo:lo + chunk], packed[lo:lo + chunk], strict=True):
                    item_shard = zlib.crc32(item.encode()) % shards
                    id_shard = zlib.crc32(str(pid).encode()) % shards
                    writes.setdefault(f"i2i:{item_shard}", {})[item] = pid
                    writes.setdefault(f"id2:{id_shard}", {})[pid] = item
                    writes.setdefault(f"meta:{item_shard}", {})[item] = meta
                for key, mapping in writes.items():
                    pipe.hset(f"{{t}}:{key}", mapping=mapping)
                pipe.execute()
        push_s = time.time() - start
        log = sorted(client.slowlog_get(100000), key=lambda e: -e["duration"])
        durations = [e["duration"] / 1000 for e in log]
        return {"n": len(items), "shards": shards, "chunk": chunk, "push_s": round(push_s, 1),
                "over_5ms": len(durations), "over_20ms": sum(d > 20 for d in durations),
                "over_50ms": sum(d > 50 for d in durations), "longest_ms": durations[0] if durations else 0,
                "top": [(round(e["duration"] / 1000, 1), e["command"][:40].decode(errors="replace")) for e in log[:5]],
                "mem_mb": client.info("memory")["used_memory"] >> 20, "load": os.getloadavg()}
    finally:
        server.terminate()
        server.wait()


def main() -> None:
    n = int(sys.argv[1])
    layouts = [int(x) for x in sys.argv[2].split(",")]
    chunk = int(sys.argv[3]) if len(sys.argv) > 3 else 2000
    rng = random.Random(0)
    items = [f"{i:010d}" for i in range(n)]
    packed = rng.sample(range(256 ** 3), n)
    title = "".join(rng.choice(string.ascii_letters + " ") for _ in range(80))
    for shards in layouts:
        print(json.dumps(probe(items, packed, title, shards, chunk)), flush=True)


if __name__ == "__main__":
    main()
