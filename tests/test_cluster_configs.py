"""Every YAML under cluster/ and train/configs/ parses, and what it points at exists and loads."""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from nezha.config import from_dict, load_yaml
from nezha.model.backbones import PRESETS
from train.config import STRATEGIES, RayTrainConfig

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAMLS = sorted((REPO / "cluster").glob("*.yaml"))
TRAIN_CONFIGS = sorted((REPO / "train" / "configs").glob("*.yaml"))
IMAGE_ROOT = "/app/"  # where the container images of the KubeRay manifests hold the repository


def load(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{path}: expected a mapping"
    return data


def repo_path(path: str) -> Path:
    return REPO / path.removeprefix(IMAGE_ROOT)


def check_train_command(command: str) -> None:
    """`python train/run.py --config CONFIG [--flags]`: the script and the config exist, the flags are fields."""
    args = shlex.split(command)
    script = next(a for a in args if a.endswith("train/run.py"))
    assert repo_path(script).is_file()
    config = repo_path(args[args.index("--config") + 1])
    assert config in TRAIN_CONFIGS
    fields = {f.replace("_", "-") for f in RayTrainConfig.__dataclass_fields__}
    for flag in (a for a in args if a.startswith("--")):
        assert flag[2:] in fields | {"config"}, f"{command}: unknown flag {flag}"


def test_there_is_something_to_check():
    assert {p.name for p in CLUSTER_YAMLS} >= {"ray-cluster.yaml", "kuberay-rayjob.yaml", "kuberay-rayservice.yaml"}
    assert {p.name for p in TRAIN_CONFIGS} == {"quickstart.yaml", "llama-1b.yaml", "qwen-0.6b.yaml", "llama-3b.yaml"}


@pytest.mark.parametrize("path", CLUSTER_YAMLS + TRAIN_CONFIGS, ids=lambda p: p.name)
def test_yaml_parses(path: Path):
    load(path)


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: p.name)
def test_train_config_loads_into_ray_train_config(path: Path):
    cfg = from_dict(RayTrainConfig, load_yaml(path), source=str(path))
    assert cfg.backbone in PRESETS  # a local Hugging Face folder replaces it for pretrained weights
    assert cfg.strategy in STRATEGIES and 0 <= cfg.zero_stage <= 3
    assert cfg.num_workers >= 1 and cfg.batch_size >= 1
    if path.name == "quickstart.yaml":  # runs on this machine
        assert cfg.use_gpu is not True and cfg.num_workers * cfg.cpus_per_worker <= 2
    else:  # cluster runs: inputs and outputs on storage every node sees
        assert cfg.use_gpu is True and cfg.dtype in ("auto", "bfloat16")
        assert Path(cfg.prepared).is_absolute() and (Path(cfg.storage_path).is_absolute() or "://" in cfg.storage_path)


def test_cluster_launcher_config():
    cfg = load(REPO / "cluster" / "ray-cluster.yaml")
    assert cfg["provider"]["type"] and cfg["head_node_type"] in cfg["available_node_types"]
    assert cfg["max_workers"] >= max(t.get("max_workers", 0) for t in cfg["available_node_types"].values())
    assert all(source == "." for source in cfg["file_mounts"].values())  # the repository root
    assert any("pip install" in c and "/home/ray/nezha" in c for c in cfg["setup_commands"])
    assert any("ray start --head" in c for c in cfg["head_start_ray_commands"])
    # Each 8-GPU node fits 8 workers of the GPU train configs.
    gpus = max(t["resources"].get("GPU", 0) for t in cfg["available_node_types"].values())
    for path in TRAIN_CONFIGS:
        train = from_dict(RayTrainConfig, load_yaml(path))
        if train.use_gpu:
            assert train.num_workers % gpus == 0 or train.num_workers <= gpus


def test_rayjob_runs_the_train_entry_point():
    job = load(REPO / "cluster" / "kuberay-rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    check_train_command(job["spec"]["entrypoint"])
    spec = job["spec"]["rayClusterSpec"]
    gpus = sum(int(g["replicas"]) * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
               for g in spec["workerGroupSpecs"])
    args = shlex.split(job["spec"]["entrypoint"])
    config = repo_path(args[args.index("--config") + 1])
    assert from_dict(RayTrainConfig, load_yaml(config)).num_workers <= gpus


def test_rayservice_serves_the_serve_app_with_valid_args():
    service = load(REPO / "cluster" / "kuberay-rayservice.yaml")
    assert service["apiVersion"] == "ray.io/v1" and service["kind"] == "RayService"
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    (app,) = serve_config["applications"]
    module, attr = app["import_path"].split(":")
    assert app["import_path"] == "serve.app:app_builder"
    serve_app = importlib.import_module(module)
    assert callable(getattr(serve_app, attr))
    cfg = from_dict(serve_app.ServeConfig, app["args"])  # unknown keys or bad values raise
    decoder = next(d for d in app["deployments"] if d["name"] == "Recommender")
    assert decoder["ray_actor_options"].get("num_gpus") == 1 and cfg.device == "auto"
    # It serves what the RayJob writes: OUT/best = STORAGE_PATH/NAME/best of the training run.
    job = load(REPO / "cluster" / "kuberay-rayjob.yaml")
    args = shlex.split(job["spec"]["entrypoint"])
    train = from_dict(RayTrainConfig, load_yaml(repo_path(args[args.index("--config") + 1])))
    name = args[args.index("--name") + 1]
    assert cfg.checkpoint == f"{train.storage_path}/{name}/best"


def test_readme_names_the_serve_import_path_and_every_file():
    readme = (REPO / "cluster" / "README.md").read_text()
    assert "serve.app:app_builder" in readme
    for path in CLUSTER_YAMLS:
        assert path.name in readme
    for link in re.findall(r"\]\(([^)#]+)\)", readme):
        if "://" not in link:
            assert (REPO / "cluster" / link).resolve().exists(), link


def test_rayservice_is_serve_gpu_yaml_and_uses_no_deprecated_fields():
    import subprocess
    import sys

    service = load(REPO / "cluster" / "kuberay-rayservice.yaml")
    embedded = yaml.safe_load(service["spec"]["serveConfigV2"])
    gpu = load(REPO / "cluster" / "serve.gpu.yaml")
    embedded["applications"][0]["args"]["checkpoint"] = gpu["applications"][0]["args"]["checkpoint"]
    assert embedded == gpu, "run python cluster/sync_rayservice.py"
    check = subprocess.run([sys.executable, str(REPO / "cluster" / "sync_rayservice.py"), "--check"],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout
    # KubeRay deprecated these (v1.2+): health is judged by the Serve application's status instead.
    assert not {"serviceUnhealthySecondThreshold", "deploymentUnhealthySecondThreshold"} & set(service["spec"])
    head_env = service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "value": "60"} in head_env


def test_sync_rayservice_rewrites_a_drifted_service(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("sync_rayservice", REPO / "cluster" / "sync_rayservice.py")
    sync = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sync)
    service = (REPO / "cluster" / "kuberay-rayservice.yaml").read_text()
    drifted = service.replace("max_batch_size: 128", "max_batch_size: 32")
    assert drifted != service
    assert sync.rendered(drifted, (REPO / "cluster" / "serve.gpu.yaml").read_text()) == service


def test_grafana_dashboard_graphs_the_service_metrics():
    import json

    dashboard = json.loads((REPO / "cluster" / "grafana-nezha.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    source = (REPO / "serve" / "metrics.py").read_text()
    names = set(re.findall(r'"(nezha_[a-z_]+)"', source))
    graphed = {n for n in names if f"ray_{n}" in exprs}
    assert graphed == names, f"not graphed: {names - graphed}"
