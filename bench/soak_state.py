"""The soak's shared state and bookkeeping (``bench/soak.py``): the tokens, the thread-safe tally of what the
workers observed, the one-call wrapper that records each status, and the state every worker reads."""

from __future__ import annotations

import argparse
import collections
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as `python bench/soak.py`: the soak imports edgetune.* and tests.*
    sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

CAMERA_TOKEN = "soak-camera-token-0001"
ADMIN_TOKEN = "soak-admin-token-0123456789abcdef"
SC = grpc.StatusCode
CAM_MD = (("authorization", f"Bearer {CAMERA_TOKEN}"),)
ADMIN_MD = (*CAM_MD, ("x-edgetune-admin-token", ADMIN_TOKEN))


@dataclass
class Tally:
    """Everything the workers observed (thread-safe)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    codes: collections.Counter = field(default_factory=collections.Counter)  # (worker, code) -> n
    server_errors: list[tuple[float, str]] = field(default_factory=list)  # (time, code) the server replied
    frame_errors: list[float] = field(default_factory=list)  # times of FrameResults with an error
    unknown: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    valid_ms: list[tuple[float, float]] = field(default_factory=list)  # (time, latency) of valid unary calls
    served: int = 0
    hostile: int = 0
    health: list[tuple[float, float, str]] = field(default_factory=list)  # (start, end, status) of each check
    stats_bytes_max: int = 0

    def rpc(self, worker: str, code: SC, details: str = "", hostile: bool = False) -> None:
        now = time.monotonic()
        with self.lock:
            self.codes[(worker, code.name)] += 1
            if hostile:
                self.hostile += 1
            if code == SC.OK:
                self.served += 1
            elif code == SC.UNKNOWN:
                self.unknown.append(f"{worker}: {details[:200]}")
            elif _server_generated(code, details):
                self.server_errors.append((now, code.name))

    def frame(self, result: Any, hostile: bool = False) -> None:
        with self.lock:
            if hostile:
                self.hostile += 1
            if result.error:
                self.frame_errors.append(time.monotonic())
            else:
                self.served += 1

    def fail(self, msg: str) -> None:
        with self.lock:
            if len(self.failures) < 50:
                self.failures.append(msg)


def _server_generated(code: SC, details: str) -> bool:
    """Whether an error status came from the server (not from this client's deadline, cancel or connection)."""
    if code in (SC.CANCELLED, SC.UNAVAILABLE):
        return False
    if code == SC.DEADLINE_EXCEEDED:
        return "no frame received" in details  # the server's idle-stream timeout
    if code == SC.INTERNAL:
        return "deserializ" in details.lower() or "internal server error" in details
    return True


def call(tally: Tally, worker: str, fn: Any, *args: Any, hostile: bool = False, **kw: Any) -> Any:
    """``fn(*args, **kw)``, its status recorded in ``tally``: the response, or the ``grpc.RpcError``."""
    try:
        out = fn(*args, **kw)
        tally.rpc(worker, SC.OK, hostile=hostile)
        return out
    except grpc.RpcError as e:
        tally.rpc(worker, e.code(), e.details() or "", hostile=hostile)
        return e


class SoakState:
    """What the workers (``soak_workers``), the run (``soak``) and the checks (``soak_checks``) share."""

    def __init__(self, args: argparse.Namespace, work: Path, good: list[bytes]) -> None:
        self.args = args
        self.work = work
        self.tally = Tally()
        self.stop = threading.Event()
        self.pause = threading.Event()  # hostile workers hold still around the planned kill
        self.address = ""
        self.window: tuple[float, float] | None = None  # the planned restart (monotonic seconds)
        # failures unless the call overlaps the restart: (worker, call start, call end, message)
        self.timed_failures: list[tuple[str, float, float, str]] = []
        self.hostile_busy = 0  # hostile workers inside a call (the kill waits for 0 once they are paused)
        self.busy_lock = threading.Lock()
        self.peak_rss_mb = 0
        self.servers: list[Any] = []
        self._server_lock = threading.Lock()
        self.good = good
        self.loadmodel_results: list[tuple[str, str, str]] = []
        self.fast_streams = 0
        self.t0 = time.monotonic()
        # set by Soak.run (and Soak.prepare) before the workers start; read by the workers and the checks
        self.good_payloads: list[tuple[str, bytes, int]] = []  # the hostile unary inputs (soak_inputs)
        self.phases: dict[str, float] = {}
        self.rss_at_start_mb = 0
        self.video_frames = 0

    def in_window(self, t: float) -> bool:
        return self.window is not None and self.window[0] <= t <= self.window[1]

    def overlaps_window(self, start: float, end: float, window_end: float | None = None) -> bool:
        """Whether a call that ran from ``start`` to ``end`` overlapped the restart (a call in flight at the kill
        is cut by it; ``window_end``: a later end of the restart for this caller, see ``soak_checks``)."""
        if self.window is None:
            return False
        return start <= (self.window[1] if window_end is None else window_end) and end >= self.window[0]
