"""Backend selection: ``get_runner(name, bundle)``.

``auto``: the bundle's TensorRT engine when one is cached (found by name, before importing TensorRT;
the runner then picks the one built for this GPU/TensorRT/ONNX or refuses with a rebuild hint) and
``tensorrt`` imports, else ONNX Runtime with CUDA/TensorRT execution providers when present, else
ONNX Runtime on the CPU. The choice and the reason are logged. ONNX Runtime at ``precision int8`` runs the
bundle's INT8 variant (``make export ARGS='--quantize static'``; a device-in-the-loop search that picked int8
exports it), at fp32/fp16 ``model.onnx``.
"""

from __future__ import annotations

import logging

from edge_server.runners.base import Runner
from edge_server.runners.onnxruntime import GPU_PROVIDERS, OnnxRuntimeRunner, available_providers, variant_for
from edge_server.runners.tensorrt import TensorRTRunner, engines_dir, find_engines
from edgetune.bundle import Bundle
from edgetune.errors import ConfigError

log = logging.getLogger("edge_server.runners")

BACKENDS = ("auto", "tensorrt", "onnxruntime", "onnxruntime-cpu")

__all__ = ["BACKENDS", "Runner", "get_runner"]


def get_runner(
    name: str, bundle: Bundle, *, max_batch_size: int = 8, intra_op_threads: int = 0, precision: str = "fp16"
) -> Runner:
    """Build the runner ``name`` (one of :data:`BACKENDS`) for ``bundle``."""
    if name not in BACKENDS:
        raise ConfigError(f"backend must be one of {BACKENDS}, got {name!r}")

    if name == "tensorrt":
        runner: Runner = TensorRTRunner(bundle, precision=precision, max_batch_size=max_batch_size)
        reason = "requested"
    elif name in ("onnxruntime", "onnxruntime-cpu"):
        variant, why = variant_for(bundle, precision)
        runner = OnnxRuntimeRunner(
            bundle,
            max_batch_size=max_batch_size,
            intra_op_threads=intra_op_threads,
            cpu_only=name == "onnxruntime-cpu",
            variant=variant,
        )
        reason = f"requested; {why}"
    else:
        runner, reason = _auto(bundle, max_batch_size, intra_op_threads, precision)
    log.info(
        "backend selected",
        extra={
            "fields": {
                "backend": runner.name,
                "precision": runner.precision,
                "requested": name,
                "reason": reason,
                "max_batch_size": runner.max_batch_size,
            }
        },
    )
    return runner


def _auto(bundle: Bundle, max_batch_size: int, intra_op_threads: int, precision: str) -> tuple[Runner, str]:
    engines = find_engines(bundle, precision)  # by name only: TensorRT is not imported yet
    if engines:
        # Engines present but none for this GPU/TensorRT/ONNX (or a stale one) raises with a rebuild hint;
        # only a missing tensorrt/cuda-python installation falls back, and says so.
        try:
            trt_runner = TensorRTRunner(bundle, precision=precision, max_batch_size=max_batch_size)
            return trt_runner, f"engine {trt_runner.engine_path}"
        except ConfigError as e:
            log.warning(
                "TensorRT engine present but TensorRT is not importable; using ONNX Runtime",
                extra={"fields": {"engines": [str(p) for p in engines], "error": str(e)}},
            )
            why = f"TensorRT not importable: {e}"
    else:
        why = f"no {precision} TensorRT engine in {engines_dir(bundle)}"
    gpu = [p for p in GPU_PROVIDERS if p in available_providers()]
    variant, which = variant_for(bundle, precision, strict=False)
    runner = OnnxRuntimeRunner(
        bundle, max_batch_size=max_batch_size, intra_op_threads=intra_op_threads, variant=variant
    )
    return runner, f"{why}; ONNX Runtime GPU providers: {gpu or 'none'}; {which}"
