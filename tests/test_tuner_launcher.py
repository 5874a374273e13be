"""`ray up cluster.yaml && make tune` from a laptop: detection of the launched cluster and the forward."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tuner import launcher

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def tmpdir_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    import tempfile

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    monkeypatch.delenv("EDGETUNE_LOCAL", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr("tuner.cluster.running_local_cluster", lambda: None)
    return tmp_path


def _fake_launch(config: Path) -> Path:
    """Write the cache `ray up` leaves, at the path edgetune computes for this config."""
    from ray.autoscaler._private.commands import CONFIG_CACHE_VERSION
    from ray.autoscaler._private.util import prepare_config

    cfg = prepare_config(yaml.safe_load(config.read_text()))
    cache = launcher.launcher_cache_file(config)
    cache.write_text(json.dumps({"_version": CONFIG_CACHE_VERSION, "provider_log_info": {}, "config": cfg}))
    return cache


def test_cache_file_is_the_one_ray_up_reads(tmpdir_env: Path) -> None:
    """Ray's own _bootstrap_config finds our cache file: otherwise it would try to reach AWS (no boto3 here)."""
    from ray.autoscaler._private.commands import _bootstrap_config

    cache = _fake_launch(REPO / "cluster.yaml")
    assert cache.parent == tmpdir_env and cache.name.startswith("ray-config-")
    resolved = _bootstrap_config(yaml.safe_load((REPO / "cluster.yaml").read_text()))
    assert resolved["cluster_name"] == yaml.safe_load((REPO / "cluster.yaml").read_text())["cluster_name"]


def test_launched_cluster_detection(tmpdir_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = shutil.copy(REPO / "cluster.yaml", tmpdir_env / "cluster.yaml")
    up = lambda p: "10.0.0.5"  # noqa: E731 - the launcher's answer for an up head node
    assert launcher.launched_cluster(cfg, get_head_ip=up) is None  # never launched from here
    _fake_launch(Path(cfg))
    assert launcher.launched_cluster(cfg, get_head_ip=up) == "10.0.0.5"
    assert launcher.launched_cluster(cfg, get_head_ip=lambda p: None) is None  # launched, but down now
    assert launcher.launched_cluster(cfg, address="local", get_head_ip=up) is None
    monkeypatch.setenv("EDGETUNE_LOCAL", "1")
    assert launcher.launched_cluster(cfg, get_head_ip=up) is None
    monkeypatch.delenv("EDGETUNE_LOCAL")
    monkeypatch.setattr("tuner.cluster.running_local_cluster", lambda: "127.0.0.1:6379")  # we are the head
    assert launcher.launched_cluster(cfg, get_head_ip=up) is None


def test_head_ip_is_none_when_the_launcher_cannot_reach_the_cloud(tmpdir_env: Path) -> None:
    # no AWS credentials / boto3 here: the real `ray get-head-ip` fails fast and we run locally
    assert launcher.head_ip(REPO / "cluster.yaml", timeout=120) is None


def test_forward_runs_the_study_on_the_head_and_fetches_outputs(tmp_path: Path) -> None:
    calls: list[list[str]] = []

    class Done:
        returncode = 0

    def run(cmd: list[str], check: bool = False) -> Done:
        calls.append(cmd)
        return Done()

    argv = ["--data", "/data/waste", "--out", "/home/me/out", "--trials", "40", "--gpus-per-trial=1"]
    rc = launcher.forward("cluster.yaml", "10.0.0.5", argv, "waste", str(tmp_path / "out"), run=run)
    assert rc == 0 and len(calls) == 2
    exe, inner = calls[0][1:3], calls[0][3]
    assert exe == ["exec", "cluster.yaml"]
    assert inner.startswith("cd ~/edgetune && EDGETUNE_LOCAL=1 make tune ARGS=")
    assert "/home/me/out" not in inner and "--out runs/waste" in inner and "--trials 40" in inner
    assert calls[1][1:] == ["rsync-down", "cluster.yaml", "~/edgetune/runs/waste/", str(tmp_path / "out") + "/"]


def test_make_tune_here_ignores_a_cluster_yaml_never_launched(tmp_path: Path) -> None:
    """The CLI's decision on this machine: nothing launched -> no forward (fails later on a bad dataset)."""
    r = subprocess.run(
        [
            str(REPO / ".venv/bin/python"),
            "-m",
            "tuner",
            "--data",
            str(tmp_path / "missing"),
            "--out",
            str(tmp_path / "o"),
            "--storage",
            f"sqlite:///{tmp_path}/o.db",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert "is up (head" not in r.stdout
    assert r.returncode == 2 and "Traceback" not in r.stderr
