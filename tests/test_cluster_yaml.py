"""cluster.yaml is a valid Ray cluster-launcher config (checked offline against Ray's autoscaler schema)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("ray")
from ray.autoscaler._private.util import prepare_config, validate_config  # noqa: E402


def _load() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def _validate(cfg: dict) -> None:
    validate_config(prepare_config(copy.deepcopy(cfg)))


def test_cluster_yaml_validates():
    cfg = _load()
    _validate(cfg)
    assert cfg["provider"]["type"] == "aws"
    head = cfg["available_node_types"][cfg["head_node_type"]]
    assert "GPU" not in head["resources"], "the head node is a CPU node"
    gpu_types = [n for n, t in cfg["available_node_types"].items() if n != cfg["head_node_type"]]
    assert gpu_types, "a worker node type is needed"
    w = cfg["available_node_types"][gpu_types[0]]
    assert w["node_config"]["InstanceType"].startswith(("g", "p")), "GPU worker instance type"
    assert 0 <= w["min_workers"] <= w["max_workers"]


def test_cluster_yaml_is_pinned_and_installs_the_project():
    cfg = _load()
    for key in ("image", "head_image"):
        img = cfg["docker"][key]
        tag = img.rpartition(":")[2]
        assert ":" in img and tag != "latest" and tag.startswith("2.60."), img
    setup = " ".join(cfg["setup_commands"])
    assert "make install" in setup and "train,postgres" in setup
    assert "EDGETUNE_STORAGE_PATH=s3://" in setup, "shared checkpoint storage for all nodes"
    assert cfg["file_mounts"].get("~/edgetune") == "."
    assert any("--dashboard-host=0.0.0.0" in c for c in cfg["head_start_ray_commands"])


@pytest.mark.parametrize("breakage", ["min_gt_max", "typo_key", "bad_head_type", "string_setup"])
def test_broken_copy_fails(breakage):
    cfg = _load()
    workers = [n for n in cfg["available_node_types"] if n != cfg["head_node_type"]]
    if breakage == "min_gt_max":
        cfg["available_node_types"][workers[0]]["min_workers"] = 5
        cfg["available_node_types"][workers[0]]["max_workers"] = 2
    elif breakage == "typo_key":
        node = cfg["available_node_types"][workers[0]]
        node["max_worker"] = node.pop("max_workers")
    elif breakage == "bad_head_type":
        cfg["head_node_type"] = "no.such.type"
    else:
        cfg["setup_commands"] = "pip install edgetune"
    with pytest.raises(Exception):  # noqa: B017 - jsonschema.ValidationError or ValueError, depending on the check
        _validate(cfg)
