"""Where results go: a JSONL or CSV log (headless), and an overlay window when a display exists."""

from __future__ import annotations

import csv
import json
import os
import re
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import IO, Any

import numpy as np

from edgetune.errors import ConfigError

#: Columns of every result record (JSONL objects also carry ``predictions``: the top-k list).
FIELDS = (
    "camera_id",
    "frame_id",
    "capture_time_us",
    "label",
    "score",
    "latency_ms",
    "server_ms",
    "model_version",
    "dropped_before",
    "lost_before",
    "error",
)
LOG_FORMATS = ("jsonl", "csv")


def log_format_for(path: str, fmt: str | None = None) -> str:
    """``fmt`` if given, else from the extension (.csv → csv, anything else → jsonl)."""
    if fmt is not None:
        if fmt not in LOG_FORMATS:
            raise ConfigError(f"log format must be one of {LOG_FORMATS}, got {fmt!r}")
        return fmt
    return "csv" if path.lower().endswith(".csv") else "jsonl"


class ResultLog:
    """Thread-safe line-per-result log; each line is flushed so it can be followed live.

    ``path`` ``"-"`` writes to stdout.
    """

    def __init__(self, path: str, fmt: str | None = None) -> None:
        self.format = log_format_for(path, fmt)
        self.path = path
        self._lock = threading.Lock()
        self.count = 0
        if path == "-":
            self._fh: IO[str] = sys.stdout
            self._own = False
        else:
            p = Path(path)
            if p.is_dir():
                raise ConfigError(f"--log {path} is a directory; give a file name ending in .jsonl or .csv")
            if not p.parent.is_dir():
                raise ConfigError(f"--log {path}: directory {p.parent} does not exist")
            self._fh = open(p, "w", newline="" if self.format == "csv" else None, encoding="utf-8")
            self._own = True
        self._csv: Any = None
        if self.format == "csv":
            self._csv = csv.DictWriter(self._fh, fieldnames=list(FIELDS), extrasaction="ignore")
            self._csv.writeheader()
            self._fh.flush()

    def write(self, record: dict[str, Any]) -> None:
        with self._lock:
            if self.format == "csv":
                self._csv.writerow({k: ("" if record.get(k) is None else record.get(k)) for k in FIELDS})
            else:
                self._fh.write(json.dumps(record, separators=(",", ":")) + "\n")
            self._fh.flush()
            self.count += 1

    def close(self) -> None:
        with self._lock:
            if self._own and not self._fh.closed:
                self._fh.close()


class FpsMeter:
    """Results per second over a sliding window of the last ``window`` seconds."""

    def __init__(self, window: float = 2.0) -> None:
        self.window = window
        self._times: deque[float] = deque()

    def tick(self, t: float | None = None) -> float:
        t = time.monotonic() if t is None else t
        self._times.append(t)
        while self._times and t - self._times[0] > self.window:
            self._times.popleft()
        if len(self._times) < 2:
            return 0.0
        return (len(self._times) - 1) / max(self._times[-1] - self._times[0], 1e-6)


def draw_overlay(image: np.ndarray, record: dict[str, Any], fps: float) -> np.ndarray:
    """A copy of ``image`` (BGR) with label, score, FPS and latency drawn on a dark band."""
    import cv2

    out = image.copy()
    if record.get("error"):
        lines = [f"{record['camera_id']} #{record['frame_id']}: error", str(record["error"])[:60]]
    else:
        lines = [
            f"{record.get('label')}  {float(record.get('score') or 0.0):.2f}",
            f"{fps:4.1f} fps  {float(record.get('latency_ms') or 0.0):.0f} ms  drop {record.get('dropped_before', 0)}",
        ]
    scale = max(0.4, min(out.shape[1] / 640.0, 1.5))
    line_h = int(28 * scale)
    band = min(out.shape[0], line_h * len(lines) + 8)
    out[:band] = (out[:band].astype(np.float32) * 0.35).astype(np.uint8)
    for i, text in enumerate(lines):
        y = line_h * (i + 1)
        cv2.putText(
            out,
            text,
            (6, y),
            cv2.FONT_HERSHEY_SIMPLEX,
            0.7 * scale,
            (255, 255, 255),
            max(1, int(2 * scale)),
            cv2.LINE_AA,
        )
    return out


def display_available() -> tuple[bool, str]:
    """Whether an overlay window can be shown, and why not."""
    import cv2

    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return False, "no display: DISPLAY (or WAYLAND_DISPLAY) is not set"
    m = re.search(r"^\s*GUI:\s*(\S+)", cv2.getBuildInformation(), flags=re.MULTILINE)
    if m and m.group(1).upper() == "NONE":
        return False, "this OpenCV has no GUI support (opencv-python-headless); install opencv-python for --display"
    return True, ""


class OverlayWindow:
    """One window per camera, updated from the main thread by :meth:`pump`."""

    def __init__(self) -> None:
        ok, why = display_available()
        if not ok:
            raise ConfigError(f"--display: {why}")
        self._lock = threading.Lock()
        self._pending: dict[str, np.ndarray] = {}
        self._fps: dict[str, FpsMeter] = {}
        self.closed_by_user = False

    def update(self, record: dict[str, Any], image: np.ndarray | None) -> None:
        if image is None:
            return
        cam = str(record["camera_id"])
        fps = self._fps.setdefault(cam, FpsMeter()).tick()
        drawn = draw_overlay(image, record, fps)
        with self._lock:
            self._pending[cam] = drawn

    def pump(self) -> bool:
        """Show the newest images; False once the user pressed q or Esc."""
        import cv2

        with self._lock:
            items = list(self._pending.items())
            self._pending.clear()
        for cam, img in items:
            cv2.imshow(f"edgetune {cam}", img)
        key = cv2.waitKey(1) & 0xFF
        if key in (ord("q"), 27):
            self.closed_by_user = True
        return not self.closed_by_user

    def close(self) -> None:
        import cv2

        cv2.destroyAllWindows()
