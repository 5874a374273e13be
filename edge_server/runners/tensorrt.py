"""TensorRT backend: deserialise and run a prebuilt engine (real ``tensorrt`` API, TRT 8.6 and 10).

Engines are built on the device by ``make engine BUNDLE=… PRECISION=…`` (``edge_server.engine``) and
cached next to the bundle; this module is the one definition of their names, where they live and what
their sidecar records (the builder imports it)::

    <bundle>/engines/model.<precision>.trt<TensorRT version>.sm<compute capability>.<ONNX sha12>.engine
    <bundle>/engines/<engine name>.json   sidecar: SIDECAR_KEYS (tensorrt_version, gpu_name,
                                          compute_capability, onnx_sha256, precision, max_batch_size)
                                          + engine SHA-256, build options and accuracy check

e.g. ``model.fp16.trt10.3.0.sm87.1a2b3c4d5e6f.engine`` (:func:`engine_filename`, used by builder and
runner). Engines built for other GPUs, TensorRT versions or ONNX files are kept side by side (several
devices may share a bundle directory on NFS). :func:`find_engines` lists a precision's engines without
importing TensorRT (the server's ``auto`` backend, the systemd unit); :func:`select_engine`, once the GPU
is known, picks the one named for this system and bundle, or refuses with what each engine was built
for and the rebuild command. The name is only an index: the sidecar (:func:`validate_sidecar`: GPU
name, compute capability, TensorRT version, ONNX SHA, precision) and the engine's SHA-256
(:func:`check_engine_sha`) are checked before deserialising. Device memory is handled with NVIDIA's
``cuda-python`` (``cuda.bindings.runtime`` or the older ``cuda.cudart``), imported lazily, so this
module imports fine where TensorRT is absent.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edge_server.runners.base import Runner
from edgetune.bundle import Bundle
from edgetune.device import PRECISIONS
from edgetune.errors import BundleError, ConfigError
from edgetune.fsutil import atomic_write_bytes

log = logging.getLogger("edge_server.runners")

SIDECAR_KEYS = ("tensorrt_version", "gpu_name", "compute_capability", "onnx_sha256", "precision", "max_batch_size")
ENGINES_DIR = "engines"
ENGINE_NAME_FORMAT = "model.<precision>.trt<TensorRT version>.sm<compute capability>.<first 12 hex of ONNX SHA>.engine"
_TRT_VERSION = re.compile(r"[0-9]+(\.[0-9A-Za-z]+)*")
_CC = re.compile(r"([0-9]+)\.([0-9])")
_ENGINE_NAME = re.compile(
    r"model\.(?P<precision>fp32|fp16|int8)\.trt(?P<trt>[0-9]+(?:\.[0-9A-Za-z]+)*)"
    r"\.sm(?P<sm>[0-9]{2,3})\.(?P<sha>[0-9a-f]{12})\.engine"
)


def _check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ConfigError(f"TensorRT precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


def system_tag(tensorrt_version: str, compute_capability: str) -> str:
    """``trt<version>.sm<cc digits>``, e.g. ``trt10.3.0.sm87``: the part of engine and timing-cache names
    that ties them to a TensorRT version and a GPU architecture."""
    if not isinstance(tensorrt_version, str) or not _TRT_VERSION.fullmatch(tensorrt_version):
        raise ConfigError(f"TensorRT version must look like '10.3.0' (digits and dots), got {tensorrt_version!r}")
    if not isinstance(compute_capability, str) or not _CC.fullmatch(compute_capability):
        raise ConfigError(f"compute capability must be '<major>.<minor>' like '8.7', got {compute_capability!r}")
    return f"trt{tensorrt_version}.sm{compute_capability.replace('.', '')}"


def engine_filename(precision: str, tensorrt_version: str, compute_capability: str, onnx_sha: str) -> str:
    """The one engine file name (:data:`ENGINE_NAME_FORMAT`), e.g. ``model.fp16.trt10.3.0.sm87.1a2b3c4d5e6f.engine``."""
    _check_precision(precision)
    sha = onnx_sha.lower() if isinstance(onnx_sha, str) else ""
    if not re.fullmatch(r"[0-9a-f]{12,64}", sha):
        raise ConfigError(f"ONNX SHA-256 must be 12 to 64 hex digits, got {onnx_sha!r}")
    return f"model.{precision}.{system_tag(tensorrt_version, compute_capability)}.{sha[:12]}.engine"


def parse_engine_filename(name: str) -> dict[str, str] | None:
    """Inverse of :func:`engine_filename`: precision, tensorrt_version, compute_capability ("8.7") and
    onnx_sha12 of an engine file name, or None when the name is not in that format."""
    m = _ENGINE_NAME.fullmatch(Path(name).name)
    if m is None:
        return None
    sm = m["sm"]
    return {
        "precision": m["precision"],
        "tensorrt_version": m["trt"],
        "compute_capability": f"{sm[:-1]}.{sm[-1]}",
        "onnx_sha12": m["sha"],
    }


def engines_dir(bundle: Bundle | Path | str) -> Path:
    return (bundle.path if isinstance(bundle, Bundle) else Path(bundle)) / ENGINES_DIR


def engine_path(bundle: Bundle, precision: str, system: Mapping[str, str]) -> Path:
    """Where the engine of ``bundle`` for ``precision`` built on ``system`` (:func:`system_info`) is cached."""
    return engines_dir(bundle) / engine_filename(
        precision, system["tensorrt_version"], system["compute_capability"], bundle.sha256
    )


def find_engines(bundle: Bundle | Path | str, precision: str) -> list[Path]:
    """Every cached engine of ``precision`` in the bundle (any GPU / TensorRT / ONNX), sorted; needs no TensorRT.

    Globs ``engines/model.<precision>.*.engine``; the unversioned ``model.<precision>.engine`` of older
    edgetune releases is listed too, so that it is reported and rebuilt rather than silently ignored."""
    d = engines_dir(bundle)
    found = set(d.glob(f"model.{_check_precision(precision)}.*.engine")) | {d / f"model.{precision}.engine"}
    return sorted(p for p in found if p.is_file())


def describe_engine(engine: Path) -> str:
    """What ``engine`` was built for, from its name and (when readable) its sidecar."""
    parsed = parse_engine_filename(engine.name)
    if parsed is None:
        facts = [f"name not in the {ENGINE_NAME_FORMAT} format (older edgetune?)"]
    else:
        facts = [
            f"TensorRT {parsed['tensorrt_version']}",
            f"compute capability {parsed['compute_capability']}",
            f"ONNX {parsed['onnx_sha12']}",
        ]
    try:
        meta = json.loads(sidecar_path(engine).read_text())
    except (OSError, ValueError):
        return f"{engine.name} ({', '.join(facts)}; sidecar missing or unreadable)"
    if isinstance(meta, dict):
        if parsed is None:
            facts += [
                f"sidecar: TensorRT {meta.get('tensorrt_version')}",
                f"compute capability {meta.get('compute_capability')}",
                f"ONNX {str(meta.get('onnx_sha256'))[:12]}",
            ]
        facts.append(f"GPU {meta.get('gpu_name')!r}")
    return f"{engine.name} ({', '.join(facts)})"


def select_engine(
    bundle: Bundle, precision: str, system: Mapping[str, str], candidates: list[Path] | None = None
) -> Path:
    """The engine among ``candidates`` (default :func:`find_engines`) named for this system and bundle.

    Raises :class:`BundleError` when there is none: what each found engine was built for, what this
    system is, and the rebuild command. The caller still validates the sidecar and the engine SHA."""
    found = find_engines(bundle, precision) if candidates is None else list(candidates)
    wanted = engine_path(bundle, precision, system)
    hint = _rebuild_hint(bundle.path, precision)
    for p in found:
        if p.name == wanted.name and p.is_file():
            return p
    here = (
        f"this system: TensorRT {system['tensorrt_version']}, GPU {system.get('gpu_name')!r}, compute "
        f"capability {system['compute_capability']}; bundle ONNX {bundle.version}; expected {wanted.name}"
    )
    if not found:
        raise BundleError(f"no {precision} TensorRT engine in {wanted.parent} ({here}); build it: {hint}")
    raise BundleError(
        f"no {precision} TensorRT engine in {wanted.parent} matches this system and bundle ({here}); "
        f"found {len(found)} built for something else: {'; '.join(map(describe_engine, found))}; {hint} "
        "(engines for other GPUs / TensorRT versions are kept and do no harm)"
    )


def sidecar_path(engine: Path) -> Path:
    return engine.with_name(engine.name + ".json")


def _rebuild_hint(bundle_path: Path | str, precision: str) -> str:
    return f"rebuild the engine with `make engine BUNDLE={bundle_path} PRECISION={precision}`"


def _precision_of(engine: Path) -> str:
    """Precision named by an engine file ``model.<precision>.…engine`` (fp16 if the name says nothing)."""
    parts = Path(engine).name.split(".")
    return parts[1] if len(parts) >= 3 and parts[1] in PRECISIONS else "fp16"


def validate_sidecar(
    meta: Mapping[str, Any],
    *,
    bundle: Bundle,
    tensorrt_version: str,
    gpu_name: str,
    compute_capability: str,
    engine: Path,
    precision: str | None = None,
) -> None:
    """Check that an engine's sidecar matches the running system and the bundle.

    ``precision``, when given, is the precision the caller asked for (the sidecar must say the same).
    Raises :class:`BundleError` naming every mismatch and how to rebuild.
    """
    if precision is None:
        precision = str(meta.get("precision", _precision_of(engine))) if isinstance(meta, Mapping) else "fp16"
    hint = _rebuild_hint(bundle.path, precision)
    if not isinstance(meta, Mapping):
        raise BundleError(f"{sidecar_path(engine)}: sidecar must be a JSON object; {hint}")
    missing = [k for k in SIDECAR_KEYS if k not in meta]
    if missing:
        raise BundleError(
            f"{sidecar_path(engine)}: missing field(s) {missing} (required: {list(SIDECAR_KEYS)}); {hint}"
        )
    problems = []
    if str(meta["onnx_sha256"]) != bundle.sha256:
        problems.append(f"built from ONNX {str(meta['onnx_sha256'])[:12]}, bundle model is {bundle.version}")
    if str(meta["tensorrt_version"]) != tensorrt_version:
        problems.append(f"built with TensorRT {meta['tensorrt_version']}, running TensorRT {tensorrt_version}")
    if str(meta["gpu_name"]) != gpu_name:
        problems.append(f"built on GPU {meta['gpu_name']!r}, running on {gpu_name!r}")
    if str(meta["compute_capability"]) != compute_capability:
        problems.append(f"built for compute capability {meta['compute_capability']}, this GPU has {compute_capability}")
    if meta["precision"] not in PRECISIONS:
        problems.append(f"precision {meta['precision']!r} not one of {PRECISIONS}")
    elif meta["precision"] != precision:
        problems.append(f"engine precision is {meta['precision']}, {precision} was requested")
    mbs = meta["max_batch_size"]
    if not isinstance(mbs, int) or isinstance(mbs, bool) or mbs < 1:
        problems.append(f"max_batch_size must be an integer >= 1, got {mbs!r}")
    if problems:
        raise BundleError(f"engine {engine} does not match this system/bundle: {'; '.join(problems)}; {hint}")


def read_sidecar(engine: Path) -> dict[str, Any]:
    side = sidecar_path(engine)
    try:
        meta = json.loads(side.read_text())
    except FileNotFoundError:
        raise BundleError(
            f"engine {engine} has no sidecar {side.name}; {_rebuild_hint(engine.parent.parent, _precision_of(engine))}"
        ) from None
    except (OSError, json.JSONDecodeError) as e:
        raise BundleError(
            f"{side}: unreadable ({e}); {_rebuild_hint(engine.parent.parent, _precision_of(engine))}"
        ) from None
    return meta if isinstance(meta, dict) else {"_invalid": meta}


def check_engine_sha(engine: Path, data: bytes, meta: Mapping[str, Any], precision: str | None = None) -> None:
    """The engine bytes must have the SHA-256 its sidecar records (the builder always writes it): an engine
    copied over, modified or partly written is refused with the rebuild command."""
    hint = _rebuild_hint(engine.parent.parent, precision or _precision_of(engine))
    recorded = meta.get("engine_sha256")
    if not isinstance(recorded, str):
        raise BundleError(f"{sidecar_path(engine)}: no engine_sha256 recorded, the engine cannot be verified; {hint}")
    if hashlib.sha256(data).hexdigest() != recorded:
        raise BundleError(f"{engine} does not match the SHA-256 in its sidecar (modified or partly written); {hint}")


def write_engine_files(engine: Path, data: bytes, sidecar: Mapping[str, Any]) -> None:
    """Write an engine and its sidecar, each atomically. The old sidecar is removed first, so no reader pairs
    a new engine with an old sidecar (an engine without a sidecar is refused)."""
    engine.parent.mkdir(parents=True, exist_ok=True)
    sidecar_path(engine).unlink(missing_ok=True)
    atomic_write_bytes(engine, data)
    atomic_write_bytes(sidecar_path(engine), json.dumps(dict(sidecar), indent=2).encode())


def import_tensorrt() -> Any:
    """The ``tensorrt`` module, or a :class:`ConfigError` explaining how to get it."""
    try:
        import tensorrt
    except ImportError as e:
        raise ConfigError(
            f"the tensorrt backend needs the TensorRT Python package ({e}); on a Jetson it comes with JetPack "
            "(apt install python3-libnvinfer), elsewhere use --backend onnxruntime"
        ) from None
    return tensorrt


def import_cudart() -> Any:
    """CUDA runtime bindings from ``cuda-python`` (new and old module layout)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # cuda-python < 12.6
        except ImportError:
            raise ConfigError("the tensorrt backend needs cuda-python: pip install 'cuda-python'") from None
    return cudart


def _check(result: Any, what: str) -> Any:
    """cuda-python returns (err, *values); raise on error, return the values."""
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(f"CUDA call {what} failed: {err}")
    return rest[0] if len(rest) == 1 else tuple(rest)


def gpu_name(cudart: Any, device: int = 0) -> str:
    props = _check(cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    name = props.name
    return (name.decode() if isinstance(name, bytes) else str(name)).rstrip("\x00").strip()


def compute_capability(cudart: Any, device: int = 0) -> str:
    """``"major.minor"`` of ``device``, e.g. ``"8.7"`` on a Jetson Orin."""
    props = _check(cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    return f"{int(props.major)}.{int(props.minor)}"


def system_info(trt: Any, cudart: Any, device: int = 0) -> dict[str, str]:
    """What an engine is tied to on this machine: the sidecar fields checked by :func:`validate_sidecar`."""
    return {
        "tensorrt_version": str(trt.__version__),
        "gpu_name": gpu_name(cudart, device),
        "compute_capability": compute_capability(cudart, device),
    }


class TensorRTRunner(Runner):
    """Runs a cached engine with TensorRT's tensor-name API (``set_input_shape``, ``execute_async_v3``).

    ``engine`` None: the bundle's engine for ``precision`` named for this GPU and TensorRT
    (:func:`select_engine`); an explicit ``engine`` path (the builder's staged engine) is used as is.
    Either way the sidecar and the engine SHA-256 are checked before deserialising."""

    def __init__(
        self, bundle: Bundle, precision: str = "fp16", max_batch_size: int = 8, engine: Path | None = None
    ) -> None:
        _check_precision(precision)
        candidates = [Path(engine)] if engine is not None else find_engines(bundle, precision)
        if not [p for p in candidates if p.is_file()]:  # checked before importing TensorRT
            raise BundleError(
                f"no {precision} TensorRT engine "
                f"{'at ' + str(engine) if engine is not None else 'in ' + str(engines_dir(bundle))}; "
                f"build it with `make engine BUNDLE={bundle.path} PRECISION={precision}`"
            )
        trt = import_tensorrt()
        cudart = import_cudart()
        system = system_info(trt, cudart)
        engine = candidates[0] if engine is not None else select_engine(bundle, precision, system, candidates)
        meta = read_sidecar(engine)  # the name only indexes; sidecar and engine SHA are the truth
        validate_sidecar(meta, bundle=bundle, engine=engine, precision=precision, **system)
        data = engine.read_bytes()
        check_engine_sha(engine, data, meta, precision)
        self._trt, self._cudart = trt, cudart
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(data)
        if self._engine is None:
            raise BundleError(f"TensorRT could not deserialise {engine}; {_rebuild_hint(bundle.path, precision)}")
        self._context = self._engine.create_execution_context()
        self._in, self._out = bundle.input_name, bundle.output_name
        self._input_hw = bundle.spec.input_size
        prof_max = self._engine.get_tensor_profile_shape(self._in, 0)[2]
        self.max_batch_size = int(min(max_batch_size, prof_max[0], int(meta["max_batch_size"])))
        self._in_dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(self._in)))
        self._out_dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(self._out)))
        self._num_classes = int(self._engine.get_tensor_shape(self._out)[-1])
        n = self.max_batch_size
        self._in_bytes = n * 3 * self._input_hw[0] * self._input_hw[1] * self._in_dtype.itemsize
        self._out_bytes = n * self._num_classes * self._out_dtype.itemsize
        self._d_in = _check(cudart.cudaMalloc(self._in_bytes), "cudaMalloc(input)")
        self._d_out = _check(cudart.cudaMalloc(self._out_bytes), "cudaMalloc(output)")
        self._stream = _check(cudart.cudaStreamCreate(), "cudaStreamCreate")
        self._context.set_tensor_address(self._in, int(self._d_in))
        self._context.set_tensor_address(self._out, int(self._d_out))
        self.name = "tensorrt"
        self.precision = str(meta["precision"])
        self.engine_path = engine

    def infer(self, batch: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(self.check_batch(batch, self._input_hw), dtype=self._in_dtype)
        n = x.shape[0]
        cudart = self._cudart
        out = np.empty((n, self._num_classes), dtype=self._out_dtype)
        if not self._context.set_input_shape(self._in, tuple(x.shape)):
            raise RuntimeError(f"TensorRT rejected input shape {x.shape}")
        h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        _check(cudart.cudaMemcpyAsync(self._d_in, x.ctypes.data, x.nbytes, h2d, self._stream), "cudaMemcpyAsync(H2D)")
        if not self._context.execute_async_v3(int(self._stream)):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        _check(
            cudart.cudaMemcpyAsync(out.ctypes.data, self._d_out, out.nbytes, d2h, self._stream), "cudaMemcpyAsync(D2H)"
        )
        _check(cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
        return out.astype(np.float32, copy=False)

    def close(self) -> None:
        cudart = getattr(self, "_cudart", None)
        if cudart is None:
            return
        for ptr in (getattr(self, "_d_in", None), getattr(self, "_d_out", None)):
            if ptr is not None:
                cudart.cudaFree(ptr)
        if getattr(self, "_stream", None) is not None:
            cudart.cudaStreamDestroy(self._stream)
        self._context = self._engine = self._runtime = None
        self._cudart = None
