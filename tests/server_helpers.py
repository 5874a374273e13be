"""Small helpers shared by the hostile-client server tests (``test_server_limits.py``,
``test_server_admin_errors.py``)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edge_server.server import make_server


def call_code(fn: Any, *args: Any, **kw: Any) -> grpc.StatusCode:
    """The status code of ``fn(*args, **kw)`` (``OK`` when it returns)."""
    try:
        fn(*args, **kw)
        return grpc.StatusCode.OK
    except grpc.RpcError as e:
        return e.code()


def call_error(fn: Any, *args: Any, **kw: Any) -> grpc.RpcError:
    """The :class:`grpc.RpcError` that ``fn(*args, **kw)`` must raise."""
    with pytest.raises(grpc.RpcError) as e:
        fn(*args, **kw)
    return e.value


def wait_until(cond: Any, timeout: float = 120.0, what: str = "") -> None:
    """Polls ``cond()`` until true; an AssertionError after ``timeout`` s (generous: a loaded machine is slow, the
    state itself does not go away)."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"not reached within {timeout:g} s: {what or cond}"
        time.sleep(0.02)


def health_status(ch: grpc.Channel, timeout: float = 5) -> int:
    return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=timeout).status


def start_server(bundle: Path, **kw: Any) -> Any:
    """An in-process server on a free port, ONNX Runtime on one thread unless told otherwise."""
    kw.setdefault("backend", "onnxruntime")
    kw.setdefault("intra_op_threads", 1)
    return make_server(bundle=bundle, port=0, **kw).start()
