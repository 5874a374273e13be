"""Where the study runs: an existing Ray cluster, or a local one started for this run.

Decision order (printed at start):
1. ``--address`` / ``RAY_ADDRESS``: connect there (``--address local`` forces step 3).
2. A Ray node was started on this machine (``ray start`` / ``ray up`` leaves one on the head node; its
   address is in ``$RAY_TMPDIR/ray/ray_current_cluster``, default ``/tmp/ray``) and its GCS answers:
   connect to it.
3. Otherwise start a local Ray with this machine's CPUs (and GPUs) and stop it at the end.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

from edgetune.device import token_available
from tuner import _ray_compat

log = logging.getLogger(__name__)


def bootstrap_file() -> str:
    """The file where ``ray start`` records the address of the node it started (honours RAY_TMPDIR)."""
    return _ray_compat.address_file()


def _answers(addr: str) -> bool:
    host, _, port = addr.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=1.0):
            return True
    except (OSError, ValueError):
        return False


def running_local_cluster() -> str | None:
    """Address of a Ray node started with ``ray start`` on this machine, if its GCS answers."""
    path = bootstrap_file()
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        addr = f.read().strip()
    return addr if addr and _answers(addr) else None


def connect(
    address: str | None = None,
    num_cpus: int | None = None,
    quiet: bool = False,
    env_vars: dict[str, str] | None = None,
    include_dashboard: bool = False,
) -> dict[str, Any]:
    """Initialise Ray per the decision order; returns ``{"mode", "address", "resources"}``.

    ``mode`` is ``given`` (address/RAY_ADDRESS), ``existing`` (a running node found on this machine) or
    ``local`` (started here, stopped by :func:`shutdown`). ``env_vars`` reach every Ray worker. A local
    instance starts without its dashboard (seconds of start-up and a CPU-hungry process saved), unless
    ``include_dashboard``: DDP trials need it, since without the dashboard's State API Ray 2.60 does not free
    a stopped Train-in-Tune trial's placement group (shared/notes/ray-2.60.md).
    """
    import ray

    if ray.is_initialized():
        return {"mode": "already-initialised", "address": None, "resources": ray.cluster_resources()}
    runtime_env = {"env_vars": dict(env_vars)} if env_vars else None
    target = address or os.environ.get("RAY_ADDRESS") or None
    mode = "given"
    if target == "local":
        target = None
    elif not target:
        target = running_local_cluster()
        mode = "existing"
    if target:
        # A cluster started with token auth (`ray start` under RAY_AUTH_MODE=token, as cluster.yaml does) needs
        # RAY_AUTH_MODE=token here too (token from ~/.ray/auth_token); it is taken from the environment as is,
        # because forcing it breaks clusters started without it ("Missing authorization header").
        _init_existing(target, runtime_env)
    else:
        mode = "local"
        # A local study's workers are its training: Ray starts workers at niceness 15 (RayConfig worker_niceness),
        # so on a machine doing other work a time-budgeted study would train a fraction of what its budget holds.
        os.environ.setdefault("RAY_worker_niceness", "0")
        # address="local": never attach to some other instance on this machine by accident.
        ray.init(
            address="local",
            num_cpus=num_cpus or os.cpu_count(),
            log_to_driver=True,
            logging_level=logging.WARNING,
            include_dashboard=include_dashboard,
            runtime_env=runtime_env,
        )
    res = ray.cluster_resources()
    if not quiet:
        where = {
            "given": f"the Ray cluster at {target}",
            "existing": f"the running Ray cluster at {target}",
            "local": "a local Ray instance started for this study",
        }[mode]
        log.info(
            f"using {where}: {len(ray.nodes())} node(s), {res.get('CPU', 0):g} CPU, "
            f"{res.get('GPU', 0):g} GPU (ray.mode={mode})"
        )
    return {"mode": mode, "address": target, "resources": res}


def _init_existing(address: str, runtime_env: dict[str, Any] | None) -> None:
    """``ray.init(address=…)``. With ``RAY_AUTH_MODE`` unset and a token at hand, a head started where a token
    exists runs with token auth (Ray 2.60's default) but a client with the mode unset does not: when the cluster
    refuses the connection for that, retry once in token mode (Ray's own retries make that first refusal take
    about 20 s; export RAY_AUTH_MODE=token to skip it, as cluster.yaml does)."""
    import ray

    # as given first: a client forced into token mode against a cluster without token auth connects, but its
    # actors are then never scheduled (measured with Ray 2.60), so token mode is only the retry
    modes = ["", "token"] if not os.environ.get("RAY_AUTH_MODE") and token_available() else [""]
    for i, mode in enumerate(modes):
        if mode:
            _ray_compat.set_auth_mode(mode)
        try:
            ray.init(address=address, log_to_driver=True, logging_level=logging.WARNING, runtime_env=runtime_env)
            return
        except (ConnectionError, RuntimeError) as e:
            chain: list[str] = []
            x: BaseException | None = e
            while x is not None and len(chain) < 8:
                chain.append(f"{type(x).__name__}: {x}")
                x = x.__cause__ or x.__context__
            text = " ".join(chain)
            auth = any(
                w in text for w in ("InvalidAuthToken", "AuthenticationError", "Unauthenticated", "authorization")
            )
            if not auth or i == len(modes) - 1:
                raise
            log.info(f"the Ray cluster at {address} uses token auth; retrying with RAY_AUTH_MODE=token")


def shutdown(info: dict[str, Any]) -> None:
    """Disconnect; a local instance started by :func:`connect` is stopped with it."""
    import ray

    if ray.is_initialized() and info.get("mode") != "already-initialised":
        ray.shutdown()
