"""Where the study runs: an existing Ray cluster, or a local one started for this run.

Decision order (printed at start):
1. ``--address`` / ``RAY_ADDRESS``: connect there.
2. A Ray node was started on this machine (``ray start`` / ``ray up`` leaves one on the head node):
   connect to it (``address="auto"``).
3. Otherwise start a local Ray with this machine's CPUs (and GPUs) and stop it at the end.
"""

from __future__ import annotations

import os
from typing import Any

BOOTSTRAP_FILE = "/tmp/ray/ray_current_cluster"


def _running_local_cluster() -> str | None:
    """Address of a Ray node started with ``ray start`` on this machine, if its GCS answers."""
    try:
        from ray._private.services import find_bootstrap_address

        found = find_bootstrap_address(None)
    except Exception:  # noqa: BLE001 - API differences / no file
        found = None
    if not found and os.path.exists(BOOTSTRAP_FILE):
        found = open(BOOTSTRAP_FILE).read().strip()
    if not found:
        return None
    addrs = [found] if isinstance(found, str) else list(found)
    for addr in addrs:
        host, _, port = addr.rpartition(":")
        import socket

        try:
            with socket.create_connection((host or "127.0.0.1", int(port)), timeout=1.0):
                return addr
        except (OSError, ValueError):
            continue
    return None


def connect(address: str | None = None, num_cpus: int | None = None, quiet: bool = False) -> dict[str, Any]:
    """Initialise Ray per the decision order; returns ``{"mode", "address", "resources"}``."""
    import ray

    if ray.is_initialized():
        return {"mode": "already-initialised", "address": None, "resources": ray.cluster_resources()}
    target = address or os.environ.get("RAY_ADDRESS")
    mode = "given"
    if not target:
        target = _running_local_cluster()
        mode = "existing"
    if target:
        # Ray 2.60 clusters use token auth by default; ray.init reads ~/.ray/auth_token.
        os.environ.setdefault("RAY_AUTH_MODE", "token")
        ray.init(address=target, log_to_driver=True, logging_level="WARNING")
    else:
        mode = "local"
        ray.init(num_cpus=num_cpus or os.cpu_count(), log_to_driver=True, logging_level="WARNING",
                 include_dashboard=True)
    res = ray.cluster_resources()
    if not quiet:
        where = {"given": f"the Ray cluster at {target}", "existing": f"the running Ray cluster at {target}",
                 "local": "a local Ray instance started for this study"}[mode]
        print(f"edgetune: using {where}: {len(ray.nodes())} node(s), {res.get('CPU', 0):g} CPU, {res.get('GPU', 0):g} GPU")
    return {"mode": mode, "address": target, "resources": res}


def shutdown(info: dict[str, Any]) -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
