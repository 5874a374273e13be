"""INT8 entropy calibration from the bundle's calibration images (TensorRT ``IInt8EntropyCalibrator2``).

Three layers, so that everything except the TensorRT base-class binding runs and is tested without
TensorRT or a GPU:

* :class:`CalibrationBatches`: the bundle's ``calib/*.png`` images (listed in ``bundle.json``
  ``calibration_images``), read with :func:`edgetune.imagedecode.read_image` and preprocessed with the
  bundle's own spec, as fixed-size ``float32 [B, 3, H, W]`` batches in listing order. TensorRT
  calibrates with one fixed batch shape (the calibration profile), so a short last batch is either
  filled up with images from the start of the list (``partial="pad"``, the default: every image is
  seen at least once) or left out (``partial="drop"``).
* :class:`CalibratorCore`: the calibrator protocol (``get_batch_size``, ``get_batch``,
  ``read_calibration_cache``, ``write_calibration_cache``) on top of the batches, a device buffer and
  a :class:`CalibrationCache` file.
* :func:`make_entropy_calibrator`: binds the core to ``trt.IInt8EntropyCalibrator2`` (TensorRT 8.6
  and 10; deprecated but still present in 10.x) with a :class:`CudaBuffer` from ``cuda-python``.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edge_server.runners.tensorrt import _check
from edgetune.bundle import Bundle
from edgetune.errors import BundleError, ConfigError, ImageDecodeError
from edgetune.fsutil import atomic_write_bytes
from edgetune.imagedecode import read_image
from edgetune.preprocess import PreprocessSpec

log = logging.getLogger("edge_server.engine.calibrator")

PARTIAL_MODES = ("pad", "drop")


def calibration_image_paths(bundle: Bundle) -> list[Path]:
    """The calibration image files listed in ``bundle.json`` (``calibration_images``), checked to exist."""
    paths = []
    for i, entry in enumerate(bundle.manifest.calibration_images):  # shape validated by BundleManifest
        p = bundle.member(entry.file, f"calibration_images[{i}]")
        if not p.is_file():
            raise BundleError(f"bundle {bundle.path}: calibration image {entry.file} is missing; re-export the bundle")
        paths.append(p)
    return paths


class CalibrationBatches:
    """Fixed-size preprocessed batches over ``images`` (in order), see the module docstring."""

    def __init__(
        self, images: Sequence[str | Path], spec: PreprocessSpec, batch_size: int, partial: str = "pad"
    ) -> None:
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ConfigError(f"calibration batch size must be an integer >= 1, got {batch_size!r}")
        if partial not in PARTIAL_MODES:
            raise ConfigError(f"partial must be one of {PARTIAL_MODES}, got {partial!r}")
        self.images = [Path(p) for p in images]
        if not self.images:
            raise ConfigError(
                "INT8 calibration needs at least one calibration image; the bundle lists none "
                "(re-export it, or build fp16/fp32)"
            )
        if partial == "drop" and len(self.images) < batch_size:
            raise ConfigError(
                f"partial='drop' with {len(self.images)} calibration image(s) and batch size "
                f"{batch_size} leaves no batch; use a batch size <= {len(self.images)} or partial='pad'"
            )
        self.spec = spec
        self.batch_size = batch_size
        self.partial = partial
        self.shape = (batch_size, 3, *spec.input_size)
        self.dtype = np.dtype(np.float32)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize

    def __len__(self) -> int:
        full, rest = divmod(len(self.images), self.batch_size)
        return full + (1 if rest and self.partial == "pad" else 0)

    def batch_indices(self) -> list[list[int]]:
        """Image indices of every batch (pad wraps around to the start of the list)."""
        n = len(self.images)
        out = []
        for b in range(len(self)):
            start = b * self.batch_size
            out.append([(start + k) % n for k in range(self.batch_size)])
        return out

    def load(self, index: int) -> np.ndarray:
        path = self.images[index]
        try:
            return self.spec.apply(read_image(path))
        except ImageDecodeError as e:
            raise BundleError(f"calibration image {path} cannot be read: {e}") from None

    def __iter__(self) -> Iterator[np.ndarray]:
        for idx in self.batch_indices():
            yield np.ascontiguousarray(np.stack([self.load(i) for i in idx]), dtype=self.dtype)

    def digest(self) -> str:
        """SHA-256 over the images' bytes, the spec and the batching: names the calibration cache."""
        h = hashlib.sha256()
        h.update(repr((self.batch_size, self.partial, sorted(self.spec.to_dict().items()))).encode())
        for p in self.images:
            h.update(p.name.encode())
            h.update(p.read_bytes())
        return h.hexdigest()


class CalibrationCache:
    """The calibration table TensorRT writes after calibrating; reused by later INT8 builds."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def read(self) -> bytes | None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        if not data:
            log.warning("empty calibration cache ignored", extra={"fields": {"path": str(self.path)}})
            return None
        log.info("using calibration cache", extra={"fields": {"path": str(self.path), "bytes": len(data)}})
        return data

    def write(self, data: Any) -> None:
        blob = bytes(memoryview(data))
        atomic_write_bytes(self.path, blob)
        log.info("calibration cache written", extra={"fields": {"path": str(self.path), "bytes": len(blob)}})


def calibration_cache_path(bundle: Bundle, tensorrt_version: str, batches: CalibrationBatches) -> Path:
    """``<bundle>/engines/int8-calibration.<onnx sha12>.<images digest12>.trt<version>.cache``."""
    return (
        bundle.path
        / "engines"
        / f"int8-calibration.{bundle.version}.{batches.digest()[:12]}.trt{tensorrt_version}.cache"
    )


class DeviceBuffer(Protocol):
    """Memory that calibration batches are copied into; ``ptr`` is what TensorRT reads."""

    ptr: int

    def upload(self, batch: np.ndarray) -> int: ...

    def free(self) -> None: ...


class CudaBuffer:
    """A ``cudaMalloc`` allocation filled with ``cudaMemcpy`` (``cuda-python`` runtime bindings)."""

    def __init__(self, cudart: Any, nbytes: int) -> None:
        self._cudart, self._check, self.nbytes = cudart, _check, int(nbytes)
        self.ptr = int(_check(cudart.cudaMalloc(self.nbytes), "cudaMalloc(calibration batch)"))

    def upload(self, batch: np.ndarray) -> int:
        if batch.nbytes != self.nbytes:
            raise ValueError(f"calibration batch has {batch.nbytes} bytes, buffer holds {self.nbytes}")
        kind = self._cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        err = self._cudart.cudaMemcpy(self.ptr, batch.ctypes.data, batch.nbytes, kind)
        self._check(err, "cudaMemcpy(calibration batch)")
        return self.ptr

    def free(self) -> None:
        if self.ptr:
            self._cudart.cudaFree(self.ptr)
            self.ptr = 0


class CalibratorCore:
    """The ``IInt8Calibrator`` protocol over batches, a device buffer and a cache (no TensorRT needed)."""

    def __init__(
        self, batches: CalibrationBatches, buffer: DeviceBuffer, cache: CalibrationCache, input_name: str
    ) -> None:
        self.batches, self.buffer, self.cache, self.input_name = batches, buffer, cache, input_name
        self._it: Iterator[np.ndarray] = iter(batches)
        self.batches_served = 0
        #: set when a batch failed inside TensorRT's callback; the builder refuses the engine then
        self.error: BaseException | None = None

    def get_batch_size(self) -> int:
        return self.batches.batch_size

    def get_batch(self, names: Sequence[str]) -> list[int] | None:
        """Device pointers for the next batch (one per name), ``None`` when calibration data is exhausted."""
        if list(names) != [self.input_name]:
            raise BundleError(
                f"TensorRT asks calibration data for inputs {list(names)}, the bundle's model has "
                f"the single input {self.input_name!r}"
            )
        batch = next(self._it, None)
        if batch is None:
            log.info("calibration batches done", extra={"fields": {"batches": self.batches_served}})
            return None
        self.batches_served += 1
        log.info("calibration batch", extra={"fields": {"batch": self.batches_served, "of": len(self.batches)}})
        return [self.buffer.upload(batch)]

    def read_calibration_cache(self) -> bytes | None:
        return self.cache.read()

    def write_calibration_cache(self, cache: Any) -> None:
        self.cache.write(cache)


def make_entropy_calibrator(trt: Any, core: CalibratorCore) -> Any:
    """A ``trt.IInt8EntropyCalibrator2`` that delegates to ``core`` (keep a reference while building)."""

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)  # the pybind11 base must be initialised explicitly
            self.core = core

        def get_batch_size(self) -> int:
            return self.core.get_batch_size()

        def get_batch(self, names: list[str]) -> list[int] | None:
            try:
                return self.core.get_batch(names)
            except Exception as e:  # must not cross into TensorRT's C++; the builder re-raises core.error
                log.exception("calibration batch failed")
                self.core.error = e
                return None

        def read_calibration_cache(self) -> bytes | None:
            return self.core.read_calibration_cache()

        def write_calibration_cache(self, cache: Any) -> None:
            self.core.write_calibration_cache(cache)

    return EntropyCalibrator()
