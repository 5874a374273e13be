"""Online augmentation presets named after the seed papers (torchvision.transforms.v2).

Input: the cached, resized image as a uint8 CHW torch tensor (RGB, at least ``spec.input_size``).
Output: float32 ``[3, H, W]`` with ``(H, W) = spec.input_size``, normalised with the spec's own
mean/std and channel order (no constants here: the graphite paper's 0.5/0.5 normalisation is a
property of the spec a run uses, not of the preset).

Presets (``strength`` in [0, 2] scales every magnitude; 1 = the paper's values):

- ``graphite``: random crop, horizontal flip p=0.5.
- ``garbage``: random crop, horizontal + vertical flips, rotation (±20°), contrast/saturation/hue jitter.
- ``rock``: scale 0.5–2, rotation 0–360°, translation (±10 %), flips, brightness (±30 %),
  Gaussian blur (p=0.5), Gaussian noise with variance 0.01 (σ=0.1 in [0, 1] pixel units).
- ``flips``: centre crop, then one of identity / h-flip / v-flip / both, uniformly (rotation-symmetric
  imagery: solar cells, wafers, tiles seen from above).
- ``dihedral``: centre crop, then one of the 8 dihedral views (flips and 90° rotations; the graphite
  paper's offline expansion), uniformly.
- ``none``: centre crop only (the evaluation crop).

``flips``, ``dihedral`` and ``none`` are deterministic views of the evaluation crop, so the trainer can
serve them from the frozen-prefix activation cache (:mod:`trainer.feeds`); ``strength`` does not apply.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torchvision.transforms import v2

from edgetune.errors import ConfigError
from edgetune.preprocess import PreprocessSpec
from trainer.actcache import VIEW_SETS
from trainer.config import AUG_PRESETS as PRESETS  # one choice list


class _ChannelOrderNormalize(torch.nn.Module):
    """float [0, 1] RGB -> spec channel order, ``(x - mean) / std`` (mean/std read from the spec)."""

    def __init__(self, spec: PreprocessSpec) -> None:
        super().__init__()
        self.bgr = spec.channel_order == "BGR"
        self.mean = torch.tensor(spec.mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(spec.std, dtype=torch.float32).view(3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bgr:
            x = x.flip(-3)
        return (x - self.mean) / self.std


class RandomView(torch.nn.Module):
    """One of ``views`` (names of :data:`trainer.actcache.VIEWS`) uniformly at random, on a CHW tensor."""

    def __init__(self, views: tuple[str, ...]) -> None:
        super().__init__()
        self.views = views

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = self.views[int(torch.randint(len(self.views), ()))]
        return view_chw(x, v)


def view_chw(x: torch.Tensor, view: str) -> torch.Tensor:
    """:func:`trainer.actcache.apply_view` for a CHW tensor."""
    if view == "id":
        return x
    if view == "hflip":
        return x.flip(-1)
    if view == "vflip":
        return x.flip(-2)
    if view == "rot180":
        return x.flip(-1, -2)
    if view == "rot90":
        return torch.rot90(x, 1, (-2, -1))
    if view == "rot270":
        return torch.rot90(x, -1, (-2, -1))
    if view == "transpose":
        return x.transpose(-2, -1)
    if view == "antitranspose":
        return x.transpose(-2, -1).flip(-1, -2)
    raise ConfigError(f"unknown view {view!r}")


def _random_crop(spec: PreprocessSpec, s: float) -> Any:
    """Random crop of the resized image back to the input size; strength 0 = the centre crop."""
    if s <= 0:
        return v2.CenterCrop(spec.input_size)
    lo = max(0.08, 1.0 - 0.4 * s)
    r = 1.0 + 0.25 * s
    return v2.RandomResizedCrop(spec.input_size, scale=(lo, 1.0), ratio=(1 / r, r), antialias=True)


def build_augment(preset: str, spec: PreprocessSpec, strength: float = 1.0) -> Callable[[torch.Tensor], torch.Tensor]:
    """The training transform of a preset: uint8 CHW tensor -> normalised float32 [3, *spec.input_size]."""
    if preset not in PRESETS:
        raise ConfigError(f"augmentation preset must be one of {list(PRESETS)}, got {preset!r}")
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 <= strength <= 2.0:
        raise ConfigError(f"augmentation strength must be a number in [0, 2], got {strength!r}")
    s = float(strength)
    size = spec.input_size
    ops: list[Any]
    if preset == "none":
        ops = [v2.CenterCrop(size), v2.ToDtype(torch.float32, scale=True)]
    elif preset in ("flips", "dihedral"):
        if preset == "dihedral" and size[0] != size[1]:
            raise ConfigError(f"augmentation 'dihedral' rotates by 90 degrees and needs a square input, got {size}")
        ops = [v2.CenterCrop(size), RandomView(VIEW_SETS[preset]), v2.ToDtype(torch.float32, scale=True)]
    elif preset == "graphite":
        ops = [_random_crop(spec, s), v2.RandomHorizontalFlip(0.5), v2.ToDtype(torch.float32, scale=True)]
    elif preset == "garbage":
        ops = [
            v2.RandomRotation(20.0 * s, interpolation=v2.InterpolationMode.BILINEAR),
            _random_crop(spec, s),
            v2.RandomHorizontalFlip(0.5),
            v2.RandomVerticalFlip(0.5),
            v2.ColorJitter(contrast=0.3 * s, saturation=0.3 * s, hue=min(0.5, 0.05 * s)),
            v2.ToDtype(torch.float32, scale=True),
        ]
    else:  # rock
        ops = [
            v2.RandomAffine(
                degrees=min(180.0, 180.0 * s),
                translate=(min(1.0, 0.1 * s), min(1.0, 0.1 * s)),
                scale=(2.0**-s, 2.0**s),
                interpolation=v2.InterpolationMode.BILINEAR,
            ),
            v2.CenterCrop(size),
            v2.RandomHorizontalFlip(0.5),
            v2.RandomVerticalFlip(0.5),
            v2.ColorJitter(brightness=0.3 * s),
            v2.RandomApply([v2.GaussianBlur(5, sigma=(0.1, max(0.1, 1.5 * s)))], p=0.5 if s > 0 else 0.0),
            v2.ToDtype(torch.float32, scale=True),
            v2.GaussianNoise(mean=0.0, sigma=0.1 * s, clip=True),
        ]
    ops.append(_ChannelOrderNormalize(spec))
    return Augment(preset, s, v2.Compose(ops), size)


class Augment:
    """A picklable training transform; checks the input type and the output size."""

    def __init__(self, preset: str, strength: float, compose: Any, size: tuple[int, int]) -> None:
        self.preset = preset
        self.strength = strength
        self.compose = compose
        self.size = size

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        if img.dtype != torch.uint8 or img.ndim != 3 or img.shape[0] != 3:
            raise ConfigError(f"augmentation expects a uint8 [3, H, W] tensor, got {img.dtype} {tuple(img.shape)}")
        if img.shape[1] < self.size[0] or img.shape[2] < self.size[1]:
            raise ConfigError(f"image {tuple(img.shape[1:])} is smaller than the input size {self.size}; resize first")
        out = self.compose(img)
        return out.contiguous()

    def __repr__(self) -> str:
        return f"Augment(preset={self.preset!r}, strength={self.strength})"
