"""``make edge-node HEAD=<host:port> TARGET=<name>`` / ``make edge-node-stop``: join this device to a running
Ray cluster as the timing node of target ``<name>``, and take it out again.

The node carries the custom resource ``edge_target:<name>`` (amount 1, so timings on this device never
overlap) and offers no CPUs or GPUs to the cluster, so no training trial is ever placed on it: it only runs
the timing tasks of ``make tune TARGET=<name>`` (``edge_server.agent.timing``: the ONNX file and the server's runners;
no torch, no trainer). It is started with Ray's own command, ``ray start --address … --block``, kept in its own
process group; ``stop`` sends that process SIGTERM, Ray's own shutdown of a ``--block`` node (it drains the
node and stops the node's processes, and nothing else on the machine, unlike ``ray stop``).

Ray's rule: every node of a cluster runs the same Ray version and the same Python minor version. JetPack 6
ships Python 3.10, so the head and the GPU workers run Python 3.10 too (cluster.yaml, README "Device in the
loop"). This module only runs the ``ray`` command line, so it imports neither Ray nor torch.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from edgetune.dataclass_cli import HelpFormatter, add_version
from edgetune.device import RESOURCE_PREFIX, TARGET_RULE, token_available, valid_target

_HEAD = re.compile(r"^[A-Za-z0-9_.:\[\]-]+:[0-9]{1,5}$")
STARTED = "Ray runtime started"


def state_dir() -> Path:
    return Path(os.environ.get("EDGETUNE_STATE_DIR") or Path.home() / ".cache" / "edgetune") / "edge-nodes"


def _ray_exe() -> str:
    here = Path(sys.executable).with_name("ray")
    exe = str(here) if here.exists() else shutil.which("ray")
    if not exe:
        raise SystemExit(
            "error: the `ray` command is not installed: pip install 'edgetune[serve,edge]' (on a Jetson: "
            "the aarch64 Ray wheel of the cluster's Ray version; README 'Device in the loop')"
        )
    return exe


def _local_ip_towards(host: str) -> str:
    """The address of this machine on the route to the head (what the node advertises); "" = let Ray choose."""
    if host in ("127.0.0.1", "localhost"):
        return "127.0.0.1"
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, 9))
            return str(s.getsockname()[0])
    except OSError:
        return ""


def _check_head(head: str, target: str) -> str:
    """The head's host, once the target name and the head address are valid and a Ray head answers there."""
    if not valid_target(target):
        raise SystemExit(f"error: TARGET must be {TARGET_RULE}, got {target!r}")
    if not _HEAD.match(head or ""):
        raise SystemExit(
            f"error: HEAD must be <head host>:<port> (the address `ray start --head` printed), got {head!r}"
        )
    host = head.rsplit(":", 1)[0].strip("[]")
    port = int(head.rsplit(":", 1)[1])
    try:
        socket.create_connection((host, port), timeout=5.0).close()
    except OSError as e:
        raise SystemExit(
            f"error: no Ray head answers at {head} ({e}); start it with `ray start --head --port {port}`"
            " (or `ray up cluster.yaml`)"
        ) from None
    return host


def _state_file(target: str) -> Path:
    """Where this machine records the node of ``target`` (a stale record of a node that is gone is removed)."""
    d = state_dir()
    d.mkdir(parents=True, exist_ok=True)
    state_file = d / f"{target}.json"
    if state_file.exists():
        old = json.loads(state_file.read_text())
        if _is_our_node(int(old["pid"]), target):
            raise SystemExit(
                f"error: an edge node for target {target!r} already runs here (pid {old['pid']}); "
                "stop it with `make edge-node-stop`"
            )
        state_file.unlink()
    return state_file


def start(head: str, target: str, timeout_s: float = 120.0) -> dict[str, object]:
    """Join the cluster at ``head`` as the timing node of ``target`` (``ray start --block`` in its own process
    group); returns the recorded state (pid, resource, log). SystemExit saying what is wrong where it cannot."""
    host = _check_head(head, target)
    state_file = _state_file(target)
    log = state_file.with_suffix(".log")
    resource = json.dumps({RESOURCE_PREFIX + target: 1})
    ip = _local_ip_towards(host)
    cmd = [
        _ray_exe(),
        "start",
        "--address",
        head,
        *(["--node-ip-address", ip] if ip else []),
        "--num-cpus",
        "0",
        "--num-gpus",
        "0",
        "--resources",
        resource,
        "--disable-usage-stats",
        "--block",
    ]
    env = dict(os.environ)
    for attempt in (1, 2):
        proc, text = _launch(cmd, env, log, timeout_s)
        if proc.poll() is None:
            info = {
                "pid": proc.pid,
                "target": target,
                "head": head,
                "resource": RESOURCE_PREFIX + target,
                "log": str(log),
                "started_at": time.time(),
                "auth_mode": env.get("RAY_AUTH_MODE", ""),
            }
            state_file.write_text(json.dumps(info))
            return info
        # Ray 2.60: a head started where a token exists uses token auth, a joining node with RAY_AUTH_MODE unset
        # does not: retry once in token mode (never forced on a cluster started without it)
        if attempt == 1 and "InvalidAuthToken" in text and "RAY_AUTH_MODE" not in env and token_available():
            env["RAY_AUTH_MODE"] = "token"
            continue
        raise SystemExit(f"error: `ray start` exited with {proc.returncode}:\n" + "\n".join(text.splitlines()[-8:]))
    raise AssertionError("unreachable")


def _launch(cmd: list[str], env: dict[str, str], log: Path, timeout_s: float) -> tuple[subprocess.Popen[bytes], str]:
    """Start ``ray start --block``; return once it says the node started (process alive) or it exited."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        text = log.read_text(errors="replace")
        if STARTED in text or proc.poll() is not None:
            proc.poll()
            return proc, text
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(30)
    raise SystemExit(f"error: the edge node did not start within {timeout_s:g} s (log: {log})")


def _is_our_node(pid: int, target: str) -> bool:
    """The process ``pid`` is still the ``ray start --block`` of ``target``'s node (not a stranger that reused the
    PID after a reboot or crash)."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return _alive(pid) and not Path("/proc").is_dir()  # no /proc (not Linux): trust the PID
    text = b" ".join(cmd).decode(errors="replace")
    return "start" in text and "--block" in text and RESOURCE_PREFIX + target in text


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop(target: str = "", timeout_s: float = 60.0) -> list[str]:
    """Stop the edge node(s) started here (``target`` or all): SIGTERM to each ``ray start --block``."""
    d = state_dir()
    files = [d / f"{target}.json"] if target else sorted(d.glob("*.json"))
    stopped = []
    for f in files:
        if not f.exists():
            continue
        info = json.loads(f.read_text())
        pid = int(info["pid"])
        if _is_our_node(pid, str(info["target"])):
            os.kill(pid, signal.SIGTERM)  # Ray's handler drains the node and stops its processes
            deadline = time.time() + timeout_s
            while _alive(pid) and time.time() < deadline:
                try:
                    os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    pass
                time.sleep(0.3)
            if _is_our_node(pid, str(info["target"])):
                os.killpg(pid, signal.SIGKILL)
        f.unlink()
        stopped.append(str(info["target"]))
    return stopped


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m edge_server.agent", description=__doc__.split("\n")[0], formatter_class=HelpFormatter
    )
    add_version(p)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("start", help="join the Ray head as the timing node of a target", formatter_class=HelpFormatter)
    s.add_argument("--head", required=True, help="the Ray head's <host>:<port> (GCS address)")
    s.add_argument("--target", required=True, help="target name: the node carries resource edge_target:<name>")
    s.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the node to join")
    t = sub.add_parser("stop", help="stop the edge node(s) started on this machine", formatter_class=HelpFormatter)
    t.add_argument("--target", default="", help="only this target's node (default: all)")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.cmd == "start":
        info = start(a.head, a.target, a.timeout)
        print(
            f"edge node for target {info['target']} joined {info['head']} (resource {info['resource']}, pid "
            f"{info['pid']}, log {info['log']}); stop it with `make edge-node-stop`"
        )
    else:
        done = stop(a.target)
        print(f"stopped edge node(s): {', '.join(done)}" if done else "no edge node started here is running")
    return 0


if __name__ == "__main__":
    sys.exit(main())
