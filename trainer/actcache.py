"""Frozen-prefix activation cache: the output of a backbone's frozen stages, computed once per content key.

With ``model.freeze`` cut at a block boundary (:mod:`trainer.stages`), the frozen prefix maps an image to
the same activation in every epoch of every trial with that cut. This module computes those activations
once per :class:`ActKey` (the resized images' content, backbone, the prefix's own weights, the full
preprocessing spec, the cut and the view) and keeps them:

- on disk under ``<cache>/activations/<digest>.npy`` (+ ``.json`` with the key and how it was built), for
  later trials, later studies on the same data, and every process on the node (each node of a cluster
  builds or reads its own); building is guarded by a file lock, so concurrent trials build a key once;
- in memory, in a per-process LRU bounded by ``memory_bytes``; an array larger than the bound is served
  memory-mapped instead.

Views are the deterministic dihedral transforms of the (centre-cropped) input: ``VIEW_SETS["dihedral"]``
(h/v flips, rot90: the graphite paper's offline expansion), ``"flips"`` (identity, h, v, both) or
``"none"``. Validation uses the identity view. Activations are stored as float16 only where a parity
check on the first batch shows the backbone's pooled features within ``FP16_TOLERANCE`` of float32;
float32 otherwise.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgetune.fsutil import atomic_path

CACHE_VERSION = 1
VIEWS = ("id", "hflip", "vflip", "rot180", "rot90", "rot270", "transpose", "antitranspose")
VIEW_SETS: dict[str, tuple[str, ...]] = {"none": VIEWS[:1], "flips": VIEWS[:4], "dihedral": VIEWS}
FP16_TOLERANCE = 1e-3  #: max |pooled-feature difference| / max(1, max |feature|) for float16 storage
BUILD_BATCH = 64


def apply_view(img: np.ndarray, view: str) -> np.ndarray:
    """A dihedral view of an HxWxC image (rot90 variants need a square image to keep the shape)."""
    if view == "id":
        return img
    if view == "hflip":
        return img[:, ::-1]
    if view == "vflip":
        return img[::-1]
    if view == "rot180":
        return img[::-1, ::-1]
    if view == "rot90":
        return np.rot90(img, 1, axes=(0, 1))
    if view == "rot270":
        return np.rot90(img, -1, axes=(0, 1))
    if view == "transpose":
        return np.swapaxes(img, 0, 1)
    if view == "antitranspose":
        return np.swapaxes(img, 0, 1)[::-1, ::-1]
    raise ValueError(f"unknown view {view!r}; views: {list(VIEWS)}")


@dataclass(frozen=True)
class ActKey:
    """Everything an activation depends on."""

    items: str  #: content key of the resized source images (``trainer.imagestore.store_key``)
    backbone: str
    prefix: str  #: SHA-256 of the frozen stages' parameters and buffers (weights file, init run or seed)
    spec: str  #: the full preprocessing spec (JSON): crop, normalisation, channel order
    cut: int
    view: str
    dtype: str = "auto"  #: data.activation_dtype: "auto" (fp16 where parity holds) or "float32"

    def digest(self) -> str:
        doc = json.dumps({"v": CACHE_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(doc.encode()).hexdigest()[:32]


def prefix_fingerprint(stages: Sequence[torch.nn.Module], cut: int) -> str:
    """SHA-256 of the tensors of the first ``cut`` stages (names + bytes): identical weights, identical key."""
    h = hashlib.sha256(f"cut={cut}".encode())
    for i, st in enumerate(stages[:cut]):
        for name, t in list(st.named_parameters()) + list(st.named_buffers()):
            h.update(f"{i}.{name}:{tuple(t.shape)}:{t.dtype}".encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@dataclass
class CacheStats:
    memory_hits: int = 0
    disk_hits: int = 0
    builds: int = 0
    build_seconds: float = 0.0
    evictions: int = 0
    mapped: int = 0  #: arrays served memory-mapped because they exceed the memory bound
    dtypes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class ActivationCache:
    """Disk store + per-process LRU of activation arrays ``[N, C, H, W]`` (or ``[N, D]`` at the last cut)."""

    def __init__(self, root: str | Path, memory_bytes: int = 2 << 30) -> None:
        self.root = Path(root)
        self.memory_bytes = int(memory_bytes)
        self._lru: OrderedDict[str, np.ndarray] = OrderedDict()
        self.stats = CacheStats()

    @property
    def resident_bytes(self) -> int:
        return sum(a.nbytes for a in self._lru.values())

    def path_of(self, key: ActKey) -> Path:
        return self.root / f"{key.digest()}.npy"

    def get(
        self,
        key: ActKey,
        build: Callable[[], Iterator[np.ndarray]],
        n: int,
        fp16_ok: Callable[[np.ndarray], bool] | None = None,
    ) -> np.ndarray:
        """The array for ``key``: from memory, from disk, or built by iterating ``build()`` (float32 batches
        in item order, ``n`` rows in all) and stored; float16 when ``fp16_ok(first batch)`` says so."""
        d = key.digest()
        if d in self._lru:
            self._lru.move_to_end(d)
            self.stats.memory_hits += 1
            return self._lru[d]
        path = self.path_of(key)
        if path.exists():
            self.stats.disk_hits += 1
        else:
            with self._lock(d):
                if path.exists():  # built by a concurrent process while we waited
                    self.stats.disk_hits += 1
                else:
                    self._build(key, path, build, n, fp16_ok)
        arr = np.load(path, mmap_mode="r")
        if arr.shape[0] != n:
            raise RuntimeError(f"activation cache {path} holds {arr.shape[0]} rows, expected {n}; delete it")
        os.utime(path)  # LRU order on disk for cleanup by age
        return self._remember(d, arr)

    def _remember(self, d: str, arr: np.ndarray) -> np.ndarray:
        if arr.nbytes > self.memory_bytes:
            self.stats.mapped += 1
            return arr
        while self._lru and self.resident_bytes + arr.nbytes > self.memory_bytes:
            self._lru.popitem(last=False)
            self.stats.evictions += 1
        loaded = np.array(arr)  # a real copy into RAM (ascontiguousarray of a memmap is a view of the file)
        self._lru[d] = loaded
        return loaded

    @contextmanager
    def _lock(self, d: str) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / f"{d}.lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _build(
        self,
        key: ActKey,
        path: Path,
        build: Callable[[], Iterator[np.ndarray]],
        n: int,
        fp16_ok: Callable[[np.ndarray], bool] | None,
    ) -> None:
        t0 = time.perf_counter()
        out: Any = None  # np.memmap while building
        row = 0
        dtype = "float32"
        with atomic_path(path, suffix=".npy") as tmp:
            for batch in build():
                if out is None:
                    dtype = "float16" if fp16_ok is not None and fp16_ok(batch) else "float32"
                    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(n, *batch.shape[1:]))
                out[row : row + len(batch)] = batch
                row += len(batch)
            if out is None or row != n:
                raise RuntimeError(f"activation build produced {row} rows, expected {n}")
            out.flush()
            del out
            meta = {"key": asdict(key), "dtype": dtype, "rows": n, "seconds": time.perf_counter() - t0}
            path.with_suffix(".json").write_text(json.dumps(meta, indent=1))
        self.stats.builds += 1
        self.stats.build_seconds += time.perf_counter() - t0
        self.stats.dtypes.append(dtype)


def fp16_parity_check(suffix: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[np.ndarray], bool]:
    """A check for :meth:`ActivationCache.get`: float16 storage is allowed when ``suffix`` (the stages after
    the cut, down to pooled features) gives the same features within ``FP16_TOLERANCE`` on both roundings."""

    def check(batch: np.ndarray) -> bool:
        with torch.no_grad():
            ref = suffix(torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)))
            low = suffix(torch.from_numpy(batch.astype(np.float16).astype(np.float32)))
        scale = max(1.0, float(ref.abs().max()))
        return bool(float((ref - low).abs().max()) / scale <= FP16_TOLERANCE)

    return check
