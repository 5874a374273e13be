"""Build the bundle's TensorRT engine on the target device (``make engine BUNDLE=… PRECISION=…``).

Engines are not portable across GPUs or TensorRT versions, so they are built where they run, from the bundle's
``model.onnx``: ONNX parser, one optimisation profile over the dynamic batch axis (1, opt, max), FP16 / INT8
(entropy calibration on the bundle's calibration images, calibration cache kept), a timing cache reused across
builds. The engine is named by :func:`edge_server.runners.tensorrt.engine_filename`
(``engines/model.<precision>.trt<version>.sm<cc>.<onnx sha12>.engine``, the name the server selects); a current
engine (that name, sidecar matching this system, ONNX and options, engine SHA) is kept unless ``--force``. Engines
built for other GPUs / TensorRT versions / ONNX files are left in place (bundles may be shared over NFS). After a
build the engine runs the check images next to ONNX Runtime; top-1 agreement and max |Δprob| are printed and kept in
the sidecar. TensorRT 8.5/8.6 and 10.x. Exit status: 0 built or up to date, 1 build failed or agreement below
``--min-agreement``, 2 usage error (bundle, options, no TensorRT). Sidecars and the keep / reuse decisions
(installed engine current, engine from the search's device cache): :mod:`edge_server.engine.cache`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edge_server.engine import calibrator as cal
from edge_server.engine.cache import (
    MAX_BATCH_LIMIT,
    BuildOptions,
    ProfileShapes,
    _int,
    cached_engine,
    engine_cache_dir,
    engine_status,
    make_sidecar,
)
from edge_server.logs import configure_logging
from edge_server.runners import tensorrt as rt
from edge_server.runners.onnxruntime import OnnxRuntimeRunner
from edgetune.bundle import Bundle, load_bundle
from edgetune.dataclass_cli import Flag, HelpFormatter, add_fields, add_version, field_values
from edgetune.device import PRECISION_CHOICES
from edgetune.errors import BundleError, ConfigError, EdgetuneError, ImageDecodeError
from edgetune.fsutil import atomic_write_bytes
from edgetune.imagedecode import read_image
from edgetune.numeric import softmax

log = logging.getLogger("edge_server.engine")

#: TensorRT versions this builder is written for: [8.5, 11.0) (tensor-name API, memory pools, calibrators).
TRT_SUPPORTED = ((8, 5), (11, 0))


class EngineBuildError(EdgetuneError):
    """TensorRT could not build the engine, or the built engine failed its accuracy check."""


def decide_precision(requested: str, *, fast_fp16: bool, fast_int8: bool, n_calibration_images: int) -> tuple[str, str]:
    """The precision to build and why. ``auto``: int8 if the platform has fast INT8 and the bundle has
    calibration images, else fp16 if it has fast FP16, else fp32."""
    if requested not in PRECISION_CHOICES:
        raise ConfigError(f"precision must be one of {PRECISION_CHOICES}, got {requested!r}")
    if requested == "auto":
        if fast_int8 and n_calibration_images > 0:
            return "int8", f"auto: fast INT8 and {n_calibration_images} calibration images"
        if fast_fp16:
            why = "no calibration images in the bundle" if fast_int8 else "no fast INT8 on this GPU"
            return "fp16", f"auto: fast FP16 ({why})"
        return "fp32", "auto: this GPU has neither fast INT8 nor fast FP16"
    if requested == "int8":
        if not fast_int8:
            raise ConfigError(
                "this GPU has no fast INT8 (TensorRT platform_has_fast_int8 is false); build --precision fp16 or auto"
            )
        if n_calibration_images < 1:
            raise ConfigError(
                "INT8 needs calibration images and the bundle lists none (calibration_images); "
                "re-export the bundle or build --precision fp16"
            )
        return "int8", f"requested; {n_calibration_images} calibration images"
    if requested == "fp16" and not fast_fp16:
        return "fp16", "requested, but this GPU has no fast FP16: TensorRT will mostly pick FP32 kernels"
    return requested, "requested"


def profile_shapes(
    input_shape: Sequence[int], input_hw: tuple[int, int], max_batch: int, opt_batch: int
) -> ProfileShapes:
    """Profile for the network input ``input_shape`` (-1 = dynamic) at the bundle's ``input_hw``."""
    shape = tuple(int(d) for d in input_shape)
    if len(shape) != 4 or shape[1] != 3:
        raise BundleError(f"model input must be [batch, 3, H, W], the ONNX has {list(shape)}")
    if shape[0] != -1:
        raise BundleError(
            f"model input batch axis is fixed at {shape[0]}; the engine needs a dynamic batch axis "
            "(re-export the bundle)"
        )
    for axis, (dim, want) in enumerate(zip(shape[2:], input_hw, strict=True), start=2):
        if dim not in (-1, want):
            raise BundleError(
                f"model input axis {axis} is {dim} but the bundle's preprocessing makes {want} "
                f"(input_size {list(input_hw)})"
            )
    _int("max batch", max_batch, 1, MAX_BATCH_LIMIT)
    _int("opt batch", opt_batch, 1, max_batch)
    h, w = input_hw
    return ProfileShapes(min=(1, 3, h, w), opt=(opt_batch, 3, h, w), max=(max_batch, 3, h, w))


def parse_tensorrt_version(version: str) -> tuple[int, int]:
    """``"10.3.0"`` → (10, 3); raises :class:`ConfigError` outside :data:`TRT_SUPPORTED`."""
    try:
        major, minor = (int(p) for p in str(version).split(".")[:2])
    except ValueError:
        raise ConfigError(f"cannot read the TensorRT version {version!r}") from None
    low, high = TRT_SUPPORTED
    if not low <= (major, minor) < high:
        raise ConfigError(
            f"TensorRT {version} is not supported by the engine builder (supported: "
            f"{low[0]}.{low[1]} up to, not including, {high[0]}.{high[1]})"
        )
    return major, minor


def network_flags(trt: Any) -> int:
    """TensorRT 8 needs the EXPLICIT_BATCH flag for ONNX; in 10 it is implied (and deprecated)."""
    explicit = parse_tensorrt_version(trt.__version__)[0] < 10
    return 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH) if explicit else 0


def default_timing_cache(bundle: Bundle, system: dict[str, str]) -> Path:
    """Per TensorRT version and GPU, next to the engines (shared by the bundle's fp32/fp16/int8 builds)."""
    tag = rt.system_tag(system["tensorrt_version"], system["compute_capability"])
    return rt.engines_dir(bundle) / f"timing.{tag}.cache"


def compare_outputs(engine_logits: np.ndarray, reference_logits: np.ndarray) -> dict[str, Any]:
    """Top-1 agreement and max |Δprob| of the engine against the ONNX Runtime reference."""
    if engine_logits.shape != reference_logits.shape or engine_logits.ndim != 2 or not len(engine_logits):
        raise ValueError(
            f"logits must be two equal non-empty [N, C] arrays, got {engine_logits.shape} and {reference_logits.shape}"
        )
    pe, pr = softmax(engine_logits), softmax(reference_logits)
    return {
        "n_images": int(len(pe)),
        "top1_agreement": float((pe.argmax(1) == pr.argmax(1)).mean()),
        "max_abs_prob_diff": float(np.abs(pe - pr).max()),
        "mean_abs_prob_diff": float(np.abs(pe - pr).mean()),
    }


def load_check_images(bundle: Bundle) -> tuple[np.ndarray, np.ndarray]:
    """The bundle's check images preprocessed with its spec, and the ONNX top-1 recorded at export."""
    entries = bundle.manifest.check_images  # shape (file, onnx_top1) validated by BundleManifest
    if not entries:
        raise BundleError(f"bundle {bundle.path} lists no check_images; re-export it (the accuracy check needs them)")
    images, top1 = [], []
    for i, e in enumerate(entries):
        try:
            images.append(bundle.spec.apply(read_image(bundle.member(e.file, f"check_images[{i}]"))))
        except (ImageDecodeError, OSError) as err:
            raise BundleError(f"bundle {bundle.path}: check image {e.file} unreadable: {err}") from None
        top1.append(e.onnx_top1)
    return np.stack(images).astype(np.float32), np.asarray(top1)


def run_batched(runner: Any, x: np.ndarray) -> np.ndarray:
    n = runner.max_batch_size
    return np.concatenate([runner.infer(x[i : i + n]) for i in range(0, len(x), n)])


def accuracy_check(bundle: Bundle, engine: Path, precision: str, max_batch: int) -> dict[str, Any]:
    """Run the engine (TensorRTRunner) and ONNX Runtime (CPU, fp32) on the check images and compare."""
    x, recorded = load_check_images(bundle)
    ort = OnnxRuntimeRunner(bundle, max_batch_size=max_batch, cpu_only=True)
    try:
        ref = run_batched(ort, x)
    finally:
        ort.close()
    trt_runner = rt.TensorRTRunner(bundle, precision=precision, max_batch_size=max_batch, engine=engine)
    try:
        out = run_batched(trt_runner, x)
    finally:
        trt_runner.close()
    return {
        **compare_outputs(out, ref),
        "reference": "onnxruntime:CPUExecutionProvider fp32",
        "onnx_matches_export_top1": float((ref.argmax(1) == recorded).mean()),
    }


def _parse_onnx(trt: Any, bundle: Bundle, trt_logger: Any) -> tuple[Any, Any, Any]:
    """TensorRT's network of the bundle's ONNX (builder, network, parser: the parser owns the weights, so it lives
    as long as the build), checked against bundle.json's input and output names."""
    builder = trt.Builder(trt_logger)
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse_from_file(str(bundle.model_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineBuildError(f"TensorRT's ONNX parser rejected {bundle.model_path}: " + "; ".join(errors))
    inputs = [network.get_input(i).name for i in range(network.num_inputs)]
    outputs = [network.get_output(i).name for i in range(network.num_outputs)]
    if inputs != [bundle.input_name] or bundle.output_name not in outputs:
        raise BundleError(
            f"{bundle.model_path}: inputs {inputs} / outputs {outputs}, bundle.json says "
            f"input {bundle.input_name!r}, output {bundle.output_name!r}"
        )
    return builder, network, parser


def _configure_int8(
    trt: Any, cudart: Any, builder: Any, config: Any, bundle: Bundle, options: BuildOptions, system: dict[str, str]
) -> tuple[Any, Any, Any, dict[str, Any]]:
    """INT8 with entropy calibration over the bundle's calibration images at one fixed batch shape; returns the
    calibrator's core (its error is checked after the build), the device buffer to free, the calibrator (held by
    the caller until the build ends, as TensorRT's samples do) and the facts."""
    paths = cal.calibration_image_paths(bundle)
    batches = cal.CalibrationBatches(paths, bundle.spec, min(options.calib_batch, max(1, len(paths))))
    cache = cal.CalibrationCache(cal.calibration_cache_path(bundle, system["tensorrt_version"], batches))
    buffer = cal.CudaBuffer(cudart, batches.nbytes)
    core = cal.CalibratorCore(batches, buffer, cache, bundle.input_name)
    calib_profile = builder.create_optimization_profile()
    calib_profile.set_shape(bundle.input_name, batches.shape, batches.shape, batches.shape)
    config.set_flag(trt.BuilderFlag.INT8)
    calibrator = cal.make_entropy_calibrator(trt, core)
    config.int8_calibrator = calibrator
    config.set_calibration_profile(calib_profile)  # calibration runs at one fixed batch shape
    facts = {
        "images": len(batches.images),
        "batch_size": batches.batch_size,
        "batches": len(batches),
        "cache": str(cache.path),
        "cache_reused": cache.path.is_file(),
    }
    return core, buffer, calibrator, facts


def _attach_timing_cache(config: Any, tc_path: Path) -> int:
    """Load the timing cache at ``tc_path`` into the builder config (a new one where it is missing or unusable);
    returns the bytes loaded."""
    blob = tc_path.read_bytes() if tc_path.is_file() else b""
    timing_cache = config.create_timing_cache(blob)
    if timing_cache is None or not config.set_timing_cache(timing_cache, False):
        log.warning(
            "timing cache unusable (other TensorRT/GPU?), starting a new one", extra={"fields": {"path": str(tc_path)}}
        )
        blob = b""
        if not config.set_timing_cache(config.create_timing_cache(b""), False):
            raise EngineBuildError("TensorRT refused a new, empty timing cache")
    return len(blob)


def build_engine_bytes(
    trt: Any,
    cudart: Any,
    bundle: Bundle,
    precision: str,
    options: BuildOptions,
    system: dict[str, str],
    fast_fp16: bool,
    trt_logger: Any,
) -> tuple[bytes, ProfileShapes, dict[str, Any]]:
    """Parse the ONNX, configure and build; returns (serialized engine, profile, build facts)."""
    builder, network, _parser = _parse_onnx(trt, bundle, trt_logger)
    shapes = profile_shapes(tuple(network.get_input(0).shape), bundle.spec.input_size, options.max_batch, options.opt)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mb << 20)
    profile = builder.create_optimization_profile()
    profile.set_shape(bundle.input_name, shapes.min, shapes.opt, shapes.max)
    if config.add_optimization_profile(profile) < 0:
        raise EngineBuildError(f"TensorRT rejected the optimisation profile {shapes}")
    facts: dict[str, Any] = {"flags": []}
    if precision in ("fp16", "int8") and (precision == "fp16" or fast_fp16):
        config.set_flag(trt.BuilderFlag.FP16)  # int8: layers without INT8 kernels fall back to FP16, not FP32
        facts["flags"].append("FP16")
    core = buffer = _calibrator = None
    if precision == "int8":
        core, buffer, _calibrator, facts["calibration"] = _configure_int8(
            trt, cudart, builder, config, bundle, options, system
        )
        facts["flags"].append("INT8")
    tc_path = Path(options.timing_cache) if options.timing_cache else default_timing_cache(bundle, system)
    try:  # the calibration buffer is freed whatever happens from here on
        facts["timing_cache"] = {"path": str(tc_path), "loaded_bytes": _attach_timing_cache(config, tc_path)}
        serialized = builder.build_serialized_network(network, config)
    finally:
        if buffer is not None:
            buffer.free()
    if core is not None and core.error is not None:
        raise EngineBuildError(f"INT8 calibration failed: {core.error}")
    if serialized is None:
        raise EngineBuildError("TensorRT build_serialized_network failed (see the TensorRT messages above)")
    tc_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(tc_path, bytes(memoryview(config.get_timing_cache().serialize())))
    return bytes(memoryview(serialized)), shapes, facts


def build(bundle_dir: str | Path, options: BuildOptions, verbose: bool = False) -> dict[str, Any]:
    """Build (or keep) the engine of ``bundle_dir``; returns a summary (``status``: built / up-to-date)."""
    bundle = load_bundle(bundle_dir)
    trt = rt.import_tensorrt()
    cudart = rt.import_cudart()
    parse_tensorrt_version(trt.__version__)
    system = rt.system_info(trt, cudart)
    trt_logger = trt.Logger(trt.Logger.INFO if verbose else trt.Logger.WARNING)
    probe = trt.Builder(trt_logger)
    fast_fp16, fast_int8 = bool(probe.platform_has_fast_fp16), bool(probe.platform_has_fast_int8)
    n_calib = len(bundle.manifest.calibration_images)
    precision, why = decide_precision(
        options.precision, fast_fp16=fast_fp16, fast_int8=fast_int8, n_calibration_images=n_calib
    )
    engine = rt.engine_path(bundle, precision, system)
    summary: dict[str, Any] = {"engine": str(engine), "precision": precision, "precision_reason": why, **system}
    current, reason = engine_status(bundle, system, precision, options)
    if current and not options.force:
        return {**summary, "status": "up-to-date", "reason": reason}
    t0 = time.perf_counter()
    reused = None if options.force else cached_engine(bundle, system, precision, options, engine_cache_dir())
    if reused is not None:
        data, shapes, facts = reused
        log.info("reusing the engine built during the search", extra={"fields": {**summary, **facts}})
    else:
        log.info("building TensorRT engine", extra={"fields": {**summary, "reason": "--force" if current else reason}})
        data, shapes, facts = build_engine_bytes(trt, cudart, bundle, precision, options, system, fast_fp16, trt_logger)
    seconds = round(time.perf_counter() - t0, 2)
    side = {"build_seconds": seconds, "platform": {"fast_fp16": fast_fp16, "fast_int8": fast_int8}, **facts}
    staged = engine.with_name(f".{engine.name}.{os.getpid()}.staged")
    rt.write_engine_files(staged, data, make_sidecar(bundle, system, precision, shapes, options, data, **side))
    try:
        check = accuracy_check(bundle, staged, precision, options.max_batch)
        if check["top1_agreement"] < options.min_agreement:
            raise EngineBuildError(
                f"{precision} engine agrees with ONNX Runtime on {check['top1_agreement']:.1%} of the check images "
                f"(< --min-agreement {options.min_agreement:.1%}, max |Δp| {check['max_abs_prob_diff']:.3g}); "
                "engine not installed: try --precision fp16 or fp32"
            )
        rt.write_engine_files(
            engine, data, make_sidecar(bundle, system, precision, shapes, options, data, accuracy_check=check, **side)
        )
    finally:
        staged.unlink(missing_ok=True)
        rt.sidecar_path(staged).unlink(missing_ok=True)
    return {
        **summary,
        "status": "reused" if reused is not None else "built",
        "build_seconds": seconds,
        "accuracy_check": check,
        **facts,
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m edge_server.engine",
        description="Build (or reuse) the bundle's TensorRT engine on this device.",
        formatter_class=HelpFormatter,
    )
    add_version(p)
    p.add_argument("--bundle", required=True, help="bundle directory (model.onnx + bundle.json)")
    add_fields(p, BuildOptions, {"precision": Flag(choices=PRECISION_CHOICES)})
    p.add_argument("--verbose", action="store_true", help="TensorRT INFO messages")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    configure_logging("info" if args.verbose else "warning")
    try:
        options = BuildOptions(**field_values(args, BuildOptions))
        result = build(args.bundle, options, verbose=args.verbose)
    except (EdgetuneError, OSError, RuntimeError) as e:  # usage errors: 2; build, CUDA, file system failures: 1
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, EdgetuneError) and not isinstance(e, EngineBuildError) else 1
    if result["status"] == "up-to-date":
        print(f"up to date: {result['reason']}")
    else:
        c = result["accuracy_check"]
        print(
            f"built {result['engine']} ({result['precision']}: {result['precision_reason']}) in "
            f"{result['build_seconds']} s on {result['gpu_name']} (sm {result['compute_capability']}, TensorRT "
            f"{result['tensorrt_version']}); check images vs ONNX Runtime: top-1 agreement "
            f"{c['top1_agreement']:.1%} of {c['n_images']}, max |Δprob| {c['max_abs_prob_diff']:.3g}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
