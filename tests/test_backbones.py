"""Backbone registry: names, errors, default preprocessing, every backbone builds and runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.models as tvm

from edgetune.errors import ConfigError
from trainer.backbones import (
    BackboneInfo,
    get_backbone_info,
    list_backbones,
    parameterised_layers,
    register_backbone,
    resolve_weights,
    weights_available,
)
from trainer.config import ModelConfig
from trainer.model import create_model

REQUIRED = [
    "vgg16",
    "resnet34",
    "mobilenet_v2",
    "resnext50_32x4d",
    "alexnet",
    "densenet121",
    "googlenet",
    "mnasnet1_0",
    "resnet18",
    "shufflenet_v2_x1_0",
    "squeezenet1_1",
    "wide_resnet50_2",
    "efficientnet_b0",
    "efficientnet_lite0",
    "efficientnet_lite1",
    "efficientnet_lite2",
]


def test_registry_lists_all_required_backbones():
    names = list_backbones()
    assert set(REQUIRED) <= set(names)
    assert names == sorted(names)
    assert list_backbones("efficientnet_lite*") == ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
    assert list_backbones("resnet*") == ["resnet18", "resnet34"]


@pytest.mark.parametrize(
    "call",
    [
        lambda: get_backbone_info("resnet1000"),
        lambda: weights_available("resnet1000"),
        lambda: resolve_weights("resnet1000", "imagenet"),
        lambda: create_model(ModelConfig(backbone="resnet1000", weights="none"), 3),
    ],
)
def test_unknown_backbone_lists_valid_names(call):
    with pytest.raises(ConfigError) as e:
        call()
    msg = str(e.value)
    assert "resnet1000" in msg
    for name in REQUIRED:
        assert name in msg


def test_duplicate_registration_raises():
    info = get_backbone_info("resnet18")
    with pytest.raises(ConfigError, match="already registered"):
        register_backbone(info)
    assert isinstance(info, BackboneInfo)


def test_lite_specs_match_their_weights():
    for name, size in (("efficientnet_lite0", 224), ("efficientnet_lite1", 240), ("efficientnet_lite2", 260)):
        spec = get_backbone_info(name).default_spec
        assert spec.input_size == (size, size)
        img = np.array([[[127, 255, 0]]], dtype=np.uint8)  # (x - 127) / 128
        out = spec.normalize(img)[:, 0, 0]
        np.testing.assert_allclose(out, [0.0, 1.0, -127 / 128], atol=1e-6)


@pytest.mark.parametrize(
    "name,weights",
    [("resnet34", tvm.ResNet34_Weights.IMAGENET1K_V1), ("efficientnet_b0", tvm.EfficientNet_B0_Weights.IMAGENET1K_V1)],
)
def test_torchvision_specs_come_from_weight_transforms(name, weights):
    spec = get_backbone_info(name).default_spec
    t = weights.transforms()
    assert spec.input_size == (t.crop_size[0],) * 2 and spec.resize == t.resize_size[0]
    assert spec.mean == tuple(t.mean) and spec.std == tuple(t.std)
    assert spec.interpolation == t.interpolation.value
    info = get_backbone_info(name)
    assert any(weights.url in s for s in info.weight_sources)


HEAVY = {"vgg16", "wide_resnet50_2", "resnext50_32x4d"}  # > 100 M params or slow to initialise on 2 cores


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n for n in list_backbones()]
)
def test_every_backbone_builds_from_scratch_and_classifies(name):
    torch.manual_seed(0)
    model = create_model(ModelConfig(backbone=name, weights="none", img_size=64), num_classes=3)
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = model.forward_features(x)
        logits = model(x)
    info = get_backbone_info(name)
    # the feature width is derived from the built module (no number typed in the registry): the registry's value,
    # the features the backbone really returns and the head's input all agree
    first_linear = next(m for m in model.head.modules() if isinstance(m, torch.nn.Linear))
    assert feats.shape == (2, info.feature_dim) == (2, model.feature_dim) == (2, first_linear.in_features)
    assert logits.shape == (2, 3)
    assert torch.isfinite(logits).all()
    assert model.weights_source == "none"
    # the backbone's own classifier is gone: no parameter produces 1000 ImageNet outputs
    assert all(p.shape[0] != 1000 for p in model.backbone.parameters())


def test_feature_dim_is_read_off_the_module():
    """A backbone registered without any feature size gets it from its module; a module that does not return
    pooled ``[N, D]`` features is refused with a message naming what it returned."""
    from edgetune.errors import EdgetuneError
    from edgetune.preprocess import PreprocessSpec
    from trainer.backbones import feature_dim_of
    from trainer.weights import WeightFile

    def build(pretrained: bool, image_size: int) -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Conv2d(3, 7, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())

    info = BackboneInfo(
        name="tiny",
        family="tiny",
        default_spec=PreprocessSpec(input_size=(32, 32), resize=36),
        weight_sources=(),
        weight_file=WeightFile(filename="tiny.pth"),
        build=build,
    )
    assert info.feature_dim == 7
    m = build(False, 32).train()
    assert feature_dim_of(m, 32) == 7 and m.training  # the probe leaves the training mode as it was
    with pytest.raises(EdgetuneError, match=r"returns \(1, 7, 30, 30\).*\[N, feature_dim\]"):
        feature_dim_of(torch.nn.Conv2d(3, 7, 3), 32)


def test_layer_order_is_forward_order():
    model = create_model(ModelConfig(backbone="resnet18", weights="none", img_size=64), 2)
    names = [n for n, _ in parameterised_layers(model.backbone)]
    assert names[:3] == ["conv1", "bn1", "layer1.0.conv1"]
    assert names[-1] == "layer4.1.bn2"
    assert names.index("layer2.0.downsample.0") > names.index("layer2.0.conv1")
    lite = create_model(ModelConfig(backbone="efficientnet_lite0", weights="none", img_size=64), 2)
    lnames = [n for n, _ in lite.layer_order()]
    assert lnames[:2] == ["_conv_stem", "_bn0"] and lnames[-2:] == ["_conv_head", "_bn1"]


def test_weights_tag_names_the_weight_set(tmp_path):
    from trainer.backbones import weights_tag_of

    info = get_backbone_info("resnet18")
    assert weights_tag_of("resnet18", "none") == "none"
    assert weights_tag_of("resnet18", str(tmp_path / info.weight_file.filename)) == info.weights_tag
    assert info.weights_tag == "torchvision ResNet18_Weights.IMAGENET1K_V1"
    assert weights_tag_of("resnet18", str(tmp_path / "finetuned.pth")) == "custom"
    assert create_model(ModelConfig(backbone="resnet18", weights="none"), num_classes=2).weights_tag == "none"
