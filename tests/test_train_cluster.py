"""train/run.py on a real 2-node Ray cluster: a head and a second node started with `ray start` on this
machine, each with 1 CPU and its own custom resource, so a job of two 1-CPU workers puts one on each node.

ZeRO-2 and ZeRO-3 (with gradient accumulation) as `python train/run.py` drivers, then the user-JSON
ds_config through `ray job submit`. Every run writes its summary JSON; the tests print the node-ID log lines
and wall times (run pytest with -s to see them).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from redis_fixtures import free_port

# Two `ray start` nodes and four short jobs: about 3 minutes on the idle 2-core machine.
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
NODE_LINE = re.compile(r"rank (\d) of 2 on node ([0-9a-f]+)")


@dataclass
class LocalCluster:
    gcs_address: str
    dashboard_url: str
    env: dict[str, str]


def start_node(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """`ray start --block ...`, once it logs that its runtime started. Ray gives a node's raylet 30 s (fixed)
    to register with the GCS; at nice 19 on 2 cores under a load of 30 that can pass and the node exits:
    then it is started again."""
    for attempt in range(5):
        offset = log.stat().st_size if log.exists() else 0
        process = subprocess.Popen(args, env=env, stdout=log.open("a"), stderr=subprocess.STDOUT,
                                   start_new_session=True)
        deadline = time.monotonic() + 300
        while process.poll() is None and time.monotonic() < deadline:
            if "Ray runtime started." in log.read_text()[offset:]:
                return process
            time.sleep(1)
        stop(process)
        print(f"node start attempt {attempt + 1} failed (load average {os.getloadavg()[0]:.0f})")
    raise RuntimeError(f"`{' '.join(args)}` did not start; see {log}")


def stop(process: subprocess.Popen) -> None:
    """SIGTERM to the `ray start --block` we started stops its node; then whatever is left of the process
    group it leads (start_new_session: only what this test started), e.g. after a failed start."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    logs = tmp_path_factory.mktemp("cluster-logs")
    # A short private temp dir: Ray's socket paths must stay short, and the cluster address file it writes
    # there must not replace that of another Ray on this machine.
    temp_dir = tempfile.mkdtemp(prefix="rc", dir="/tmp")
    # The second node's own: with one shared temp dir, its runtime-env agent garbage-collects a job's unpacked
    # working_dir (it holds no reference to it) while the job's driver runs in it on the head node.
    second_temp_dir = tempfile.mkdtemp(prefix="rd", dir="/tmp")
    port, dashboard = free_port(), free_port()
    # `python` in jobs and DeepSpeed's JIT builds (ninja) must come from this interpreter's environment.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    env["RAY_gcs_rpc_server_connect_timeout_s"] = "60"  # the default 5 s is too short on 2 busy cores
    if (Path.home() / ".ray" / "auth_token").is_file():
        env["RAY_AUTH_MODE"] = "token"  # Ray 2.60 then enables token auth, which `ray job submit` must be told
    common = ["nice", "-n", "19", str(BIN / "ray"), "start", "--block", "--num-cpus=1", "--num-gpus=0",
              "--disable-usage-stats", f"--dashboard-agent-listen-port={free_port()}"]
    nodes: list[subprocess.Popen] = []
    try:
        nodes.append(start_node(
            common + ["--head", f"--port={port}", f"--temp-dir={temp_dir}", "--resources={\"head\": 1}",
                      "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                      f"--ray-client-server-port={free_port()}"], env, logs / "head.log"))
        second = [a if not a.startswith("--dashboard-agent") else f"--dashboard-agent-listen-port={free_port()}"
                  for a in common]
        nodes.append(start_node(second + [f"--address=127.0.0.1:{port}", f"--temp-dir={second_temp_dir}",
                                          "--resources={\"second\": 1}"], env, logs / "second.log"))
        cluster = LocalCluster(f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard}", env)
        wait_for_nodes(cluster, 2, 180)
        yield cluster
    finally:
        for process in reversed(nodes):
            stop(process)
        shutil.rmtree(temp_dir, ignore_errors=True)
        shutil.rmtree(second_temp_dir, ignore_errors=True)


def wait_for_nodes(cluster: LocalCluster, count: int, timeout: float) -> None:
    script = (f"import ray, time\nray.init(address={cluster.gcs_address!r}, log_to_driver=False)\n"
              f"deadline = time.time() + {timeout}\n"
              f"while sum(n['Alive'] for n in ray.nodes()) < {count}:\n"
              "    assert time.time() < deadline, ray.nodes()\n"
              "    time.sleep(1)\n")
    subprocess.run(["nice", "-n", "19", sys.executable, "-c", script], env=cluster.env, check=True,
                   timeout=timeout + 60)


def run_args(prepared: Path, storage: Path, name: str, summary: Path, **extra: Any) -> list[str]:
    args = {"prepared": prepared, "storage-path": storage, "name": name, "backbone": "tiny", "max-steps": 20,
            "batch-size": 16, "lr": 3e-3, "eval-every": 10, "checkpoint-every": 10, "eval-beam": 5,
            "log-every": 10, "num-workers": 2, "cpus-per-worker": 1, "summary-json": summary, **extra}
    return [part for key, value in args.items() for part in (f"--{key}", str(value))]


def check_two_nodes(output: str, summary: dict[str, Any]) -> list[str]:
    """The workers' log lines: rank 0 and rank 1 on two different nodes (as the summary says too)."""
    lines = sorted({m.group(0) for m in NODE_LINE.finditer(output)})
    nodes = {m.group(1): m.group(2) for m in NODE_LINE.finditer(output)}
    assert set(nodes) == {"0", "1"} and nodes["0"] != nodes["1"], lines
    assert summary["node_ids"] == [nodes["0"], nodes["1"]]
    return lines


def train_on(cluster: LocalCluster, tmp_path: Path, tiny_prepared: Path, name: str, **extra: Any
             ) -> tuple[dict[str, Any], str, float]:
    summary_file, log = tmp_path / f"{name}.json", tmp_path / f"{name}.log"
    started = time.perf_counter()
    with log.open("w") as out:  # a file, so that a run that times out leaves its log behind
        done = subprocess.run(["nice", "-n", "19", sys.executable, "train/run.py",
                               *run_args(tiny_prepared, tmp_path / "ray", name, summary_file, **extra)],
                              cwd=REPO, env={**cluster.env, "RAY_ADDRESS": cluster.gcs_address},
                              stdout=out, stderr=subprocess.STDOUT, timeout=900)
    wall = time.perf_counter() - started
    output = log.read_text()
    assert done.returncode == 0, output[-6000:]
    return json.loads(summary_file.read_text()), output, wall


@pytest.mark.slow
@pytest.mark.parametrize("stage, extra", [
    (2, {"shard-validation": "false"}),  # rank 0 validates alone: the wait to compare with the sharded runs
    (2, {}),  # sharded validation (the default)
    (3, {"gradient-accumulation-steps": 2}),
])
def test_one_worker_per_node_on_a_two_node_cluster(two_nodes, tiny_prepared, tmp_path, stage, extra):
    summary, output, wall = train_on(two_nodes, tmp_path, tiny_prepared, f"zero{stage}", **{"zero-stage": stage,
                                                                                            **extra})
    lines = check_two_nodes(output, summary)
    assert summary["config"]["zero_stage"] == stage and summary["steps"] == 20
    assert [h["step"] for h in summary["history"]] == [10, 20]
    assert (tmp_path / "ray" / f"zero{stage}" / "state_step00000020").is_dir()
    print(f"\nZeRO-{stage} on 2 nodes: {' | '.join(lines)}; wall {wall:.1f} s (train {summary['train_seconds']:.1f} s); "
          f"validation waits per rank {summary['validation_wait_s']} s")


@pytest.mark.slow
def test_ray_job_submit_runs_the_same_job_with_a_users_ds_config(two_nodes, tiny_prepared, tmp_path):
    summary_file = tmp_path / "job.json"
    args = run_args(tiny_prepared, tmp_path / "ray", "job", summary_file,
                    **{"deepspeed-config": "train/configs/ds_config.json"})  # relative: inside the uploaded copy
    started = time.perf_counter()
    done = subprocess.run(["nice", "-n", "19", str(BIN / "ray"), "job", "submit", "--address", two_nodes.dashboard_url,
                           "--working-dir", ".", "--", "python", "train/run.py", *args],
                          cwd=REPO, env=two_nodes.env, capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - started
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert re.search(r"Job 'raysubmit_\w+' succeeded", output), output[-2000:]
    summary = json.loads(summary_file.read_text())
    lines = check_two_nodes(output, summary)
    assert summary["steps"] == 20 and summary["config"]["deepspeed_config"].endswith("train/configs/ds_config.json")
    best = [line for line in output.splitlines() if line.startswith("best checkpoint:")]
    submitted = [line for line in output.splitlines() if re.search(r"Job '?raysubmit_\w+'? (submitted|succeeded)", line)]
    print(f"\nray job submit: {' | '.join(lines)}; wall {wall:.1f} s; validation waits per rank "
          f"{summary['validation_wait_s']} s\n" + "\n".join(submitted + best))
    assert best
