"""Built-in dataset preparers: write an ImageFolder tree once into the cache directory.

- ``elpv``: electroluminescence images of solar cells (PyPI ``elpv-dataset``, 2,624 PNGs,
  300x300 grey). Tasks: ``defect4`` (defect probability 0, 1/3, 2/3, 1 -> classes ``p0``,
  ``p033``, ``p067``, ``p100``), ``binary`` (``functional`` p < 0.5, ``defective`` p >= 0.5),
  ``type`` (``mono``/``poly``).
- ``textures``: scikit-image's ``brick``, ``grass`` and ``gravel`` photos (512x512 grey), cut
  into 96-px tiles with stride 32. Each class is ONE photo, so neighbouring tiles are correlated;
  the preparer therefore fixes a spatial split: rows [0, 320) -> train, [320, 416) -> val,
  [416, 512) -> test (no tile straddles a band), recorded in ``edgetune_split.json``, which the
  split step uses instead of a seeded split. Per class: 112 train, 14 val, 14 test tiles.

Preparation is idempotent and safe with concurrent processes: each writes into a temporary
folder, writes the ``.complete`` marker last, then renames the folder into place atomically.
The images are never committed to git; they live in the cache directory only.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from edgetune.errors import ConfigError, EdgetuneError
from trainer.scan import SPLIT_FILE

BUILTINS = ("elpv", "textures")
ELPV_TASKS = ("defect4", "binary", "type")
MARKER = ".complete"
TEXTURE_PHOTOS = ("brick", "grass", "gravel")
TEXTURE_TILE = 96
TEXTURE_STRIDE = 32


def cache_root(cache_dir: str = "") -> Path:
    """``cache_dir`` if given, else ``$EDGETUNE_CACHE``, else ``~/.cache/edgetune``."""
    root = cache_dir or os.environ.get("EDGETUNE_CACHE", "") or str(Path.home() / ".cache" / "edgetune")
    return Path(root).expanduser().resolve()


def prepare_builtin(name: str, cache: Path, elpv_task: str = "defect4") -> tuple[Path, str]:
    """Prepare a built-in dataset; returns (ImageFolder root, dataset name)."""
    if name == "textures":
        return prepare_textures(cache), "textures"
    if name == "elpv":
        return prepare_elpv(cache, elpv_task), f"elpv-{elpv_task}"
    raise ConfigError(f"unknown built-in dataset {name!r}; built-ins: {list(BUILTINS)} (or pass a folder/CSV path)")


def _prepare_once(final: Path, write: Callable[[Path], None]) -> Path:
    if (final / MARKER).exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
    try:
        write(tmp)
        (tmp / MARKER).write_text("ok\n")
        if final.exists() and not (final / MARKER).exists():
            # An incomplete folder (e.g. copied by hand or an old crash): move it aside, never trust it.
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / MARKER).exists():  # not a concurrent winner: a real failure
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def texture_bands(height: int = 512, tile: int = TEXTURE_TILE) -> dict[str, tuple[int, int]]:
    """Row bands of a texture photo: train on top, then one tile-high band each for val and test."""
    return {"train": (0, height - 2 * tile), "val": (height - 2 * tile, height - tile), "test": (height - tile, height)}


def texture_tiles(
    height: int, width: int, tile: int = TEXTURE_TILE, stride: int = TEXTURE_STRIDE
) -> list[tuple[str, int, int]]:
    """(split, y, x) of every tile; a tile belongs to the band that contains it entirely."""
    out = []
    for split, (y0, y1) in texture_bands(height, tile).items():
        for y in range(y0, y1 - tile + 1, stride):
            for x in range(0, width - tile + 1, stride):
                out.append((split, y, x))
    return out


def prepare_textures(cache: Path, tile: int = TEXTURE_TILE, stride: int = TEXTURE_STRIDE) -> Path:
    """scikit-image brick/grass/gravel photos as an ImageFolder of tiles with a spatial split."""
    final = cache / "datasets" / f"textures-v1-t{tile}s{stride}"

    def write(tmp: Path) -> None:
        import cv2
        from skimage import data as skdata

        splits: dict[str, str] = {}
        for name in TEXTURE_PHOTOS:
            photo = getattr(skdata, name)()
            if photo.ndim != 2:
                raise EdgetuneError(f"scikit-image {name}() is not a grey image: shape {photo.shape}")
            (tmp / name).mkdir()
            h, w = photo.shape
            for split, y, x in texture_tiles(h, w, tile, stride):
                rel = f"{name}/{name}_y{y:03d}_x{x:03d}.png"
                if not cv2.imwrite(str(tmp / rel), photo[y : y + tile, x : x + tile]):
                    raise EdgetuneError(f"cannot write {tmp / rel}")
                splits[rel] = split
        (tmp / SPLIT_FILE).write_text(
            json.dumps(
                {
                    "source": "scikit-image data.brick/grass/gravel",
                    "tile": tile,
                    "stride": stride,
                    "bands": texture_bands(512, tile),
                    "files": splits,
                },
                indent=1,
            )
        )

    return _prepare_once(final, write)


def elpv_package_dir() -> Path:
    spec = importlib.util.find_spec("elpv_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise EdgetuneError(
            "the elpv dataset needs the PyPI package elpv-dataset: pip install elpv-dataset==1.0.0.post1"
        )
    d = Path(list(spec.submodule_search_locations)[0]) / "data"
    if not (d / "labels.csv").exists():
        raise EdgetuneError(f"elpv-dataset is installed but {d / 'labels.csv'} is missing; reinstall the package")
    return d


def elpv_class(proba: float, cell_type: str, task: str) -> str:
    """Class name of one elpv cell for a task."""
    if task == "defect4":
        for value, name in ((0.0, "p0"), (1 / 3, "p033"), (2 / 3, "p067"), (1.0, "p100")):
            if abs(proba - value) < 1e-3:
                return name
        raise EdgetuneError(f"elpv defect probability {proba} is not one of 0, 1/3, 2/3, 1")
    if task == "binary":
        return "defective" if proba >= 0.5 else "functional"
    if task == "type":
        if cell_type not in ("mono", "poly"):
            raise EdgetuneError(f"elpv cell type {cell_type!r} is not mono or poly")
        return cell_type
    raise ConfigError(f"elpv task must be one of {list(ELPV_TASKS)}, got {task!r}")


def read_elpv_labels(data_dir: Path) -> list[tuple[str, float, str]]:
    """(relative image path, defect probability, mono/poly) rows of the package's labels.csv."""
    rows = []
    for lineno, line in enumerate((data_dir / "labels.csv").read_text().splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 3:
            raise EdgetuneError(f"{data_dir / 'labels.csv'}:{lineno}: expected path, probability, type; got {line!r}")
        rows.append((parts[0], float(parts[1]), parts[2]))
    return rows


def prepare_elpv(cache: Path, task: str = "defect4") -> Path:
    """The elpv images as an ImageFolder for one task (files copied from the installed package)."""
    if task not in ELPV_TASKS:
        raise ConfigError(f"elpv task must be one of {list(ELPV_TASKS)}, got {task!r}")
    data_dir = elpv_package_dir()
    final = cache / "datasets" / f"elpv-v1-{task}"

    def write(tmp: Path) -> None:
        for rel, proba, cell_type in read_elpv_labels(data_dir):
            cls = elpv_class(proba, cell_type, task)
            (tmp / cls).mkdir(exist_ok=True)
            shutil.copyfile(data_dir / rel, tmp / cls / Path(rel).name)

    return _prepare_once(final, write)
