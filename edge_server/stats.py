"""Server statistics: per-camera FPS / drops / latency percentiles, unary latency, batch sizes, errors.

Camera ids come from clients, so what is kept per camera is bounded: at most ``max_cameras`` are tracked
(cameras idle for ``camera_idle_s`` make room for new ones; beyond that, frames of untracked cameras are
summed under :data:`ServerStats.OVERFLOW`), each with a fixed-size latency window. The servicer refuses
camera ids longer than :data:`MAX_CAMERA_ID_CHARS` before they reach these counters.

Locking: the frame-counting hot path takes the table lock only to find its camera (an O(1) dict lookup)
and then that camera's own lock. :meth:`ServerStats.snapshot` (``GetStats``) copies the table and the
scalar totals under the table lock (microseconds), then reads each camera's counters under its own lock;
FPS and percentiles are pre-aggregated per camera and recomputed (with no lock held) at most every
:data:`SUMMARY_MAX_AGE_S`.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from edgetune.errors import ConfigError

_WINDOW = 2048  # latency samples kept per series
_FPS_WINDOW_S = 10.0
#: Longest ``camera_id`` (characters) the server accepts in a frame.
MAX_CAMERA_ID_CHARS = 128
#: Default number of cameras tracked individually.
DEFAULT_MAX_CAMERAS = 256
#: Default seconds without a frame after which a tracked camera may be forgotten.
DEFAULT_CAMERA_IDLE_S = 300.0
#: A camera's FPS and latency percentiles are recomputed for GetStats at most this often (and whenever its
#: sample window has doubled since), so GetStats with every camera tracked costs a few ms, not 35 (issue 21);
#: counters (received, processed, dropped, errors) are always current.
SUMMARY_MAX_AGE_S = 1.0


def percentiles(samples: collections.deque[float] | list[float]) -> tuple[float, float, float]:
    if not samples:
        return 0.0, 0.0, 0.0
    p = np.percentile(np.fromiter(samples, dtype=np.float64), [50, 95, 99])
    return float(p[0]), float(p[1]), float(p[2])


@dataclass
class CameraCounters:
    received: int = 0
    processed: int = 0
    dropped: int = 0
    last_seen: float = 0.0
    latencies_ms: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=_WINDOW))
    done_times: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=_WINDOW))
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    #: (computed at, samples then, fps, p50, p95, p99): GetStats reuses it for up to SUMMARY_MAX_AGE_S
    summary: tuple[float, int, float, float, float, float] | None = field(default=None, repr=False, compare=False)

    def fps(self, now: float) -> float:
        return _fps(list(self.done_times), now)


def _fps(done_times: list[float], now: float) -> float:
    recent = [t for t in done_times if now - t <= _FPS_WINDOW_S]
    if len(recent) < 2:
        return 0.0
    span = recent[-1] - recent[0]
    return (len(recent) - 1) / span if span > 0 else 0.0


class ServerStats:
    """Thread-safe counters behind ``GetStats``."""

    #: Pseudo camera id under which frames of cameras beyond ``max_cameras`` are counted.
    OVERFLOW = "(untracked)"

    def __init__(
        self,
        max_cameras: int = DEFAULT_MAX_CAMERAS,
        camera_idle_s: float = DEFAULT_CAMERA_IDLE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not isinstance(max_cameras, int) or not 1 <= max_cameras <= 100_000:
            raise ConfigError(f"max_cameras must be an integer in 1..100000, got {max_cameras!r}")
        if not isinstance(camera_idle_s, (int, float)) or camera_idle_s <= 0:
            raise ConfigError(f"camera_idle_s must be > 0 seconds, got {camera_idle_s!r}")
        self.max_cameras = max_cameras
        self.camera_idle_s = float(camera_idle_s)
        self._clock = clock
        self._lock = threading.Lock()
        self.started = clock()
        #: tracked cameras, least recently seen first
        self.cameras: collections.OrderedDict[str, CameraCounters] = collections.OrderedDict()
        self._overflow = CameraCounters()
        self.cameras_expired = 0
        self.requests_total = 0
        self.errors_total = 0
        self.rejected_total = 0
        self.unary_latencies_ms: collections.deque[float] = collections.deque(maxlen=_WINDOW)
        self._batch_sum = 0
        self._batch_count = 0

    def _cam(self, camera_id: str, now: float) -> CameraCounters:
        """The counters of ``camera_id`` (table lock held by the caller)."""
        cam = self.cameras.get(camera_id)
        if cam is not None:
            self.cameras.move_to_end(camera_id)
        else:
            if len(self.cameras) >= self.max_cameras:
                self._expire(now)
            if len(self.cameras) >= self.max_cameras:
                cam = self._overflow
            else:
                cam = self.cameras[camera_id] = CameraCounters()
        cam.last_seen = now
        return cam

    def _expire(self, now: float) -> None:
        while self.cameras:
            cid, oldest = next(iter(self.cameras.items()))
            if now - oldest.last_seen <= self.camera_idle_s:
                return
            del self.cameras[cid]
            self.cameras_expired += 1

    def frame_received(self, camera_id: str) -> None:
        now = self._clock()
        with self._lock:
            cam = self._cam(camera_id, now)
        with cam.lock:
            cam.received += 1

    def frame_dropped(self, camera_id: str) -> None:
        now = self._clock()
        with self._lock:
            cam = self._cam(camera_id, now)
        with cam.lock:
            cam.dropped += 1

    def frame_done(self, camera_id: str | None, latency_ms: float, ok: bool) -> None:
        """A frame's result was produced; ``camera_id`` None for frames refused before they were attributed."""
        now = self._clock()
        with self._lock:
            if not ok:
                self.errors_total += 1
            cam = self._cam(camera_id, now) if camera_id is not None else None
        if ok and cam is not None:
            with cam.lock:
                cam.processed += 1
                cam.latencies_ms.append(latency_ms)
                cam.done_times.append(now)

    def unary_done(self, latency_ms: float, ok: bool) -> None:
        """A Classify call ended (its error, if any, is counted by the RPC guard with every other error)."""
        with self._lock:
            self.requests_total += 1
            if ok:
                self.unary_latencies_ms.append(latency_ms)

    def error(self, rejected: bool = False) -> None:
        """An error reply not counted elsewhere (RESOURCE_EXHAUSTED from a limit, INTERNAL, idle stream...)."""
        with self._lock:
            self.errors_total += 1
            if rejected:
                self.rejected_total += 1

    def batch_done(self, size: int) -> None:
        with self._lock:
            self._batch_sum += size
            self._batch_count += 1

    def snapshot(self) -> dict:
        """A plain-dict view (used by the servicer and logs); percentiles are computed with no lock held."""
        now = self._clock()
        with self._lock:
            cams = list(self.cameras.items())
            if self._overflow.received or self._overflow.processed or self._overflow.dropped:
                cams.append((self.OVERFLOW, self._overflow))
            unary = list(self.unary_latencies_ms)
            totals = {
                "requests_total": self.requests_total,
                "errors_total": self.errors_total,
                "mean_batch_size": self._batch_sum / self._batch_count if self._batch_count else 0.0,
            }
        out = {}
        for cid, c in sorted(cams, key=lambda t: t[0]):
            with c.lock:
                received, processed, dropped = c.received, c.processed, c.dropped
                summary = c.summary
                n = len(c.latencies_ms)
                stale = summary is None or now - summary[0] >= SUMMARY_MAX_AGE_S or n > 2 * summary[1]
                lat, done = (list(c.latencies_ms), list(c.done_times)) if stale else ([], [])
            if summary is None or stale:  # computed with no lock held
                summary = (now, n, _fps(done, now), *percentiles(lat))
                with c.lock:
                    c.summary = summary
            out[cid] = {
                "fps": summary[2],
                "frames_received": received,
                "frames_processed": processed,
                "frames_dropped": dropped,
                "latency_p50_ms": summary[3],
                "latency_p95_ms": summary[4],
                "latency_p99_ms": summary[5],
            }
        u50, u95, u99 = percentiles(unary)
        return {
            "cameras": out,
            **totals,
            "unary_latency_p50_ms": u50,
            "unary_latency_p95_ms": u95,
            "unary_latency_p99_ms": u99,
            "uptime_s": now - self.started,
        }
