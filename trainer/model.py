"""EdgeModel = features-only backbone + classification head; weights, init checkpoint, freezing, param groups.

``create_model(cfg, num_classes)`` is the single entry point: it resolves the backbone's weights
(``cfg.weights``) or starts the backbone from an earlier edgetune checkpoint (``cfg.init``, any
class count, same backbone), adds the head and applies ``cfg.freeze``.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from edgetune.errors import ConfigError, EdgetuneError
from edgetune.preprocess import PreprocessSpec
from trainer.backbones import (
    build_backbone,
    feature_dim_of,
    format_load_error,
    get_backbone_info,
    parameterised_layers,
    weights_tag_of,
)
from trainer.checkpoint import load_checkpoint, unwrap
from trainer.config import HEADS, ModelConfig, TrainConfig
from trainer.stages import Stage, run_stages, stages_of

_NORM_TYPES = (_BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm, nn.modules.instancenorm._InstanceNorm)


def build_head(
    kind: str, feature_dim: int, num_classes: int, dropout: float = 0.0, hidden: tuple[int, int] = (512, 256)
) -> nn.Module:
    """``linear``: Dropout -> Linear. ``mlp`` (graphite paper's output module after the backbone's global
    average pool): FC1 -> ReLU -> Dropout(p) -> FC2 -> ReLU -> Dropout(p) -> FC3."""
    if kind == "linear":
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(feature_dim, num_classes))
    if kind == "mlp":
        h1, h2 = hidden
        return nn.Sequential(
            nn.Linear(feature_dim, h1),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(h1, h2),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(h2, num_classes),
        )
    raise ConfigError(f"model.head must be one of {list(HEADS)}, got {kind!r}")


@dataclass(frozen=True)
class CutPoint:
    """A block boundary of a backbone: ``index`` stages before it are frozen (0 = none, all = linear probe)."""

    index: int
    after: str  #: name of the last frozen stage ("input" for index 0)
    layers_frozen: int  #: parameterised layers before the cut
    fraction: float  #: layers_frozen / all parameterised layers of the backbone (comparable across backbones)


def cut_points_of(stages: list[Stage]) -> list[CutPoint]:
    """Every cut of a stage list, in forward order."""
    counts = [sum(1 for m in s.modules() if any(True for _ in m.parameters(recurse=False))) for s in stages]
    total = max(1, sum(counts))
    out = [CutPoint(0, "input", 0, 0.0)]
    done = 0
    for i, s in enumerate(stages):
        done += counts[i]
        out.append(CutPoint(i + 1, s.name, done, done / total))
    return out


@functools.cache
def backbone_cut_points(name: str) -> tuple[CutPoint, ...]:
    """The registry's list of a backbone's cut points (block boundaries) in forward order, from its stages."""
    info = get_backbone_info(name)
    module = info.build(False, max(64, min(info.default_spec.input_size[0], 128)))
    return tuple(cut_points_of(stages_of(info.family, module)))


class EdgeModel(nn.Module):
    """``backbone``: images -> pooled features ``[N, feature_dim]``; ``head``: features -> logits ``[N, num_classes]``.

    The backbone is also a list of stages (:mod:`trainer.stages`); ``cut`` of them are frozen (a frozen
    prefix, always in eval mode: fixed BatchNorm statistics, no drop-connect). With ``input_cut = k`` the
    model takes the activations after stage ``k`` instead of images (training on cached activations);
    ``input_cut = 0`` (the default, and what export uses) is the plain image -> logits graph.
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        backbone_name: str,
        feature_dim: int,
        num_classes: int,
        input_size: int,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.backbone_name = backbone_name
        self.feature_dim = feature_dim
        self.num_classes = num_classes
        self.input_size = input_size
        self.weights_source = "none"  #: file the backbone came from, "none", or "init:<checkpoint>"
        self.weights_tag = "none"  #: the weight set it started from (trainer.backbones.weights_tag_of)
        self.freeze_report: dict[str, Any] = {"layers_total": 0, "layers_frozen": 0, "params_frozen": 0}
        self._layers: list[tuple[str, nn.Module]] | None = None
        self._stages: list[Stage] | None = None
        self.cut = 0  #: frozen stages (set by freeze_backbone)
        self.input_cut = 0  #: what forward() takes: 0 = images, k = activations after stage k

    def stages(self) -> list[Stage]:
        """The backbone's stages (block boundaries), in forward order."""
        if self._stages is None:
            self._stages = stages_of(get_backbone_info(self.backbone_name).family, self.backbone)
        return self._stages

    def cut_points(self) -> list[CutPoint]:
        return cut_points_of(self.stages())

    def forward_prefix(self, x: torch.Tensor, cut: int | None = None) -> torch.Tensor:
        """Images -> activations after ``cut`` stages (default: the frozen prefix)."""
        return run_stages(self.stages(), x, 0, self.cut if cut is None else cut)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_cut:
            return run_stages(self.stages(), x, self.input_cut)
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))

    def layer_order(self) -> list[tuple[str, nn.Module]]:
        """The backbone's parameterised layers in forward order (names relative to ``backbone``)."""
        if self._layers is None:
            self._layers = parameterised_layers(self.backbone, image_size=max(64, min(self.input_size, 128)))
        return self._layers

    def train(self, mode: bool = True) -> EdgeModel:
        super().train(mode)
        if mode:
            for st in self.stages()[: self.cut]:
                st.eval()
            _frozen_bn_to_eval(self)
        return self

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_stages"] = None  # rebuilt on demand (they only reference the backbone's modules)
        state["_layers"] = None
        return state


def _frozen_bn_to_eval(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, _BatchNorm) and m.affine and not any(p.requires_grad for p in m.parameters()):
            m.eval()


def set_train_mode(model: nn.Module) -> None:
    """``model.train()``, but BatchNorm layers whose parameters are all frozen stay in eval mode, so their
    running statistics do not change. Works on wrapped models (DDP) too."""
    model.train()
    _frozen_bn_to_eval(model)


def preprocess_spec_for(cfg: ModelConfig) -> PreprocessSpec:
    """The backbone's default spec (matching its weights), resized to ``cfg.img_size`` when that is set."""
    spec = get_backbone_info(cfg.backbone).default_spec
    return spec.with_input_size(cfg.img_size) if cfg.img_size else spec


def resolve_cut(freeze: float, cuts: list[CutPoint], backbone: str) -> CutPoint:
    """The block boundary a ``model.freeze`` value means: a fraction in [0, 1] of the backbone's parameterised
    layers, or a whole layer count > 1 (the waste paper's "freeze 50 layers"), snapped to the nearest cut
    (equally near: the one freezing less; cuts freezing the same layers, e.g. before and after a
    parameter-free global pool: the deeper one, which caches more). The value's form (a fraction or a whole count)
    is :class:`trainer.config.ModelConfig`'s rule, checked once where the config is made; what only the backbone
    knows, its layer count, is checked here."""
    total = cuts[-1].layers_frozen
    if freeze <= 1:
        want = float(freeze)
    else:
        if int(freeze) > total:
            raise ConfigError(
                f"model.freeze={int(freeze)} layers, but backbone {backbone!r} has only {total} parameterised layers; "
                f"use a count <= {total} or a fraction in [0, 1]"
            )
        want = int(freeze) / max(1, total)
    return min(cuts, key=lambda c: (round(abs(c.fraction - want), 9), c.fraction, -c.index))


def freeze_backbone(model: EdgeModel, freeze: float) -> dict[str, Any]:
    """Freeze the backbone up to a block boundary (:func:`resolve_cut`): every parameter of the first
    ``cut`` stages. The rest of the backbone and the head are made trainable. The frozen prefix is put in
    eval mode now and by every later ``train()`` (BatchNorm statistics fixed, no drop-connect), so its output
    for an image never changes and can be cached.

    Returns the freeze report: ``layers_total``, ``layers_frozen``, ``params_frozen`` (frozen scalar
    parameters), ``cut`` (frozen stages), ``cuts_total`` (stages), ``cut_after`` (last frozen stage) and
    ``fraction`` (frozen share of the parameterised layers).
    """
    cuts = model.cut_points()
    cut = resolve_cut(freeze, cuts, model.backbone_name)
    for p in model.parameters():
        p.requires_grad_(True)
    params_frozen = 0
    for st in model.stages()[: cut.index]:
        for p in st.parameters():
            if p.requires_grad:
                p.requires_grad_(False)
                params_frozen += p.numel()
    model.cut = cut.index
    if model.training:
        model.train()
    model.freeze_report = {
        "layers_total": cuts[-1].layers_frozen,
        "layers_frozen": cut.layers_frozen,
        "params_frozen": params_frozen,
        "cut": cut.index,
        "cuts_total": len(cuts) - 1,
        "cut_after": cut.after,
        "fraction": round(cut.fraction, 4),
    }
    return dict(model.freeze_report)


def _init_from_checkpoint(model: EdgeModel, path: str, with_head: bool = False) -> None:
    ckpt = load_checkpoint(path)
    meta = ckpt["meta"]
    cfg_model = (meta.get("config") or {}).get("model") or {}
    src = cfg_model.get("backbone") or meta.get("backbone")
    if src != model.backbone_name:
        raise ConfigError(
            f"model.init checkpoint {ckpt['path']} was trained with backbone {src!r}, but model.backbone is "
            f"{model.backbone_name!r}; init needs the same backbone"
        )
    state = {k[len("backbone.") :]: v for k, v in ckpt["model_state"].items() if k.startswith("backbone.")}
    if not state:
        raise EdgetuneError(f"model.init checkpoint {ckpt['path']} holds no backbone.* weights")
    try:
        model.backbone.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise EdgetuneError(
            f"model.init checkpoint {ckpt['path']} does not fit backbone {src!r}: {format_load_error(e)}"
        ) from None
    head = {k[len("head.") :]: v for k, v in ckpt["model_state"].items() if k.startswith("head.")}
    mine = model.head.state_dict()
    if with_head and head.keys() == mine.keys() and all(head[k].shape == mine[k].shape for k in mine):
        model.head.load_state_dict(head, strict=True)  # the same task continued: its head too
    model.weights_source = f"init:{ckpt['path']}"
    model.weights_tag = str(meta.get("weights_tag", ""))  # the init checkpoint's own start ("" if it predates tags)


def edge_model(model: nn.Module) -> EdgeModel:
    """The :class:`EdgeModel` inside a DDP wrapper (or the model itself): its facts (weights, freeze report, input
    cut) read as typed attributes."""
    inner = unwrap(model)
    if not isinstance(inner, EdgeModel):
        raise TypeError(f"expected an EdgeModel (trainer.model.create_model), got {type(inner).__name__}")
    return inner


def create_model(cfg: ModelConfig, num_classes: int) -> EdgeModel:
    """Backbone (weights per ``cfg.weights``, or from ``cfg.init``) + head; ``cfg.freeze`` applied.

    With ``cfg.init`` set, the backbone starts from that checkpoint's ``backbone.*`` weights (whatever its
    class count) and ``cfg.weights`` is not resolved. The head is freshly initialised, unless ``cfg.init_head`` and
    the checkpoint's head has the same shape (a run of the same task continued: the warm final fit of a study).
    """
    if not isinstance(cfg, ModelConfig):
        raise ConfigError(f"create_model needs a ModelConfig, got {type(cfg).__name__}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ConfigError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    info = get_backbone_info(cfg.backbone)
    size = preprocess_spec_for(cfg).input_size[0]
    if cfg.init:
        backbone, source = info.build(False, size), "none"
    else:
        backbone, source = build_backbone(cfg.backbone, cfg.weights, size)
    feature_dim = feature_dim_of(backbone)  # read off the module built, never a number typed by hand
    head = build_head(cfg.head, feature_dim, num_classes, cfg.dropout, (cfg.head_hidden[0], cfg.head_hidden[1]))
    model = EdgeModel(backbone, head, cfg.backbone, feature_dim, num_classes, size)
    model.weights_source = source
    model.weights_tag = weights_tag_of(cfg.backbone, source)
    if cfg.init:
        _init_from_checkpoint(model, cfg.init, with_head=cfg.init_head)
    freeze_backbone(model, cfg.freeze)
    return model


def param_groups(model: EdgeModel, lr: float, backbone_lr_mult: float, weight_decay: float) -> list[dict[str, Any]]:
    """Optimizer groups of trainable parameters: head at ``lr``, unfrozen backbone at ``lr * backbone_lr_mult``;
    norm-layer parameters and biases get no weight decay. Empty groups are left out."""
    module: nn.Module = getattr(model, "module", model)  # unwrap DDP
    no_decay_ids = {id(p) for m in module.modules() if isinstance(m, _NORM_TYPES) for p in m.parameters(recurse=False)}
    groups: list[dict[str, Any]] = []
    for part, part_lr in (("head", lr), ("backbone", lr * backbone_lr_mult)):
        decay: list[nn.Parameter] = []
        no_decay: list[nn.Parameter] = []
        for name, p in getattr(module, part).named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if id(p) in no_decay_ids or name.endswith("bias") or p.ndim <= 1 else decay).append(p)
        for suffix, params, wd in (("", decay, weight_decay), ("_no_decay", no_decay, 0.0)):
            if params:
                groups.append({"name": part + suffix, "params": params, "lr": part_lr, "weight_decay": wd})
    return groups


def count_params(model: nn.Module) -> int:
    """All parameters (trainable or not)."""
    return sum(p.numel() for p in model.parameters())


def model_size_mb(model: nn.Module) -> float:
    """Size of parameters + buffers in MiB (what a float checkpoint of the model weighs)."""
    n = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    return n / (1024 * 1024)


def model_from_checkpoint(path: str | os.PathLike[str]) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the exact model of a checkpoint (no pretrained download needed): (model in eval, meta)."""
    ckpt = load_checkpoint(os.fspath(path))
    meta = ckpt["meta"]
    untrained = {"model.weights": "none", "model.init": "", "model.freeze": 0.0}
    cfg = TrainConfig.from_dict(meta["config"]).replace(untrained)
    model = create_model(cfg.model, num_classes=len(meta["classes"]))
    model.load_state_dict(ckpt["model_state"])
    model.eval()
    return model, meta
