"""``ray up cluster.yaml && make tune`` from the laptop: run the study on the launched cluster.

When ``make tune`` runs on a machine that is not itself a Ray node, with no ``--address`` /
``RAY_ADDRESS``, and ``ray up <cluster.yaml>`` was run from this machine (Ray's cluster launcher keeps
its resolved config in ``$TMPDIR/ray-config-<sha256>``), edgetune asks the launcher for the head node
(``ray get-head-ip``). If the head answers, the study is run there with ``ray exec <cluster.yaml>
'cd ~/edgetune && make tune …'`` (the code is the checkout ``ray up`` synced) and the outputs are copied
back with ``ray rsync-down``. ``EDGETUNE_LOCAL=1`` or ``--address local`` keeps the study on this machine.
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from tuner import _ray_compat

log = logging.getLogger(__name__)

REMOTE_DIR = "~/edgetune"


def launcher_cache_file(config_path: str | Path) -> Path:
    """Where ``ray up config_path`` caches its resolved config (same hashing as Ray's ``_bootstrap_config``)."""
    return _ray_compat.launcher_cache_file(yaml.safe_load(Path(config_path).read_text()))


def _ray_cli() -> list[str]:
    exe = Path(sys.executable).with_name("ray")
    return [str(exe)] if exe.exists() else ["ray"]


def head_ip(config_path: str | Path, timeout: float = 60.0) -> str | None:
    """The launched cluster's head IP per ``ray get-head-ip`` (None when it is not up / unreachable)."""
    try:
        r = subprocess.run(
            [*_ray_cli(), "get-head-ip", str(config_path)], capture_output=True, text=True, timeout=timeout, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = [ln.strip() for ln in r.stdout.splitlines() if ln.strip()]
    return lines[-1] if r.returncode == 0 and lines else None


def launched_cluster(
    config_path: str | Path = "cluster.yaml", address: str = "", get_head_ip: Callable[[Path], str | None] | None = None
) -> str | None:
    """Head IP of a cluster launched from this machine with ``config_path``, or None (then run here)."""
    from tuner.cluster import running_local_cluster  # noqa: PLC0415 - late-bound: tests patch it

    p = Path(config_path)
    if os.environ.get("EDGETUNE_LOCAL") or address or os.environ.get("RAY_ADDRESS") or not p.is_file():
        return None
    if running_local_cluster():  # this machine is a Ray node (e.g. the head itself): cluster.py connects
        return None
    try:
        cache = launcher_cache_file(p)
    except Exception:  # noqa: BLE001 - a cluster.yaml the launcher would reject is not a launched cluster
        return None
    if not cache.is_file():
        return None
    return (get_head_ip or head_ip)(p)


def strip_out(argv: list[str]) -> list[str]:
    """``argv`` without ``--out X`` / ``--out=X`` (the remote run writes under ~/edgetune/runs/<study>)."""
    kept, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--out":
            skip = True
        elif not a.startswith("--out="):
            kept.append(a)
    return kept


def remote_commands(config_path: str | Path, argv: list[str], study: str, local_out: str) -> list[list[str]]:
    """The ``ray exec`` that runs the study on the head and the ``ray rsync-down`` that fetches its outputs."""
    cfg = str(config_path)
    remote_out = f"runs/{study}"
    args = [*strip_out(argv), "--out", remote_out]
    inner = f"cd {REMOTE_DIR} && EDGETUNE_LOCAL=1 make tune ARGS={shlex.quote(shlex.join(args))}"
    return [
        [*_ray_cli(), "exec", cfg, inner],
        [*_ray_cli(), "rsync-down", cfg, f"{REMOTE_DIR}/{remote_out}/", local_out.rstrip("/") + "/"],
    ]


def forward(
    config_path: str | Path,
    head: str,
    argv: list[str],
    study: str,
    local_out: str,
    run: Callable[..., Any] = subprocess.run,
) -> int:
    log.info(
        f"the cluster launched from {config_path} is up (head {head}): running the study there "
        f"(EDGETUNE_LOCAL=1 make tune runs it on this machine instead)"
    )
    rc = 0
    Path(local_out).mkdir(parents=True, exist_ok=True)
    for cmd in remote_commands(config_path, argv, study, local_out):
        log.info("$ " + shlex.join(cmd))
        rc = run(cmd, check=False).returncode
        if rc != 0:
            return int(rc)
    return rc
