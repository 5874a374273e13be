"""Backbones as an ordered list of stages: the block boundaries where a frozen prefix can be cut off.

``stages_of(family, module)`` returns ``[Stage, ...]`` such that applying them in order equals
``module(x)`` (the features-only backbone: images -> pooled features). A cut ``k`` (0 <= k <= len)
freezes ``stages[:k]``; its output is what the activation cache stores (:mod:`trainer.actcache`), and only
``stages[k:]`` plus the head run per training step. Cut 0 = full fine-tuning, cut ``len`` = linear probe
on pooled features.

A :class:`Stage` wraps modules of the backbone by reference (no copies, no parameters of its own), so
the backbone's ``state_dict`` and ``forward`` are unchanged and the exported graph is the original one.
Stages are listed per backbone family (the way timm's ``feature_info`` lists feature points); a family
without a list is a single stage (cuts 0 and 1 only).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

Tail = Callable[[torch.Tensor], torch.Tensor]


def _flatten(x: torch.Tensor) -> torch.Tensor:
    return torch.flatten(x, 1)


def _gap_flatten(x: torch.Tensor) -> torch.Tensor:
    return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


def _relu_gap_flatten(x: torch.Tensor) -> torch.Tensor:  # DenseNet's forward after features
    return torch.flatten(F.adaptive_avg_pool2d(F.relu(x), 1), 1)


def _mean_hw(x: torch.Tensor) -> torch.Tensor:  # MNASNet / ShuffleNetV2: x.mean([2, 3])
    return x.mean([2, 3])


class Stage(nn.Module):
    """``modules`` applied in order, then ``tail`` (a module-level function, so stages pickle)."""

    def __init__(self, name: str, modules: Sequence[nn.Module], tail: Tail | None = None) -> None:
        super().__init__()
        self.name = name
        self.parts = nn.ModuleList(modules)
        self.tail = tail

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for m in self.parts:
            x = m(x)
        return self.tail(x) if self.tail is not None else x


class _LiteBlock(nn.Module):
    """One MBConv block of EfficientNet-Lite with the drop-connect rate its position gives it."""

    def __init__(self, block: nn.Module, rate: float) -> None:
        super().__init__()
        self.block = block
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x, drop_connect_rate=self.rate)


class _Whole(nn.Module):
    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


def _lite(m: Any) -> list[Stage]:
    blocks = list(m._blocks)
    rate = float(m._global_params.drop_connect_rate or 0.0)
    out = [Stage("stem", [m._conv_stem, m._bn0, m._swish])]
    for i, b in enumerate(blocks):  # as EfficientNet.extract_features scales it
        out.append(Stage(f"blocks.{i}", [_LiteBlock(b, rate * i / len(blocks) if rate else 0.0)]))
    out.append(Stage("head", [m._conv_head, m._bn1, m._swish], _gap_flatten))
    return out


def _resnet(m: Any) -> list[Stage]:
    out = [Stage("stem", [m.conv1, m.bn1, m.relu, m.maxpool])]
    for li in range(1, 5):
        for bi, block in enumerate(getattr(m, f"layer{li}")):
            out.append(Stage(f"layer{li}.{bi}", [block]))
    out.append(Stage("pool", [m.avgpool], _flatten))
    return out


def _features_then(tail: Tail) -> Callable[[Any], list[Stage]]:
    """``m.features[i]`` one stage each (MobileNetV2, EfficientNet-B0), then ``tail``."""

    def build(m: Any) -> list[Stage]:
        feats = list(m.features)
        out = [Stage(f"features.{i}", [f]) for i, f in enumerate(feats)]
        pool = getattr(m, "avgpool", None)
        if isinstance(pool, nn.Module):
            out.append(Stage("pool", [pool], _flatten))
        else:
            out.append(Stage("pool", [], tail))
        return out

    return build


def _split_at_pools(m: Any) -> list[Stage]:
    """VGG / AlexNet / SqueezeNet: the feature stack cut after every max-pool, then the global pool."""
    out: list[Stage] = []
    cur: list[nn.Module] = []
    start = 0
    for i, f in enumerate(m.features):
        cur.append(f)
        if isinstance(f, nn.MaxPool2d):
            out.append(Stage(f"features.{start}-{i}", cur))
            cur, start = [], i + 1
    if cur:
        out.append(Stage(f"features.{start}-end", cur))
    pool = m.avgpool if hasattr(m, "avgpool") else m.classifier  # squeezenet: classifier is the GAP
    out.append(Stage("pool", [pool], _flatten))
    return out


def _densenet(m: Any) -> list[Stage]:
    f = m.features
    out = [Stage("stem", [f.conv0, f.norm0, f.relu0, f.pool0])]
    for i in range(1, 5):
        parts = [getattr(f, f"denseblock{i}")]
        if i < 4:
            parts.append(getattr(f, f"transition{i}"))
        else:
            parts.append(f.norm5)
        out.append(Stage(f"denseblock{i}", parts))
    out.append(Stage("pool", [], _relu_gap_flatten))
    return out


def _mnasnet(m: Any) -> list[Stage]:
    layers = list(m.layers)
    out = [Stage("stem", layers[:8])]
    for i in range(8, 14):
        out.append(Stage(f"layers.{i}", [layers[i]]))
    out.append(Stage("head", layers[14:], _mean_hw))
    return out


def _shufflenet(m: Any) -> list[Stage]:
    out = [Stage("stem", [m.conv1, m.maxpool])]
    for s in ("stage2", "stage3", "stage4"):
        for bi, block in enumerate(getattr(m, s)):
            out.append(Stage(f"{s}.{bi}", [block]))
    out.append(Stage("head", [m.conv5], _mean_hw))
    return out


def _whole(m: Any) -> list[Stage]:
    return [Stage("backbone", [_Whole(m)])]


STAGES: dict[str, Callable[[Any], list[Stage]]] = {
    "efficientnet_lite": _lite,
    "resnet": _resnet,
    "mobilenet": _features_then(_gap_flatten),
    "efficientnet": _features_then(_gap_flatten),
    "vgg": _split_at_pools,
    "alexnet": _split_at_pools,
    "squeezenet": _split_at_pools,
    "densenet": _densenet,
    "mnasnet": _mnasnet,
    "shufflenet": _shufflenet,
}


def stages_of(family: str, module: nn.Module) -> list[Stage]:
    """The stages of a features-only backbone of ``family`` (one stage for families without a list)."""
    return STAGES.get(family, _whole)(module)


def run_stages(stages: Sequence[nn.Module], x: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
    for s in stages[start:stop]:
        x = s(x)
    return x
