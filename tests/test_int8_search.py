"""INT8 in device-in-the-loop search (issue 13): a candidate's timing bundle at int8 carries synthetic calibration
images and the static INT8 variant, the device times that variant, the server runs a bundle's INT8 variant with
ONNX Runtime at ``precision int8`` (and says how to make one when it is missing), and ``--precisions`` narrows what
joins the search."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgetune.bundle import load_bundle
from edgetune.errors import ConfigError


@pytest.fixture(scope="module")
def arch_int8(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from trainer.config import ModelConfig
    from trainer.export import write_architecture_bundle
    from trainer.model import create_model, preprocess_spec_for

    cfg = ModelConfig(backbone="efficientnet_lite0", weights="none", img_size=64)
    return write_architecture_bundle(
        create_model(cfg, 3),
        preprocess_spec_for(cfg),
        3,
        tmp_path_factory.mktemp("arch") / "int8",
        "efficientnet_lite0",
        precision="int8",
    )


def test_int8_timing_bundle_has_synthetic_calibration_and_the_static_variant(arch_int8: Path) -> None:
    from edge_server.engine.calibrator import calibration_image_paths
    from trainer.export import TIMING_CALIBRATION_IMAGES

    b = load_bundle(arch_int8)
    assert b.meta["purpose"] == "timing" and b.meta["timing_precision"] == "int8"
    assert len(calibration_image_paths(b)) == TIMING_CALIBRATION_IMAGES  # what a TensorRT INT8 build calibrates on
    assert b.int8_variant == "int8_static"
    v = b.variants["int8_static"]
    assert v["calibration"].startswith("synthetic") and b.variant_path("int8_static").stat().st_size > 0
    import onnx

    ops = {n.op_type for n in onnx.load(str(b.variant_path("int8_static"))).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # really quantised (QDQ), not a copy of model.onnx


def test_onnxruntime_times_the_int8_variant_and_refuses_fp16(arch_int8: Path) -> None:
    from edge_server.agent.timing import supported_precisions, time_bundle
    from edgetune.device import TimingProtocol

    assert supported_precisions("onnxruntime") == ("fp32", "int8")
    p = TimingProtocol(warmup=1, runs=5)
    q = time_bundle(arch_int8, precision="int8", protocol=p, backend="onnxruntime")
    f = time_bundle(arch_int8, precision="fp32", protocol=p, backend="onnxruntime")
    assert (q["variant"], q["precision"], f["variant"]) == ("int8_static", "int8", "fp32")
    assert q["p50_ms"] > 0 and f["p50_ms"] > 0
    with pytest.raises(ConfigError, match="fp32 and int8"):
        time_bundle(arch_int8, precision="fp16", backend="onnxruntime")


def test_fp32_timing_bundle_has_no_int8_and_int8_on_it_says_how_to_make_one(tmp_path: Path) -> None:
    from edge_server.agent.timing import time_bundle
    from trainer.config import ModelConfig
    from trainer.export import write_architecture_bundle
    from trainer.model import create_model, preprocess_spec_for

    cfg = ModelConfig(backbone="efficientnet_lite0", weights="none", img_size=64)
    d = write_architecture_bundle(
        create_model(cfg, 3), preprocess_spec_for(cfg), 3, tmp_path / "a", "efficientnet_lite0"
    )
    b = load_bundle(d)
    assert not b.variants and not b.manifest.calibration_images and b.int8_variant is None
    with pytest.raises(ConfigError, match="--quantize static"):
        time_bundle(d, precision="int8", backend="onnxruntime")


def test_server_runner_serves_int8_variant_or_explains(bundle_copy, arch_int8: Path) -> None:
    from edge_server.runners import get_runner

    with pytest.raises(ConfigError, match=r"no INT8 variant .*--quantize static"):
        get_runner("onnxruntime", bundle_copy, precision="int8")  # asked explicitly: an error, nothing served
    auto = get_runner("auto", bundle_copy, precision="int8")  # auto: model.onnx, the reason logged
    try:
        assert auto.precision == "fp32"
    finally:
        auto.close()
    b = load_bundle(arch_int8)
    for backend in ("onnxruntime-cpu", "auto"):
        r = get_runner(backend, b, precision="int8")
        try:
            h, w = b.spec.input_size
            out = r.infer(np.zeros((1, 3, h, w), np.float32))
            assert r.precision == "int8" and out.shape == (1, 3) and np.isfinite(out).all()
        finally:
            r.close()
    fp = get_runner("onnxruntime-cpu", b, precision="fp16")
    try:
        assert fp.precision == "fp32"  # fp16/fp32 with ONNX Runtime: model.onnx
    finally:
        fp.close()


def test_precisions_option_narrows_the_search_and_is_validated(tmp_path: Path) -> None:
    from tuner.device import search_precisions
    from tuner.options import TuneOptions
    from tuner.space import load_space

    assert search_precisions(["fp32", "fp16", "int8"], (), "jet") == ["fp32", "fp16", "int8"]
    assert search_precisions(["fp32", "fp16", "int8"], ("int8", "fp32"), "jet") == ["fp32", "int8"]
    with pytest.raises(ConfigError, match=r"does not support \['fp16'\]; it supports \['fp32', 'int8'\]"):
        search_precisions(["fp32", "int8"], ("fp16",), "sim")
    kw = dict(out=str(tmp_path / "o"), storage=f"sqlite:///{tmp_path / 'o.db'}")
    with pytest.raises(ConfigError, match=r"\['int4'\] not allowed; choose from \['fp32', 'fp16', 'int8'\]"):
        TuneOptions(target="sim", precisions=("int4",), **kw)
    with pytest.raises(ConfigError, match="precisions needs --target"):
        TuneOptions(precisions=("int8",), **kw)
    space = load_space(None, ["efficientnet_lite0"])
    space.add_device_params(["int8"])  # one precision is still a parameter: trials and hand-off name it
    assert space.params["precision"].choices == ["int8"]
    # a space without an input size gets the default space's sizes (one definition: default_space.yaml)
    custom = tmp_path / "space.yaml"
    custom.write_text("params:\n  lr: {type: float, key: optim.lr, low: 1.0e-4, high: 1.0e-2, log: true}\n")
    bare = load_space(custom)
    bare.add_device_params(["fp32", "int8"])
    assert bare.params["img"].choices == space.params["img"].choices and bare.params["img"].key == "model.img_size"
    assert bare.params["precision"].choices == ["fp32", "int8"]
    fixed = load_space(custom)
    fixed.add_device_params(["fp32"], img_fixed=True)  # --img given: the size is not searched
    assert "img" not in fixed.params
