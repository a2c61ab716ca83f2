"""`python -m serve run serve.config.yaml`: Ray's `serve` command, with start-up limits that hold on a busy machine.

Serve's controller kills a proxy that fails its readiness check 3 times in 5 s each; on 2 cores kept busy by
another process, importing the proxy's web stack alone takes longer, and `serve run` dies with ActorDiedError.
The controller reads these limits from its environment when it starts, so they must be set before Ray starts:
this wrapper sets them (unless already set) and hands the command line to Ray's own `serve` CLI. On a cluster
started with `ray start`, export them before `ray start` instead (cluster/kuberay-rayservice.yaml does).
"""

from __future__ import annotations

import os
import sys

STARTUP_ENV = {
    "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60",  # per readiness check of a starting proxy (Serve: 5)
    "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "30",  # per health check of a running proxy (Serve: 10)
    "RAY_raylet_start_wait_time_s": "120",  # a local Ray's raylet registering with its GCS (Ray: 10)
}


def main(argv: list[str] | None = None) -> None:
    for name, value in STARTUP_ENV.items():
        os.environ.setdefault(name, value)
    from ray.serve.scripts import cli

    cli.main(args=sys.argv[1:] if argv is None else argv, prog_name="python -m serve")


if __name__ == "__main__":
    main()
