"""Write cluster/serve.gpu.yaml into cluster/kuberay-rayservice.yaml as its serveConfigV2.

    python cluster/sync_rayservice.py           # rewrite the RayService
    python cluster/sync_rayservice.py --check   # exit 1 when it differs (tests/test_cluster_configs.py checks too)

The RayService keeps its own checkpoint path (the RayJob's output on the shared volume); everything else is
serve.gpu.yaml's, comments included.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

CLUSTER = Path(__file__).resolve().parent
SERVE_CONFIG = CLUSTER / "serve.gpu.yaml"
RAYSERVICE = CLUSTER / "kuberay-rayservice.yaml"
BLOCK = re.compile(r"(  serveConfigV2: \|\n)(.*?)(\n  rayClusterConfig:)", re.S)
CHECKPOINT = re.compile(r"^(\s+checkpoint: )(\S+)", re.M)


def rendered(service_text: str, serve_text: str) -> str:
    """The RayService text with serveConfigV2 = serve.gpu.yaml (without its header comments, own checkpoint)."""
    match = BLOCK.search(service_text)
    if match is None:
        raise SystemExit(f"{RAYSERVICE}: no `serveConfigV2: |` block before `rayClusterConfig:`")
    current = CHECKPOINT.search(match.group(2))
    if current is None:
        raise SystemExit(f"{RAYSERVICE}: serveConfigV2 names no checkpoint")
    body = serve_text[serve_text.index("proxy_location:"):].rstrip("\n")
    body = CHECKPOINT.sub(lambda m: m.group(1) + current.group(2), body, count=1)
    block = "\n".join(f"    {line}" if line else "" for line in body.splitlines())
    return service_text[:match.start(2)] + block + service_text[match.end(2):]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only report whether the RayService is in sync")
    args = parser.parse_args(argv)
    service_text = RAYSERVICE.read_text()
    want = rendered(service_text, SERVE_CONFIG.read_text())
    if want == service_text:
        print(f"{RAYSERVICE.name} is in sync with {SERVE_CONFIG.name}")
        return 0
    if args.check:
        print(f"{RAYSERVICE.name} differs from {SERVE_CONFIG.name}: run python cluster/sync_rayservice.py")
        return 1
    RAYSERVICE.write_text(want)
    print(f"wrote {RAYSERVICE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
