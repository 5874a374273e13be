"""Time a model on this device with the server's own runners: the timing half of device-in-the-loop search.

The tuner (``tuner/device.py``) sends a Ray task pinned to ``edge_target:<name>`` the files of a bundle (an
untrained copy of a candidate architecture, or the winner's bundle at hand-off); the task calls
:func:`time_bundle` here. It builds the model the way ``make serve`` would run it (a TensorRT engine with the
existing builder where TensorRT imports, ONNX Runtime otherwise), runs ``warmup`` untimed and ``runs`` timed
batches and returns p50/p90 and the device's identity. Only the core, numpy and the runtime are imported:
an edge node needs ``edgetune[serve]`` and Ray, not torch or the trainer.
"""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from edge_server.engine import build as eng
from edge_server.engine.cache import BuildOptions, engine_cache_dir, make_sidecar
from edge_server.runners import tensorrt as rt
from edge_server.runners.onnxruntime import OnnxRuntimeRunner, variant_for
from edgetune.bundle import Bundle, load_bundle
from edgetune.device import TIMING_BACKENDS, TimingProtocol
from edgetune.errors import ConfigError, EdgetuneError

#: Precisions ONNX Runtime times and serves on a CPU: model.onnx and the bundle's INT8 variant (no fp16).
ORT_PRECISIONS = ("fp32", "int8")


def cpu_model() -> str:
    """The CPU's model name (``Hardware`` on some ARM boards), else what the platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _jetpack() -> str:
    """L4T / JetPack release from ``/etc/nv_tegra_release`` (absent off a Jetson)."""
    try:
        first = Path("/etc/nv_tegra_release").read_text().splitlines()[0]
    except (OSError, IndexError):
        return ""
    return first.strip().lstrip("# ")


def _tensorrt_system() -> dict[str, str] | None:
    """TensorRT version, GPU name and compute capability, or None where TensorRT / a GPU is absent."""
    try:
        return rt.system_info(rt.import_tensorrt(), rt.import_cudart())
    except Exception:  # noqa: BLE001 - no TensorRT / CUDA / GPU here: ONNX Runtime is used
        return None


def pick_backend(backend: str) -> str:
    """The backend a timing uses: ``tensorrt`` or ``onnxruntime`` (``auto``: TensorRT where it works)."""
    if backend not in TIMING_BACKENDS:
        raise ConfigError(f"timing backend must be one of {TIMING_BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "tensorrt" if _tensorrt_system() is not None else "onnxruntime"
    return backend


def device_identity(backend: str = "auto") -> dict[str, Any]:
    """What the latency was measured on: host, CPU, runtime, and with TensorRT the GPU, TensorRT and JetPack."""
    used = pick_backend(backend)
    ident: dict[str, Any] = {
        "host": platform.node(),
        "machine": platform.machine(),
        "cpu": cpu_model(),
        "cpus": os.cpu_count() or 0,
        "python": platform.python_version(),
        "backend": used,
    }
    jp = _jetpack()
    if jp:
        ident["jetpack"] = jp
    if used == "tensorrt":
        ident.update(_tensorrt_system() or {})
    else:
        import onnxruntime

        ident["onnxruntime_version"] = onnxruntime.__version__
        ident["providers"] = ["CPUExecutionProvider"]
    return ident


def supported_precisions(backend: str = "auto") -> tuple[str, ...]:
    """Precisions a candidate can be timed (and later deployed) at on this device.

    TensorRT: fp32, fp16 where the GPU has fast FP16, int8 where it has fast INT8 (a candidate's timing bundle
    carries synthetic calibration images; the deployed engine calibrates on the bundle's real ones).
    ONNX Runtime on the CPU: fp32 and int8 (the static QDQ variant; whether it is faster depends on the CPU's
    integer instructions and the architecture, which is why it is measured), not fp16 (no faster on a CPU)."""
    if pick_backend(backend) != "tensorrt":
        return ORT_PRECISIONS

    trt = rt.import_tensorrt()
    builder = trt.Builder(trt.Logger(trt.Logger.WARNING))
    return (
        "fp32",
        *(("fp16",) if builder.platform_has_fast_fp16 else ()),
        *(("int8",) if builder.platform_has_fast_int8 else ()),
    )


def _runner(
    bundle: Bundle, backend: str, precision: str, protocol: TimingProtocol, keep_engine: bool = False
) -> tuple[Any, dict[str, Any]]:
    if backend == "tensorrt":
        return _tensorrt_runner(bundle, precision, protocol, keep_engine)
    if precision not in ORT_PRECISIONS:
        raise ConfigError(f"ONNX Runtime timing supports precisions {' and '.join(ORT_PRECISIONS)}, got {precision!r}")

    variant, _ = variant_for(bundle, precision)
    return OnnxRuntimeRunner(
        bundle, max_batch_size=protocol.batch, intra_op_threads=protocol.threads, cpu_only=True, variant=variant
    ), {"variant": variant}


def _tensorrt_runner(
    bundle: Bundle, precision: str, protocol: TimingProtocol, keep_engine: bool = False
) -> tuple[Any, dict[str, Any]]:
    """Build the engine with ``make engine``'s builder (no accuracy check here: a candidate's timed copy is
    untrained) and run it with the server's TensorRT runner; ``keep_engine`` (the winner's bundle at hand-off):
    also keep it in the device's engine cache under its standard name, for ``make engine`` to reuse."""
    trt, cudart = rt.import_tensorrt(), rt.import_cudart()
    system = rt.system_info(trt, cudart)
    logger = trt.Logger(trt.Logger.WARNING)
    fast_fp16 = bool(trt.Builder(logger).platform_has_fast_fp16)
    # the profile `make engine` builds by default (max 8, opt 4), so that the engine kept in the device's cache
    # is the one `make engine` would build, and is reused by it (edge_server.engine.cache.cached_engine)
    default = BuildOptions(precision=precision)
    options = (
        default
        if protocol.batch <= default.max_batch
        else BuildOptions(precision=precision, max_batch=protocol.batch, opt_batch=protocol.batch)
    )
    path = rt.engine_path(bundle, precision, system)
    t0 = time.perf_counter()
    data, shapes, facts = eng.build_engine_bytes(trt, cudart, bundle, precision, options, system, fast_fp16, logger)
    side = make_sidecar(
        bundle,
        system,
        precision,
        shapes,
        options,
        data,
        build_seconds=round(time.perf_counter() - t0, 2),
        built_by="edgetune timing",
        **facts,
    )
    rt.write_engine_files(path, data, side)
    if keep_engine:
        cache = engine_cache_dir()
        cache.mkdir(parents=True, exist_ok=True)
        rt.write_engine_files(cache / path.name, data, side)
    runner = rt.TensorRTRunner(bundle, precision=precision, max_batch_size=options.max_batch, engine=path)
    return runner, {"engine": path.name, "engine_build_seconds": side["build_seconds"]}


def time_bundle(
    bundle_dir: str | Path,
    precision: str = "fp32",
    protocol: TimingProtocol | None = None,
    backend: str = "auto",
    keep_engine: bool = False,
) -> dict[str, Any]:
    """Latency of the bundle's model on this device: ``p50_ms``, ``p90_ms`` (and mean/min/max) over
    ``protocol.runs`` timed batches after ``protocol.warmup`` untimed ones, with the device's identity."""
    protocol = protocol or TimingProtocol()
    used = pick_backend(backend)
    bundle = load_bundle(bundle_dir)
    runner, facts = _runner(bundle, used, precision, protocol, keep_engine)
    try:
        h, w = bundle.spec.input_size
        x = np.random.default_rng(0).standard_normal((protocol.batch, 3, h, w)).astype(np.float32)
        for _ in range(protocol.warmup):
            runner.infer(x)
        times = np.empty(protocol.runs)
        for i in range(protocol.runs):
            t = time.perf_counter()
            runner.infer(x)
            times[i] = (time.perf_counter() - t) * 1e3
    finally:
        runner.close()
    return {
        "p50_ms": float(np.percentile(times, 50)),
        "p90_ms": float(np.percentile(times, 90)),
        "mean_ms": float(times.mean()),
        "min_ms": float(times.min()),
        "max_ms": float(times.max()),
        "precision": precision,
        "backend": getattr(runner, "name", used),
        "protocol": protocol.to_dict(),
        "onnx_sha256": bundle.sha256,
        "device": device_identity(used),
        "measured_at": time.time(),
        **facts,
    }


def time_bundle_files(
    files: dict[str, bytes],
    precision: str = "fp32",
    protocol: dict[str, int] | None = None,
    backend: str = "auto",
    keep_engine: bool = False,
) -> dict[str, Any]:
    """:func:`time_bundle` for a bundle sent as ``{relative path: bytes}`` (what a Ray task receives)."""
    tmp = Path(tempfile.mkdtemp(prefix="edgetune-timing-"))
    try:
        for rel, data in files.items():
            p = (tmp / rel).resolve()
            if tmp.resolve() not in p.parents:
                raise EdgetuneError(f"timing bundle member {rel!r} points outside the bundle")
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
        return time_bundle(tmp, precision, TimingProtocol(**(protocol or {})), backend, keep_engine)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
