"""The trainer's data layer: scan -> subset -> split -> slice/expand -> cached resized pixels -> datasets.

``build_data(cfg, spec, run_dir, seed)`` is the single entry point. Order matters for honest
test numbers: membership in train/val/test is decided per SOURCE FILE first; slicing then
applies to each split separately (tiles stay in their file's split) and offline expansion only
to the train split, so no derivative of a val/test image is ever trained on.

Eval datasets (val, test, train_eval) return ``spec.normalize(spec.center_crop(spec.resize_image(raw)))``
- the same NumPy code the edge server runs - and offer ``raw(i)`` / ``source(i)``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgetune.errors import ConfigError, EdgetuneError
from edgetune.imagedecode import read_image
from edgetune.preprocess import PreprocessSpec
from trainer.augment import build_augment
from trainer.config import DataConfig
from trainer.datasets import BUILTINS, cache_root, prepare_builtin
from trainer.imagestore import ImageStore, Item, build_store, make_items, memory_budget_bytes, tile_of
from trainer.scan import SPLITS, SourceFile, dataset_hash, hash_files, list_csv, list_image_folder, scan_sources
from trainer.split import check_classes, stratified_split, stratified_subset, write_manifest

log = logging.getLogger(__name__)

__all__ = [
    "DataSplits",
    "EvalDataset",
    "PreparedSource",
    "TrainDataset",
    "build_data",
    "prepare_source",
    "resolve_dataset",
]


class _Base(torch.utils.data.Dataset):
    def __init__(self, items: Sequence[Item], store: ImageStore, spec: PreprocessSpec) -> None:
        if len(items) != len(store):
            raise EdgetuneError(f"internal: {len(items)} items but {len(store)} cached images")
        self.items = list(items)
        self.store = store
        self.spec = spec
        self.labels = [it.label for it in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def source(self, i: int) -> str:
        """File path of item ``i`` (plus its tile and offline transform, when any)."""
        return self.items[i].describe()

    def resized(self, i: int) -> np.ndarray:
        """The cached ``spec.resize_image`` output of item ``i`` (HxWx3 uint8 RGB)."""
        return self.store.get(i)


class EvalDataset(_Base):
    """Items ``(float32 [3, H, W], label)`` with the exact evaluation/serving transform."""

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = self.spec.normalize(self.spec.center_crop(self.store.get(i)))
        return torch.from_numpy(x), self.labels[i]

    def raw(self, i: int) -> tuple[np.ndarray, int]:
        """(HxWx3 uint8 RGB as decoded from the file, after slicing, before resizing; label)."""
        it = self.items[i]
        if it.transform:
            raise EdgetuneError(f"{it.describe()} is an offline-expanded copy; eval datasets have none")
        img = tile_of(read_image(it.file.path), it.grid, it.tile)
        return np.ascontiguousarray(img), it.label


class TrainDataset(_Base):
    """Items ``(float32 [3, H, W], label)``: cached resized image -> online augmentation preset."""

    def __init__(
        self,
        items: Sequence[Item],
        store: ImageStore,
        spec: PreprocessSpec,
        augment: Callable[[torch.Tensor], torch.Tensor],
    ) -> None:
        super().__init__(items, store, spec)
        self.augment = augment

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = torch.from_numpy(np.array(self.store.get(i), copy=True)).permute(2, 0, 1)
        return self.augment(img), self.labels[i]


@dataclass
class DataSplits:
    classes: list[str]
    train: torch.utils.data.Dataset
    val: torch.utils.data.Dataset
    test: torch.utils.data.Dataset | None
    train_eval: torch.utils.data.Dataset
    class_counts: list[int]
    manifest_path: Path | None
    skipped: list[tuple[str, str]]
    dataset_name: str
    dataset_hash: str


def resolve_dataset(cfg: DataConfig) -> tuple[list[SourceFile], list[tuple[str, str]], str, Path]:
    """(files, non-image files, dataset name, cache dir) for a built-in name, an ImageFolder or a CSV."""
    cache = cache_root(cfg.cache_dir)
    if cfg.dataset in BUILTINS:
        root, name = prepare_builtin(cfg.dataset, cache, cfg.elpv_task)
        files, rejected = list_image_folder(root)
        return files, rejected, name, cache
    p = Path(cfg.dataset).expanduser()
    if p.is_file() and p.suffix.lower() == ".csv":
        files, rejected = list_csv(p)
        return files, rejected, p.stem, cache
    if p.is_dir():
        files, rejected = list_image_folder(p)
        return files, rejected, p.resolve().name, cache
    raise ConfigError(
        f"data.dataset {cfg.dataset!r} is neither a built-in ({', '.join(BUILTINS)}), "
        f"an existing ImageFolder directory nor a .csv manifest"
    )


@dataclass
class PreparedSource:
    """A dataset scanned, hashed and split once (per study): what every trial's :func:`build_data` starts from
    instead of listing, hashing and decoding every file again. Small and picklable (file paths and hashes;
    decoded pixels of the first scan are kept only in the preparing process)."""

    dataset: str
    name: str
    cache: Path
    dataset_hash: str
    parts: dict[str, list[SourceFile]]
    classes: list[str]
    skipped: list[tuple[str, str]]
    predefined: bool
    max_images: int
    split_seed: int
    ratios: tuple[float, ...]
    decoded: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["decoded"] = {}
        return state


def prepare_source(cfg: DataConfig) -> PreparedSource:
    """Resolve, hash, subset, scan (every file decoded once; verdicts cached by content) and split."""
    files, rejected, name, cache = resolve_dataset(cfg)
    files = hash_files(files)
    dhash = dataset_hash(files)
    if not files and not rejected:
        raise EdgetuneError(
            f"dataset {cfg.dataset!r}: no image files found (expected root/<class>/*"
            f"{{.jpg,.jpeg,.png,.bmp,.tif,.tiff}} or a CSV with path,label columns)"
        )
    files = stratified_subset(files, cfg.max_images, cfg.split_seed)
    scan = scan_sources(files, cache)
    skipped = sorted(rejected + scan.skipped)
    if skipped and cfg.strict:
        listing = "\n  ".join(f"{p}: {r}" for p, r in skipped)
        raise EdgetuneError(
            f"{len(skipped)} unreadable or non-image file(s) in {cfg.dataset!r} "
            f"(strict mode; remove them or run without --strict to skip them):\n  {listing}"
        )
    if skipped:
        log.warning(
            "skipping %d unreadable or non-image file(s) in %r; first: %s: %s",
            len(skipped),
            cfg.dataset,
            skipped[0][0],
            skipped[0][1],
        )
    classes = check_classes(scan.good, f"dataset {cfg.dataset!r}")
    parts = stratified_split(scan.good, classes, cfg.split, cfg.split_seed)
    return PreparedSource(
        dataset=cfg.dataset,
        name=name,
        cache=cache,
        dataset_hash=dhash,
        parts=parts,
        classes=classes,
        skipped=skipped,
        predefined=any(f.split for f in scan.good),
        max_images=cfg.max_images,
        split_seed=cfg.split_seed,
        ratios=tuple(cfg.split),
        decoded=scan.decoded,
    )


def build_data(
    cfg: DataConfig,
    spec: PreprocessSpec,
    run_dir: str | Path | None = None,
    seed: int = 0,
    source: PreparedSource | None = None,
    with_test: bool = True,
) -> DataSplits:
    """Scan, subset, split, slice, expand and cache a dataset; returns the four datasets.

    Args:
        cfg: the run's data configuration (validated here).
        spec: the preprocessing spec of the backbone (resize, crop, normalisation).
        run_dir: when given, the split manifest is written to ``run_dir/split.json``.
        seed: seeds the affine expansion copies (the split itself uses ``cfg.split_seed``).
        source: the dataset already scanned and split by :func:`prepare_source` (a study does it once);
            it must be the same dataset, subset and split as ``cfg`` asks for.
        with_test: ``False`` for search trials: the test split is not even loaded (it is read once, for the
            final model); ``DataSplits.test`` is then None.
    """
    if source is None:
        source = prepare_source(cfg)
    else:
        _check_source(source, cfg)
    name, cache, dhash, classes, skipped = (
        source.name,
        source.cache,
        source.dataset_hash,
        source.classes,
        source.skipped,
    )
    items = _split_items(source, cfg)
    stores = _build_stores(items, cfg, spec, cache, seed, source, with_test)
    manifest_path = None
    if run_dir is not None:
        manifest_path = _write_split_manifest(Path(run_dir) / "split.json", cfg, source, items)
    counts = [0] * len(classes)
    for it in items["train"]:
        counts[it.label] += 1
    augment = build_augment(cfg.augment, spec, cfg.augment_strength)
    return DataSplits(
        classes=classes,
        train=TrainDataset(items["train"], stores["train"], spec, augment),
        val=EvalDataset(items["val"], stores["val"], spec),
        test=EvalDataset(items["test"], stores["test"], spec) if with_test else None,
        train_eval=EvalDataset(items["train_eval"], stores["train_eval"], spec),
        class_counts=counts,
        manifest_path=manifest_path,
        skipped=skipped,
        dataset_name=name,
        dataset_hash=dhash,
    )


def _check_source(source: PreparedSource, cfg: DataConfig) -> None:
    """A prepared source must be the dataset, subset and split ``cfg`` asks for (EdgetuneError: an internal error)."""
    if (source.dataset, source.max_images, source.split_seed, source.ratios) != (
        cfg.dataset,
        cfg.max_images,
        cfg.split_seed,
        tuple(cfg.split),
    ):
        raise EdgetuneError(
            f"internal: the prepared dataset {source.dataset!r} (max_images {source.max_images}, split "
            f"{source.ratios} seed {source.split_seed}) is not the one data asks for ({cfg.dataset!r}, "
            f"{cfg.max_images}, {tuple(cfg.split)} seed {cfg.split_seed})"
        )


def _slice_grid(cfg: DataConfig) -> tuple[int, int]:
    return int(cfg.slice_grid[0]), int(cfg.slice_grid[1])


def _split_items(source: PreparedSource, cfg: DataConfig) -> dict[str, Any]:
    """Each split's items (sliced per ``slice_grid``; the training split also expanded per ``expand``), and the
    training split's unexpanded items as ``train_eval``."""
    class_index = {c: i for i, c in enumerate(source.classes)}
    grid = _slice_grid(cfg)
    parts = source.parts
    return {
        "train": make_items(parts["train"], class_index, grid, tuple(cfg.expand)),
        "train_eval": make_items(parts["train"], class_index, grid),
        "val": make_items(parts["val"], class_index, grid),
        "test": make_items(parts["test"], class_index, grid),
    }


def _write_split_manifest(path: Path, cfg: DataConfig, source: PreparedSource, items: dict[str, Any]) -> Path:
    """The split manifest (``split.json``): which file went to which split, and what the split was made from."""
    return write_manifest(
        path,
        source.parts,
        source.skipped,
        {
            "dataset": cfg.dataset,
            "dataset_name": source.name,
            "dataset_hash": source.dataset_hash,
            "classes": source.classes,
            "split_seed": cfg.split_seed,
            "ratios": list(cfg.split),
            "predefined_split": source.predefined,
            "max_images": cfg.max_images,
            "slice_grid": list(_slice_grid(cfg)),
            "expand": list(cfg.expand),
            "items": {k: len(v) for k, v in items.items()},
        },
    )


def _build_stores(
    items: dict[str, Any],
    cfg: DataConfig,
    spec: PreprocessSpec,
    cache: Any,
    seed: int,
    source: PreparedSource,
    with_test: bool,
) -> dict[str, ImageStore]:
    """The decoded, resized images of each split (one memory budget shared by the stores of this dataset); the
    train split shares the train_eval store when nothing is expanded; no test store without ``with_test``."""
    stores: dict[str, ImageStore] = {}
    budget = memory_budget_bytes()
    for key in ("train_eval", "train", "val", "test"):
        if key == "test" and not with_test:
            continue
        if key == "train" and not cfg.expand:
            stores[key] = stores["train_eval"]
            continue
        st: dict[str, float] = {}
        stores[key] = build_store(items[key], spec, cache, seed, source.decoded, cfg.cache_images, st, budget)
        if stores[key].in_memory:
            budget -= stores[key].nbytes
        log.debug(
            "%s: %d images %s in %.2f s",
            key,
            len(items[key]),
            "from the disk cache" if st["cache_hit"] else "decoded+resized",
            st["seconds"],
        )
    return stores


def split_members(data: DataSplits) -> dict[str, set[str]]:
    """Source file paths of each split (for checks that membership is by source file)."""
    out: dict[str, set[str]] = {}
    for s in SPLITS:
        ds = getattr(data, s)
        out[s] = {it.file.path for it in ds.items}
    return out
