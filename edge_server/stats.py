"""Server statistics: per-camera FPS / drops / latency percentiles, unary latency, batch sizes."""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field

import numpy as np

_WINDOW = 2048      # latency samples kept per series
_FPS_WINDOW_S = 10.0


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
    latencies_ms: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=_WINDOW))
    done_times: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=_WINDOW))

    def fps(self, now: float) -> float:
        recent = [t for t in self.done_times if now - t <= _FPS_WINDOW_S]
        if len(recent) < 2:
            return 0.0
        span = recent[-1] - recent[0]
        return (len(recent) - 1) / span if span > 0 else 0.0


class ServerStats:
    """Thread-safe counters behind ``GetStats``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.started = time.monotonic()
        self.cameras: dict[str, CameraCounters] = {}
        self.requests_total = 0
        self.errors_total = 0
        self.unary_latencies_ms: collections.deque[float] = collections.deque(maxlen=_WINDOW)
        self._batch_sum = 0
        self._batch_count = 0

    def _cam(self, camera_id: str) -> CameraCounters:
        cam = self.cameras.get(camera_id)
        if cam is None:
            cam = self.cameras[camera_id] = CameraCounters()
        return cam

    def frame_received(self, camera_id: str) -> None:
        with self._lock:
            self._cam(camera_id).received += 1

    def frame_dropped(self, camera_id: str) -> None:
        with self._lock:
            self._cam(camera_id).dropped += 1

    def frame_done(self, camera_id: str, latency_ms: float, ok: bool) -> None:
        with self._lock:
            cam = self._cam(camera_id)
            if ok:
                cam.processed += 1
                cam.latencies_ms.append(latency_ms)
                cam.done_times.append(time.monotonic())
            else:
                self.errors_total += 1

    def unary_done(self, latency_ms: float, ok: bool) -> None:
        with self._lock:
            self.requests_total += 1
            if ok:
                self.unary_latencies_ms.append(latency_ms)
            else:
                self.errors_total += 1

    def batch_done(self, size: int) -> None:
        with self._lock:
            self._batch_sum += size
            self._batch_count += 1

    def snapshot(self) -> dict:
        """A plain-dict view (used by the servicer and logs)."""
        now = time.monotonic()
        with self._lock:
            cams = {}
            for cid, c in sorted(self.cameras.items()):
                p50, p95, p99 = percentiles(c.latencies_ms)
                cams[cid] = {"fps": c.fps(now), "frames_received": c.received, "frames_processed": c.processed,
                             "frames_dropped": c.dropped, "latency_p50_ms": p50, "latency_p95_ms": p95,
                             "latency_p99_ms": p99}
            u50, u95, u99 = percentiles(self.unary_latencies_ms)
            return {
                "cameras": cams,
                "requests_total": self.requests_total,
                "errors_total": self.errors_total,
                "unary_latency_p50_ms": u50,
                "unary_latency_p95_ms": u95,
                "unary_latency_p99_ms": u99,
                "mean_batch_size": self._batch_sum / self._batch_count if self._batch_count else 0.0,
                "uptime_s": now - self.started,
            }
