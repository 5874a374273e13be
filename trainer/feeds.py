"""What the training loop iterates: batches for training, validation and BatchNorm recalibration.

Two paths, chosen per run by :func:`choose_path` and recorded in every epoch's metrics (``data_path``):

- ``cached``: the backbone is cut at a block boundary (``model.freeze`` > 0) and the augmentation is one
  the activation cache represents (``none``, ``flips``, ``dihedral``: deterministic views). The frozen
  prefix runs once per (image, view) (:mod:`trainer.actcache`); each step feeds cached activations to the
  stages after the cut. Each epoch draws one view per training image (seeded by seed and epoch).
- ``live``: images through the whole network each step, with the online augmentation preset (random
  crop, colour, noise, ... that a cache cannot represent) or with nothing frozen.

Both paths give the same logits for the same (image, view) (``tests/test_actcache.py``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from trainer.actcache import VIEW_SETS, ActivationCache, ActKey, apply_view, fp16_parity_check, prefix_fingerprint
from trainer.config import TrainConfig
from trainer.datasets import cache_root

Batch = tuple[torch.Tensor, torch.Tensor]
_CACHES: dict[tuple[str, int], ActivationCache] = {}


def activation_cache(cfg: TrainConfig) -> ActivationCache:
    """This process's cache (one LRU per root and memory bound, shared by the runs of a worker process)."""
    root = str(cache_root(cfg.data.cache_dir) / "activations")
    mem = int(cfg.data.activation_cache_mb) << 20
    key = (root, mem)
    if key not in _CACHES:
        _CACHES[key] = ActivationCache(root, memory_bytes=mem)
    return _CACHES[key]


def choose_path(cfg: TrainConfig, cut: int) -> tuple[str, str]:
    """("cached" | "live", why)."""
    if cfg.data.activation_cache == "off":
        return "live", "data.activation_cache=off"
    if cut <= 0:
        return "live", "nothing frozen (model.freeze=0): the whole network trains"
    if cfg.data.augment not in VIEW_SETS:
        return "live", f"augmentation {cfg.data.augment!r} is random per step; the cache holds only {tuple(VIEW_SETS)}"
    return "cached", f"frozen prefix of {cut} stage(s) cached"


def view_tensor(spec: Any, resized: np.ndarray, view: str) -> np.ndarray:
    """Evaluation transform with a dihedral view: centre crop -> view -> normalise (3xHxW float32)."""
    return spec.normalize(np.ascontiguousarray(apply_view(spec.center_crop(resized), view)))


@dataclass
class Feeds:
    """Per-run iterables. ``train(epoch)`` and ``val()`` yield (x, y) on CPU; ``bn()`` yields x."""

    path: str
    reason: str
    train_len: int
    _train: Any
    _val: Any
    _bn: Any
    cache_stats: dict[str, Any] = field(default_factory=dict)

    def train(self, epoch: int) -> Iterator[Batch]:
        return self._train(epoch)

    def val(self) -> Iterator[Batch]:
        return self._val()

    def bn(self) -> Iterator[torch.Tensor]:
        return self._bn()

    @property
    def steps_per_epoch(self) -> int:
        return int(getattr(self._train, "steps", 1))


# -- sampling ------------------------------------------------------------------------------------------------------
def epoch_order(
    labels: Sequence[int] | np.ndarray,
    epoch: int,
    seed: int,
    sampler: str,
    rank: int,
    world: int,
    batch_size: int,
    drop_last: bool,
) -> list[np.ndarray]:
    """Index batches of one epoch for this rank: a seeded permutation (``uniform``) or a class-balanced draw
    with replacement (``balanced``: every class equally likely), the same on every rank, then sharded."""
    n = len(labels)
    rng = np.random.default_rng([seed, epoch, 104729])
    if sampler == "balanced":
        y = np.asarray(labels)
        counts = np.bincount(y)
        w = 1.0 / counts[y]
        order = rng.choice(n, size=n, replace=True, p=w / w.sum())
    else:
        order = rng.permutation(n)
    if world > 1:
        per = n // world if drop_last else -(-n // world)
        order = np.resize(order, per * world)[rank::world]
    cut = len(order) - len(order) % batch_size if drop_last and len(order) >= batch_size else len(order)
    return [order[i : i + batch_size] for i in range(0, cut, batch_size)]


class _Epochs:
    """Callable epoch -> batches, with ``steps`` for the LR schedule."""

    def __init__(self, fn: Any, steps: int) -> None:
        self.fn = fn
        self.steps = max(1, steps)

    def __call__(self, epoch: int) -> Iterator[Batch]:
        return self.fn(epoch)


# -- cached path ---------------------------------------------------------------------------------------------------
def _activations(
    model: Any, ds: Any, view: str, cache: ActivationCache, prefix_sha: str, allow_fp16: bool, batch: int = 64
) -> np.ndarray:
    spec = ds.spec
    key = ActKey(
        items=ds.store.key,
        backbone=model.backbone_name,
        prefix=prefix_sha,
        spec=json.dumps(spec.to_dict(), sort_keys=True),
        cut=model.cut,
        view=view,
        dtype="auto" if allow_fp16 else "float32",
    )

    def build() -> Iterator[np.ndarray]:
        was = model.training
        model.eval()
        try:
            with torch.inference_mode():
                for i in range(0, len(ds), batch):
                    x = np.stack([view_tensor(spec, ds.resized(j), view) for j in range(i, min(len(ds), i + batch))])
                    yield model.forward_prefix(torch.from_numpy(x)).float().numpy()
        finally:
            model.train(was)

    stages = model.stages()

    def suffix(a: torch.Tensor) -> torch.Tensor:
        for st in stages[model.cut :]:
            a = st(a)
        return a

    return cache.get(key, build, len(ds), fp16_ok=fp16_parity_check(suffix) if allow_fp16 else None)


def cached_feeds(cfg: TrainConfig, model: Any, data: Any, rank: int, world: int, reason: str) -> Feeds:
    cache = activation_cache(cfg)
    before = cache.stats.as_dict()
    t0 = time.perf_counter()
    sha = prefix_fingerprint(model.stages(), model.cut)
    views = VIEW_SETS[cfg.data.augment if cfg.data.augment != "none" else "none"]
    fp16 = cfg.data.activation_dtype == "auto"
    train_arrays = [_activations(model, data.train, v, cache, sha, fp16) for v in views]
    val_array = _activations(model, data.val, "id", cache, sha, fp16)
    after = cache.stats.as_dict()
    stats = {
        k: after[k] - before[k] for k in ("memory_hits", "disk_hits", "builds", "build_seconds", "evictions", "mapped")
    }
    stats.update(
        {
            "seconds": time.perf_counter() - t0,
            "dtype": str(train_arrays[0].dtype),
            "views": len(views),
            "resident_mb": cache.resident_bytes / 2**20,
            "bytes_per_image": int(train_arrays[0][0].nbytes) if len(train_arrays[0]) else 0,
        }
    )
    labels = np.asarray(data.train.labels, dtype=np.int64)
    val_labels = np.asarray(data.val.labels, dtype=np.int64)
    drop_last = len(labels) > cfg.batch_size * world
    nv = len(views)

    def gather(idx: np.ndarray, vsel: np.ndarray) -> torch.Tensor:
        out = np.empty((len(idx), *train_arrays[0].shape[1:]), dtype=np.float32)
        for v in np.unique(vsel):
            m = vsel == v
            out[m] = train_arrays[v][idx[m]]
        return torch.from_numpy(out)

    def train(epoch: int) -> Iterator[Batch]:
        vrng = np.random.default_rng([cfg.seed, epoch, 7])
        view_of = vrng.integers(0, nv, size=len(labels))
        for b in epoch_order(labels, epoch, cfg.seed, cfg.data.sampler, rank, world, cfg.batch_size, drop_last):
            yield gather(b, view_of[b]), torch.from_numpy(labels[b])

    mine = np.arange(rank, len(val_labels), world) if world > 1 else np.arange(len(val_labels))

    def val() -> Iterator[Batch]:
        for i in range(0, len(mine), 256):
            j = mine[i : i + 256]
            yield torch.from_numpy(np.asarray(val_array[j], dtype=np.float32)), torch.from_numpy(val_labels[j])

    bn_idx = _bn_subset(len(labels), cfg.model.bn_images, cfg.seed)
    ident = train_arrays[0]

    def bn() -> Iterator[torch.Tensor]:
        for i in range(0, len(bn_idx), 128):
            yield torch.from_numpy(np.asarray(ident[bn_idx[i : i + 128]], dtype=np.float32))

    steps = len(epoch_order(labels, 1, cfg.seed, cfg.data.sampler, rank, world, cfg.batch_size, drop_last))
    return Feeds("cached", reason, len(labels), _Epochs(train, steps), val, bn, stats)


def _bn_subset(n: int, limit: int, seed: int) -> np.ndarray:
    idx = np.random.default_rng([seed, 31337]).permutation(n)
    return np.sort(idx[: min(n, limit)]) if limit else np.sort(idx)


# -- live path -----------------------------------------------------------------------------------------------------
def live_feeds(cfg: TrainConfig, data: Any, rank: int, world: int, reason: str) -> Feeds:
    labels = list(data.train.labels)
    drop_last = len(labels) > cfg.batch_size * world
    workers = cfg.data.loader_workers

    def train(epoch: int) -> Iterator[Batch]:
        order = epoch_order(labels, epoch, cfg.seed, cfg.data.sampler, rank, world, cfg.batch_size, drop_last)
        loader = DataLoader(data.train, batch_sampler=[b.tolist() for b in order], num_workers=workers)
        yield from loader

    val_ds = data.val if world == 1 else Subset(data.val, list(range(rank, len(data.val), world)))

    def val() -> Iterator[Batch]:
        yield from DataLoader(val_ds, batch_size=max(cfg.batch_size, 64), num_workers=workers)

    bn_idx = _bn_subset(len(data.train_eval), cfg.model.bn_images, cfg.seed).tolist()

    def bn() -> Iterator[torch.Tensor]:
        for x, _ in DataLoader(
            Subset(data.train_eval, bn_idx), batch_size=max(cfg.batch_size, 64), num_workers=workers
        ):
            yield x

    steps = len(epoch_order(labels, 1, cfg.seed, cfg.data.sampler, rank, world, cfg.batch_size, drop_last))
    return Feeds("live", reason, len(labels), _Epochs(train, steps), val, bn)


def make_feeds(cfg: TrainConfig, model: Any, data: Any, rank: int = 0, world: int = 1) -> Feeds:
    path, reason = choose_path(cfg, getattr(model, "cut", 0))
    if path == "cached":
        return cached_feeds(cfg, model, data, rank, world, reason)
    return live_feeds(cfg, data, rank, world, reason)
