"""Runner selection, ONNX Runtime runner, TensorRT engine sidecar validation (and the TensorRT runner where present)."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from edge_server.batcher import BatcherClosed, LatestSlot, MicroBatcher
from edge_server.runners import get_runner
from edge_server.runners.onnxruntime import OnnxRuntimeRunner
from edge_server.runners.tensorrt import engine_path, read_sidecar, sidecar_path, validate_sidecar
from edgetune.bundle import load_bundle
from edgetune.errors import BundleError, ConfigError
from tests.edge_fixtures import cached_test_bundle, copy_bundle, texture_tiles


@pytest.fixture(scope="module")
def bundle():
    return load_bundle(cached_test_bundle(seed=0))


def _sidecar(bundle, **over):
    meta = {"tensorrt_version": "10.3.0", "gpu_name": "Orin", "compute_capability": "8.7",
            "onnx_sha256": bundle.sha256, "precision": "fp16", "max_batch_size": 8}
    meta.update(over)
    return meta


def test_sidecar_validation(bundle, tmp_path):
    eng = tmp_path / "model.fp16.engine"
    validate_sidecar(_sidecar(bundle), bundle=bundle, tensorrt_version="10.3.0", gpu_name="Orin",
                     compute_capability="8.7", engine=eng)
    cases = {
        "TensorRT 8.6.2": dict(meta=_sidecar(bundle, tensorrt_version="8.6.2")),
        "built on GPU 'Xavier'": dict(meta=_sidecar(bundle, gpu_name="Xavier")),
        "built from ONNX 000000000000": dict(meta=_sidecar(bundle, onnx_sha256="0" * 64)),
        "built for compute capability 7.2": dict(meta=_sidecar(bundle, compute_capability="7.2")),
        "max_batch_size must be": dict(meta=_sidecar(bundle, max_batch_size=0)),
        "missing field(s) ['gpu_name']": dict(meta={k: v for k, v in _sidecar(bundle).items() if k != "gpu_name"}),
    }
    for fragment, case in cases.items():
        with pytest.raises(BundleError) as e:
            validate_sidecar(case["meta"], bundle=bundle, tensorrt_version="10.3.0", gpu_name="Orin",
                             compute_capability="8.7", engine=eng)
        assert fragment in str(e.value)
        assert f"make engine BUNDLE={bundle.path}" in str(e.value)


def test_engine_paths_and_sidecar_reading(bundle, tmp_path):
    assert engine_path(bundle, "int8") == bundle.path / "engines" / "model.int8.engine"
    with pytest.raises(ConfigError, match="precision must be one of"):
        engine_path(bundle, "fp8")
    eng = tmp_path / "engines" / "model.fp16.engine"
    eng.parent.mkdir()
    with pytest.raises(BundleError, match="no sidecar"):
        read_sidecar(eng)
    sidecar_path(eng).write_text(json.dumps(_sidecar(bundle)))
    assert read_sidecar(eng)["gpu_name"] == "Orin"


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="checks the no-TensorRT path")
def test_tensorrt_backend_without_tensorrt(bundle, tmp_path):
    b = load_bundle(copy_bundle(bundle.path, tmp_path / "b"))
    with pytest.raises(BundleError, match="make engine BUNDLE="):
        get_runner("tensorrt", b)  # no engine built
    eng = engine_path(b, "fp16")
    eng.parent.mkdir()
    eng.write_bytes(b"not an engine")
    sidecar_path(eng).write_text(json.dumps(_sidecar(b)))
    with pytest.raises(ConfigError, match="TensorRT Python package"):
        get_runner("tensorrt", b)
    # auto: an engine is present but tensorrt is not importable -> ONNX Runtime, and it says so
    runner = get_runner("auto", b, intra_op_threads=1)
    assert runner.name.startswith("onnxruntime:")
    runner.close()


def test_onnxruntime_runner_and_batcher(bundle):
    imgs = texture_tiles("test")[0][:5]
    x = bundle.spec.apply_batch(imgs)
    runner = get_runner("onnxruntime-cpu", bundle, max_batch_size=4, intra_op_threads=1)
    assert isinstance(runner, OnnxRuntimeRunner) and runner.intra_op_threads == 1
    assert runner.name == "onnxruntime:CPUExecutionProvider" and runner.max_batch_size == 4
    full = np.concatenate([runner.infer(x[:4]), runner.infer(x[4:])])
    assert full.shape == (5, 3) and full.dtype == np.float32
    with pytest.raises(ValueError, match="batch size 5 outside 1..4"):
        runner.infer(x)
    with pytest.raises(ValueError, match=r"batch must be \[N, 3, 32, 32\]"):
        runner.infer(x[:, :, :16])
    batcher = MicroBatcher(runner, max_batch=4, max_wait_ms=50)
    futs = [batcher.submit(x[i]) for i in range(5)]
    results = [f.result(timeout=10) for f in futs]
    np.testing.assert_allclose(np.stack([r.logits for r in results]), full, atol=1e-5)
    assert [r.batch_size for r in results] == [4, 4, 4, 4, 1]  # all queued within the 50 ms window
    batcher.close()
    with pytest.raises(BatcherClosed):
        batcher.submit(x[0])
    with pytest.raises(ConfigError, match="max_wait_ms"):
        MicroBatcher(get_runner("onnxruntime-cpu", bundle, intra_op_threads=1), max_wait_ms=-1)


def test_latest_slot_drops_stale():
    slot: LatestSlot[int] = LatestSlot()
    assert slot.put(1) is None
    assert slot.put(2) == 1 and slot.put(3) == 2
    assert slot.take() == (3, 2)
    slot.put(4)
    slot.close()
    assert slot.take() == (4, 0) and slot.take() is None


@pytest.mark.tensorrt
@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None,
                    reason="tensorrt Python package not installed (JetPack / NVIDIA GPU machines only)")
def test_tensorrt_runner_matches_onnxruntime(bundle):
    b = bundle
    if not engine_path(b, "fp32").is_file():
        pytest.skip(f"no fp32 engine built for the test bundle: run `make engine BUNDLE={b.path} PRECISION=fp32`")
    x = b.spec.apply_batch(texture_tiles("test")[0][:4])
    trt_runner = get_runner("tensorrt", b, precision="fp32")
    ort_runner = get_runner("onnxruntime-cpu", b)
    np.testing.assert_allclose(trt_runner.infer(x), ort_runner.infer(x), atol=1e-3)
    trt_runner.close()
