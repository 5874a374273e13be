"""Turning captured frames into wire messages and results into log records."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from edgetune.errors import ConfigError


@dataclass(frozen=True)
class EncodeOptions:
    """Client-side size reduction before sending.

    Attributes:
        max_size: longest image side in pixels after resizing (downscale only, aspect kept);
            0 sends frames at their captured size.
        jpeg_quality: JPEG quality 1..100.
    """

    max_size: int = 640
    jpeg_quality: int = 90

    def __post_init__(self) -> None:
        if not isinstance(self.max_size, int) or not (self.max_size == 0 or self.max_size >= 16):
            raise ConfigError(f"--max-size must be 0 (no resize) or an integer >= 16 pixels, got {self.max_size!r}")
        if not isinstance(self.jpeg_quality, int) or not 1 <= self.jpeg_quality <= 100:
            raise ConfigError(f"--jpeg-quality must be an integer in 1..100, got {self.jpeg_quality!r}")


def resize_frame(image: np.ndarray, max_size: int) -> np.ndarray:
    """Downscale so that the longer side is at most ``max_size`` (area interpolation)."""
    import cv2

    h, w = image.shape[:2]
    if max_size <= 0 or max(h, w) <= max_size:
        return image
    scale = max_size / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def encode_frame(image_bgr: np.ndarray, opts: EncodeOptions) -> tuple[bytes, np.ndarray]:
    """(JPEG bytes, the resized BGR image) of one frame, exactly as the client sends it."""
    import cv2

    small = resize_frame(image_bgr, opts.max_size)
    ok, buf = cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, opts.jpeg_quality])
    if not ok:
        raise ConfigError(f"OpenCV could not JPEG-encode a frame of shape {image_bgr.shape}")
    return buf.tobytes(), small


def predictions_to_list(predictions: Any) -> list[dict[str, Any]]:
    return [{"label": p.label, "index": int(p.index), "score": round(float(p.score), 6)} for p in predictions]


def result_record(res: Any, latency_ms: float, lost_before: int) -> dict[str, Any]:
    """The log record of one ``FrameResult``."""
    preds = predictions_to_list(res.predictions)
    top = preds[0] if preds else None
    return {
        "camera_id": res.camera_id,
        "frame_id": int(res.frame_id),
        "capture_time_us": int(res.capture_time_us),
        "label": top["label"] if top else None,
        "score": top["score"] if top else None,
        "predictions": preds,
        "latency_ms": round(latency_ms, 3),
        "server_ms": round(res.timing.total_us / 1000.0, 3) if res.HasField("timing") else None,
        "model_version": res.model_version,
        "dropped_before": int(res.dropped_before),
        "lost_before": int(lost_before),
        "error": res.error or None,
    }
