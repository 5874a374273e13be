"""What is recorded about a built TensorRT engine, and when an engine already on disk is used instead of a build.

* :func:`make_sidecar`: the engine's sidecar (system, ONNX SHA, precision, batch profile, engine SHA, build facts),
  written next to it by ``make engine`` (:mod:`edge_server.engine`) and by the search's timing
  (:mod:`edge_server.agent.timing`);
* :func:`engine_status`: whether the bundle's installed engine (the name the server selects) is current for this
  system, ONNX and options (``make engine`` keeps it unless ``--force``);
* :func:`cached_engine`: whether the engine the search built for the winner's bundle on this device (the device's
  engine cache) can be installed instead of building one.

No TensorRT here: the decisions read sidecars and engine bytes only.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_server.runners import tensorrt as rt
from edgetune.bundle import Bundle
from edgetune.dataclass_cli import opt as option  # BuildOptions has an ``opt`` of its own
from edgetune.device import PRECISION_CHOICES
from edgetune.errors import BundleError, ConfigError

log = logging.getLogger("edge_server.engine")  # the builder's logger, as before the split

#: Engines built while timing are kept here on the device, named as ``make engine`` names them, so that
#: ``make engine`` on the same device reuses the winner's engine instead of rebuilding (:func:`cached_engine`).
ENGINE_CACHE_ENV = "EDGETUNE_ENGINE_CACHE"


def engine_cache_dir() -> Path:
    return Path(os.environ.get(ENGINE_CACHE_ENV) or Path.home() / ".cache" / "edgetune" / "engines")


MAX_BATCH_LIMIT = 1024


def _int(name: str, value: Any, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ConfigError(f"{name} must be an integer in {low}..{high}, got {value!r}")
    return value


@dataclass(frozen=True)
class BuildOptions:
    """What the user asked for (validated). ``opt_batch`` None = ``max(1, max_batch // 2)``."""

    precision: str = option(
        "fp16",
        "engine precision (default fp16, the server's default); auto = int8 > fp16 > "
        "fp32 by what the GPU does fast and whether the bundle has calibration images",
    )
    max_batch: int = option(8, "largest batch of the profile (server --max-batch)")
    opt_batch: int | None = option(None, "batch the kernels are tuned for (default max/2)")
    workspace_mb: int = option(1024, "TensorRT workspace memory pool limit (MiB)")
    timing_cache: Path | None = option(
        None, "timing cache file, loaded and updated (default <bundle>/engines/timing.trt<ver>.sm<cc>.cache)"
    )
    calib_batch: int = option(8, "INT8 calibration batch size")
    min_agreement: float = option(
        0.0, "refuse the engine when its top-1 agreement with ONNX Runtime on the check images is lower"
    )
    force: bool = option(False, "rebuild even when the cached engine is current")

    def __post_init__(self) -> None:
        if self.precision not in PRECISION_CHOICES:
            raise ConfigError(f"precision must be one of {PRECISION_CHOICES}, got {self.precision!r}")
        _int("max batch", self.max_batch, 1, MAX_BATCH_LIMIT)
        if self.opt_batch is not None:
            _int("opt batch", self.opt_batch, 1, self.max_batch)
        _int("workspace (MiB)", self.workspace_mb, 16, 1 << 20)
        _int("calibration batch", self.calib_batch, 1, MAX_BATCH_LIMIT)
        if not isinstance(self.min_agreement, (int, float)) or not 0.0 <= self.min_agreement <= 1.0:
            raise ConfigError(f"min agreement must be a number in [0, 1], got {self.min_agreement!r}")

    @property
    def opt(self) -> int:
        return self.opt_batch if self.opt_batch is not None else max(1, self.max_batch // 2)


@dataclass(frozen=True)
class ProfileShapes:
    """Optimisation profile of the input: kernels are tuned for ``opt`` and valid from ``min`` to ``max``."""

    min: tuple[int, int, int, int]
    opt: tuple[int, int, int, int]
    max: tuple[int, int, int, int]


def make_sidecar(
    bundle: Bundle,
    system: dict[str, str],
    precision: str,
    shapes: ProfileShapes,
    options: BuildOptions,
    engine_bytes: bytes,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "format": "edgetune-engine-sidecar",
        "format_version": 1,
        **system,
        "onnx_sha256": bundle.sha256,
        "precision": precision,
        "max_batch_size": shapes.max[0],
        "opt_batch_size": shapes.opt[0],
        "profile": {"min": list(shapes.min), "opt": list(shapes.opt), "max": list(shapes.max)},
        "workspace_mb": options.workspace_mb,
        "engine_sha256": hashlib.sha256(engine_bytes).hexdigest(),
        "engine_bytes": len(engine_bytes),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **extra,
    }


def engine_status(bundle: Bundle, system: dict[str, str], precision: str, options: BuildOptions) -> tuple[bool, str]:
    """(True, why) when the cached engine for ``precision`` is current for this system, bundle and options."""
    engine = rt.engine_path(bundle, precision, system)  # the same name the server selects
    if not engine.is_file():
        others = [p.name for p in rt.find_engines(bundle, precision)]
        return False, f"no engine at {engine}" + (f" (kept, built for other systems: {others})" if others else "")
    try:
        meta = rt.read_sidecar(engine)
        rt.validate_sidecar(meta, bundle=bundle, engine=engine, precision=precision, **system)
        rt.check_engine_sha(engine, engine.read_bytes(), meta, precision)
    except BundleError as e:
        return False, str(e)
    if (meta.get("max_batch_size"), meta.get("opt_batch_size")) != (options.max_batch, options.opt):
        return False, (
            f"engine batch profile max {meta.get('max_batch_size')}/opt {meta.get('opt_batch_size')} "
            f"differs from the requested max {options.max_batch}/opt {options.opt}"
        )
    return True, f"{engine} is current (TensorRT {system['tensorrt_version']}, {system['gpu_name']})"


def cached_engine(
    bundle: Bundle, system: dict[str, str], precision: str, options: BuildOptions, cache_dir: Path
) -> tuple[bytes, ProfileShapes, dict[str, Any]] | None:
    """An engine this device already built for exactly this bundle (``make tune TARGET=…`` times the winner's
    bundle on its target and keeps the engine in the device's engine cache, ``edge_server.agent.timing``): reused when
    its sidecar matches TensorRT version, GPU, compute capability, ONNX SHA, precision and batch profile and its
    bytes match their SHA-256; None (with the reason logged) otherwise."""
    path = cache_dir / rt.engine_path(bundle, precision, system).name
    if not path.is_file():
        return None
    try:
        meta = rt.read_sidecar(path)
        rt.validate_sidecar(meta, bundle=bundle, engine=path, precision=precision, **system)
        data = path.read_bytes()
        rt.check_engine_sha(path, data, meta, precision)
        if (meta.get("max_batch_size"), meta.get("opt_batch_size")) != (options.max_batch, options.opt):
            raise BundleError(
                f"batch profile max {meta.get('max_batch_size')}/opt {meta.get('opt_batch_size')}, "
                f"requested max {options.max_batch}/opt {options.opt}"
            )
        prof = meta["profile"]
        shapes = ProfileShapes(min=tuple(prof["min"]), opt=tuple(prof["opt"]), max=tuple(prof["max"]))  # type: ignore[arg-type]
    except (BundleError, KeyError, TypeError, ValueError, OSError) as e:
        log.info("cached engine not reused", extra={"fields": {"engine": str(path), "reason": str(e)}})
        return None
    facts: dict[str, Any] = {k: meta[k] for k in ("flags", "timing_cache", "calibration") if k in meta}
    return data, shapes, {**facts, "reused_from": str(path), "reused_build_seconds": meta.get("build_seconds")}
