"""The field of `make bench-field`: the texture materials of the home dataset (scikit-image brick / grass / gravel)
seen by cameras in worse conditions — out of focus (Gaussian blur, sigma 2), under-exposed (x 0.35) and with
sensor noise (sigma 8) —, a real shift the home model has never seen. Each camera looks at its own region of the
photos (cameras never share a region, so their frames are never near-duplicates of each other's); its frames are
written as an image folder in a shuffled order (the camera client streams them in name order). The answer key
maps a captured frame back to its source image by pixel content (what a labeller sees), not by any id."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

TILE = 96
SHIFT = {"blur_sigma": 2.0, "gain": 0.35, "noise_sigma": 8.0}
#: (row band start, column band start) of each camera: 4 row bands x 2 column halves of rows 0-416 (the home
#: dataset's train and validation bands; its test band, rows 416-512, is never a field frame)
CAMERA_REGIONS = [(y, x) for y in (0, 104, 208, 312) for x in (0, 256)]


@dataclass(frozen=True)
class FieldFrame:
    camera: str
    path: Path
    label: str
    grey: np.ndarray  # the frame as written (uint8)


def shift(tile: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    g = cv2.GaussianBlur(tile.astype(np.float32), (0, 0), SHIFT["blur_sigma"]) * SHIFT["gain"]
    g = g + rng.normal(0.0, SHIFT["noise_sigma"], g.shape)
    return np.clip(g, 0, 255).astype(np.uint8)


def write_field(folder: Path, classes: tuple[str, ...], seed: int = 0) -> dict[str, list[FieldFrame]]:
    """One image folder per camera under ``folder``; returns each camera's frames."""
    from skimage import data as skdata

    rng = np.random.default_rng(seed)
    photos = {c: getattr(skdata, c)() for c in classes}
    out: dict[str, list[FieldFrame]] = {}
    for k, (y0, x0) in enumerate(CAMERA_REGIONS):
        cam = f"cam-{k + 1}"
        tiles = [
            (c, photos[c][y : y + TILE, x : x + TILE])
            for c in classes
            for y in (y0, y0 + 8)
            for x in range(x0, x0 + 256 - TILE + 1, 16)
        ]
        order = rng.permutation(len(tiles))
        d = folder / cam
        d.mkdir(parents=True, exist_ok=True)
        frames = []
        for n, i in enumerate(order):
            label, tile = tiles[i]
            g = shift(tile, rng)
            p = d / f"frame_{n:04d}.png"
            cv2.imwrite(str(p), g)
            frames.append(FieldFrame(cam, p, label, g))
        out[cam] = frames
    return out


class AnswerKey:
    """The true class of a captured frame: the camera's field image closest in pixels (the client JPEG-encodes)."""

    def __init__(self, frames: dict[str, list[FieldFrame]]) -> None:
        self.frames = frames
        self.stack = {c: np.stack([f.grey.astype(np.float32) for f in fs]) for c, fs in frames.items()}

    def label(self, camera: str, encoded: bytes) -> str:
        img = cv2.imdecode(np.frombuffer(encoded, np.uint8), cv2.IMREAD_GRAYSCALE).astype(np.float32)
        err = ((self.stack[camera] - img[None]) ** 2).mean(axis=(1, 2))
        return self.frames[camera][int(err.argmin())].label
