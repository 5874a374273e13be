"""Capture at the edge (``--capture DIR``): keep the frames worth labelling, off the request path.

A frame is kept when the model was unsure of it (top-1 probability below ``min_confidence`` or top-1 minus
top-2 below ``min_margin``: reason ``low_confidence``) or, otherwise, with probability ``random_rate``
(reason ``random``: a uniform sample, so field accuracy can be estimated without bias). The request path only
decides and puts the frame's bytes on a bounded queue (``queue_frames`` frames and ``queue_mb`` bytes); when
the queue is full the frame is dropped and counted, never waited for. One writer thread writes frame and
sidecar into the :class:`~edge_server.spool.Spool` (bounded in bytes and files; per-class quotas). Writes are
also bounded in rate (``max_writes_per_s``, a token bucket), so a hostile client sending unsure frames cannot
churn the disk faster than that. A write the disk refuses (full, read-only) is counted and pauses capture for
``pause_after_error_s``; serving never waits for or fails on capture.

:class:`DriftMonitor` (always on) keeps the rolling mean top-1 confidence and the predicted class distribution of
the last ``window`` classified images, against the training distribution the bundle records.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import queue
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_server.spool import Spool, SpoolFull
from edgetune.capture_record import CAPTURE_REASONS, FRAME_EXTS, CaptureRecord, new_capture_id
from edgetune.errors import ConfigError, EdgetuneError
from edgetune.imageheader import read_image_header

log = logging.getLogger("edge_server.capture")

#: Counters of :class:`Capture` (GetStats ``capture.counters``).
CAPTURE_COUNTERS = (
    "dropped_queue",
    "dropped_rate",
    "dropped_quota",
    "dropped_too_large",
    "dropped_paused",
    "write_errors",
    "evicted",
)


@dataclass(frozen=True, kw_only=True)
class CaptureConfig:
    """``--capture DIR`` and its bounds (validated on construction)."""

    dir: Path
    max_mb: float = 256.0
    max_files: int = 2000
    min_confidence: float = 0.6
    min_margin: float = 0.2
    random_rate: float = 0.02
    #: share of max_files that low-confidence frames of one predicted class may hold
    class_quota: float = 0.5
    queue_frames: int = 32
    queue_mb: float = 32.0
    max_frame_mb: float = 8.0
    max_writes_per_s: float = 20.0
    pause_after_error_s: float = 30.0
    seed: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "dir", Path(self.dir))
        _range("capture max_mb", self.max_mb, 0.01, 1 << 24)
        _range("capture max_files", self.max_files, 1, 10_000_000, integer=True)
        _range("capture min_confidence", self.min_confidence, 0.0, 1.0)
        _range("capture min_margin", self.min_margin, 0.0, 1.0)
        _range("capture random_rate", self.random_rate, 0.0, 1.0)
        _range("capture class_quota", self.class_quota, 0.001, 1.0)
        _range("capture queue_frames", self.queue_frames, 1, 100_000, integer=True)
        _range("capture queue_mb", self.queue_mb, 0.01, 1 << 16)
        _range("capture max_frame_mb", self.max_frame_mb, 0.001, 1024)
        _range("capture max_writes_per_s", self.max_writes_per_s, 0.01, 100_000)
        _range("capture pause_after_error_s", self.pause_after_error_s, 0.0, 86_400)

    @property
    def class_quota_files(self) -> int:
        return max(1, int(self.max_files * self.class_quota))


def _range(name: str, v: Any, lo: float, hi: float, integer: bool = False) -> None:
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if not ok or isinstance(v, bool) or not lo <= v <= hi:
        raise ConfigError(f"{name} must be {'an integer' if integer else 'a number'} in [{lo:g}, {hi:g}], got {v!r}")


def capture_reason(probs: np.ndarray, cfg: CaptureConfig, rng: random.Random) -> str | None:
    """Why a frame with these probabilities is kept (one of CAPTURE_REASONS), or None."""
    if len(probs) >= 2:
        top2 = np.partition(probs, -2)[-2:]
        top1, second = float(top2[1]), float(top2[0])
    else:
        top1, second = float(probs.max()), 0.0
    if top1 < cfg.min_confidence or top1 - second < cfg.min_margin:
        return CAPTURE_REASONS[0]
    if cfg.random_rate and rng.random() < cfg.random_rate:
        return CAPTURE_REASONS[1]
    return None


@dataclass(frozen=True)
class _Pending:
    data: bytes
    camera_id: str
    capture_time_us: int
    frame_id: int
    time_unix: float
    model_version: str
    bundle_sha256: str
    labels: tuple[str, ...]
    probs: tuple[float, ...]
    reason: str


class Capture:
    """The bounded capture queue and its writer thread; ``close()`` stops the writer."""

    def __init__(self, cfg: CaptureConfig) -> None:
        self.cfg = cfg
        root = cfg.dir.resolve()
        self.spool = Spool(root, int(cfg.max_mb * 1024 * 1024), cfg.max_files, cfg.class_quota_files)
        self._rng = random.Random(cfg.seed)
        self._queue: queue.Queue[_Pending | None] = queue.Queue()
        self._lock = threading.Lock()
        self._queued_bytes = 0
        self._queued = 0
        self._tokens = cfg.max_writes_per_s
        self._refill_at = time.monotonic()
        self._paused_until = 0.0
        self.counters: collections.Counter[str] = collections.Counter()
        self.captured: collections.Counter[str] = collections.Counter()
        self._writer = threading.Thread(target=self._write_loop, name="edge-capture-writer", daemon=True)
        self._writer.start()

    # -- request path: decide and enqueue, never wait -------------------------------------------------
    def offer(
        self, data: bytes, probs: np.ndarray, model: Any, camera_id: str, capture_time_us: int, frame_id: int = 0
    ) -> str | None:
        """Queue the frame when it is worth keeping; returns its reason, or None (not kept or dropped)."""
        cfg = self.cfg
        with self._lock:
            reason = capture_reason(probs, cfg, self._rng)
            if reason is None:
                return None
            now = time.monotonic()
            drop = self._admit(len(data), now)
            if drop is not None:
                self.counters[drop] += 1
                return None
            self._queued += 1
            self._queued_bytes += len(data)
        b = model.bundle
        self._queue.put(
            _Pending(
                bytes(data),
                camera_id,
                int(capture_time_us),
                int(frame_id),
                time.time(),
                model.version,
                b.sha256,
                tuple(b.labels),
                tuple(float(p) for p in probs),
                reason,
            )
        )
        return reason

    def _admit(self, size: int, now: float) -> str | None:
        """Under the lock: the counter a frame of ``size`` bytes is dropped under, or None (admitted)."""
        cfg = self.cfg
        if size > cfg.max_frame_mb * 1024 * 1024:
            return "dropped_too_large"
        if now < self._paused_until:
            return "dropped_paused"
        if self._queued >= cfg.queue_frames or self._queued_bytes + size > cfg.queue_mb * 1024 * 1024:
            return "dropped_queue"
        self._tokens = min(cfg.max_writes_per_s, self._tokens + (now - self._refill_at) * cfg.max_writes_per_s)
        self._refill_at = now
        if self._tokens < 1.0:
            return "dropped_rate"
        self._tokens -= 1.0
        return None

    # -- writer thread ------------------------------------------------------------------------------------
    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            try:
                self._write(item)
            except Exception:  # a bug here must never reach serving; logged in full
                log.exception("capture writer: unexpected error; frame not kept")
                with self._lock:
                    self.counters["write_errors"] += 1
            finally:
                with self._lock:
                    self._queued -= 1
                    self._queued_bytes -= len(item.data)

    def _write(self, p: _Pending) -> None:
        try:
            fmt = read_image_header(p.data, "frame").format
        except EdgetuneError:
            return  # the server refused this image already
        ext = FRAME_EXTS.get(fmt)
        if ext is None:
            return

        cid = new_capture_id()
        rec = CaptureRecord(
            id=cid,
            frame=cid + ext,
            frame_sha256=hashlib.sha256(p.data).hexdigest(),
            frame_bytes=len(p.data),
            camera_id=p.camera_id,
            time_unix=round(p.time_unix, 6),
            capture_time_us=p.capture_time_us,
            frame_id=p.frame_id,
            model_version=p.model_version,
            bundle_sha256=p.bundle_sha256,
            labels=p.labels,
            probs=p.probs,
            reason=p.reason,
        )
        before = self.spool.evicted
        try:
            self.spool.add(rec, p.data)
        except SpoolFull as e:
            with self._lock:
                self.counters["dropped_quota" if "quota" in str(e) else "dropped_too_large"] += 1
            return
        except OSError as e:
            with self._lock:
                self.counters["write_errors"] += 1
                self._paused_until = time.monotonic() + self.cfg.pause_after_error_s
            log.warning(
                "capture write failed; capture paused, serving goes on",
                extra={"fields": {"error": str(e), "pause_s": self.cfg.pause_after_error_s}, "group": True},
            )
            return
        with self._lock:
            self.captured[p.reason] += 1
            self.counters["evicted"] += self.spool.evicted - before

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until the queue is written (tests, shutdown); False on timeout."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self._lock:
                if self._queued == 0:
                    return True
            time.sleep(0.01)
        return False

    def close(self) -> None:
        self._queue.put(None)
        self._writer.join(timeout=10.0)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            out = {
                "captured": {r: self.captured[r] for r in CAPTURE_REASONS},
                "counters": {c: self.counters[c] for c in CAPTURE_COUNTERS},
                "queued": self._queued,
                "paused": time.monotonic() < self._paused_until,
            }
        out["spool_files"], out["spool_bytes"] = self.spool.files, self.spool.bytes
        return out


class DriftMonitor:
    """Rolling mean top-1 confidence and predicted-class counts of the last ``window`` images."""

    def __init__(self, window: int = 1000) -> None:
        self.window = window
        self._lock = threading.Lock()
        self._conf: collections.deque[float] = collections.deque(maxlen=window)
        self._pred: collections.deque[int] = collections.deque(maxlen=window)
        self._sum = 0.0

    def observe(self, probs: np.ndarray) -> None:
        i = int(np.argmax(probs))
        c = float(probs[i])
        with self._lock:
            if len(self._conf) == self.window:
                self._sum -= self._conf[0]
            self._conf.append(c)
            self._pred.append(i)
            self._sum += c

    def snapshot(self, n_classes: int) -> tuple[float, int, list[int]]:
        """(mean confidence, images in the window, predicted count per class)."""
        with self._lock:
            n = len(self._conf)
            mean = self._sum / n if n else 0.0
            preds = list(self._pred)
        counts = [0] * n_classes
        for i in preds:
            if i < n_classes:
                counts[i] += 1
        return mean, n, counts
