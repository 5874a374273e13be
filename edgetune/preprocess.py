"""The one preprocessing spec of edgetune (NumPy + OpenCV only, no torch).

A :class:`PreprocessSpec` is chosen by the backbone registry (its weights decide mean/std
and input size), saved in every checkpoint and in the exported ``bundle.json``, and read
back from there by export, the edge server and the client. No other module defines
normalisation constants.

Pipeline for evaluation and serving (training uses the same resize, then augments)::

    bytes/file --decode_image--> HxWx3 uint8 RGB --spec.resize--> --spec.center_crop--> --spec.normalize--> 3xHxW float32

Bounded work per image (every caller, trainer and server alike):

* :func:`decode_image` accepts exactly :data:`ACCEPTED_FORMATS` (JPEG, PNG, WebP, TIFF, BMP), reads
  width and height from the header of each (:func:`read_image_header`) and refuses an image over
  ``max_pixels`` (or, when asked, over ``max_aspect_ratio``) before OpenCV decodes anything. Other
  formats (PNM, GIF, AVIF, HDR, ...) are refused with the list of accepted ones.
* :meth:`PreprocessSpec.resize_image` (both resize modes, hence :meth:`~PreprocessSpec.apply` and
  the crop after it) refuses images whose aspect ratio exceeds :data:`MAX_ASPECT_RATIO` and never
  produces an intermediate larger than :data:`MAX_RESIZE_PIXELS`: a 1x60000 image no longer becomes
  a 256 x 15 M pixel intermediate.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgetune.errors import ConfigError, ImageDecodeError

_INTERPOLATIONS = ("bilinear", "area", "bicubic", "nearest")
_CHANNEL_ORDERS = ("RGB", "BGR")
_RESIZE_MODES = ("shorter_side", "stretch")

#: Default upper bound on decoded pixels (64 MP); protects servers from decompression bombs.
DEFAULT_MAX_PIXELS = 64 * 1024 * 1024
#: The encoded formats :func:`decode_image` accepts (header parsed before decoding); all others are refused.
ACCEPTED_FORMATS = ("JPEG", "PNG", "WebP", "TIFF", "BMP")
#: Largest long-side / short-side ratio any resize accepts (wider images must be tiled first).
MAX_ASPECT_RATIO = 32.0
#: Largest intermediate image (pixels) ``resize_image`` may produce, whatever the spec.
MAX_RESIZE_PIXELS = 16 * 1024 * 1024


def _cv2() -> Any:
    import cv2  # OpenCV is a hard dependency of every edgetune side; imported lazily for fast CLI start

    return cv2


@dataclass(frozen=True)
class PreprocessSpec:
    """How an image becomes the network's input tensor.

    Attributes:
        input_size: (height, width) of the tensor fed to the network.
        resize: with ``resize_mode="shorter_side"``, the shorter image side is resized to this
            many pixels (aspect kept) before a centre crop to ``input_size``; with
            ``"stretch"`` the image is resized straight to ``input_size`` and ``resize`` is ignored.
        resize_mode: ``"shorter_side"`` or ``"stretch"``.
        interpolation: OpenCV interpolation: bilinear, area, bicubic or nearest.
        mean, std: per-channel normalisation in [0, 1] pixel units, in ``channel_order``:
            ``x = (pixel / 255 - mean) / std``.
        channel_order: ``"RGB"`` or ``"BGR"`` order of the network's input channels.
        layout: always ``"NCHW"`` (recorded so that other runtimes need not guess).
    """

    input_size: tuple[int, int] = (224, 224)
    resize: int = 256
    resize_mode: str = "shorter_side"
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    channel_order: str = "RGB"
    layout: str = field(default="NCHW")

    def __post_init__(self) -> None:
        size = tuple(self.input_size) if isinstance(self.input_size, (list, tuple)) else None
        if size is None or len(size) != 2 or not all(isinstance(v, int) and v >= 8 for v in size):
            raise ConfigError(f"preprocess.input_size must be two integers >= 8 (height, width), got {self.input_size!r}")
        object.__setattr__(self, "input_size", (int(size[0]), int(size[1])))
        if self.resize_mode not in _RESIZE_MODES:
            raise ConfigError(f"preprocess.resize_mode must be one of {_RESIZE_MODES}, got {self.resize_mode!r}")
        if self.resize_mode == "shorter_side" and (not isinstance(self.resize, int) or self.resize < max(size)):
            raise ConfigError(
                f"preprocess.resize must be an integer >= the larger input side {max(size)} for shorter_side mode, "
                f"got {self.resize!r}"
            )
        if self.interpolation not in _INTERPOLATIONS:
            raise ConfigError(f"preprocess.interpolation must be one of {_INTERPOLATIONS}, got {self.interpolation!r}")
        if self.channel_order not in _CHANNEL_ORDERS:
            raise ConfigError(f"preprocess.channel_order must be one of {_CHANNEL_ORDERS}, got {self.channel_order!r}")
        if self.layout != "NCHW":
            raise ConfigError(f"preprocess.layout must be 'NCHW', got {self.layout!r}")
        for name in ("mean", "std"):
            vals = getattr(self, name)
            if not isinstance(vals, (list, tuple)) or len(vals) != 3:
                raise ConfigError(f"preprocess.{name} must be three numbers, got {vals!r}")
            try:
                floats = tuple(float(v) for v in vals)
            except (TypeError, ValueError):
                raise ConfigError(f"preprocess.{name} must be three numbers, got {vals!r}") from None
            if not all(math.isfinite(v) for v in floats) or (name == "std" and min(floats) <= 0):
                raise ConfigError(f"preprocess.{name} must be finite{' and > 0' if name == 'std' else ''}, got {vals!r}")
            object.__setattr__(self, name, floats)

    # -- serialisation ----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PreprocessSpec:
        if not isinstance(d, Mapping):
            raise ConfigError(f"preprocess spec must be a mapping, got {type(d).__name__}")
        allowed = set(cls.__dataclass_fields__)
        unknown = set(d) - allowed
        if unknown:
            raise ConfigError(f"unknown preprocess key(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
        kw = dict(d)
        for k in ("input_size", "mean", "std"):
            if k in kw and isinstance(kw[k], list):
                kw[k] = tuple(kw[k])
        return cls(**kw)

    def with_input_size(self, size: int | tuple[int, int]) -> PreprocessSpec:
        """The same spec for another input size, keeping the resize/crop ratio of the original."""
        h, w = (size, size) if isinstance(size, int) else size
        ratio = self.resize / max(self.input_size) if self.resize_mode == "shorter_side" else 1.0
        return PreprocessSpec(
            input_size=(h, w),
            resize=max(h, w, int(round(max(h, w) * ratio))),
            resize_mode=self.resize_mode,
            interpolation=self.interpolation,
            mean=self.mean,
            std=self.std,
            channel_order=self.channel_order,
        )

    # -- image operations (HxWx3 uint8 RGB in) -------------------------------------------
    def resize_image(self, img: np.ndarray) -> np.ndarray:
        """Resize step only (uint8 in, uint8 out). Cached by the trainer before augmentation."""
        cv2 = _cv2()
        interp = {
            "bilinear": cv2.INTER_LINEAR,
            "area": cv2.INTER_AREA,
            "bicubic": cv2.INTER_CUBIC,
            "nearest": cv2.INTER_NEAREST,
        }[self.interpolation]
        h, w = img.shape[:2]
        check_aspect_ratio(w, h, MAX_ASPECT_RATIO, "image")
        if self.resize_mode == "stretch":
            th, tw = self.input_size
        else:
            scale = self.resize / min(h, w)
            th, tw = max(self.input_size[0], round(h * scale)), max(self.input_size[1], round(w * scale))
        if th * tw > MAX_RESIZE_PIXELS:
            raise ImageDecodeError(
                f"image {w}x{h} would be resized to {tw}x{th}, more than {MAX_RESIZE_PIXELS} pixels; "
                f"use a smaller preprocess.resize or tile the image first")
        if (th, tw) == (h, w):
            return np.ascontiguousarray(img)
        out = cv2.resize(img, (tw, th), interpolation=interp)
        return out.reshape(th, tw, -1) if out.ndim == 2 else out

    def center_crop(self, img: np.ndarray) -> np.ndarray:
        h, w = img.shape[:2]
        th, tw = self.input_size
        if h < th or w < tw:
            raise ImageDecodeError(f"image {w}x{h} is smaller than the crop {tw}x{th}; resize it first")
        top, left = (h - th) // 2, (w - tw) // 2
        return img[top : top + th, left : left + tw]

    def normalize(self, img: np.ndarray) -> np.ndarray:
        """HxWx3 uint8 RGB -> 3xHxW float32 normalised, in ``channel_order``."""
        if self.channel_order == "BGR":
            img = img[..., ::-1]
        x = img.astype(np.float32) * np.float32(1.0 / 255.0)
        x -= np.asarray(self.mean, dtype=np.float32)
        x /= np.asarray(self.std, dtype=np.float32)
        return np.ascontiguousarray(x.transpose(2, 0, 1))

    def apply(self, img: np.ndarray) -> np.ndarray:
        """Full evaluation/serving transform of one decoded RGB image."""
        return self.normalize(self.center_crop(self.resize_image(img)))

    def apply_batch(self, imgs: Sequence[np.ndarray]) -> np.ndarray:
        out = np.empty((len(imgs), 3, *self.input_size), dtype=np.float32)
        for i, img in enumerate(imgs):
            out[i] = self.apply(img)
        return out


def _to_rgb_uint8(arr: np.ndarray, source: str) -> np.ndarray:
    cv2 = _cv2()
    # Conversions run in OpenCV on the decoded array (uint8 out): no float copy of the whole image.
    if arr.dtype == np.uint16:
        arr = cv2.convertScaleAbs(arr, alpha=1.0 / 257.0)  # round(v / 257), as (v / 257 + 0.5) truncated
    elif arr.dtype in (np.float32, np.float64):
        finite = np.isfinite(arr)
        if not finite.all():
            lo = float(arr[finite].min()) if finite.any() else 0.0
            hi = float(arr[finite].max()) if finite.any() else 0.0
            np.nan_to_num(arr, copy=False, nan=lo, posinf=hi, neginf=lo)
        lo, hi = float(arr.min()), float(arr.max())
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        arr = cv2.convertScaleAbs(arr, alpha=scale, beta=-lo * scale)
    elif arr.dtype != np.uint8:
        raise ImageDecodeError(f"{source}: unsupported pixel type {arr.dtype}")
    if arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 1):
        return cv2.cvtColor(arr.reshape(arr.shape[0], arr.shape[1]), cv2.COLOR_GRAY2RGB)
    if arr.ndim == 3 and arr.shape[2] == 3:
        return cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)
    if arr.ndim == 3 and arr.shape[2] == 4:
        # Composite over black, weighting by alpha: transparent pixels carry no colour (uint8 in OpenCV).
        rgb = cv2.cvtColor(arr, cv2.COLOR_BGRA2RGB)
        alpha = cv2.cvtColor(np.ascontiguousarray(arr[..., 3]), cv2.COLOR_GRAY2RGB)
        return cv2.multiply(rgb, alpha, scale=1.0 / 255.0)
    raise ImageDecodeError(f"{source}: unsupported image shape {arr.shape}")


def decode_image(data: bytes | bytearray | memoryview | np.ndarray, source: str = "<bytes>",
                 max_pixels: int = DEFAULT_MAX_PIXELS, max_aspect_ratio: float | None = None) -> np.ndarray:
    """Decode encoded image bytes (one of :data:`ACCEPTED_FORMATS`) to HxWx3 uint8 RGB.

    The header is read first (:func:`read_image_header`): an unknown format, an image over
    ``max_pixels`` or (when given) over ``max_aspect_ratio`` is refused before OpenCV decodes it.
    Grey, grey+alpha, RGBA (composited over black), CMYK JPEG and 16-bit images are converted.
    Raises :class:`ImageDecodeError` naming ``source`` for empty, truncated, undecodable,
    unsupported or oversized input.
    """
    cv2 = _cv2()
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
    return _to_rgb_uint8(arr, source)


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
            f"(crop or tile such images before classifying them)")


def _is_truncated(buf: np.ndarray) -> bool:
    """OpenCV decodes truncated JPEG/PNG files silently (grey fill); detect them from the trailer."""
    head = bytes(buf[:8])
    tail = bytes(buf[-32:])
    if head[:3] == b"\xff\xd8\xff":
        return b"\xff\xd9" not in tail
    if head == b"\x89PNG\r\n\x1a\n":
        return b"IEND" not in tail
    return False


# -- image headers -------------------------------------------------------------------------------

@dataclass(frozen=True)
class ImageHeader:
    """What an encoded image declares before it is decoded.

    ``channels`` and ``bytes_per_sample`` are upper bounds of what ``cv2.imdecode(IMREAD_UNCHANGED)``
    produces (palette images count as 4 channels), so ``decoded_bytes`` bounds the decoder's output.
    """

    format: str
    width: int
    height: int
    channels: int = 3
    bytes_per_sample: int = 1

    @property
    def pixels(self) -> int:
        return self.width * self.height

    @property
    def decoded_bytes(self) -> int:
        return self.pixels * self.channels * self.bytes_per_sample


_PNG_SIG = b"\x89PNG\r\n\x1a\n"
_MAX_SIDE = 1 << 20  # no accepted decoder goes beyond this; larger header values are corrupt or hostile


def read_image_header(data: bytes | bytearray | memoryview | np.ndarray, source: str = "<bytes>") -> ImageHeader:
    """Width, height, channels and sample size from the header of a JPEG, PNG, WebP, TIFF or BMP.

    Reads only the header (for JPEG: the markers up to the first frame header). Raises
    :class:`ImageDecodeError` for other formats (naming the accepted ones) and for truncated or
    inconsistent headers.
    """
    if isinstance(data, np.ndarray):
        buf = memoryview(np.ascontiguousarray(data).reshape(-1).view(np.uint8))  # type: ignore[arg-type]
    else:
        buf = memoryview(data).cast("B")  # no copy of the image data
    if len(buf) == 0:
        raise ImageDecodeError(f"{source}: empty image data")
    kind = "image"
    try:
        if buf[:8] == _PNG_SIG:
            kind = "PNG"
            head = _png_header(buf)
        elif buf[:3] == b"\xff\xd8\xff":
            kind = "JPEG"
            head = _jpeg_header(buf)
        elif buf[:4] == b"RIFF" and buf[8:12] == b"WEBP":
            kind = "WebP"
            head = _webp_header(buf)
        elif bytes(buf[:4]) in (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+"):
            kind = "TIFF"
            head = _tiff_header(buf)
        elif buf[:2] == b"BM":
            kind = "BMP"
            head = _bmp_header(buf)
        else:
            raise ImageDecodeError(f"{source}: not a decodable image (unrecognised format; accepted formats: "
                                   f"{', '.join(ACCEPTED_FORMATS)})")
    except _HeaderError as e:
        raise ImageDecodeError(f"{source}: {e}") from None
    except (struct.error, IndexError, OverflowError):
        raise ImageDecodeError(f"{source}: truncated or corrupt {kind} header") from None
    if not (1 <= head.width <= _MAX_SIDE and 1 <= head.height <= _MAX_SIDE):
        raise ImageDecodeError(f"{source}: {head.format} header declares an impossible size "
                               f"{head.width}x{head.height}")
    return head


class _HeaderError(ValueError):
    """A header problem; :func:`read_image_header` adds the source name."""


def _png_header(b: memoryview) -> ImageHeader:
    if len(b) < 33 or b[12:16] != b"IHDR":
        raise _HeaderError("truncated PNG header (no IHDR chunk)")
    w, h = struct.unpack(">II", b[16:24])
    depth, color = b[24], b[25]
    channels = {0: 1, 2: 3, 3: 4, 4: 4, 6: 4}.get(color)
    if channels is None:
        raise _HeaderError(f"PNG header has an invalid colour type {color}")
    return ImageHeader("PNG", w, h, channels, 2 if depth == 16 else 1)


_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


_JPEG_MAX_SEGMENTS = 1024  # real files have a few dozen before the frame header


def _jpeg_header(b: memoryview) -> ImageHeader:
    i = 2
    n = len(b)
    for _ in range(_JPEG_MAX_SEGMENTS):
        if i + 4 > n:
            break
        if b[i] != 0xFF:
            raise _HeaderError("corrupt JPEG (marker expected)")
        marker = b[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # stand-alone markers
            i += 2
            continue
        if marker in (0xD9, 0xDA):
            break  # end of image / start of scan before any frame header
        (length,) = struct.unpack(">H", b[i + 2 : i + 4])
        if length < 2:
            raise _HeaderError("corrupt JPEG (bad segment length)")
        if marker in _JPEG_SOF:
            precision, h, w, comps = struct.unpack(">BHHB", b[i + 4 : i + 10])
            if h == 0:
                raise _HeaderError("JPEG without a height in its frame header (DNL) is not supported")
            return ImageHeader("JPEG", w, h, max(1, comps), 2 if precision > 8 else 1)
        i += 2 + length
    else:
        raise _HeaderError(f"corrupt JPEG (more than {_JPEG_MAX_SEGMENTS} segments before the frame header)")
    raise _HeaderError("truncated JPEG (no frame header)")


def _webp_header(b: memoryview) -> ImageHeader:
    i = 12
    while i + 8 <= len(b):
        tag, size = bytes(b[i : i + 4]), struct.unpack("<I", b[i + 4 : i + 8])[0]
        p = i + 8
        if tag == b"VP8X":
            w = 1 + int.from_bytes(b[p + 4 : p + 7], "little")
            h = 1 + int.from_bytes(b[p + 7 : p + 10], "little")
            if len(b) < p + 10:
                raise _HeaderError("truncated WebP header")
            return ImageHeader("WebP", w, h, 4, 1)
        if tag == b"VP8L":
            if len(b) < p + 5 or b[p] != 0x2F:
                raise _HeaderError("corrupt lossless WebP header")
            bits = int.from_bytes(b[p + 1 : p + 5], "little")
            return ImageHeader("WebP", 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF), 4, 1)
        if tag == b"VP8 ":
            if len(b) < p + 10 or b[p + 3 : p + 6] != b"\x9d\x01\x2a":
                raise _HeaderError("corrupt lossy WebP header")
            w, h = struct.unpack("<HH", b[p + 6 : p + 10])
            return ImageHeader("WebP", w & 0x3FFF, h & 0x3FFF, 3, 1)
        i = p + size + (size & 1)
    raise _HeaderError("truncated WebP (no VP8/VP8L/VP8X chunk)")


_TIFF_TYPES = {1: ("B", 1), 3: ("H", 2), 4: ("I", 4), 6: ("b", 1), 8: ("h", 2), 9: ("i", 4), 16: ("Q", 8),
               17: ("q", 8)}


def _tiff_header(b: memoryview) -> ImageHeader:
    e = "<" if b[:2] == b"II" else ">"
    big = bytes(b[2:4]) in (b"+\0", b"\0+")
    if big:
        bytesize, _, ifd = struct.unpack(e + "HHQ", b[4:16])
        if bytesize != 8:
            raise _HeaderError("corrupt BigTIFF header")
        (count,) = struct.unpack(e + "Q", b[ifd : ifd + 8])
        start, entry, inline = ifd + 8, 20, 8
    else:
        (ifd,) = struct.unpack(e + "I", b[4:8])
        (count,) = struct.unpack(e + "H", b[ifd : ifd + 2])
        start, entry, inline = ifd + 2, 12, 4
    if count == 0 or count > 4096:
        raise _HeaderError("corrupt TIFF (bad directory)")
    tags: dict[int, int] = {}
    for k in range(count):
        o = start + k * entry
        if big:
            tag, typ, n = struct.unpack(e + "HHQ", b[o : o + 12])
            field_at = o + 12
        else:
            tag, typ, n = struct.unpack(e + "HHI", b[o : o + 8])
            field_at = o + 8
        if tag not in (256, 257, 258, 262, 277, 322, 323) or typ not in _TIFF_TYPES or n < 1:
            continue
        fmt, size = _TIFF_TYPES[typ]
        at = field_at
        if size * n > inline:  # the values live elsewhere; the first one is what we need
            (at,) = struct.unpack(e + ("Q" if big else "I"), b[field_at : field_at + inline])
        (tags[tag],) = struct.unpack(e + fmt, b[at : at + size])
    if 256 not in tags or 257 not in tags:
        raise _HeaderError("TIFF without ImageWidth/ImageLength")
    spp = max(1, tags.get(277, 1))
    channels = max(spp, 4) if tags.get(262) == 3 else spp  # palette images decode to colour
    bits = max(1, tags.get(258, 1))
    if 322 in tags or 323 in tags:  # tiled: the decoder allocates one whole tile, which may exceed the image
        tile = tags.get(322, 0) * tags.get(323, 0)
        if tile > max(tags[256] * tags[257], 1 << 18):
            raise _HeaderError(f"TIFF tile {tags.get(322)}x{tags.get(323)} is larger than its "
                               f"{tags[256]}x{tags[257]} image")
    return ImageHeader("TIFF", tags[256], tags[257], min(channels, 64), max(1, -(-bits // 8)))


def _bmp_header(b: memoryview) -> ImageHeader:
    (dib,) = struct.unpack("<I", b[14:18])
    if dib == 12:
        w, h, _, bpp = struct.unpack("<HHHH", b[18:26])
    elif dib >= 40:
        w, h, _, bpp = struct.unpack("<iiHH", b[18:30])
    else:
        raise _HeaderError(f"unsupported BMP header size {dib}")
    return ImageHeader("BMP", w, abs(h), 4 if bpp == 32 else 3, 1)


def read_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read an image file as HxWx3 uint8 RGB (see :func:`decode_image`)."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ImageDecodeError(f"{p}: cannot read ({e.strerror})") from None
    return decode_image(data, source=str(p), max_pixels=max_pixels)
