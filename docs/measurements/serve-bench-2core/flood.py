"""How fast overload is turned away: N closed-loop clients x 6 requests against one replica admitting 8.

    PYTHONPATH=. .venv/bin/python docs/measurements/serve-bench-2core/flood.py 16 32 64

Starts its own local Ray + Serve on port 8011 with the quickstart checkpoint (docs/serving.md, "Load test").
The proxy row of that page: set `max_ongoing_requests` 8, `max_queued_requests` 1 and `max_pending_requests`
64 in OPTIONS, so that Serve's proxy refuses before the replica sees the request.
"""

from __future__ import annotations

import http.client
import json
import os
import sys
import threading
import time

import numpy as np
import ray
from ray import serve

from nezha.loadgen import sample_histories
from nezha.timing import latency_stats
from serve.app import ServeConfig, build_app

CHECKPOINT = "runs/quickstart/train/best"
PORT = 8011
REQUESTS_PER_CLIENT = 6
OPTIONS = {"Recommender": {"num_replicas": 1, "max_ongoing_requests": 256, "max_queued_requests": 64,
                           "ray_actor_options": {"num_cpus": 1},
                           "user_config": {"max_batch_size": 8, "batch_wait_timeout_s": 0.0,
                                           "max_pending_requests": 8}}}


def flood(bodies: list[bytes], clients: int) -> list[tuple[int, float, str | None]]:
    """(status, latency ms, Retry-After) of every request of `clients` concurrent keep-alive clients."""
    results: list[tuple[int, float, str | None]] = []
    lock = threading.Lock()

    def client(index: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", PORT, timeout=30)
        for j in range(REQUESTS_PER_CLIENT):
            start = time.perf_counter()
            conn.request("POST", "/v1/recommend", body=bodies[(index + j) % len(bodies)],
                         headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            response.read()
            elapsed = (time.perf_counter() - start) * 1000
            with lock:
                results.append((response.status, elapsed, response.getheader("Retry-After")))
        conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def summary(clients: int, results: list[tuple[int, float, str | None]]) -> str:
    refused = [ms for status, ms, _ in results if status == 503]
    ok = [ms for status, ms, _ in results if status == 200]
    other = sum(status not in (200, 503) for status, _, _ in results)
    line = f"clients {clients}: sent {len(results)}, 200 {len(ok)}, 503 {len(refused)}, other {other}"
    if refused:
        stats = latency_stats(refused)
        retry_after = sorted({str(h) for status, _, h in results if status == 503})
        line += (f"; 503 p50 {stats['p50']:.1f} p99 {stats['p99']:.1f} max {max(refused):.1f} ms, "
                 f"Retry-After {retry_after}")
    if ok:
        line += f"; 200 p50 {latency_stats(ok)['p50']:.1f} ms"
    return line + f"; load {os.getloadavg()[0]:.1f}"


def main(levels: list[int]) -> None:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    serve.run(build_app(ServeConfig(checkpoint=CHECKPOINT), OPTIONS), name="nezha", route_prefix="/")
    histories = sample_histories(CHECKPOINT, 64, 20, np.random.default_rng(0))
    bodies = [json.dumps({"history": h, "k": 10}).encode() for h in histories]
    try:
        for clients in levels:
            print(summary(clients, flood(bodies, clients)), flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [16, 32, 64])
