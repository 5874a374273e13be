"""Items (source file x tile x offline transform) and their decoded, resized uint8 pixels.

Every item's pixels are ``spec.resize_image(transform(tile(read_image(file))))``. They are
computed once and written to a disk cache keyed by content (file hashes, tiles, transforms,
the spec's resize parameters), one flat ``.bin`` + ``.idx.npy`` per split, so repeated runs
and tuning trials do not decode again. The store then lives in memory (when it fits) or is
memory-mapped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgetune.errors import EdgetuneError, ImageDecodeError
from edgetune.fsutil import atomic_path
from edgetune.imagedecode import read_image
from edgetune.preprocess import PreprocessSpec
from trainer.scan import SourceFile

log = logging.getLogger(__name__)

STORE_VERSION = 1
MEMORY_FRACTION = 0.25
MEMORY_CAP = 2 << 30  # 2 GiB


@dataclass(frozen=True)
class Item:
    """One dataset item: a source file, an optional tile of it, an optional offline transform."""

    file: SourceFile
    label: int
    tile: tuple[int, int] | None = None  #: (row, col) in ``grid`` when the image is sliced
    grid: tuple[int, int] = (1, 1)
    transform: str = ""  #: "", "hflip", "vflip", "rot90" or "affine" (offline expansion, train only)

    def describe(self) -> str:
        s = self.file.path
        if self.tile is not None:
            s += f"#tile={self.tile[0]},{self.tile[1]}/{self.grid[0]}x{self.grid[1]}"
        if self.transform:
            s += f"#{self.transform}"
        return s


def make_items(
    files: Sequence[SourceFile], class_index: dict[str, int], grid: tuple[int, int], expand: Sequence[str] = ()
) -> list[Item]:
    """Items of one split: each file sliced into ``grid`` tiles, each tile plus one copy per expansion."""
    rows, cols = grid
    out = []
    for f in files:
        tiles: list[tuple[int, int] | None] = (
            [None] if (rows, cols) == (1, 1) else [(r, c) for r in range(rows) for c in range(cols)]
        )
        for t in tiles:
            for tr in ("", *expand):
                out.append(Item(f, class_index[f.label], t, (rows, cols), tr))
    return out


def tile_of(img: np.ndarray, grid: tuple[int, int], tile: tuple[int, int] | None) -> np.ndarray:
    """Tile (row, col) of an R x C grid (integer bounds; the grid covers the whole image)."""
    if tile is None:
        return img
    rows, cols = grid
    h, w = img.shape[:2]
    if h < rows or w < cols:
        raise EdgetuneError(f"image {w}x{h} is too small to slice into {rows}x{cols} tiles")
    r, c = tile
    return img[r * h // rows : (r + 1) * h // rows, c * w // cols : (c + 1) * w // cols]


def affine_params(seed: int, item: Item) -> tuple[float, float, float, float, float]:
    """Deterministic (angle deg, scale, shear deg, tx, ty as fractions) for an item's affine copy."""
    t = item.tile or (0, 0)
    ident = int(hashlib.sha256(f"{item.file.sha256}|{item.file.rel}".encode()).hexdigest()[:12], 16)
    rng = np.random.default_rng([seed, ident, t[0], t[1]])
    return (
        float(rng.uniform(-15, 15)),
        float(rng.uniform(0.9, 1.1)),
        float(rng.uniform(-8, 8)),
        float(rng.uniform(-0.06, 0.06)),
        float(rng.uniform(-0.06, 0.06)),
    )


def apply_transform(img: np.ndarray, transform: str, params: tuple[float, ...] | None = None) -> np.ndarray:
    """An offline expansion transform of an HxWx3 uint8 image."""
    if transform == "":
        return img
    if transform == "hflip":
        return np.ascontiguousarray(img[:, ::-1])
    if transform == "vflip":
        return np.ascontiguousarray(img[::-1])
    if transform == "rot90":
        return np.ascontiguousarray(np.rot90(img, 1, axes=(0, 1)))
    if transform == "affine":
        import cv2

        if params is None:
            raise EdgetuneError("affine expansion needs its parameters")
        angle, scale, shear, tx, ty = params
        h, w = img.shape[:2]
        m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, scale)
        sh = np.tan(np.deg2rad(shear))
        m = np.array([[1, sh, -sh * h / 2], [0, 1, 0]], dtype=np.float64) @ np.vstack([m, [0, 0, 1]])
        m[0, 2] += tx * w
        m[1, 2] += ty * h
        return cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    raise EdgetuneError(f"unknown expansion {transform!r}; allowed: hflip, vflip, rot90, affine")


def item_pixels(item: Item, raw: np.ndarray, seed: int) -> np.ndarray:
    """The item before resizing: tile of the decoded source image, then its offline transform."""
    tile = tile_of(raw, item.grid, item.tile)
    params = affine_params(seed, item) if item.transform == "affine" else None
    return apply_transform(tile, item.transform, params)


def resize_key(spec: PreprocessSpec) -> dict[str, Any]:
    """The spec fields that determine ``spec.resize_image`` output."""
    return {
        "input_size": list(spec.input_size),
        "resize": spec.resize,
        "resize_mode": spec.resize_mode,
        "interpolation": spec.interpolation,
    }


def store_key(items: Sequence[Item], spec: PreprocessSpec, seed: int) -> str:
    h = hashlib.sha256(json.dumps({"v": STORE_VERSION, "resize": resize_key(spec)}, sort_keys=True).encode())
    uses_seed = any(it.transform == "affine" for it in items)
    h.update(f"seed={seed if uses_seed else '-'}\n".encode())
    for it in items:
        h.update(f"{it.file.sha256}|{it.tile}|{it.grid}|{it.transform}\n".encode())
    return h.hexdigest()


class ImageStore:
    """Resized uint8 HxWx3 images of a list of items, held in memory or memory-mapped from the disk cache."""

    def __init__(self, data: np.ndarray | None, index: np.ndarray, path: Path | None, key: str = "") -> None:
        self.key = key  #: content key (items + resize parameters): what the activation cache keys on
        self._data = data  # flat uint8 buffer (in memory) or None until memory-mapped
        self.index = index  # int64 [N, 3]: offset, height, width
        self.path = path  # .bin file for memory-mapping (None when in memory only)
        self.in_memory = data is not None and not isinstance(data, np.memmap)

    def __len__(self) -> int:
        return int(self.index.shape[0])

    @property
    def nbytes(self) -> int:
        return int((self.index[:, 1] * self.index[:, 2] * 3).sum()) if len(self) else 0

    def get(self, i: int) -> np.ndarray:
        if self._data is None:
            if self.path is None:
                raise EdgetuneError("image store has neither data nor a cache file")
            self._data = np.memmap(self.path, dtype=np.uint8, mode="r")
        off, h, w = (int(v) for v in self.index[i])
        return np.asarray(self._data[off : off + h * w * 3]).reshape(h, w, 3)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if not self.in_memory:
            state["_data"] = None  # DataLoader workers / Ray workers re-open the memory map
        return state


def memory_budget_bytes() -> int:
    """Bytes of decoded images kept in memory by ``cache_images: auto``: 25 % of RAM, at most 2 GiB."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = 8 << 30
    return int(min(ram * MEMORY_FRACTION, MEMORY_CAP))


def build_store(
    items: Sequence[Item],
    spec: PreprocessSpec,
    cache_dir: Path,
    seed: int,
    decoded: dict[str, np.ndarray] | None = None,
    cache_images: str = "auto",
    stats: dict[str, float] | None = None,
    memory_budget: int | None = None,
) -> ImageStore:
    """Load the items' resized pixels from the disk cache, computing and caching them on a miss.

    ``cache_images``: "yes" keeps them in memory, "no" memory-maps the cache file, "auto" keeps
    them in memory when they take less than ``memory_budget`` bytes (default: 25 % of RAM, at most
    2 GiB; callers building several stores pass what is left of it).
    """
    key = store_key(items, spec, seed)
    folder = cache_dir / "decoded"
    bin_path, idx_path = folder / f"{key}.bin", folder / f"{key}.idx.npy"
    t0 = time.perf_counter()
    hit = bin_path.exists() and idx_path.exists()
    if hit:
        try:
            index = np.load(idx_path)
            hit = index.shape == (len(items), 3) and bin_path.stat().st_size == int(
                (index[:, 1] * index[:, 2] * 3).sum()
            )
        except (OSError, ValueError):
            hit = False
    if not hit:
        index = _compute(items, spec, seed, decoded or {}, folder, bin_path, idx_path)
    if stats is not None:
        stats["cache_hit"] = float(hit)
        stats["seconds"] = time.perf_counter() - t0
        stats["images"] = float(len(items))
    total = int((index[:, 1] * index[:, 2] * 3).sum()) if len(items) else 0
    budget = memory_budget if memory_budget is not None else memory_budget_bytes()
    keep = cache_images == "yes" or (cache_images == "auto" and total < budget)
    if keep:
        data = np.fromfile(bin_path, dtype=np.uint8) if total else np.zeros(0, np.uint8)
        return ImageStore(data, index, bin_path, key)
    return ImageStore(None, index, bin_path, key)


def _compute(
    items: Sequence[Item],
    spec: PreprocessSpec,
    seed: int,
    decoded: dict[str, np.ndarray],
    folder: Path,
    bin_path: Path,
    idx_path: Path,
) -> np.ndarray:
    folder.mkdir(parents=True, exist_ok=True)
    index = np.zeros((len(items), 3), dtype=np.int64)
    last: tuple[str, np.ndarray] | None = None
    off = 0
    # The index is replaced first, the data file last: its presence (with the right size) marks completion.
    with atomic_path(bin_path) as tmp:
        with open(tmp, "wb") as fh:
            for i, it in enumerate(items):
                if last is None or last[0] != it.file.rel:
                    raw = decoded.get(it.file.rel)
                    if raw is None:
                        try:
                            raw = read_image(it.file.path)
                        except ImageDecodeError as e:
                            raise EdgetuneError(f"{e} (the file changed after the dataset was scanned)") from None
                    last = (it.file.rel, raw)
                img = spec.resize_image(item_pixels(it, last[1], seed))
                if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
                    raise EdgetuneError(f"{it.describe()}: resized image has shape {img.shape} {img.dtype}")
                fh.write(np.ascontiguousarray(img).tobytes())
                index[i] = (off, img.shape[0], img.shape[1])
                off += img.nbytes
        with atomic_path(idx_path, suffix=".tmp.npy") as tmp_idx:
            np.save(tmp_idx, index)
    return index


def decode_throughput(
    items: Sequence[Item], spec: PreprocessSpec, store: ImageStore, seed: int = 0, n: int = 32
) -> dict[str, float]:
    """Images/s of decoding + resizing from files vs reading the cached store (first ``n`` items)."""
    sel = list(range(min(n, len(items))))
    t0 = time.perf_counter()
    for i in sel:
        spec.resize_image(item_pixels(items[i], read_image(items[i].file.path), seed))
    t_decode = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in sel:
        store.get(i).copy()
    t_cached = time.perf_counter() - t0
    return {"decode_img_s": len(sel) / max(t_decode, 1e-9), "cached_img_s": len(sel) / max(t_cached, 1e-9)}
