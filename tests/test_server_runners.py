"""Runner selection, ONNX Runtime runner, TensorRT engine naming, lookup (none / matching / only stale /
several GPUs side by side) and sidecar validation, all without TensorRT (and the TensorRT runner where present)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import re

import numpy as np
import pytest

from edge_server.batcher import BatcherClosed, LatestSlot, MicroBatcher
from edge_server.runners import get_runner
from edge_server.runners.onnxruntime import OnnxRuntimeRunner
from edge_server.runners.tensorrt import (
    check_engine_sha,
    engine_filename,
    engine_path,
    find_engines,
    parse_engine_filename,
    read_sidecar,
    select_engine,
    sidecar_path,
    validate_sidecar,
    write_engine_files,
)
from edgetune.bundle import load_bundle
from edgetune.errors import BundleError, ConfigError
from testkit.edge_fixtures import copy_bundle, texture_tiles

ORIN = {"tensorrt_version": "10.3.0", "gpu_name": "Orin", "compute_capability": "8.7"}
XAVIER = {"tensorrt_version": "8.5.2", "gpu_name": "Xavier", "compute_capability": "7.2"}
RTX = {"tensorrt_version": "10.3.0", "gpu_name": "NVIDIA GeForce RTX 3060", "compute_capability": "8.6"}


def _sidecar(bundle, **over):
    meta = {**ORIN, "onnx_sha256": bundle.sha256, "precision": "fp16", "max_batch_size": 8}
    meta.update(over)
    return meta


def _install(bundle, system, precision="fp16", onnx_sha=None, data=b"engine"):
    """An engine file + sidecar as the builder writes them for ``system`` (bytes: not a real engine)."""
    meta = _sidecar(
        bundle,
        **system,
        precision=precision,
        onnx_sha256=onnx_sha or bundle.sha256,
        engine_sha256=hashlib.sha256(data).hexdigest(),
    )
    path = (
        engine_path(bundle, precision, system)
        if onnx_sha is None
        else (
            bundle.path / "engines" / f"model.{precision}.trt{system['tensorrt_version']}"
            f".sm{system['compute_capability'].replace('.', '')}.{onnx_sha[:12]}.engine"
        )
    )
    write_engine_files(path, data, meta)
    return path


def test_sidecar_validation(loaded_bundle, tmp_path):
    eng = tmp_path / "model.fp16.engine"
    validate_sidecar(
        _sidecar(loaded_bundle),
        bundle=loaded_bundle,
        tensorrt_version="10.3.0",
        gpu_name="Orin",
        compute_capability="8.7",
        engine=eng,
    )
    cases = {
        "TensorRT 8.6.2": dict(meta=_sidecar(loaded_bundle, tensorrt_version="8.6.2")),
        "built on GPU 'Xavier'": dict(meta=_sidecar(loaded_bundle, gpu_name="Xavier")),
        "built from ONNX 000000000000": dict(meta=_sidecar(loaded_bundle, onnx_sha256="0" * 64)),
        "built for compute capability 7.2": dict(meta=_sidecar(loaded_bundle, compute_capability="7.2")),
        "max_batch_size must be": dict(meta=_sidecar(loaded_bundle, max_batch_size=0)),
        "missing field(s) ['gpu_name']": dict(
            meta={k: v for k, v in _sidecar(loaded_bundle).items() if k != "gpu_name"}
        ),
    }
    for fragment, case in cases.items():
        with pytest.raises(BundleError) as e:
            validate_sidecar(
                case["meta"],
                bundle=loaded_bundle,
                tensorrt_version="10.3.0",
                gpu_name="Orin",
                compute_capability="8.7",
                engine=eng,
            )
        assert fragment in str(e.value)
        assert f"make engine BUNDLE={loaded_bundle.path}" in str(e.value)


def test_engine_filename(loaded_bundle):
    sha = "1A2B3C4D5E6F" + "0" * 52
    assert engine_filename("fp16", "10.3.0", "8.7", sha) == "model.fp16.trt10.3.0.sm87.1a2b3c4d5e6f.engine"
    assert engine_filename("int8", "8.6.2.3", "10.0", sha[:12]) == "model.int8.trt8.6.2.3.sm100.1a2b3c4d5e6f.engine"
    for p in ("fp32", "fp16", "int8"):
        name = engine_path(loaded_bundle, p, ORIN).name
        assert parse_engine_filename(name) == {
            "precision": p,
            "tensorrt_version": "10.3.0",
            "compute_capability": "8.7",
            "onnx_sha12": loaded_bundle.version,
        }
    assert parse_engine_filename("model.int8.trt8.6.2.3.sm100.1a2b3c4d5e6f.engine")["compute_capability"] == "10.0"
    assert engine_path(loaded_bundle, "fp16", XAVIER).name == f"model.fp16.trt8.5.2.sm72.{loaded_bundle.version}.engine"
    for bad in (
        "model.fp16.engine",
        "model.fp8.trt10.3.0.sm87.1a2b3c4d5e6f.engine",
        "model.fp16.trt10.3.0.sm87.x.engine",
        "model.fp16.trt10.3.0.sm87.1a2b3c4d5e6f.engine.json",
        ".model.fp16.trt10.3.0.sm87.1a2b3c4d5e6f.engine",
    ):
        assert parse_engine_filename(bad) is None, bad
    errors = {
        "precision must be one of": ("fp8", "10.3.0", "8.7", sha),
        "TensorRT version must look like '10.3.0'": ("fp16", "10/3", "8.7", sha),
        "compute capability must be '<major>.<minor>'": ("fp16", "10.3.0", "87", sha),
        "ONNX SHA-256 must be 12 to 64 hex digits": ("fp16", "10.3.0", "8.7", "abc"),
    }
    for fragment, args in errors.items():
        with pytest.raises(ConfigError, match=re.escape(fragment)):
            engine_filename(*args)


def test_engine_paths_and_sidecar_reading(loaded_bundle, tmp_path):
    assert engine_path(loaded_bundle, "int8", ORIN) == (
        loaded_bundle.path / "engines" / f"model.int8.trt10.3.0.sm87.{loaded_bundle.version}.engine"
    )
    with pytest.raises(ConfigError, match="precision must be one of"):
        engine_path(loaded_bundle, "fp8", ORIN)
    with pytest.raises(ConfigError, match="precision must be one of"):
        find_engines(loaded_bundle, "fp8")
    eng = tmp_path / "engines" / "model.fp16.trt10.3.0.sm87.0123456789ab.engine"
    eng.parent.mkdir()
    with pytest.raises(BundleError, match="no sidecar"):
        read_sidecar(eng)
    sidecar_path(eng).write_text(json.dumps(_sidecar(loaded_bundle)))
    assert read_sidecar(eng)["gpu_name"] == "Orin"


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="checks the no-TensorRT path")
def test_tensorrt_backend_without_tensorrt(loaded_bundle, tmp_path, caplog):
    b = load_bundle(copy_bundle(loaded_bundle.path, tmp_path / "b"))
    with pytest.raises(BundleError, match="make engine BUNDLE="):
        get_runner("tensorrt", b)  # no engine built
    with caplog.at_level(logging.INFO, logger="edge_server.runners"):
        runner = get_runner("auto", b, intra_op_threads=1)  # no engine: ONNX Runtime, and it says why
    runner.close()
    assert runner.name.startswith("onnxruntime:")
    assert f"no fp16 TensorRT engine in {b.path / 'engines'}" in _selected(caplog)["reason"]
    _install(b, XAVIER)  # an engine for another GPU only: found by name without importing TensorRT
    with pytest.raises(ConfigError, match="TensorRT Python package"):
        get_runner("tensorrt", b)
    caplog.clear()
    # auto: an engine is present but tensorrt is not importable -> ONNX Runtime, and it says so
    with caplog.at_level(logging.INFO, logger="edge_server.runners"):
        runner = get_runner("auto", b, intra_op_threads=1)
    runner.close()
    assert runner.name.startswith("onnxruntime:")
    assert "TensorRT not importable" in _selected(caplog)["reason"]


def _selected(caplog) -> dict:
    return next(r.fields for r in caplog.records if r.getMessage() == "backend selected")


def test_find_engines_without_tensorrt(loaded_bundle, tmp_path):
    b = load_bundle(copy_bundle(loaded_bundle.path, tmp_path / "b"))
    assert find_engines(b, "fp16") == []  # no engines/ directory at all
    orin, xavier = _install(b, ORIN), _install(b, XAVIER)
    int8 = _install(b, ORIN, precision="int8")
    legacy = b.path / "engines" / "model.fp16.engine"  # unversioned name of older releases: found, so refused
    legacy.write_bytes(b"old")
    (b.path / "engines" / ".model.fp16.trt10.3.0.sm87.0123456789ab.engine.123.staged").write_bytes(b"tmp")
    (b.path / "engines" / "timing.trt10.3.0.sm87.cache").write_bytes(b"cache")
    assert find_engines(b, "fp16") == sorted([orin, xavier, legacy])
    assert find_engines(b.path, "int8") == [int8]
    assert find_engines(b, "fp32") == []


def test_select_engine_none_matching_stale_and_side_by_side(loaded_bundle, tmp_path):
    b = load_bundle(copy_bundle(loaded_bundle.path, tmp_path / "b"))
    hint = f"make engine BUNDLE={b.path} PRECISION=fp16"
    with pytest.raises(BundleError) as e:  # none at all
        select_engine(b, "fp16", ORIN)
    assert "no fp16 TensorRT engine in" in str(e.value) and "build it" in str(e.value) and hint in str(e.value)
    # only stale engines: other TensorRT, other ONNX, legacy name -> every one is described vs this system
    old_trt = _install(b, dict(ORIN, tensorrt_version="8.6.2"))
    old_onnx = _install(b, ORIN, onnx_sha="f" * 64)
    legacy = b.path / "engines" / "model.fp16.engine"
    legacy.write_bytes(b"old")
    sidecar_path(legacy).write_text(json.dumps(_sidecar(b, tensorrt_version="8.5.2", gpu_name="Xavier")))
    _install(b, ORIN, precision="int8")  # right system, other precision: not a candidate
    with pytest.raises(BundleError) as e:
        select_engine(b, "fp16", ORIN)
    msg = str(e.value)
    assert "matches this system and bundle" in msg and hint in msg and "found 3 built for something else" in msg
    assert (
        f"this system: TensorRT 10.3.0, GPU 'Orin', compute capability 8.7; bundle ONNX {b.version}; "
        f"expected {engine_path(b, 'fp16', ORIN).name}"
    ) in msg
    assert f"{old_trt.name} (TensorRT 8.6.2, compute capability 8.7, ONNX {b.version}, GPU 'Orin')" in msg
    assert f"{old_onnx.name} (TensorRT 10.3.0, compute capability 8.7, ONNX ffffffffffff, GPU 'Orin')" in msg
    assert "model.fp16.engine (name not in the model.<precision>.trt<TensorRT version>" in msg
    assert "sidecar: TensorRT 8.5.2" in msg and "GPU 'Xavier'" in msg
    # several GPUs sharing the bundle directory: each picks its own engine, nothing is removed
    mine = {
        name: _install(b, system, data=name.encode())
        for name, system in (("orin", ORIN), ("xavier", XAVIER), ("rtx", RTX))
    }
    for name, system in (("orin", ORIN), ("xavier", XAVIER), ("rtx", RTX)):
        picked = select_engine(b, "fp16", system)
        assert picked == mine[name] and picked.read_bytes() == name.encode()
        meta = read_sidecar(picked)
        validate_sidecar(meta, bundle=b, engine=picked, precision="fp16", **system)
        check_engine_sha(picked, picked.read_bytes(), meta, "fp16")
    assert len(find_engines(b, "fp16")) == 6 and old_trt.is_file() and legacy.is_file()
    with pytest.raises(BundleError, match=re.escape(f"expected model.fp16.trt10.4.0.sm87.{b.version}.engine")):
        select_engine(b, "fp16", dict(ORIN, tensorrt_version="10.4.0"))  # after a JetPack upgrade


def test_engine_name_can_lie_sidecar_and_sha_decide(loaded_bundle, tmp_path):
    b = load_bundle(copy_bundle(loaded_bundle.path, tmp_path / "b"))
    path = _install(b, ORIN, data=b"built on an Orin")
    # a sidecar for another GPU behind this system's name (copied by hand, or same sm, other GPU model)
    sidecar_path(path).write_text(json.dumps(_sidecar(b, gpu_name="Orin Nano", engine_sha256="0" * 64)))
    assert select_engine(b, "fp16", ORIN) == path  # the name matches ...
    with pytest.raises(BundleError, match="built on GPU 'Orin Nano', running on 'Orin'.*PRECISION=fp16"):
        validate_sidecar(read_sidecar(path), bundle=b, engine=path, precision="fp16", **ORIN)  # ... the sidecar not
    with pytest.raises(BundleError, match="does not match the SHA-256 in its sidecar.*PRECISION=fp16"):
        check_engine_sha(path, path.read_bytes(), read_sidecar(path), "fp16")
    with pytest.raises(BundleError, match="no engine_sha256 recorded"):
        check_engine_sha(path, path.read_bytes(), _sidecar(b), "fp16")


def test_onnxruntime_runner_and_batcher(loaded_bundle):
    imgs = texture_tiles("test")[0][:5]
    x = loaded_bundle.spec.apply_batch(imgs)
    runner = get_runner("onnxruntime-cpu", loaded_bundle, max_batch_size=4, intra_op_threads=1)
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
        MicroBatcher(get_runner("onnxruntime-cpu", loaded_bundle, intra_op_threads=1), max_wait_ms=-1)


def test_latest_slot_drops_stale():
    slot: LatestSlot[int] = LatestSlot()
    assert slot.put(1) is None
    assert slot.put(2) == 1 and slot.put(3) == 2
    assert slot.take() == (3, 2)
    slot.put(4)
    slot.close()
    assert slot.take() == (4, 0) and slot.take() is None


@pytest.mark.tensorrt
@pytest.mark.skipif(
    importlib.util.find_spec("tensorrt") is None,
    reason="tensorrt Python package not installed (JetPack / NVIDIA GPU machines only)",
)
def test_tensorrt_runner_matches_onnxruntime(loaded_bundle):
    b = loaded_bundle
    if not find_engines(b, "fp32"):
        pytest.skip(f"no fp32 engine built for the test bundle: run `make engine BUNDLE={b.path} PRECISION=fp32`")
    x = b.spec.apply_batch(texture_tiles("test")[0][:4])
    trt_runner = get_runner("tensorrt", b, precision="fp32")
    ort_runner = get_runner("onnxruntime-cpu", b)
    np.testing.assert_allclose(trt_runner.infer(x), ort_runner.infer(x), atol=1e-3)
    trt_runner.close()


def test_adaptive_batching_waits_only_for_announced_images(loaded_bundle):
    """A lone request pays no batching delay; images already being decoded are waited for; fixed always waits."""
    import threading
    import time

    spec = loaded_bundle.spec
    imgs, _ = texture_tiles("test")
    x = spec.apply(imgs[0])
    runner = OnnxRuntimeRunner(loaded_bundle, max_batch_size=8, intra_op_threads=1)
    # a max wait far above anything a loaded machine adds: "did not wait" and "waited for the announced images"
    # are then told apart by state (batch sizes) and by a 5 s margin, not by a tight clock
    b = MicroBatcher(runner, max_batch=8, max_wait_ms=10_000, adaptive=True)
    try:
        b.submit(x).result(timeout=60)  # warm-up
        with b.incoming() as ticket:
            t0 = time.monotonic()
            res = b.submit(x, ticket=ticket).result(timeout=60)
        assert res.batch_size == 1 and time.monotonic() - t0 < 5.0  # not the 10 s max wait (the most allowed)

        tickets = [b.incoming() for _ in range(3)]
        held = [t.__enter__() for t in tickets]  # three images "being decoded"
        futs = []

        def late(i: int) -> None:
            time.sleep(0.05 * i)
            futs.append(b.submit(x, ticket=held[i]))
            tickets[i].__exit__(None, None, None)

        threads = [threading.Thread(target=late, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        sizes = [f.result(timeout=60).batch_size for f in futs]
        assert sizes == [3, 3, 3]  # the first waited for the two announced ones
    finally:
        b.close(close_runner=False)
    fixed = MicroBatcher(runner, max_batch=8, max_wait_ms=300, adaptive=False)
    try:
        t0 = time.monotonic()
        assert fixed.submit(x).result(timeout=30).batch_size == 1
        assert time.monotonic() - t0 >= 0.28  # a fixed wait waits for company that never comes
    finally:
        fixed.close()
