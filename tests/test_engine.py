"""TensorRT engine builder (edge_server.engine) and INT8 calibrator (edge_server.engine.calibrator).

Everything that does not need TensorRT runs everywhere on a real bundle (real ONNX model, real
calibration/check PNGs, real ONNX Runtime): precision decisions, profile shapes, naming, sidecar
writing/validation, calibration batching and cache, accuracy comparison, CLI errors. The builds
themselves need the tensorrt package and an NVIDIA GPU and skip with the reason otherwise.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_server.engine import build as eng
from edge_server.engine import cache as engine_cache
from edge_server.engine import calibrator as cal
from edge_server.runners.onnxruntime import OnnxRuntimeRunner
from edge_server.runners.tensorrt import (
    SIDECAR_KEYS,
    engine_filename,
    engine_path,
    find_engines,
    import_cudart,
    read_sidecar,
    sidecar_path,
    validate_sidecar,
    write_engine_files,
)
from edgetune.bundle import load_bundle
from edgetune.errors import BundleError, ConfigError
from edgetune.imagedecode import read_image

REPO = Path(__file__).resolve().parents[1]
HAS_TRT = importlib.util.find_spec("tensorrt") is not None
SYSTEM = {"tensorrt_version": "10.3.0", "gpu_name": "Orin", "compute_capability": "8.7"}


def _onnx_input_shape(bundle) -> tuple[int, ...]:
    import onnx

    inp = next(i for i in onnx.load(str(bundle.model_path)).graph.input if i.name == bundle.input_name)
    return tuple(d.dim_value if d.HasField("dim_value") else -1 for d in inp.type.tensor_type.shape.dim)


# -- precision ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "requested,fp16,int8,n_calib,expected",
    [
        ("auto", True, True, 32, "int8"),
        ("auto", True, True, 0, "fp16"),
        ("auto", True, False, 32, "fp16"),
        ("auto", False, False, 32, "fp32"),
        ("auto", False, True, 0, "fp32"),
        ("fp32", True, True, 32, "fp32"),
        ("fp16", True, True, 0, "fp16"),
        ("fp16", False, False, 0, "fp16"),
        ("int8", True, True, 5, "int8"),
    ],
)
def test_decide_precision(requested, fp16, int8, n_calib, expected):
    precision, why = eng.decide_precision(requested, fast_fp16=fp16, fast_int8=int8, n_calibration_images=n_calib)
    assert precision == expected and why
    if requested == "fp16" and not fp16:
        assert "no fast FP16" in why


def test_decide_precision_errors():
    with pytest.raises(ConfigError, match="lists none"):
        eng.decide_precision("int8", fast_fp16=True, fast_int8=True, n_calibration_images=0)
    with pytest.raises(ConfigError, match="no fast INT8"):
        eng.decide_precision("int8", fast_fp16=True, fast_int8=False, n_calibration_images=10)
    with pytest.raises(ConfigError, match=r"one of \('auto', 'fp32', 'fp16', 'int8'\)"):
        eng.decide_precision("fp8", fast_fp16=True, fast_int8=True, n_calibration_images=10)


# -- options and profile -------------------------------------------------------------------------
def test_build_options_validation():
    assert engine_cache.BuildOptions().opt == 4 and engine_cache.BuildOptions(max_batch=1).opt == 1
    assert engine_cache.BuildOptions(max_batch=16, opt_batch=2).opt == 2
    bad = {
        "max batch must be an integer in 1..1024": dict(max_batch=0),
        "opt batch must be an integer in 1..8": dict(opt_batch=9),
        "workspace (MiB)": dict(workspace_mb=1),
        "calibration batch": dict(calib_batch=0),
        "min agreement": dict(min_agreement=1.5),
        "precision must be one of": dict(precision="half"),
    }
    for fragment, kwargs in bad.items():
        with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
            engine_cache.BuildOptions(**kwargs)


def test_profile_shapes_from_bundle(loaded_bundle):
    shape = _onnx_input_shape(loaded_bundle)
    assert shape == (-1, 3, 32, 32)  # the exporter's dynamic batch axis
    opts = engine_cache.BuildOptions(max_batch=8)
    p = eng.profile_shapes(shape, loaded_bundle.spec.input_size, opts.max_batch, opts.opt)
    assert (p.min, p.opt, p.max) == ((1, 3, 32, 32), (4, 3, 32, 32), (8, 3, 32, 32))
    p = eng.profile_shapes((-1, 3, -1, -1), (48, 64), 2, 1)  # dynamic H/W: the bundle's input size is used
    assert p.max == (2, 3, 48, 64) and p.opt == (1, 3, 48, 64)
    cases = {
        "batch axis is fixed at 1": ((1, 3, 32, 32), 8, 4),
        "must be [batch, 3, H, W]": ((-1, 1, 32, 32), 8, 4),
        "axis 3 is 28": ((-1, 3, 32, 28), 8, 4),
        "opt batch must be an integer in 1..4": (shape, 4, 5),
    }
    for fragment, (shp, mx, opt) in cases.items():
        with pytest.raises((BundleError, ConfigError)) as e:
            eng.profile_shapes(shp, (32, 32), mx, opt)
        assert fragment in str(e.value)


def test_tensorrt_versions():
    assert eng.parse_tensorrt_version("8.6.2.3") == (8, 6)
    assert eng.parse_tensorrt_version("10.3.0") == (10, 3)
    for bad in ("8.4.1", "11.0.0", "7.1", "cuda"):
        with pytest.raises(ConfigError, match="TensorRT"):
            eng.parse_tensorrt_version(bad)


# -- naming and sidecar --------------------------------------------------------------------------
def test_naming(loaded_bundle):
    for p in ("fp32", "fp16", "int8"):  # the builder writes what the runner selects (test_server_runners)
        name = f"model.{p}.trt10.3.0.sm87.{loaded_bundle.version}.engine"
        assert engine_path(loaded_bundle, p, SYSTEM) == loaded_bundle.path / "engines" / name
        assert sidecar_path(engine_path(loaded_bundle, p, SYSTEM)).name == name + ".json"
    assert eng.default_timing_cache(loaded_bundle, SYSTEM).name == "timing.trt10.3.0.sm87.cache"
    paths = cal.calibration_image_paths(loaded_bundle)
    b4, b8 = (cal.CalibrationBatches(paths, loaded_bundle.spec, n) for n in (4, 8))
    c4 = cal.calibration_cache_path(loaded_bundle, "8.6.2", b4)
    assert c4.parent == loaded_bundle.path / "engines" and loaded_bundle.version in c4.name
    assert c4.name.endswith(".trt8.6.2.cache")
    assert c4 != cal.calibration_cache_path(loaded_bundle, "8.6.2", b8)  # other batching -> other cache
    same = cal.CalibrationBatches(paths, loaded_bundle.spec, 4)
    assert c4 == cal.calibration_cache_path(loaded_bundle, "8.6.2", same)


def _sidecar(bundle, system=SYSTEM, precision="fp16", data=b"engine", **extra):
    shapes = eng.profile_shapes((-1, 3, 32, 32), (32, 32), 8, 4)
    return engine_cache.make_sidecar(bundle, system, precision, shapes, engine_cache.BuildOptions(), data, **extra)


def test_sidecar_fields_and_mismatches(loaded_bundle, tmp_path):
    engine = tmp_path / "model.fp16.engine"
    meta = _sidecar(loaded_bundle)
    assert set(SIDECAR_KEYS) <= set(meta) and meta["compute_capability"] == "8.7"
    assert meta["profile"] == {"min": [1, 3, 32, 32], "opt": [4, 3, 32, 32], "max": [8, 3, 32, 32]}
    validate_sidecar(meta, bundle=loaded_bundle, engine=engine, precision="fp16", **SYSTEM)
    mismatches = {
        "running TensorRT 8.6.2": dict(SYSTEM, tensorrt_version="8.6.2"),
        "running on 'Xavier'": dict(SYSTEM, gpu_name="Xavier"),
        "built for compute capability 8.7, this GPU has 7.2": dict(SYSTEM, compute_capability="7.2"),
    }
    for fragment, system in mismatches.items():
        with pytest.raises(BundleError) as e:
            validate_sidecar(meta, bundle=loaded_bundle, engine=engine, precision="fp16", **system)
        assert fragment in str(e.value) and f"make engine BUNDLE={loaded_bundle.path} PRECISION=fp16" in str(e.value)
    with pytest.raises(BundleError, match="built from ONNX 000000000000") as e:
        validate_sidecar(
            dict(meta, onnx_sha256="0" * 64), bundle=loaded_bundle, engine=engine, precision="fp16", **SYSTEM
        )
    with pytest.raises(BundleError, match="engine precision is fp16, int8 was requested") as e:
        validate_sidecar(meta, bundle=loaded_bundle, engine=engine, precision="int8", **SYSTEM)
    assert f"make engine BUNDLE={loaded_bundle.path} PRECISION=int8" in str(e.value)
    with pytest.raises(BundleError, match=r"missing field\(s\) \['compute_capability'\]"):
        old = {k: v for k, v in meta.items() if k != "compute_capability"}  # sidecar of an older edgetune
        validate_sidecar(old, bundle=loaded_bundle, engine=engine, precision="fp16", **SYSTEM)


def test_engine_status_and_atomic_writes(bundle_copy):
    b = bundle_copy
    opts = engine_cache.BuildOptions(precision="fp16", max_batch=8)
    current, why = engine_cache.engine_status(b, SYSTEM, "fp16", opts)
    assert not current and "no engine at" in why and "other systems" not in why
    engine = engine_path(b, "fp16", SYSTEM)
    write_engine_files(engine, b"serialized engine", _sidecar(b, data=b"serialized engine"))
    assert sorted(p.name for p in engine.parent.iterdir()) == [engine.name, engine.name + ".json"]
    assert read_sidecar(engine)["engine_bytes"] == len(b"serialized engine")
    assert engine_cache.engine_status(b, SYSTEM, "fp16", opts)[0]
    # another TensorRT / GPU looks for its own name: this engine is kept and listed, not "stale"
    for other in (dict(SYSTEM, tensorrt_version="10.4.0"), dict(SYSTEM, compute_capability="8.6")):
        current, why = engine_cache.engine_status(b, other, "fp16", opts)
        assert not current and f"no engine at {engine_path(b, 'fp16', other)}" in why and engine.name in why
    # same name but the sidecar disagrees (same sm, other GPU model): the sidecar is the truth
    current, why = engine_cache.engine_status(b, dict(SYSTEM, gpu_name="Orin Nano"), "fp16", opts)
    assert not current and "running on 'Orin Nano'" in why and "PRECISION=fp16" in why
    current, why = engine_cache.engine_status(b, SYSTEM, "fp16", engine_cache.BuildOptions(max_batch=16))
    assert not current and "differs from the requested max 16/opt 8" in why
    side = _sidecar(b, system=dict(SYSTEM, tensorrt_version="8.6.2", compute_capability="7.2"), data=b"xavier")
    xavier = engine_path(b, "fp16", dict(SYSTEM, tensorrt_version="8.6.2", compute_capability="7.2"))
    write_engine_files(xavier, b"xavier", side)  # another device sharing the bundle directory
    assert engine_cache.engine_status(b, SYSTEM, "fp16", opts)[0]
    assert find_engines(b, "fp16") == sorted([engine, xavier])
    engine.write_bytes(b"serialized engine, truncated")
    current, why = engine_cache.engine_status(b, SYSTEM, "fp16", opts)
    assert not current and "does not match the SHA-256" in why
    sidecar_path(engine).unlink()
    current, why = engine_cache.engine_status(b, SYSTEM, "fp16", opts)
    assert not current and "no sidecar" in why and "PRECISION=fp16" in why


# -- calibration ---------------------------------------------------------------------------------
class HostBuffer:
    """Host memory in place of the CUDA buffer: TensorRT would read ``ptr``, the test reads ``data``."""

    def __init__(self, nbytes: int) -> None:
        self.data = np.zeros(nbytes, np.uint8)
        self.ptr = int(self.data.ctypes.data)

    def upload(self, batch: np.ndarray) -> int:
        self.data[:] = np.ascontiguousarray(batch).view(np.uint8).ravel()
        return self.ptr

    def free(self) -> None:
        self.ptr = 0


def test_calibration_batches(loaded_bundle):
    paths = cal.calibration_image_paths(loaded_bundle)
    assert len(paths) == len(loaded_bundle.meta["calibration_images"]) >= 7
    expected = [loaded_bundle.spec.apply(read_image(p)) for p in paths[:7]]
    pad = cal.CalibrationBatches(paths[:7], loaded_bundle.spec, 3)
    assert len(pad) == 3 and pad.shape == (3, 3, 32, 32) and pad.nbytes == 3 * 3 * 32 * 32 * 4
    assert pad.batch_indices() == [[0, 1, 2], [3, 4, 5], [6, 0, 1]]  # short last batch filled from the start
    batches = list(pad)
    assert [b.shape for b in batches] == [(3, 3, 32, 32)] * 3 and all(b.dtype == np.float32 for b in batches)
    for b, idx in zip(batches, pad.batch_indices(), strict=True):
        np.testing.assert_array_equal(b, np.stack([expected[i] for i in idx]))
    drop = cal.CalibrationBatches(paths[:7], loaded_bundle.spec, 3, partial="drop")
    assert len(drop) == 2 and len(list(drop)) == 2 and drop.batch_indices() == [[0, 1, 2], [3, 4, 5]]
    exact = cal.CalibrationBatches(paths[:6], loaded_bundle.spec, 3)
    assert len(exact) == 2
    for kwargs, fragment in [
        (dict(images=[], batch_size=2), "at least one calibration image"),
        (dict(images=paths[:2], batch_size=0), "batch size must be an integer >= 1"),
        (dict(images=paths[:2], batch_size=3, partial="drop"), "leaves no batch"),
        (dict(images=paths[:2], batch_size=1, partial="repeat"), "partial must be one of"),
    ]:
        with pytest.raises(ConfigError, match=fragment):
            cal.CalibrationBatches(spec=loaded_bundle.spec, **kwargs)


def test_calibration_image_listing_errors(bundle_copy):
    b = bundle_copy
    (b.path / b.meta["calibration_images"][0]["file"]).unlink()
    with pytest.raises(BundleError, match="calibration image calib/.* is missing"):
        cal.calibration_image_paths(b)
    meta = json.loads((b.path / "bundle.json").read_text())
    meta["calibration_images"] = [{"label_index": 0}]
    (b.path / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match=r"calibration_images\[0\] must be an object with a 'file'"):
        load_bundle(b.path)  # the one place the manifest's shape is validated


def test_calibrator_core_batches_and_cache(loaded_bundle, tmp_path):
    paths = cal.calibration_image_paths(loaded_bundle)[:5]
    batches = cal.CalibrationBatches(paths, loaded_bundle.spec, 2)
    buf = HostBuffer(batches.nbytes)
    cache = cal.CalibrationCache(tmp_path / "engines" / "calib.cache")
    core = cal.CalibratorCore(batches, buf, cache, loaded_bundle.input_name)
    assert core.get_batch_size() == 2
    with pytest.raises(BundleError, match="single input 'input'"):
        core.get_batch(["images"])
    seen = []
    while (ptrs := core.get_batch([loaded_bundle.input_name])) is not None:
        assert ptrs == [buf.ptr]
        seen.append(buf.data.view(np.float32).reshape(batches.shape).copy())
    assert len(seen) == 3 and core.batches_served == 3
    np.testing.assert_array_equal(seen[2][0], loaded_bundle.spec.apply(read_image(paths[4])))
    np.testing.assert_array_equal(seen[2][1], loaded_bundle.spec.apply(read_image(paths[0])))  # padded from the start
    assert core.get_batch([loaded_bundle.input_name]) is None  # stays exhausted
    assert core.read_calibration_cache() is None  # no cache yet: TensorRT calibrates
    table = bytearray(b"TRT-8602-EntropyCalibration2\ninput: 3c010a14\n")
    core.write_calibration_cache(memoryview(table))
    assert cache.path.read_bytes() == bytes(table) and core.read_calibration_cache() == bytes(table)
    assert [p.name for p in cache.path.parent.iterdir()] == ["calib.cache"]  # no temp files left
    cache.path.write_bytes(b"")
    assert core.read_calibration_cache() is None


# -- accuracy check ------------------------------------------------------------------------------
def test_compare_outputs():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(6, 3)).astype(np.float32)
    same = eng.compare_outputs(ref.copy(), ref)
    assert same["top1_agreement"] == 1.0 and same["max_abs_prob_diff"] == 0.0 and same["n_images"] == 6
    drift = ref + np.float32(1e-3)  # a constant logit shift leaves probabilities unchanged
    assert eng.compare_outputs(drift, ref)["max_abs_prob_diff"] < 1e-6
    flipped = ref.copy()
    flipped[0] = -ref[0]  # reverses the ranking of row 0
    r = eng.compare_outputs(flipped, ref)
    assert r["top1_agreement"] == pytest.approx(5 / 6) and r["max_abs_prob_diff"] > 0.01
    with pytest.raises(ValueError, match="two equal non-empty"):
        eng.compare_outputs(ref[:3], ref)


def test_check_images_match_onnx_reference(loaded_bundle):
    x, recorded = eng.load_check_images(loaded_bundle)
    assert x.shape == (len(loaded_bundle.meta["check_images"]), 3, 32, 32) and x.dtype == np.float32
    ort = OnnxRuntimeRunner(loaded_bundle, max_batch_size=4, intra_op_threads=1, cpu_only=True)
    logits = eng.run_batched(ort, x)  # 4 + 4 + … chunks, as against the engine
    ort.close()
    assert logits.shape == (len(x), len(loaded_bundle.labels))
    assert (logits.argmax(1) == recorded).all()  # preprocessing here == preprocessing at export


def test_check_images_missing(bundle_copy):
    meta = json.loads((bundle_copy.path / "bundle.json").read_text())
    meta["check_images"] = []
    (bundle_copy.path / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="lists no check_images"):
        eng.load_check_images(load_bundle(bundle_copy.path))


# -- CLI -----------------------------------------------------------------------------------------
def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edge_server.engine", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_cli_usage_errors(loaded_bundle, tmp_path):
    r = _cli("--bundle", str(tmp_path / "nope"))
    assert r.returncode == 2 and "is not a bundle: bundle.json not found" in r.stderr
    r = _cli("--bundle", str(loaded_bundle.path), "--max-batch", "4", "--opt-batch", "6")
    assert r.returncode == 2 and "opt batch must be an integer in 1..4, got 6" in r.stderr
    r = _cli("--bundle", str(loaded_bundle.path), "--precision", "fp8")
    assert r.returncode == 2 and "invalid choice: 'fp8'" in r.stderr
    for res in (r,):
        assert "Traceback" not in res.stderr


@pytest.mark.skipif(HAS_TRT, reason="checks the message when the tensorrt package is absent")
def test_cli_without_tensorrt(bundle_copy):
    r = _cli("--bundle", str(bundle_copy.path), "--precision", "auto")
    assert r.returncode == 2, r.stderr
    assert "needs the TensorRT Python package" in r.stderr and "python3-libnvinfer" in r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert not (bundle_copy.path / "engines").exists()


# -- real builds (TensorRT + NVIDIA GPU) -----------------------------------------------------------
def _require_tensorrt_gpu():
    trt = pytest.importorskip(
        "tensorrt",
        reason="tensorrt Python package not installed (JetPack / NVIDIA GPU "
        "machines only); the TensorRT build path is not exercised here",
    )
    try:
        cudart = import_cudart()
    except ConfigError as e:
        pytest.skip(f"cuda-python missing: {e}")
    err, count = cudart.cudaGetDeviceCount()
    if int(err) != 0 or count < 1:
        pytest.skip(f"no CUDA GPU visible (cudaGetDeviceCount: {err}, {count})")
    return trt


@pytest.mark.tensorrt
@pytest.mark.slow
def test_build_fp32_then_reuse_then_force(bundle_copy):
    _require_tensorrt_gpu()
    opts = engine_cache.BuildOptions(precision="fp32", max_batch=4)
    first = eng.build(bundle_copy.path, opts)
    assert first["status"] == "built" and first["accuracy_check"]["top1_agreement"] == 1.0
    assert first["accuracy_check"]["max_abs_prob_diff"] < 1e-3
    assert find_engines(bundle_copy, "fp32") == [Path(first["engine"])]
    assert Path(first["engine"]).name == engine_filename(
        "fp32", first["tensorrt_version"], first["compute_capability"], bundle_copy.sha256
    )
    meta = read_sidecar(Path(first["engine"]))
    assert meta["accuracy_check"]["top1_agreement"] == 1.0 and meta["max_batch_size"] == 4
    assert Path(first["timing_cache"]["path"]).is_file() and first["timing_cache"]["loaded_bytes"] == 0
    assert eng.build(bundle_copy.path, opts)["status"] == "up-to-date"
    again = eng.build(bundle_copy.path, engine_cache.BuildOptions(precision="fp32", max_batch=4, force=True))
    assert again["status"] == "built" and again["timing_cache"]["loaded_bytes"] > 0  # timing cache reused
    from edge_server.runners import get_runner

    runner = get_runner("tensorrt", bundle_copy, precision="fp32", max_batch_size=4)
    x, recorded = eng.load_check_images(bundle_copy)
    assert (runner.infer(x[:4]).argmax(1) == recorded[:4]).all()
    runner.close()


@pytest.mark.tensorrt
@pytest.mark.slow
def test_build_int8_with_calibration_cache(bundle_copy):
    trt = _require_tensorrt_gpu()
    if not trt.Builder(trt.Logger(trt.Logger.WARNING)).platform_has_fast_int8:
        pytest.skip("this GPU has no fast INT8")
    first = eng.build(bundle_copy.path, engine_cache.BuildOptions(precision="int8", max_batch=4, calib_batch=4))
    cache = Path(first["calibration"]["cache"])
    assert first["status"] == "built" and cache.is_file() and not first["calibration"]["cache_reused"]
    assert 0.0 <= first["accuracy_check"]["top1_agreement"] <= 1.0
    again = eng.build(
        bundle_copy.path, engine_cache.BuildOptions(precision="int8", max_batch=4, calib_batch=4, force=True)
    )
    assert again["calibration"]["cache_reused"]
    assert json.loads(sidecar_path(Path(again["engine"])).read_text())["precision"] == "int8"
