import json, statistics, sys, threading, time, http.client, os
import numpy as np
from ray import serve
import ray
from serve.app import build_app, ServeConfig
from nezha.loadgen import sample_histories
ck = "runs/quickstart/train/best"
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
serve.start(http_options={"host": "127.0.0.1", "port": 8011})
opts = {"Recommender": {"num_replicas": 1, "max_ongoing_requests": 256, "max_queued_requests": 64,
        "ray_actor_options": {"num_cpus": 1},
        "user_config": {"max_batch_size": 8, "batch_wait_timeout_s": 0.0, "max_pending_requests": 8}}}
serve.run(build_app(ServeConfig(checkpoint=ck), opts), name="nezha", route_prefix="/")
hs = sample_histories(ck, 64, 20, np.random.default_rng(0))
bodies = [json.dumps({"history": h, "k": 10}).encode() for h in hs]
for clients in map(int, sys.argv[1:]):
    res = []; lock = threading.Lock()
    def run(i):
        c = http.client.HTTPConnection("127.0.0.1", 8011, timeout=30)
        for j in range(6):
            t = time.perf_counter(); c.request("POST", "/v1/recommend", body=bodies[(i + j) % 64], headers={"Content-Type": "application/json"})
            r = c.getresponse(); r.read(); dt = (time.perf_counter() - t) * 1000
            with lock: res.append((r.status, dt))
        c.close()
    ts = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    [t.start() for t in ts]; [t.join() for t in ts]
    r503 = sorted(d for s, d in res if s == 503); r200 = sorted(d for s, d in res if s == 200)
    other = [s for s, _ in res if s not in (200, 503)]
    q = lambda v, p: v[min(len(v) - 1, int(p * len(v)))] if v else float("nan")
    print(f"clients {clients}: sent {len(res)}, 200 {len(r200)}, 503 {len(r503)}, other {len(other)}; "
          f"503 p50 {q(r503, .5):.1f} p99 {q(r503, .99):.1f} max {r503[-1] if r503 else float('nan'):.1f} ms; "
          f"200 p50 {q(r200, .5):.1f} ms; load {os.getloadavg()[0]:.1f}", flush=True)
serve.shutdown(); ray.shutdown()
