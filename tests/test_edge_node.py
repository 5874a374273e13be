"""``make edge-node`` / ``make edge-node-stop`` against a real ``ray start --head`` on 127.0.0.1: the node joins
with ``edge_target:<name>`` and no CPUs/GPUs for training, and stopping it leaves the head running."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _edge(env: dict[str, str], *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge_server.agent", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _nodes(env: dict[str, str], address: str) -> list[dict]:
    code = (
        f"import json, ray; ray.init(address={address!r}, logging_level='ERROR'); "
        "print(json.dumps([{k: n[k] for k in ('NodeID', 'Alive', 'Resources')} for n in ray.nodes()]))"
    )
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_bad_arguments_are_refused_clearly(tmp_path):
    env = {**os.environ, "EDGETUNE_STATE_DIR": str(tmp_path)}
    p = _edge(env, "start", "--head", "127.0.0.1:1", "--target", "bad name")
    assert p.returncode != 0 and "TARGET must be" in p.stderr
    p = _edge(env, "start", "--head", "nohostport", "--target", "sim")
    assert p.returncode != 0 and "HEAD must be <head host>:<port>" in p.stderr
    p = _edge(env, "start", "--head", f"127.0.0.1:{_free_port()}", "--target", "sim")
    assert p.returncode != 0 and "no Ray head answers" in p.stderr and "ray start --head" in p.stderr
    p = _edge(env, "stop")
    assert p.returncode == 0 and "no edge node started here" in p.stdout


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_edge_node_joins_with_its_resource_and_stops_alone(tmp_path):
    import tempfile

    port = _free_port()
    short = Path(tempfile.mkdtemp(prefix="et-ray-", dir="/tmp"))  # Ray's socket paths must stay under 107 bytes
    env = {**os.environ, "RAY_TMPDIR": str(short), "EDGETUNE_STATE_DIR": str(tmp_path / "state")}
    env.pop("RAY_ADDRESS", None)
    head_log = open(tmp_path / "head.log", "w")
    head = subprocess.Popen(
        [
            RAY,
            "start",
            "--head",
            "--node-ip-address",
            "127.0.0.1",
            "--port",
            str(port),
            "--num-cpus",
            "1",
            "--include-dashboard=false",
            "--disable-usage-stats",
            "--block",
        ],
        env=env,
        stdout=head_log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while "Ray runtime started" not in (tmp_path / "head.log").read_text() and time.time() < deadline:
            assert head.poll() is None, (tmp_path / "head.log").read_text()[-2000:]
            time.sleep(0.5)
        p = _edge(env, "start", "--head", address, "--target", "sim")
        assert p.returncode == 0, p.stdout + p.stderr
        assert "resource edge_target:sim" in p.stdout
        state = json.loads((tmp_path / "state" / "edge-nodes" / "sim.json").read_text())
        p2 = _edge(env, "start", "--head", address, "--target", "sim")
        assert p2.returncode != 0 and "already runs here" in p2.stderr
        node_env = {**env, "RAY_AUTH_MODE": state["auth_mode"]} if state["auth_mode"] else env
        nodes = [n for n in _nodes(node_env, address) if n["Alive"]]
        edge = [n for n in nodes if n["Resources"].get("edge_target:sim") == 1.0]
        assert len(nodes) == 2 and len(edge) == 1, nodes
        assert edge[0]["Resources"].get("CPU", 0) == 0 and edge[0]["Resources"].get("GPU", 0) == 0  # no training
        p = _edge(env, "stop")
        assert p.returncode == 0 and "stopped edge node(s): sim" in p.stdout
        try:
            os.kill(state["pid"], 0)
            alive = True
        except ProcessLookupError:
            alive = False
        assert not alive
        assert head.poll() is None  # the head is untouched
        alive_nodes = [n for n in _nodes(node_env, address) if n["Alive"]]
        assert not any("edge_target:sim" in n["Resources"] for n in alive_nodes)
    finally:
        _edge(env, "stop")
        if head.poll() is None:
            os.killpg(head.pid, signal.SIGTERM)  # Ray's own shutdown of a --block node
            head.wait(60)
        head_log.close()
        import shutil

        shutil.rmtree(short, ignore_errors=True)
