"""Frame sources of the camera client: camera index (V4L2), CSI (GStreamer), RTSP/HTTP URL,
video file and directory of images.

Every source yields :class:`CapturedFrame` objects (BGR uint8, as OpenCV delivers them) with a
per-camera sequence number (the wire ``frame_id``) and a capture timestamp in microseconds since
the Unix epoch.

Two kinds of sources:

* **live** (cameras, URLs, or a file replayed with ``live=True``): a background grabber reads
  continuously and keeps only the newest frame, so a slow consumer, or one that is disconnected
  from the server, always continues from the live frame; frames it never took are counted in
  ``CapturedFrame.skipped_before``.
* **finite** (video files, image directories): frames are read one after another on demand; the
  consumer decides the pace. ``read`` returns ``None`` at the end.
"""

from __future__ import annotations

import abc
import os
import re
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgetune.backoff import Backoff
from edgetune.errors import ConfigError, EdgetuneError, ImageDecodeError
from edgetune.imagedecode import read_image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
URL_SCHEMES = ("rtsp://", "rtsps://", "rtmp://", "http://", "https://")
#: A live device that stops delivering is reopened after 0.5 s, 1 s, 2 s, ... up to 10 s (reset on a frame).
REOPEN_INITIAL_S, REOPEN_MAX_S = 0.5, 10.0
_CAMERA_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class SourceError(EdgetuneError):
    """A frame source could not be opened or failed while reading."""


def now_us() -> int:
    """Wall-clock time in microseconds since the Unix epoch (the wire's capture_time_us)."""
    return time.time_ns() // 1000


def _cv2() -> Any:
    import cv2

    return cv2


@dataclass
class CapturedFrame:
    camera_id: str
    seq: int  # per-camera sequence number; sent as frame_id
    capture_time_us: int
    image: np.ndarray  # HxWx3 uint8 BGR
    skipped_before: int = 0  # frames the source captured but nobody took since the previous read


class Source(abc.ABC):
    """Base class: ``read()`` the next frame (``None`` at the end), ``close()`` when done."""

    live: bool = False

    def __init__(self, camera_id: str, description: str) -> None:
        if not _CAMERA_ID_RE.match(camera_id):
            raise ConfigError(f"camera id {camera_id!r} is invalid: use 1-64 letters, digits, '_', '.' or '-'")
        self.camera_id = camera_id
        self.description = description

    @abc.abstractmethod
    def read(self, timeout: float | None = None) -> CapturedFrame | None:
        """The next frame, or ``None`` at the end of the source."""

    def close(self) -> None:  # noqa: B027 - sources without resources need no close
        """Release the device/file; idempotent."""

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.camera_id!r}, {self.description!r})"


class DirectorySource(Source):
    """Images of a directory in name order (not recursive). Undecodable files are skipped with a
    one-line warning and counted in ``errors``."""

    def __init__(self, path: Path, camera_id: str) -> None:
        super().__init__(camera_id, str(path))
        self.files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not self.files:
            raise SourceError(f"directory {path} contains no images ({', '.join(IMAGE_EXTENSIONS)})")
        self._next = 0
        self.errors = 0

    def read(self, timeout: float | None = None) -> CapturedFrame | None:
        while self._next < len(self.files):
            seq, path = self._next, self.files[self._next]
            self._next += 1
            try:
                rgb = read_image(path)
            except ImageDecodeError as e:
                self.errors += 1
                print(f"edge_client: [{self.camera_id}] skipping image: {e}", file=sys.stderr)
                continue
            bgr = np.ascontiguousarray(rgb[..., ::-1])
            return CapturedFrame(self.camera_id, seq, now_us(), bgr)
        return None


class VideoFileSource(Source):
    """Every frame of a video file, in order, read on demand."""

    def __init__(self, path: Path, camera_id: str) -> None:
        super().__init__(camera_id, str(path))
        cv2 = _cv2()
        self._cap = cv2.VideoCapture(str(path))
        if not self._cap.isOpened():
            raise SourceError(f"cannot open video file {path}: OpenCV could not find a decoder for it")
        self.native_fps = float(self._cap.get(cv2.CAP_PROP_FPS) or 0.0)
        self._seq = 0

    def read(self, timeout: float | None = None) -> CapturedFrame | None:
        if self._cap is None:
            return None
        ok, img = self._cap.read()
        if not ok or img is None:
            return None
        frame = CapturedFrame(self.camera_id, self._seq, now_us(), _as_bgr(img))
        self._seq += 1
        return frame

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None


class LiveSource(Source):
    """A capture device read continuously by a background thread that keeps the newest frame.

    ``opener`` returns an opened ``cv2.VideoCapture``. When a device stops delivering, it is
    reopened with a growing delay (cameras unplugged, RTSP streams restarting) unless
    ``finite`` is set (a file replayed as a camera), in which case the source ends.
    """

    live = True

    def __init__(
        self, opener: Any, camera_id: str, description: str, *, finite: bool = False, pace_fps: float = 0.0
    ) -> None:
        super().__init__(camera_id, description)
        self._opener = opener
        self._finite = finite
        self._pace = 1.0 / pace_fps if pace_fps > 0 else 0.0
        self._cap = opener()  # raises SourceError; first open is synchronous so errors surface at start
        self._cond = threading.Condition()
        self._latest: CapturedFrame | None = None
        self._taken_seq = -1
        self._ended = False
        self._stop = threading.Event()
        self.captured = 0
        self._thread = threading.Thread(target=self._grab_loop, name=f"grab-{camera_id}", daemon=True)
        self._thread.start()

    def _grab_loop(self) -> None:
        seq = 0
        backoff = Backoff(initial=REOPEN_INITIAL_S, maximum=REOPEN_MAX_S, jitter=False)
        next_t = time.monotonic()
        while not self._stop.is_set():
            ok, img = (False, None) if self._cap is None else self._cap.read()
            if ok and img is not None:
                backoff.reset()
                frame = CapturedFrame(self.camera_id, seq, now_us(), _as_bgr(img))
                seq += 1
                with self._cond:
                    self._latest = frame
                    self.captured = seq
                    self._cond.notify_all()
                if self._pace:
                    next_t += self._pace
                    self._stop.wait(max(0.0, next_t - time.monotonic()))
                continue
            if self._finite:
                break
            delay = backoff.next_delay()
            retry = REOPEN_MAX_S if delay is None else delay  # None only with a max_total, not set here
            print(
                f"edge_client: [{self.camera_id}] no frame from {self.description}; reopening in {retry:.1f} s",
                file=sys.stderr,
            )
            if self._cap is not None:
                self._cap.release()
                self._cap = None
            if self._stop.wait(retry):
                break
            try:
                self._cap = self._opener()
            except SourceError as e:
                print(f"edge_client: [{self.camera_id}] {e}", file=sys.stderr)
        with self._cond:
            self._ended = True
            self._cond.notify_all()

    def read(self, timeout: float | None = None) -> CapturedFrame | None:
        """The newest frame not returned yet (waits for one); ``None`` once the source ended."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._latest is None or self._latest.seq <= self._taken_seq:
                if self._ended:
                    return None
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"no frame from {self.description} within {timeout} s")
                self._cond.wait(remaining)
            frame = self._latest
            frame.skipped_before = frame.seq - self._taken_seq - 1
            self._taken_seq = frame.seq
            return frame

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)
        if self._cap is not None:
            self._cap.release()
            self._cap = None


def _as_bgr(img: np.ndarray) -> np.ndarray:
    cv2 = _cv2()
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    if img.shape[2] == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2BGR)
    return img


def _open_capture(target: str | int, api: int, what: str) -> Any:
    cv2 = _cv2()
    cap = cv2.VideoCapture(target, api)
    if not cap.isOpened():
        cap.release()
        raise SourceError(f"cannot open {what}")
    return cap


def csi_pipeline(sensor_id: int, width: int = 1280, height: int = 720, fps: int = 30) -> str:
    """GStreamer pipeline of a Jetson CSI camera (nvarguscamerasrc) delivering BGR to OpenCV."""
    return (
        f"nvarguscamerasrc sensor-id={sensor_id} ! video/x-raw(memory:NVMM),width={width},height={height},"
        f"framerate={fps}/1 ! nvvidconv ! video/x-raw,format=BGRx ! videoconvert ! video/x-raw,format=BGR ! "
        "appsink drop=1 max-buffers=1"
    )


def split_camera_id(spec: str) -> tuple[str | None, str]:
    """``"NAME=SOURCE"`` → (NAME, SOURCE); a plain source → (None, source).

    An existing path containing '=' is taken as a path; a name never contains ':' or '/'.
    """
    if "=" in spec and not os.path.exists(spec):
        name, rest = spec.split("=", 1)
        if name and ":" not in name and "/" not in name and rest:
            return name, rest
    return None, spec


def _default_camera_id(spec: str) -> str:
    if spec.isdigit():
        return f"cam{spec}"
    if spec.startswith("csi:"):
        return f"csi{spec[4:]}"
    if spec.lower().startswith(URL_SCHEMES):
        host = re.sub(r"^[a-z]+://([^@/]*@)?", "", spec, flags=re.IGNORECASE).split("/", 1)[0]
        return re.sub(r"[^A-Za-z0-9_.-]", "_", host)[:64] or "url"
    name = Path(spec.rstrip("/")).stem or "source"
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:64]


def open_source(spec: str, camera_id: str | None = None, *, live: bool = False) -> Source:
    """Open a source from its command-line form.

    Forms: ``0`` (camera index, V4L2), ``csi:0`` (Jetson CSI camera via GStreamer),
    ``gst:<pipeline>``, ``rtsp://…`` / ``http(s)://…`` (network stream), a video file, a directory
    of images; optionally prefixed ``NAME=`` to set the camera id. ``live=True`` replays a video
    file as a camera at its native frame rate (frames are dropped when the consumer is slow).
    """
    name, target = split_camera_id(spec)
    cam = camera_id or name or _default_camera_id(target)
    cv2 = _cv2()
    if target.isdigit():
        index = int(target)
        api = cv2.CAP_V4L2 if sys.platform.startswith("linux") else cv2.CAP_ANY
        return LiveSource(
            lambda: _open_capture(index, api, f"camera {index} (V4L2 /dev/video{index})"), cam, f"camera {index}"
        )
    if target.startswith(("csi:", "gst:")):
        if target.startswith("csi:"):
            if not target[4:].isdigit():
                raise ConfigError(f"CSI source must be csi:<sensor id>, e.g. csi:0; got {target!r}")
            pipeline = csi_pipeline(int(target[4:]))
        else:
            pipeline = target[4:]
        what = f"GStreamer pipeline {pipeline!r} (needs OpenCV built with GStreamer, as on JetPack)"
        return LiveSource(lambda: _open_capture(pipeline, cv2.CAP_GSTREAMER, what), cam, target)
    if target.lower().startswith(URL_SCHEMES):
        return LiveSource(lambda: _open_capture(target, cv2.CAP_FFMPEG, f"stream {target}"), cam, target)
    path = Path(target)
    if path.is_dir():
        if live:
            raise ConfigError("--live replays a video file as a camera; it does not apply to a directory")
        return DirectorySource(path, cam)
    if path.is_file():
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            raise ConfigError(f"{path} is a single image: use --once {path}, or a directory of images as --source")
        if live:
            probe = VideoFileSource(path, cam)
            fps = probe.native_fps or 30.0
            probe.close()
            return LiveSource(
                lambda: _open_capture(str(path), cv2.CAP_ANY, f"video file {path}"),
                cam,
                str(path),
                finite=True,
                pace_fps=fps,
            )
        return VideoFileSource(path, cam)
    raise ConfigError(
        f"source {spec!r} is neither a camera index (0, 1, …), csi:N, gst:<pipeline>, an "
        f"rtsp/http(s) URL, an existing video file nor an existing directory of images"
    )


def open_sources(specs: list[str], *, live: bool = False) -> list[Source]:
    """Open several sources; camera ids must be unique. Closes what was opened on failure."""
    if not specs:
        raise ConfigError("no source given: pass --source (several allowed)")
    opened: list[Source] = []
    try:
        for spec in specs:
            src = open_source(spec, live=live)
            if any(s.camera_id == src.camera_id for s in opened):
                src.close()
                raise ConfigError(
                    f"two sources have the camera id {src.camera_id!r}; name them with NAME=SOURCE, e.g. left={spec}"
                )
            opened.append(src)
    except BaseException:
        for s in opened:
            s.close()
        raise
    return opened
