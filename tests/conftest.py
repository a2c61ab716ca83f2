"""Shared fixtures: a tiny synthetic dataset prepared with the real pipeline, and tiny models."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

# Tiny models gain nothing from intra-op threads, and spinning OpenMP threads on a 2-core machine
# that also runs Ray workers slows every op several-fold.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]


def write_tiny_dataset(root: Path, num_items: int = 48, num_users: int = 40, seed: int = 0) -> Path:
    """Items in 6 brands; each user walks forward through the catalog (learnable: next = previous + 1)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    brands = ["Acme", "Bloom", "Cedar", "Dune", "Ember", "Fjord"]
    kinds = ["shampoo", "lipstick", "serum", "soap", "mascara", "lotion", "perfume", "cream"]
    with (root / "items.jsonl").open("w") as f:
        for i in range(num_items):
            f.write(json.dumps({"item_id": f"I{i:03d}", "title": f"{brands[i % 6]} {kinds[i % 8]} no. {i}",
                                "brand": brands[i % 6], "categories": ["Beauty", kinds[i % 8].title()]}) + "\n")
    lines = ["user_id,item_id,position"]
    for u in range(num_users):
        start = int(rng.integers(0, num_items))
        for pos in range(int(rng.integers(4, 9))):
            lines.append(f"U{u:03d},I{(start + pos) % num_items:03d},{pos}")
    (root / "interactions.csv").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="session")
def tiny_prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from nezha.prepare import PrepareConfig, prepare

    root = tmp_path_factory.mktemp("tiny")
    data = write_tiny_dataset(root / "data" / "tiny")
    out = root / "prepared"
    prepare(PrepareConfig(dataset=str(data), out=str(out), levels=3, codebook_size=6))
    return out


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model with every head (nezha + lm + mtp), trained briefly on the tiny dataset."""
    from nezha.training import TrainConfig, train

    out = tmp_path_factory.mktemp("ckpt")
    result = train(TrainConfig(prepared=str(tiny_prepared), out=str(out), backbone="tiny", objectives=["joint", "mtp"],
                               max_steps=30, batch_size=16, lr=3e-3, eval_every=15, eval_beam=5, progress=False))
    return result.best_checkpoint


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (starting Ray costs seconds); every Ray test uses this.

    Tolerates a Ray that is already running and only shuts down a Ray it started itself.
    """
    import ray

    started = not ray.is_initialized()
    if started:
        # On 2 busy cores a fresh Serve proxy can take over Serve's 5 s x 3 readiness checks to import
        # its web stack; the controller then kills it and `serve.start` fails. Give it time instead.
        os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "30")
        # Workers start in the driver's cwd with it on sys.path, which is how replicas import `serve`.
        ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    yield ray
    if started and ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="module")
def service(ray_session, tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    """A real recommendation service per test module: Serve over HTTP, 2 replicas, a redis-server."""
    from serve_fixtures import running_service

    with running_service(tiny_checkpoint, tmp_path_factory.mktemp("serve-redis")) as svc:
        yield svc
