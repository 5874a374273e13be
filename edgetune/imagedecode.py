"""Bounded image decoding: encoded bytes or a file -> HxWx3 uint8 RGB (NumPy + OpenCV only, no torch).

:func:`decode_image` accepts exactly :data:`~edgetune.imageheader.ACCEPTED_FORMATS` (JPEG, PNG, WebP, TIFF,
BMP), reads width and height from the header of each (:func:`~edgetune.imageheader.read_image_header`) and
refuses an image over ``max_pixels`` (or, when asked, over ``max_aspect_ratio``) before OpenCV decodes
anything. Other formats (PNM, GIF, AVIF, HDR, ...) are refused with the list of accepted ones. Every
caller, trainer and server alike, decodes through here.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgetune.errors import ImageDecodeError
from edgetune.imageheader import read_image_header

#: Default upper bound on decoded pixels (64 MP); protects servers from decompression bombs.
DEFAULT_MAX_PIXELS = 64 * 1024 * 1024


def load_cv2() -> Any:
    """The ``cv2`` module, imported on first use (a hard dependency of every edgetune side; lazy for fast CLI start)."""
    import cv2

    return cv2


def _to_rgb_uint8(arr: np.ndarray, source: str) -> np.ndarray:
    cv2 = load_cv2()
    # Conversions run in OpenCV on the decoded array (uint8 out): no float copy of the whole image.
    if arr.dtype == np.uint16:
        arr = cv2.convertScaleAbs(arr, alpha=1.0 / 257.0)  # round(v / 257), as (v / 257 + 0.5) truncated
    elif arr.dtype in (np.float32, np.float64):
        lo, hi = float(arr.min()), float(arr.max())
        if not (np.isfinite(lo) and np.isfinite(hi)):  # min/max are NaN or infinite iff some pixel is
            raise ImageDecodeError(f"{source}: float image with NaN or infinite pixel values")
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        arr = cv2.convertScaleAbs(arr, alpha=scale, beta=-lo * scale)
    elif arr.dtype != np.uint8:
        raise ImageDecodeError(f"{source}: unsupported pixel type {arr.dtype}")
    rgb: np.ndarray
    if arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 1):
        rgb = cv2.cvtColor(arr.reshape(arr.shape[0], arr.shape[1]), cv2.COLOR_GRAY2RGB)
        return rgb
    if arr.ndim == 3 and arr.shape[2] == 3:
        rgb = cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)
        return rgb
    if arr.ndim == 3 and arr.shape[2] == 4:
        # Composite over black, weighting by alpha: transparent pixels carry no colour (uint8 in OpenCV).
        rgb = cv2.cvtColor(arr, cv2.COLOR_BGRA2RGB)
        alpha = cv2.cvtColor(np.ascontiguousarray(arr[..., 3]), cv2.COLOR_GRAY2RGB)
        rgb = cv2.multiply(rgb, alpha, scale=1.0 / 255.0)
        return rgb
    raise ImageDecodeError(f"{source}: unsupported image shape {arr.shape}")


def decode_image(
    data: bytes | bytearray | memoryview | np.ndarray,
    source: str = "<bytes>",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_aspect_ratio: float | None = None,
) -> np.ndarray:
    """Decode encoded image bytes (one of :data:`ACCEPTED_FORMATS`) to HxWx3 uint8 RGB.

    The header is read first (:func:`read_image_header`): an unknown format, an image over
    ``max_pixels`` or (when given) over ``max_aspect_ratio`` is refused before OpenCV decodes it.
    Grey, grey+alpha, RGBA (composited over black), CMYK JPEG and 16-bit images are converted.
    Raises :class:`ImageDecodeError` naming ``source`` for empty, truncated, undecodable,
    unsupported or oversized input.
    """
    cv2 = load_cv2()
    buf = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data.reshape(-1)
    if buf.size == 0:
        raise ImageDecodeError(f"{source}: empty image data")
    head = read_image_header(buf, source)
    if head.pixels > max_pixels:
        raise ImageDecodeError(f"{source}: image {head.width}x{head.height} exceeds {max_pixels} pixels")
    if max_aspect_ratio is not None:
        check_aspect_ratio(head.width, head.height, max_aspect_ratio, source)
    try:
        arr = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    except cv2.error as e:  # OpenCV raises on some malformed headers
        raise ImageDecodeError(f"{source}: not a decodable image ({str(e).strip().splitlines()[-1]})") from None
    if arr is None or arr.size == 0:
        raise ImageDecodeError(f"{source}: not a decodable {head.format} image (corrupt or truncated)")
    if arr.shape[0] * arr.shape[1] > max_pixels:  # the decoder disagreed with the header: still refuse
        raise ImageDecodeError(f"{source}: image {arr.shape[1]}x{arr.shape[0]} exceeds {max_pixels} pixels")
    if _is_truncated(buf):
        raise ImageDecodeError(f"{source}: truncated image data (missing end-of-image marker)")
    return apply_orientation(_to_rgb_uint8(arr, source), head.orientation)


def apply_orientation(img: np.ndarray, orientation: int) -> np.ndarray:
    """Turn decoded pixels the way the EXIF ``orientation`` (1-8) says a viewer shows them (a phone held
    upright stores a landscape sensor image with orientation 6: rotate 90° clockwise)."""
    cv2 = load_cv2()
    turns: dict[int, Callable[[np.ndarray], np.ndarray]] = {
        2: lambda m: cv2.flip(m, 1),
        3: lambda m: cv2.rotate(m, cv2.ROTATE_180),
        4: lambda m: cv2.flip(m, 0),
        5: lambda m: cv2.transpose(m),
        6: lambda m: cv2.rotate(m, cv2.ROTATE_90_CLOCKWISE),
        7: lambda m: cv2.rotate(cv2.transpose(m), cv2.ROTATE_180),
        8: lambda m: cv2.rotate(m, cv2.ROTATE_90_COUNTERCLOCKWISE),
    }
    turn = turns.get(orientation)
    return img if turn is None else turn(img)


def check_aspect_ratio(width: int, height: int, max_ratio: float, source: str = "image") -> None:
    """Raise :class:`ImageDecodeError` when ``max(w, h) / min(w, h)`` exceeds ``max_ratio``."""
    if width < 1 or height < 1:
        raise ImageDecodeError(f"{source}: image {width}x{height} has no pixels")
    long_side, short_side = max(width, height), min(width, height)
    if long_side > max_ratio * short_side:
        ratio = long_side / short_side
        shown = f"{ratio:.0f}" if ratio >= 10 else f"{ratio:.1f}"
        raise ImageDecodeError(
            f"{source}: image {width}x{height} has aspect ratio {shown}:1 exceeds the maximum {max_ratio:g}:1 "
            f"(crop or tile such images before classifying them)"
        )


def _is_truncated(buf: np.ndarray) -> bool:
    """OpenCV decodes truncated JPEG/PNG files silently (grey fill); detect them from the trailer."""
    head = bytes(buf[:8])
    tail = bytes(buf[-32:])
    if head[:3] == b"\xff\xd8\xff":
        return b"\xff\xd9" not in tail
    if head == b"\x89PNG\r\n\x1a\n":
        return b"IEND" not in tail
    return False


def read_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read an image file as HxWx3 uint8 RGB (see :func:`decode_image`)."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ImageDecodeError(f"{p}: cannot read ({e.strerror})") from None
    return decode_image(data, source=str(p), max_pixels=max_pixels)
