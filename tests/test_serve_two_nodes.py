"""The service on a real 2-node Ray cluster: a head and a second node started with `ray start` on this machine,
two decoder replicas spread one per node (`max_replicas_per_node: 1`), one redis-server holding the catalog.

A change made through the admin API reaches the replicas on both nodes; killing the second node (kill -9)
leaves the head's replica serving. The nodes' IDs come from `/readyz` (run pytest with -s to see them).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis_fixtures import RedisServer, free_port
from serve_fixtures import ADMIN, HISTORY, free_codes, service_settings
from test_train_cluster import LocalCluster, start_node, stop, wait_for_nodes

from nezha.catalog import Catalog
from nezha.live_catalog import RedisCatalog, load_item_metadata

# Two `ray start` nodes and two replicas loading the model: about 2 minutes on the idle 2-core machine.
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# The driver that deploys the app, in its own process: this pytest process may already hold a local Ray
# (the session's `ray_session`). The app outlives it (Serve's controller is a detached actor). The proxy runs
# on the head only: both nodes share this machine's loopback, where only one can bind the port.
DEPLOY = """
import json, sys
import ray
from ray import serve
from serve.app import ServeConfig, build_app
address, port, settings, options = json.loads(sys.argv[1])
ray.init(address=address, log_to_driver=False)
serve.start(http_options={"host": "127.0.0.1", "port": port, "location": "HeadOnly", "request_timeout_s": 60})
serve.run(build_app(ServeConfig(**settings), options), name="nezha", route_prefix="/")
print(json.dumps([n["NodeID"] for n in ray.nodes() if "node:__internal_head__" in n["Resources"]]))
"""
# One replica per node: each node has 1 CPU, a replica asks for half of one.
OPTIONS = {"Recommender": {"num_replicas": 2, "max_replicas_per_node": 1, "ray_actor_options": {"num_cpus": 0.5},
                           "user_config": {"batch_wait_timeout_s": 0.05}}}


@dataclass
class TwoNodeService:
    client: httpx.Client
    redis: RedisServer
    catalog: Catalog
    second_node: subprocess.Popen
    head_node_id: str


@pytest.fixture(scope="module")
def two_node_service(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoNodeService]:
    logs = tmp_path_factory.mktemp("two-node-logs")
    # Short private temp dirs (Ray's socket paths must stay short), one per node as in test_train_cluster.
    temp_dirs = [tempfile.mkdtemp(prefix="rs", dir="/tmp"), tempfile.mkdtemp(prefix="rt", dir="/tmp")]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    env["PYTHONPATH"] = str(REPO)  # every worker on both nodes imports `serve` from this checkout
    env["RAY_gcs_rpc_server_connect_timeout_s"] = "60"  # the default 5 s is too short on 2 busy cores
    env["RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S"] = "60"  # the proxy's start on busy cores (conftest.ray_session)
    # The proxy sends everything to a replica on its own node while that one has room: the replica on the
    # second node would never be asked. Off, it picks among all replicas (the second node has no proxy here).
    env["RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING"] = "0"
    if (Path.home() / ".ray" / "auth_token").is_file():
        env["RAY_AUTH_MODE"] = "token"  # Ray 2.60 then enables token auth on the head: the second node must know
    redis = RedisServer(tmp_path_factory.mktemp("two-node-redis"))
    redis.start()
    gcs_port = free_port()
    common = ["nice", "-n", "19", str(BIN / "ray"), "start", "--block", "--num-cpus=1", "--num-gpus=0",
              "--disable-usage-stats"]
    nodes: list[subprocess.Popen] = []
    try:
        catalog = Catalog.load(tiny_checkpoint / "catalog")
        RedisCatalog(redis.url).push(catalog, source=str(tiny_checkpoint),
                                     item_meta=load_item_metadata(tiny_checkpoint, catalog))
        nodes.append(start_node(common + ["--head", f"--port={gcs_port}", f"--temp-dir={temp_dirs[0]}",
                                          "--include-dashboard=false",
                                          f"--ray-client-server-port={free_port()}",
                                          f"--dashboard-agent-listen-port={free_port()}"], env, logs / "head.log"))
        nodes.append(start_node(common + [f"--address=127.0.0.1:{gcs_port}", f"--temp-dir={temp_dirs[1]}",
                                          f"--dashboard-agent-listen-port={free_port()}"], env, logs / "second.log"))
        cluster = LocalCluster(f"127.0.0.1:{gcs_port}", "", env)
        wait_for_nodes(cluster, 2, 180)
        http_port = free_port()
        settings = service_settings(tiny_checkpoint, redis.url)
        deployed = subprocess.run(
            ["nice", "-n", "19", sys.executable, "-c", DEPLOY,
             json.dumps([cluster.gcs_address, http_port, settings, OPTIONS])],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert deployed.returncode == 0, (deployed.stdout + deployed.stderr)[-6000:]
        [head_node_id] = json.loads(deployed.stdout.splitlines()[-1])
        with httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=60) as client:
            yield TwoNodeService(client, redis, catalog, nodes[1], head_node_id)
    finally:
        for process in reversed(nodes):
            stop(process)
        redis.kill()
        for temp_dir in temp_dirs:
            shutil.rmtree(temp_dir, ignore_errors=True)


def collect(answer: Callable[[], dict[str, dict[str, Any]]], done: Callable[[dict[str, dict[str, Any]]], bool],
            timeout: float) -> dict[str, dict[str, Any]]:
    """Merge `answer()` (replica id -> its latest answer, or {}) until `done` holds; fails after `timeout` s."""
    seen: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    while not done(seen):
        assert time.monotonic() < deadline, f"not done after {timeout} s: {seen}"
        seen.update(answer())
        time.sleep(0.05)
    return seen


def by_replica(response: httpx.Response) -> dict[str, dict[str, Any]]:
    """A 200 answer under the id of the replica that gave it; {} for anything else."""
    return {response.json()["replica"]: response.json()} if response.status_code == 200 else {}


def ready_replicas(service: TwoNodeService) -> dict[str, dict[str, Any]]:
    """Replica id -> its /readyz status, polled until both replicas answered."""
    ready = collect(lambda: by_replica(service.client.get("/readyz")), lambda seen: len(seen) == 2, timeout=120)
    assert all(body["catalog"]["mode"] == "redis" and body["degraded"] == [] for body in ready.values())
    return ready


def replica_nodes(service: TwoNodeService) -> dict[str, str]:
    """Replica id -> node id."""
    return {replica: body["node_id"] for replica, body in ready_replicas(service).items()}


def test_replicas_on_two_nodes_both_apply_a_change_written_through_one(two_node_service: TwoNodeService) -> None:
    service = two_node_service
    nodes = replica_nodes(service)
    assert len(set(nodes.values())) == 2 and service.head_node_id in nodes.values(), nodes  # one on each node

    codes = free_codes(service.redis.url, service.catalog.codebook_sizes)[0]
    added = service.client.post("/v1/catalog/items", headers=ADMIN,
                                json={"items": [{"item_id": "TWO-NODES-1", "codes": codes, "title": "New"}]})
    assert added.status_code == 200, added.text
    version, added_at = added.json()["version"], time.monotonic()

    # Both replicas, one on each node, answer for the new item from their own copy of the catalog.
    known = collect(lambda: by_replica(service.client.get("/v1/items/TWO-NODES-1")),
                    lambda seen: set(seen) == set(nodes), timeout=60)
    known_s = time.monotonic() - added_at
    assert all(body["codes"] == codes and body["catalog_version"] >= version for body in known.values()), known
    print(f"\nTWO NODES: replica -> node {nodes} (head {service.head_node_id}); item TWO-NODES-1 (version "
          f"{version}, written through replica {added.json()['replica']}) answered by both within {known_s:.2f} s")


def test_killing_the_second_node_leaves_the_head_replica_serving(two_node_service: TwoNodeService) -> None:
    service = two_node_service
    ready = ready_replicas(service)
    nodes = {replica: body["node_id"] for replica, body in ready.items()}
    assert len(set(nodes.values())) == 2, nodes
    # kill -9 of the node's `ray start` with what it started in its process group (raylet, agents) and of
    # its replica (a worker in a session of its own): no drain, they just die. (A SIGTERM to `ray start`
    # would drain the node: Serve moves the replica away first and no request fails.)
    [lost_pid] = [body["pid"] for body in ready.values() if body["node_id"] != service.head_node_id]
    os.killpg(service.second_node.pid, signal.SIGKILL)
    os.kill(lost_pid, signal.SIGKILL)
    service.second_node.wait()
    killed_at = time.monotonic()

    # Until the proxy stops routing to the lost replica some requests may fail; then all are the head's.
    in_a_row: list[str] = []
    failed = 0
    while len(in_a_row) < 20:
        assert time.monotonic() < killed_at + 120, f"no 20 answers in a row within 120 s: {in_a_row}"
        answer = by_replica(service.client.post("/v1/recommend", json={"history": HISTORY, "k": 5}))
        in_a_row = in_a_row + list(answer) if answer else []
        failed += not answer
    recovered_s = time.monotonic() - killed_at
    assert {nodes[replica] for replica in in_a_row} == {service.head_node_id}, (in_a_row, nodes)

    # The survivor still follows Redis: a removal made now reaches it.
    gone = service.catalog.item_ids[-1]
    removed = service.client.delete(f"/v1/catalog/items/{gone}", headers=ADMIN)
    assert removed.status_code == 200, removed.text
    collect(lambda: {"gone": {}} if service.client.get(f"/v1/items/{gone}").status_code == 404 else {},
            lambda seen: bool(seen), timeout=30)
    print(f"\nTWO NODES: second node killed; {failed} requests failed, then 20 in a row answered on the head "
          f"node {service.head_node_id}, {recovered_s:.1f} s after the kill; removal of {gone} applied there")
