"""Typed, validated configuration of one training run.

``TrainConfig.from_dict`` accepts nested mappings (YAML files) and rejects unknown keys,
naming the allowed ones; ``apply_overrides`` takes ``section.key=value`` strings (``--set``).
Every error is a :class:`edgetune.errors.ConfigError` that says what was wrong and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from edgetune.errors import ConfigError
from trainer.datasets import BUILTINS, ELPV_TASKS
from trainer.metric import DEFAULT_METRIC, METRIC_NAMES, get_metric

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("cosine", "constant")
HEADS = ("linear", "mlp")
#: online augmentation presets (built by :func:`trainer.augment.build_augment`; declared here, torch-free, so the
#: config validates without importing torch)
AUG_PRESETS = ("graphite", "garbage", "rock", "flips", "dihedral", "none")
SAMPLERS = ("uniform", "balanced")
BN_STATS = ("recompute", "momentum", "keep")
EXPANSIONS = ("hflip", "vflip", "rot90", "affine")


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {list(allowed)}, got {value!r}")


def _check_range(name: str, value: Any, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    bad = value < lo or value > hi or (lo_open and value == lo) or (hi_open and value == hi)
    if bad:
        lb, rb = ("(" if lo_open else "["), (")" if hi_open else "]")
        raise ConfigError(f"{name} must be in {lb}{lo}, {hi}{rb}, got {value!r}")


@dataclass
class DataConfig:
    """Where the images come from and how they are split, expanded and augmented."""

    dataset: str = "textures"  #: built-in name (elpv, textures) or a path to an ImageFolder tree / CSV manifest
    cache_dir: str = ""  #: where built-in datasets are prepared; "" = $EDGETUNE_CACHE or ~/.cache/edgetune
    elpv_task: str = "defect4"  #: elpv only: defect4 (0, 1/3, 2/3, 1), binary (defective or not), type (mono/poly)
    split: tuple[float, float, float] = (0.7, 0.15, 0.15)  #: train/val/test ratios
    split_seed: int = 0
    strict: bool = False  #: fail on corrupt images instead of skipping them
    expand: tuple[str, ...] = ()  #: offline expansion of the train split: hflip, vflip, rot90, affine
    slice_grid: tuple[int, int] = (1, 1)  #: cut every train/val/test image into rows x cols tiles (after splitting)
    augment: str = "none"  #: online augmentation preset
    augment_strength: float = 1.0
    cache_images: str = "auto"  #: keep decoded, resized images in memory: auto, yes, no
    max_images: int = 0  #: use at most this many images (stratified; 0 = all) — for smoke tests
    loader_workers: int = 0  #: DataLoader worker processes (0 = in the training process)
    sampler: str = "uniform"  #: uniform (each image once per epoch) or balanced (classes drawn equally often)
    activation_cache: str = "auto"  #: auto: frozen-prefix activations cached when the augmentation allows; off
    activation_cache_mb: int = 2048  #: in-memory bound of the activation cache per process (MiB)
    activation_dtype: str = "auto"  #: auto: float16 where a parity check allows, else float32; float32

    def validate(self) -> None:
        if not isinstance(self.dataset, str) or not self.dataset:
            raise ConfigError(f"data.dataset must be a built-in name ({', '.join(BUILTINS)}) or a path")
        _check_choice("data.elpv_task", self.elpv_task, ELPV_TASKS)
        if len(self.split) != 3 or any((not isinstance(r, (int, float))) or r < 0 for r in self.split):
            raise ConfigError(f"data.split must be three non-negative ratios (train, val, test), got {self.split!r}")
        if abs(sum(self.split) - 1.0) > 1e-6 or self.split[0] <= 0 or self.split[1] <= 0 or self.split[2] <= 0:
            raise ConfigError(f"data.split ratios must be > 0 and sum to 1, got {self.split!r}")
        for e in self.expand:
            _check_choice("data.expand item", e, EXPANSIONS)
        if len(self.slice_grid) != 2 or any(not isinstance(v, int) or v < 1 or v > 16 for v in self.slice_grid):
            raise ConfigError(f"data.slice_grid must be two integers in [1, 16] (rows, cols), got {self.slice_grid!r}")
        _check_choice("data.augment", self.augment, AUG_PRESETS)
        _check_range("data.augment_strength", self.augment_strength, 0.0, 2.0)
        _check_choice("data.cache_images", self.cache_images, ("auto", "yes", "no"))
        if not isinstance(self.max_images, int) or self.max_images < 0:
            raise ConfigError(f"data.max_images must be an integer >= 0, got {self.max_images!r}")
        if not isinstance(self.loader_workers, int) or self.loader_workers < 0:
            raise ConfigError(f"data.loader_workers must be an integer >= 0, got {self.loader_workers!r}")
        _check_choice("data.sampler", self.sampler, SAMPLERS)
        _check_choice("data.activation_cache", self.activation_cache, ("auto", "off"))
        _check_choice("data.activation_dtype", self.activation_dtype, ("auto", "float32"))
        if not isinstance(self.activation_cache_mb, int) or self.activation_cache_mb < 0:
            raise ConfigError(f"data.activation_cache_mb must be an integer >= 0, got {self.activation_cache_mb!r}")


@dataclass
class ModelConfig:
    """Backbone, weights, freezing and head."""

    backbone: str = "efficientnet_lite0"
    weights: str = "imagenet"  #: imagenet (resolved offline, error if missing), none (from scratch), or a file/dir path
    init: str = ""  #: earlier edgetune run dir or checkpoint: start the backbone from it (source-domain pre-training)
    freeze: float = 0.0  #: fraction in [0, 1] of parameterised backbone layers frozen (forward order), or a count > 1
    head: str = "linear"
    head_hidden: tuple[int, int] = (512, 256)  #: widths of FC1, FC2 of the mlp head
    dropout: float = 0.0
    img_size: int = 0  #: network input size; 0 = the backbone's default
    bn_stats: str = "recompute"  #: BatchNorm statistics at evaluation/export: recompute (on training images before
    #: every evaluation), momentum (a momentum suited to the run's steps), keep (as the weights come)
    bn_images: int = 512  #: training images used to recompute BatchNorm statistics (0 = all)

    def validate(self) -> None:
        if not isinstance(self.backbone, str) or not self.backbone:
            raise ConfigError("model.backbone must be a backbone name (see `python -m trainer --list-backbones`)")
        if isinstance(self.freeze, bool) or not isinstance(self.freeze, (int, float)) or self.freeze < 0:
            raise ConfigError(f"model.freeze must be a fraction in [0, 1] or a layer count >= 2, got {self.freeze!r}")
        if self.freeze > 1 and float(self.freeze) != int(self.freeze):
            raise ConfigError(f"model.freeze above 1 is a layer count and must be whole, got {self.freeze!r}")
        _check_choice("model.head", self.head, HEADS)
        if len(self.head_hidden) != 2 or any(not isinstance(v, int) or v < 1 for v in self.head_hidden):
            raise ConfigError(f"model.head_hidden must be two positive integers, got {self.head_hidden!r}")
        _check_range("model.dropout", self.dropout, 0.0, 1.0, hi_open=True)
        if not isinstance(self.img_size, int) or (self.img_size != 0 and not 32 <= self.img_size <= 1024):
            raise ConfigError(f"model.img_size must be 0 (backbone default) or in [32, 1024], got {self.img_size!r}")
        _check_choice("model.bn_stats", self.bn_stats, BN_STATS)
        if not isinstance(self.bn_images, int) or self.bn_images < 0:
            raise ConfigError(f"model.bn_images must be an integer >= 0, got {self.bn_images!r}")


@dataclass
class LossConfig:
    """Focal loss (γ=0 and no α is plain cross-entropy)."""

    gamma: float = 0.0
    #: None, "auto" (inverse class frequency), "sqrt" (inverse square root of it) or one weight per class
    alpha: Union[str, tuple[float, ...], None] = None
    label_smoothing: float = 0.0

    def validate(self) -> None:
        _check_range("loss.gamma", self.gamma, 0.0, 10.0)
        _check_range("loss.label_smoothing", self.label_smoothing, 0.0, 1.0, hi_open=True)
        if self.alpha is None or self.alpha in ("auto", "sqrt"):
            return
        if isinstance(self.alpha, str) or not all(isinstance(a, (int, float)) and a >= 0 for a in self.alpha):
            raise ConfigError(f"loss.alpha must be null, 'auto', 'sqrt' or a list of non-negative class weights, "
                              f"got {self.alpha!r}")


@dataclass
class OptimConfig:
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9  #: SGD (Nesterov) only
    backbone_lr_mult: float = 0.1  #: LR of the unfrozen backbone = lr * this; the head uses lr
    schedule: str = "cosine"
    warmup_epochs: float = 0.0

    def validate(self) -> None:
        _check_choice("optim.optimizer", self.optimizer, OPTIMIZERS)
        _check_range("optim.lr", self.lr, 0.0, 10.0, lo_open=True)
        _check_range("optim.weight_decay", self.weight_decay, 0.0, 1.0)
        _check_range("optim.momentum", self.momentum, 0.0, 1.0, hi_open=True)
        _check_range("optim.backbone_lr_mult", self.backbone_lr_mult, 0.0, 100.0)
        _check_choice("optim.schedule", self.schedule, SCHEDULES)
        _check_range("optim.warmup_epochs", self.warmup_epochs, 0.0, 1000.0)


@dataclass
class TrainConfig:
    """One training run with fixed hyperparameters."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    epochs: int = 10
    batch_size: int = 32
    seed: int = 0
    metric: str = DEFAULT_METRIC  #: metric that selects the best epoch/checkpoint (trainer.metric)
    workers: int = 1  #: Ray Train DDP workers (1 = in-process)
    use_gpu: bool = False
    amp: bool = True  #: mixed precision (GPU only)
    channels_last: bool = True  #: NHWC memory format for training (GPU and CPU)
    threads: int = 0  #: torch intra-op threads per worker (0 = leave default)
    out: str = ""  #: run directory (checkpoints, metrics, plots)
    robustness: bool = True  #: after training, evaluate on downsampled / cropped+brightened test images
    progress: bool = True  #: progress bar per epoch

    def __post_init__(self) -> None:
        self.validate()

    @property
    def mode(self) -> str:
        return get_metric(self.metric).mode

    def validate(self) -> None:
        self.data.validate()
        self.model.validate()
        self.loss.validate()
        self.optim.validate()
        for name, lo in (("epochs", 1), ("batch_size", 1), ("workers", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ConfigError(f"{name} must be an integer >= {lo}, got {v!r}")
        _check_choice("metric", self.metric, METRIC_NAMES)
        if not isinstance(self.threads, int) or self.threads < 0:
            raise ConfigError(f"threads must be an integer >= 0, got {self.threads!r}")

    # -- (de)serialisation -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> TrainConfig:
        return _build(cls, d or {}, "")

    @classmethod
    def from_yaml(cls, path: str | Path) -> TrainConfig:
        return cls.from_dict(load_yaml_mapping(path, "config"))

    def replace(self, overrides: Mapping[str, Any]) -> TrainConfig:
        """A copy with dotted-key overrides applied (``{"optim.lr": 1e-3}``), validated."""
        d = self.to_dict()
        for key, value in overrides.items():
            _set_dotted(d, key, value)
        return TrainConfig.from_dict(d)


def load_yaml_mapping(path: str | Path, what: str) -> dict[str, Any]:
    """A YAML file whose top level is a mapping (empty file = {}); ConfigError naming ``what`` otherwise."""
    p = Path(path)
    try:
        d = yaml.safe_load(p.read_text()) or {}
    except OSError as e:
        raise ConfigError(f"cannot read {what} {p}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} {p} is not valid YAML: {e}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{what} {p} must be a mapping at top level")
    return d


def parse_override(s: str) -> tuple[str, Any]:
    """``"optim.lr=3e-4"`` -> ``("optim.lr", 0.0003)``; the value is parsed as YAML."""
    if "=" not in s:
        raise ConfigError(f"override {s!r} must look like section.key=value (e.g. optim.lr=3e-4)")
    k, v = s.split("=", 1)
    try:
        value = yaml.safe_load(v) if v.strip() else ""
    except yaml.YAMLError:
        value = v
    if isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string
        try:
            value = float(value)
        except ValueError:
            pass
    return k.strip(), value


def _set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    cur: Any = d
    for i, p in enumerate(parts[:-1]):
        if not isinstance(cur, dict) or p not in cur or not isinstance(cur[p], dict):
            raise ConfigError(f"unknown config section {'.'.join(parts[: i + 1])!r} in override {key!r}; "
                              f"sections: {sorted(k for k, v in d.items() if isinstance(v, dict))}")
        cur = cur[p]
    if parts[-1] not in cur:
        raise ConfigError(f"unknown config key {key!r}; allowed here: {sorted(cur)}")
    cur[parts[-1]] = value


def _to_plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _to_plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_plain(v) for v in x]
    return x


def _build(cls: Any, d: Mapping[str, Any], prefix: str) -> Any:
    if not isinstance(d, Mapping):
        raise ConfigError(f"config section {prefix.rstrip('.') or '<root>'} must be a mapping, got {d!r}")
    hints = get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ConfigError(f"unknown config key(s) {sorted(prefix + k for k in unknown)}; "
                          f"allowed in {prefix.rstrip('.') or 'the top level'}: {sorted(names)}")
    kwargs: dict[str, Any] = {}
    for k, v in d.items():
        t = hints[k]
        if dataclasses.is_dataclass(t):
            kwargs[k] = _build(t, v, f"{prefix}{k}.")
        else:
            kwargs[k] = _coerce(f"{prefix}{k}", t, v)
    obj = cls(**kwargs)
    if prefix and hasattr(obj, "validate"):
        obj.validate()
    return obj


def _coerce(name: str, t: Any, v: Any) -> Any:  # noqa: C901
    origin = get_origin(t)
    if origin is Union:
        args = [a for a in get_args(t) if a is not type(None)]
        if v is None:
            return None
        for a in args:
            try:
                return _coerce(name, a, v)
            except ConfigError:
                continue
        raise ConfigError(f"{name}: {v!r} is not a valid value (expected one of {args})")
    if origin is tuple:
        if not isinstance(v, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {v!r}")
        item_args = get_args(t)
        item_t = item_args[0] if item_args else Any
        return tuple(_coerce(name, item_t, x) for x in v)
    if t is float:
        if isinstance(v, bool) or not isinstance(v, (int, float, str)):
            raise ConfigError(f"{name} must be a number, got {v!r}")
        try:
            return float(v)
        except ValueError:
            raise ConfigError(f"{name} must be a number, got {v!r}") from None
    if t is int:
        if isinstance(v, bool) or not isinstance(v, int):
            if isinstance(v, float) and v.is_integer():
                return int(v)
            raise ConfigError(f"{name} must be an integer, got {v!r}")
        return v
    if t is bool:
        if not isinstance(v, bool):
            raise ConfigError(f"{name} must be true or false, got {v!r}")
        return v
    if t is str:
        if not isinstance(v, (str, int, float)) or isinstance(v, bool):
            raise ConfigError(f"{name} must be a string, got {v!r}")
        return str(v)
    return v
