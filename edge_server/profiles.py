"""Server profiles: the defaults of the memory-related limits (``python -m edge_server --profile``), and the bound
of request memory each gives (``edge_server.budget.request_memory_bound_mb``):

* ``default`` (a workstation or server): 16 MB messages, 64 unary calls, 32 streams, 256 MB in flight, 512 MB of
  decodes: at most 256 + (64 + 32) x 2 x 16 + 512 = 3,840 MB of request memory;
* ``jetson`` (a Jetson Orin Nano: 8 GB shared with the GPU): 4 MB messages (a 4096x4096 JPEG of a camera is
  far below), 16 unary calls, 16 streams, 128 MB in flight, 128 MB of decodes: at most
  128 + (16 + 16) x 2 x 4 + 128 = 512 MB.
"""

from __future__ import annotations

from typing import Any

from edge_server.budget import DEFAULT_DECODE_BUDGET_MB, DEFAULT_INFLIGHT_MB, request_memory_bound_mb

SERVER_PROFILES: dict[str, dict[str, Any]] = {  # "default" is also ServerConfig's defaults
    "default": {
        "max_message_mb": 16.0,
        "max_concurrent": 64,
        "max_streams": 32,
        "max_inflight_mb": DEFAULT_INFLIGHT_MB,
        "max_decode_mb": DEFAULT_DECODE_BUDGET_MB,
    },
    "jetson": {
        "max_message_mb": 4.0,
        "max_concurrent": 16,
        "max_streams": 16,
        "max_inflight_mb": 128.0,
        "max_decode_mb": 128.0,
    },
}

#: ``--profile`` choices.
PROFILE_NAMES = tuple(SERVER_PROFILES)


def profile_limits(profile: str, **given: Any) -> dict[str, Any]:
    """The profile's limits, with every value in ``given`` that is not None in their place."""
    out = dict(SERVER_PROFILES[profile])
    out.update({k: v for k, v in given.items() if v is not None})
    return out


def profile_bound_mb(profile: str) -> float:
    """The request-memory bound (MB) of ``profile`` with its own limits."""
    v = SERVER_PROFILES[profile]
    return request_memory_bound_mb(
        v["max_message_mb"], v["max_concurrent"], v["max_streams"], v["max_inflight_mb"], v["max_decode_mb"]
    )
