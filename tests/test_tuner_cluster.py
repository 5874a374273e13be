"""Studies on more than one Ray node: a simulated multi-node cluster (``ray.cluster_utils.Cluster``) with
1-worker trials on different nodes and a 2-worker DDP trial whose ranks sit on different nodes; and
``python -m tuner`` against an already running ``ray start`` cluster (head + a second node, token auth)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest

from tests.test_tuner_helpers import ROOT, TINY_ARGS, run_tuner, tuner_env, write_space
from tuner.summary import read_summary

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.timeout(1200)]

DRIVER = r"""
import json, sys
import ray
from ray.cluster_utils import Cluster
from tuner.options import TuneOptions
from tuner.run import run_study

tmp, space, dashboard_port = sys.argv[1], sys.argv[2], int(sys.argv[3])
# Cluster passes Ray's default dashboard port explicitly (no fallback): a free one, so that another Ray on this
# machine (a developer's `ray start`, a second test run) cannot fail the test
c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": True,
                                                  "dashboard_port": dashboard_port})
try:
    nodes = sorted(c.add_node(num_cpus=1, resources={f"node{i}": 1, "slot": 1}).node_id for i in range(2))
    c.wait_for_nodes()
    common = dict(data="textures", img=64, max_images=60, sets=("batch_size=16",), space=space, epochs=1,
                  storage=f"sqlite:///{tmp}/optuna.db", address=c.address, export=False)
    run_study(TuneOptions(study="spread", trials=2, max_concurrent=2, out=f"{tmp}/spread", **common))
    run_study(TuneOptions(study="ddp", trials=1, workers_per_trial=2, cpus_per_worker=0.5,
                          resources_per_worker={"slot": 1}, placement_strategy="STRICT_SPREAD",
                          out=f"{tmp}/ddp", **common))
    json.dump({"nodes": nodes}, open(f"{tmp}/nodes.json", "w"))
finally:
    if ray.is_initialized():
        ray.shutdown()
    c.shutdown()
"""


def _short_tmp() -> Path:
    # Ray puts unix sockets under RAY_TMPDIR: keep the path short; isolates our bootstrap file from others
    return Path(tempfile.mkdtemp(prefix="etr-", dir="/tmp"))


def test_simulated_multi_node_cluster(tmp_path):
    space = write_space(tmp_path)
    rtmp = _short_tmp()
    log = tmp_path / "driver.log"
    with open(log, "w") as f:
        p = subprocess.run(
            [sys.executable, "-c", DRIVER, str(tmp_path), str(space), str(_free_ports(1)[0])],
            cwd=ROOT,
            stdout=f,
            stderr=subprocess.STDOUT,
            env=tuner_env(RAY_TMPDIR=str(rtmp)),
            timeout=900,
        )
    shutil.rmtree(rtmp, ignore_errors=True)
    assert p.returncode == 0, log.read_text()[-4000:]
    nodes = set(json.loads((tmp_path / "nodes.json").read_text())["nodes"])
    assert len(nodes) == 2
    storage = f"sqlite:///{tmp_path}/optuna.db"
    spread = optuna.load_study(study_name="spread", storage=storage).trials
    assert [t.state.name for t in spread] == ["COMPLETE", "COMPLETE"]
    used = {t.user_attrs["node_id"] for t in spread}
    assert used == nodes, f"1-worker trials ran on {used}, cluster worker nodes {nodes}"
    (ddp,) = optuna.load_study(study_name="ddp", storage=storage).trials
    assert ddp.state.name == "COMPLETE", ddp.user_attrs
    ranks = ddp.user_attrs["worker_node_ids"]
    assert len(ranks) == 2 and set(ranks) == nodes, f"DDP ranks on {ranks}"
    assert ddp.user_attrs["checkpoint_uri"] and ddp.user_attrs["params"] > 0
    assert read_summary(tmp_path / "ddp").ray["mode"] == "given"
    assert (tmp_path / "ddp" / "best" / "metrics.json").is_file(), "the DDP trial's checkpoint was found"


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _ray_start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """``ray start --block …`` in its own process group, so it is stopped by its own handle."""
    ray_bin = str(Path(sys.executable).with_name("ray"))
    f = open(log, "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        [ray_bin, "start", "--block", "--disable-usage-stats", *args],
        env=env,
        stdout=f,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _node_args(ports: list[int], lo: int) -> list[str]:
    p = iter(ports)
    return [
        "--node-ip-address=127.0.0.1",
        "--num-cpus=1",
        f"--node-manager-port={next(p)}",
        f"--object-manager-port={next(p)}",
        f"--metrics-export-port={next(p)}",
        f"--dashboard-agent-listen-port={next(p)}",
        f"--dashboard-agent-grpc-port={next(p)}",
        f"--runtime-env-agent-port={next(p)}",
        f"--min-worker-port={lo}",
        f"--max-worker-port={lo + 199}",
    ]


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in reversed(procs):
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    deadline = time.time() + 20  # `ray start --block` drains on SIGTERM (up to 30 s): do not wait for all of it
    for p in reversed(procs):
        try:
            p.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(p.pid, signal.SIGKILL)  # whatever of this group is left
        except ProcessLookupError:
            pass
        p.wait(timeout=30)


def test_make_tune_uses_a_running_cluster(tmp_path):
    rtmp = _short_tmp()
    env = tuner_env(RAY_TMPDIR=str(rtmp), RAY_AUTH_MODE="token")
    ports = _free_ports(16)
    gcs, dash, client, *rest = ports
    # worker port ranges below the ephemeral range (32768+) that _free_ports draws from: no collisions
    lo = 10000 + (os.getpid() % 50) * 400
    procs = []
    try:
        procs.append(
            _ray_start(
                [
                    "--head",
                    f"--port={gcs}",
                    f"--dashboard-port={dash}",
                    "--dashboard-host=127.0.0.1",
                    f"--ray-client-server-port={client}",
                    *_node_args(rest[:6], lo),
                ],
                env,
                tmp_path / "head.log",
            )
        )
        addr_file = rtmp / "ray" / "ray_current_cluster"
        deadline = time.time() + 120
        while not addr_file.exists() and time.time() < deadline:
            assert procs[0].poll() is None, (tmp_path / "head.log").read_text()[-3000:]
            time.sleep(0.5)
        assert addr_file.read_text().strip().endswith(f":{gcs}")
        procs.append(
            _ray_start([f"--address=127.0.0.1:{gcs}", *_node_args(rest[6:12], lo + 200)], env, tmp_path / "worker.log")
        )
        status = [str(Path(sys.executable).with_name("ray")), "status", f"--address=127.0.0.1:{gcs}"]
        while time.time() < deadline:
            out = subprocess.run(status, env=env, capture_output=True, text=True, timeout=60).stdout
            if out.count("node_") >= 2:
                break
            time.sleep(1)
        else:
            raise AssertionError(f"second node did not join:\n{out}")
        sessions_before = set((rtmp / "ray").glob("session_2*"))
        space = write_space(tmp_path)
        run_tuner(
            [
                *TINY_ARGS,
                "--space",
                str(space),
                "--study",
                "existing",
                "--trials",
                "2",
                "--epochs",
                "1",
                "--storage",
                f"sqlite:///{tmp_path}/optuna.db",
                "--out",
                str(tmp_path / "out"),
            ],
            tmp_path / "tune.log",
            env=env,
        )
        log = (tmp_path / "tune.log").read_text()
        assert "ray.mode=existing" in log and f":{gcs}" in log
        ray_info = read_summary(tmp_path / "out").ray
        assert ray_info["mode"] == "existing" and ray_info["address"].endswith(f":{gcs}")
        assert set((rtmp / "ray").glob("session_2*")) == sessions_before, "a local Ray instance was started"
        trials = optuna.load_study(study_name="existing", storage=f"sqlite:///{tmp_path}/optuna.db").trials
        assert len(trials) == 2 and all(t.state.name in ("COMPLETE", "PRUNED") for t in trials)
        # The trials ran on this cluster's nodes (the ids `ray status` lists). Both trials are suggested at the start
        # and each takes the one CPU of a node, so on a quiet machine they run at once, one per node; on a loaded
        # machine the first can end before Tune starts the second, which then takes the freed CPU of the same node
        # (issue 20): which node runs a trial is Ray's choice, not a behaviour of make tune.
        cluster_nodes = set(re.findall(r"node_([0-9a-f]{56})", out))
        trial_nodes = {t.user_attrs["node_id"] for t in trials}
        assert len(cluster_nodes) == 2 and trial_nodes <= cluster_nodes, (trial_nodes, out)
    finally:
        _stop(procs)
        shutil.rmtree(rtmp, ignore_errors=True)
    assert all(p.poll() is not None for p in procs)
