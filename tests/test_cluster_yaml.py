"""cluster.yaml is a valid `ray up` config (the schema that ships in the ray wheel) and keeps its promises."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_cluster_yaml_matches_the_schema_in_the_ray_wheel(cluster: dict) -> None:
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(cluster, schema)


def test_ray_accepts_it_after_filling_in_defaults(cluster: dict) -> None:
    """What `ray up` does before launching anything: merge the provider defaults, validate again."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(cluster))


def test_node_types_head_gpu_workers_spot_and_limits(cluster: dict) -> None:
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert not head["node_config"]["InstanceType"].startswith(("g", "p")), "the head is a CPU node"
    gpu = {name: t for name, t in types.items() if t["node_config"]["InstanceType"].startswith(("g5.", "p4d.", "p5."))}
    assert len(gpu) >= 2, "GPU node types with one and with several GPUs"
    assert any(t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot" for t in gpu.values())
    for name, t in types.items():
        if name != cluster["head_node_type"]:
            assert 0 <= t["min_workers"] <= t["max_workers"] <= cluster["max_workers"], name
            assert "--shm-size" in " ".join(t["docker"]["worker_run_options"]), f"{name}: /dev/shm for Ray Data"
    assert cluster["docker"]["image"].startswith("rayproject/ray:2.60."), "node Ray must match the client's"


def test_every_node_installs_the_project_and_shares_the_auth_token(cluster: dict) -> None:
    assert cluster["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert cluster["file_mounts"]["~/speechlm"] == "."
    assert any("pip install" in c and "speechlm" in c for c in cluster["setup_commands"])
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = " ".join(cluster[key])
        assert "RAY_AUTH_MODE=token" in start and "MLFLOW_TRACKING_URI=" in start, key
    assert "mlflow server" in " ".join(cluster["head_start_ray_commands"])


def test_header_names_the_launch_commands() -> None:
    header = re.match(r"(?:#.*\n)+", CLUSTER_YAML.read_text()).group(0)
    for command in (
        "ray up cluster.yaml",
        "ray job submit --working-dir . -- python -m orchestrator train",
        "ray get-auth-token --generate",
        "RAY_AUTH_MODE=token",
        "ray down cluster.yaml",
    ):
        assert command in header, command
