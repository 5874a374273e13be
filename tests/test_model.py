"""EdgeModel: heads, freezing (fraction/count, grads, BN stats), param groups, init from a checkpoint, sizes."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from edgetune.errors import ConfigError
from trainer.checkpoint import save_checkpoint
from trainer.config import ModelConfig, TrainConfig
from trainer.model import (
    CutPoint,
    EdgeModel,
    count_params,
    create_model,
    freeze_backbone,
    model_size_mb,
    param_groups,
    preprocess_spec_for,
    resolve_cut,
    set_train_mode,
)


def _model(backbone: str = "resnet18", classes: int = 3, **kw) -> EdgeModel:
    torch.manual_seed(0)
    return create_model(ModelConfig(backbone=backbone, weights="none", img_size=64, **kw), classes)


def test_linear_and_mlp_heads():
    m = _model(dropout=0.3)
    assert [type(x) for x in m.head] == [nn.Dropout, nn.Linear]
    assert m.head[0].p == 0.3 and m.head[1].in_features == 512 and m.head[1].out_features == 3
    m = _model("mobilenet_v2", classes=4, head="mlp", head_hidden=(64, 32), dropout=0.5)
    types = [type(x) for x in m.head]
    assert types == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    assert [(x.in_features, x.out_features) for x in m.head if isinstance(x, nn.Linear)] == [
        (1280, 64),
        (64, 32),
        (32, 4),
    ]
    assert all(x.p == 0.5 for x in m.head if isinstance(x, nn.Dropout))
    m.eval()
    assert m(torch.randn(2, 3, 64, 64)).shape == (2, 4)


def test_frozen_layers_get_no_grad_and_keep_bn_stats():
    m = _model(freeze=0.5)
    rep = m.freeze_report
    cuts = m.cut_points()
    assert not any(abs(c.fraction - 0.5) < abs(rep["fraction"] - 0.5) - 1e-9 for c in cuts)  # no cut is nearer
    assert rep["params_frozen"] > 0
    layers = m.layer_order()
    frozen = [mod for _, mod in layers[: rep["layers_frozen"]]]
    live = [mod for _, mod in layers[rep["layers_frozen"] :]]
    assert all(not p.requires_grad for mod in frozen for p in mod.parameters(recurse=False))
    assert all(p.requires_grad for mod in live for p in mod.parameters(recurse=False))
    frozen_bn = [mod for mod in frozen if isinstance(mod, _BatchNorm)]
    live_bn = [mod for mod in live if isinstance(mod, _BatchNorm)]
    assert frozen_bn and live_bn
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    stats = [(b.running_mean.clone(), b.running_var.clone()) for b in frozen_bn]
    live_stats = [b.running_mean.clone() for b in live_bn]
    opt = torch.optim.SGD(param_groups(m, lr=0.1, backbone_lr_mult=1.0, weight_decay=0.0), lr=0.1)
    set_train_mode(m)
    assert all(not b.training for b in frozen_bn) and all(b.training for b in live_bn)
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(m(torch.randn(4, 3, 64, 64)), torch.tensor([0, 1, 2, 0])).backward()
        opt.step()
    for n, p in m.named_parameters():
        if not p.requires_grad:
            assert p.grad is None
            assert torch.equal(p, before[n]), n
    assert not torch.equal(m.head[1].weight, before["head.1.weight"])
    assert not torch.equal(layers[-1][1].weight, before["backbone." + layers[-1][0] + ".weight"])
    for b, (mean, var) in zip(frozen_bn, stats, strict=True):
        assert torch.equal(b.running_mean, mean) and torch.equal(b.running_var, var)
    assert any(not torch.equal(b.running_mean, s) for b, s in zip(live_bn, live_stats, strict=True))
    m.train()  # a plain train() keeps frozen BN in eval too
    assert all(not b.training for b in frozen_bn)


def test_fraction_is_comparable_across_backbones():
    for name in ("resnet18", "mobilenet_v2", "efficientnet_lite0"):
        m = _model(name)
        rep = freeze_backbone(m, 0.5)
        cuts = m.cut_points()  # the freeze snaps to the block boundary nearest 50 % of the layers
        gap = max(b.fraction - a.fraction for a, b in zip(cuts, cuts[1:], strict=False))
        assert abs(rep["fraction"] - 0.5) <= gap / 2 + 1e-9, (name, rep)
        assert rep["layers_frozen"] == cuts[rep["cut"]].layers_frozen  # the report is the cut it froze at
        frozen = [freeze_backbone(m, f)["layers_frozen"] for f in (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)]
        assert frozen == sorted(frozen), (name, frozen)  # freezing more never freezes fewer layers
        assert freeze_backbone(m, 1.0)["cut"] == len(cuts) - 1  # the last cut: pooled features, a linear probe
        assert freeze_backbone(m, 0.0)["layers_frozen"] == 0
        assert all(p.requires_grad for p in m.parameters())
        assert freeze_backbone(m, 1.0)["layers_frozen"] == rep["layers_total"]
        assert all(not p.requires_grad for p in m.backbone.parameters())
        assert all(p.requires_grad for p in m.head.parameters())


def test_absolute_count_and_errors():
    m = _model(freeze=21)  # resnet18: 40 parameterised layers; 21 snaps to the boundary after layer2.1 (20)
    assert m.freeze_report["layers_frozen"] == 20 and m.freeze_report["cut_after"] == "layer2.1"
    names = [n for n, p in m.backbone.named_parameters() if not p.requires_grad]
    assert names[0] == "conv1.weight" and all(n.startswith(("conv1", "bn1", "layer1", "layer2")) for n in names)
    n = m.freeze_report["layers_total"]
    with pytest.raises(ConfigError, match=f"has only {n} parameterised layers"):
        freeze_backbone(m, n + 5)
    # the value's form is the config's rule, checked once where the config is made (tests/test_configs.py)
    with pytest.raises(ConfigError, match="must be whole"):
        ModelConfig(backbone="resnet18", weights="none", freeze=2.5)
    with pytest.raises(ConfigError, match="fraction in"):
        ModelConfig(backbone="resnet18", weights="none", freeze=-0.1)


def test_param_groups_lr_and_weight_decay():
    m = _model(freeze=0.25)
    groups = {g["name"]: g for g in param_groups(m, lr=1e-3, backbone_lr_mult=0.1, weight_decay=0.05)}
    assert set(groups) == {"head", "head_no_decay", "backbone", "backbone_no_decay"}
    assert groups["head"]["lr"] == 1e-3 and groups["backbone"]["lr"] == pytest.approx(1e-4)
    assert groups["head"]["weight_decay"] == 0.05 and groups["backbone_no_decay"]["weight_decay"] == 0.0
    ids = {id(p) for g in groups.values() for p in g["params"]}
    assert ids == {id(p) for p in m.parameters() if p.requires_grad}
    bn_ids = {id(p) for mod in m.modules() if isinstance(mod, nn.BatchNorm2d) for p in mod.parameters()}
    assert not bn_ids & {id(p) for g in ("head", "backbone") for p in groups[g]["params"]}
    assert all(p.ndim > 1 for g in ("head", "backbone") for p in groups[g]["params"])


def test_init_from_checkpoint_with_other_class_count(tmp_path):
    src = _model(classes=5)
    with torch.no_grad():
        src.backbone.conv1.weight.add_(1.0)  # distinguishable from a fresh init
    cfg = TrainConfig(model=ModelConfig(backbone="resnet18", weights="none"))
    spec = preprocess_spec_for(cfg.model)
    save_checkpoint(tmp_path / "run" / "best", src, cfg.to_dict(), list("abcde"), spec, 1, {"val_acc": 0.5})
    dst = create_model(ModelConfig(backbone="resnet18", weights="imagenet", init=str(tmp_path / "run"), freeze=0.5), 3)
    assert dst.weights_source.startswith("init:") and dst.head[1].out_features == 3
    for k, v in src.backbone.state_dict().items():
        assert torch.equal(dst.backbone.state_dict()[k], v), k
    assert dst.freeze_report["layers_frozen"] > 0
    with pytest.raises(ConfigError, match="trained with backbone 'resnet18'"):
        create_model(ModelConfig(backbone="resnet34", weights="none", init=str(tmp_path / "run")), 3)


def test_init_head_continues_the_same_task_only(tmp_path):
    """model.init_head: the head starts from the checkpoint too when it has the same shape (a run continued);
    with another class count it is fresh, as without the flag."""
    src = _model(classes=3)
    with torch.no_grad():
        src.head[1].weight.add_(1.0)
    cfg = TrainConfig(model=ModelConfig(backbone="resnet18", weights="none"))
    save_checkpoint(
        tmp_path / "run" / "best", src, cfg.to_dict(), list("abc"), preprocess_spec_for(cfg.model), 1, {"val_acc": 0.5}
    )
    warm = create_model(ModelConfig(backbone="resnet18", init=str(tmp_path / "run"), init_head=True), 3)
    assert torch.equal(warm.head[1].weight, src.head[1].weight)
    cold = create_model(ModelConfig(backbone="resnet18", init=str(tmp_path / "run")), 3)
    assert not torch.equal(cold.head[1].weight, src.head[1].weight)
    other = create_model(ModelConfig(backbone="resnet18", init=str(tmp_path / "run"), init_head=True), 4)
    assert other.head[1].out_features == 4


def test_spec_override_sizes_and_validation():
    cfg = ModelConfig(backbone="efficientnet_lite1")
    assert preprocess_spec_for(cfg).input_size == (240, 240)
    spec = preprocess_spec_for(ModelConfig(backbone="efficientnet_lite1", img_size=128))
    assert spec.input_size == (128, 128) and spec.mean == preprocess_spec_for(cfg).mean
    m = _model()
    n = count_params(m)
    assert n == 11_176_512 + 512 * 3 + 3  # resnet18 without fc + linear head
    buffers = sum(b.numel() * b.element_size() for b in m.buffers())
    assert model_size_mb(m) == pytest.approx((n * 4 + buffers) / 2**20)
    with pytest.raises(ConfigError, match="num_classes"):
        create_model(ModelConfig(backbone="resnet18", weights="none"), 1)


def _cut(index: int, fraction: float) -> CutPoint:
    return CutPoint(index=index, after=f"stage{index}", layers_frozen=round(fraction * 100), fraction=fraction)


def test_resolve_cut_snaps_to_the_nearest_boundary_and_breaks_ties_as_documented():
    """Behaviour on a made-up backbone: the nearest cut; equally near, the one freezing less; cuts freezing the same
    layers (before and after a parameter-free pool), the deeper one; a count above 1 is layers, whole and at most
    the backbone's."""
    cuts = [_cut(0, 0.0), _cut(1, 0.4), _cut(2, 0.6), _cut(3, 1.0), _cut(4, 1.0)]
    assert resolve_cut(0.45, cuts, "toy").index == 1
    assert resolve_cut(0.55, cuts, "toy").index == 2
    assert resolve_cut(0.5, cuts, "toy").index == 1  # equally near 0.4 and 0.6: freeze less
    assert resolve_cut(1.0, cuts, "toy").index == 4  # 3 and 4 freeze the same layers: the deeper
    assert resolve_cut(0.0, cuts, "toy").index == 0
    assert resolve_cut(60, cuts, "toy").index == 2  # 60 of 100 layers
    with pytest.raises(ConfigError, match="has only 100 parameterised layers"):
        resolve_cut(101, cuts, "toy")
