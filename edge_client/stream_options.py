"""What one camera stream is configured with (:class:`StreamOptions`) and what it reports (:class:`CameraStats`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from edge_client.frames import EncodeOptions
from edgetune.backoff import Backoff
from edgetune.errors import ConfigError


@dataclass(frozen=True)
class StreamOptions:
    """Per-camera streaming behaviour.

    Attributes:
        fps: maximum frames per second sent per camera (0 = no limit).
        top_k: predictions per result.
        max_inflight: frames sent and not answered yet before the client waits; ``None`` = 1 for
            files and directories (the server keeps one frame per stream, latest wins: a second
            unanswered frame could replace the one waiting, so 1 gets every frame processed),
            unlimited for live sources (the server drops stale frames).
        max_retry_time: seconds to keep retrying an unreachable server (0 = forever).
        result_timeout: seconds to wait at the end of a finite source for outstanding results.
        connect_timeout: seconds one connection attempt may take.
        backoff_initial, backoff_max: reconnect delays (exponential, with jitter).
        keep_images: pass the sent image to the sinks (for the overlay window).
    """

    encode: EncodeOptions = field(default_factory=EncodeOptions)
    fps: float = 0.0
    top_k: int = 1
    max_inflight: int | None = None
    max_retry_time: float = 60.0
    result_timeout: float = 10.0
    connect_timeout: float = 3.0
    backoff_initial: float = 0.2
    backoff_max: float = 5.0
    keep_images: bool = False

    def __post_init__(self) -> None:
        if not self.fps >= 0:
            raise ConfigError(f"--fps must be >= 0 (0 = no limit), got {self.fps!r}")
        if not isinstance(self.top_k, int) or not 1 <= self.top_k <= 100:
            raise ConfigError(f"--top-k must be an integer in 1..100, got {self.top_k!r}")
        if self.max_inflight is not None and (not isinstance(self.max_inflight, int) or self.max_inflight < 0):
            raise ConfigError(f"--max-inflight must be an integer >= 0 (0 = unlimited), got {self.max_inflight!r}")
        for name in ("result_timeout", "connect_timeout"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be > 0 s, got {getattr(self, name)!r}")
        Backoff(self.backoff_initial, self.backoff_max, max_total=self.max_retry_time)  # validates


@dataclass
class CameraStats:
    camera_id: str
    sent: int = 0  # distinct frames sent (a re-sent frame counts once)
    results: int = 0
    errors: int = 0  # results whose frame the server could not process
    dropped: int = 0  # dropped by the server (backpressure), from dropped_before
    lost: int = 0  # sent but never answered (live source disconnected, end-of-source timeout, gave up)
    skipped: int = 0  # captured by a live source but never sent (fps limit, window, disconnection)
    resent: int = 0  # frames of a finite source sent again after a reconnection
    reconnects: int = 0
    latencies_ms: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies_ms)

        def pct(q: float) -> float | None:
            return round(lat[min(len(lat) - 1, int(q * len(lat)))], 3) if lat else None

        return {
            "camera_id": self.camera_id,
            "sent": self.sent,
            "results": self.results,
            "errors": self.errors,
            "dropped": self.dropped,
            "lost": self.lost,
            "skipped": self.skipped,
            "resent": self.resent,
            "reconnects": self.reconnects,
            "latency_p50_ms": pct(0.5),
            "latency_p95_ms": pct(0.95),
            "latency_max_ms": pct(1.0),
        }
