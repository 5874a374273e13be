"""ONNX Runtime backend (CPU; CUDA / TensorRT execution providers when the build has them)."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from edge_server.runners.base import Runner
from edgetune.bundle import Bundle
from edgetune.errors import BundleError, ConfigError

log = logging.getLogger("edge_server.runners")

#: Execution providers in order of preference for ``--backend onnxruntime``.
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
CPU_PROVIDER = "CPUExecutionProvider"


def _ort() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise ConfigError(
            "the onnxruntime backend needs the onnxruntime package: pip install 'edgetune[serve]' "
            "(on a Jetson: the onnxruntime-gpu wheel for your JetPack)"
        ) from None
    return onnxruntime


def available_providers() -> list[str]:
    return list(_ort().get_available_providers())


def variant_for(bundle: Bundle, precision: str, strict: bool = True) -> tuple[str, str]:
    """The bundle variant ONNX Runtime runs at ``precision`` and why: ``int8`` is the bundle's INT8 variant
    (``Bundle.int8_variant``); fp32 and fp16 run ``model.onnx`` (ONNX Runtime's fp16 is no faster on a CPU).
    A bundle without an INT8 variant: an error naming how to make one (``strict``), else fp32 with the reason."""
    if precision != "int8":
        return "fp32", f"precision {precision}: model.onnx"
    name = bundle.int8_variant
    if name is not None:
        return name, f"precision int8: variant {name}"
    why = (
        f"bundle {bundle.path} has no INT8 variant (variants: {sorted(bundle.variants) or 'none'}); export one "
        "with `make export ARGS='--quantize static'`"
    )
    if strict:
        raise ConfigError(f"precision int8 with ONNX Runtime: {why}")
    return "fp32", f"precision int8 asked but {why}: model.onnx"


class OnnxRuntimeRunner(Runner):
    """Runs the bundle's ``model.onnx`` (or a named variant) with ONNX Runtime.

    Args:
        bundle: the validated bundle.
        max_batch_size: the largest micro-batch the server will form (the model has a dynamic batch axis).
        intra_op_threads: ONNX Runtime intra-op threads (0 = ONNX Runtime's default, all cores).
        cpu_only: use only the CPU provider even when GPU providers are present.
        variant: bundle variant (``"fp32"`` = model.onnx, e.g. ``"int8_dynamic"``).
    """

    def __init__(
        self,
        bundle: Bundle,
        max_batch_size: int = 8,
        intra_op_threads: int = 0,
        cpu_only: bool = False,
        variant: str = "fp32",
    ) -> None:
        if not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ConfigError(f"max_batch_size must be an integer >= 1, got {max_batch_size!r}")
        if not isinstance(intra_op_threads, int) or intra_op_threads < 0:
            raise ConfigError(f"intra_op_threads must be an integer >= 0 (0 = default), got {intra_op_threads!r}")
        ort = _ort()
        avail = ort.get_available_providers()
        providers = [CPU_PROVIDER] if cpu_only else [p for p in GPU_PROVIDERS if p in avail] + [CPU_PROVIDER]
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = intra_op_threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.log_severity_level = 3
        path = bundle.variant_path(variant)
        try:
            self._session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        except Exception as e:  # ORT raises its own exception types (InvalidGraph, Fail, ...)
            raise BundleError(f"bundle {bundle.path}: ONNX Runtime cannot load {path.name}: {e}") from None
        self._input_name = bundle.input_name
        self._output_name = bundle.output_name
        self._input_hw = bundle.spec.input_size
        inputs = {i.name: i for i in self._session.get_inputs()}
        if self._input_name not in inputs:
            raise BundleError(
                f"bundle {bundle.path}: model has no input {self._input_name!r}; inputs: {sorted(inputs)}"
            )
        outputs = [o.name for o in self._session.get_outputs()]
        if self._output_name not in outputs:
            raise BundleError(f"bundle {bundle.path}: model has no output {self._output_name!r}; outputs: {outputs}")
        shape = inputs[self._input_name].shape
        if len(shape) != 4 or (
            isinstance(shape[2], int) and isinstance(shape[3], int) and (shape[2], shape[3]) != tuple(self._input_hw)
        ):
            raise BundleError(
                f"bundle {bundle.path}: model input shape {shape} does not match the preprocess input_size "
                f"{list(self._input_hw)}"
            )
        out_shape = next(o for o in self._session.get_outputs() if o.name == self._output_name).shape
        if len(out_shape) == 2 and isinstance(out_shape[1], int) and out_shape[1] != len(bundle.labels):
            raise BundleError(
                f"bundle {bundle.path}: bundle.json has {len(bundle.labels)} labels but the model has "
                f"{out_shape[1]} outputs (output {self._output_name!r} shape {out_shape}); the labels must match "
                "the model's classes (re-export the bundle)"
            )
        fixed_batch = shape[0] if isinstance(shape[0], int) else None
        self.max_batch_size = min(max_batch_size, fixed_batch) if fixed_batch else max_batch_size
        self.provider = self._session.get_providers()[0]
        self.name = f"onnxruntime:{self.provider}"
        self.precision = "int8" if "int8" in variant else ("fp16" if "fp16" in variant else "fp32")
        self.intra_op_threads = intra_op_threads

    def infer(self, batch: np.ndarray) -> np.ndarray:
        x = self.check_batch(batch, self._input_hw)
        (logits,) = self._session.run([self._output_name], {self._input_name: x})
        return np.asarray(logits, dtype=np.float32)

    def close(self) -> None:
        self._session = None  # type: ignore[assignment]
