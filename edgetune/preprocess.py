"""The one preprocessing spec of edgetune (NumPy + OpenCV only, no torch).

A :class:`PreprocessSpec` is chosen by the backbone registry (its weights decide mean/std
and input size), saved in every checkpoint and in the exported ``bundle.json``, and read
back from there by export, the edge server and the client. No other module defines
normalisation constants.

Pipeline for evaluation and serving (training uses the same resize, then augments)::

    bytes/file --decode_image--> HxWx3 uint8 RGB --spec.resize--> --spec.center_crop--> --spec.normalize-->
    3xHxW float32

Decoding lives in :mod:`edgetune.imagedecode` (:func:`~edgetune.imagedecode.decode_image`,
:func:`~edgetune.imagedecode.read_image`) and header parsing in :mod:`edgetune.imageheader`; both bound
the work per image before OpenCV decodes anything. Here:

* :meth:`PreprocessSpec.resize_image` (both resize modes, hence :meth:`~PreprocessSpec.apply` and
  the crop after it) refuses images whose aspect ratio exceeds :data:`MAX_ASPECT_RATIO` and never
  produces an intermediate larger than :data:`MAX_RESIZE_PIXELS`: a 1x60000 image no longer becomes
  a 256 x 15 M pixel intermediate.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from edgetune.errors import ConfigError, ImageDecodeError
from edgetune.imagedecode import check_aspect_ratio, load_cv2

_INTERPOLATIONS = ("bilinear", "area", "bicubic", "nearest")
_CHANNEL_ORDERS = ("RGB", "BGR")
_RESIZE_MODES = ("shorter_side", "stretch")

#: Largest long-side / short-side ratio any resize accepts (wider images must be tiled first).
MAX_ASPECT_RATIO = 32.0
#: Largest intermediate image (pixels) ``resize_image`` may produce, whatever the spec.
MAX_RESIZE_PIXELS = 16 * 1024 * 1024


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
            raise ConfigError(
                f"preprocess.input_size must be two integers >= 8 (height, width), got {self.input_size!r}"
            )
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
                positive = " and > 0" if name == "std" else ""
                raise ConfigError(f"preprocess.{name} must be finite{positive}, got {vals!r}")
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
        cv2 = load_cv2()
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
                f"use a smaller preprocess.resize or tile the image first"
            )
        if (th, tw) == (h, w):
            return np.ascontiguousarray(img)
        out: np.ndarray = cv2.resize(img, (tw, th), interpolation=interp)
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
