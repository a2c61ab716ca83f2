"""The shipped start path, `python -m serve run serve.config.yaml`, on a machine whose cores are all busy.

Serve's own proxy readiness limit (5 s x 3) kills the proxy there; the wrapper gives it time. The test runs the
real command in a fresh local Ray (RAY_ADDRESS=local: never an existing cluster) next to busy loops on every core.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from redis_fixtures import free_port

from serve.__main__ import STARTUP_ENV, main

REPO = Path(__file__).resolve().parents[1]


def test_the_wrapper_sets_the_startup_limits_unless_given(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in STARTUP_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S", "45")
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert os.environ["RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S"] == "60"
    assert os.environ["RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S"] == "45"


@pytest.mark.slow
def test_serve_run_comes_up_while_every_core_is_busy(tiny_checkpoint: Path, tmp_path: Path) -> None:
    config = yaml.safe_load((REPO / "serve.config.yaml").read_text())
    port = free_port()
    config["http_options"]["port"] = port
    (app,) = config["applications"]
    app["args"].update(checkpoint=str(tiny_checkpoint), beam=10, decoders=["nezha", "mtp", "beam"])
    path = tmp_path / "serve.config.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if k not in STARTUP_ENV}
    env.update(RAY_ADDRESS="local", NEZHA_REDIS_URL="")
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 2)]
    log = tmp_path / "serve-run.log"  # a file: an unread pipe fills up and blocks Serve's logging
    server = subprocess.Popen([sys.executable, "-m", "serve", "run", str(path)], cwd=REPO, env=env,
                              stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    start = time.monotonic()
    try:
        ready = None
        while time.monotonic() - start < 420:
            assert server.poll() is None, log.read_text()[-4000:]
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
                if r.status_code == 200:
                    ready = time.monotonic() - start
                    break
            except httpx.HTTPError:
                pass
            time.sleep(2)
        assert ready is not None, "no service within 420 s"
        r = httpx.post(f"http://127.0.0.1:{port}/v1/recommend", json={"history": ["I010", "I011"], "k": 3}, timeout=30)
        assert r.status_code == 200 and r.json()["items"][0]["title"]
        print(f"\nSTART python -m serve run serve.config.yaml with {len(busy)} busy loops: ready after {ready:.0f} s, "
              f"load average {os.getloadavg()[0]:.1f}")
    finally:
        for proc in busy:
            proc.kill()
        server.send_signal(signal.SIGINT)  # serve run shuts Serve and its own local Ray down
        try:
            server.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
