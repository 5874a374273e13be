"""Typed, validated, frozen configuration of one training run (pydantic models).

``TrainConfig.from_dict`` accepts nested mappings (YAML files) and rejects unknown keys,
naming the allowed ones; ``parse_override`` reads ``section.key=value`` strings (``--set``);
``cfg.replace({...})`` returns a new, validated config (configs are frozen).
Every error is a :class:`edgetune.errors.ConfigError` that names the dotted key, says what was wrong and
what is allowed (pydantic's ``ValidationError`` is translated by
:func:`trainer.config_validation.explain`; the value types, the base model and the checks live there too).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Union

import yaml
from pydantic import Field, field_validator

from edgetune.errors import ConfigError
from trainer.config_validation import (
    Bool,
    ConfigModel,
    Count,
    Int,
    Number,
    Positive,
    Str,
    bad,
    integer,
    interval,
    items,
    number,
    one_of,
    string,
    user_errors,
)
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
CACHE_IMAGES = ("auto", "yes", "no")
ACTIVATION_CACHE = ("auto", "off")
ACTIVATION_DTYPES = ("auto", "float32")
ALPHA_RULES = ("auto", "sqrt")


class DataConfig(ConfigModel):
    """Where the images come from and how they are split, expanded and augmented."""

    section: ClassVar[str] = "data"

    dataset: Str = "textures"  #: built-in name (elpv, textures) or a path to an ImageFolder tree / CSV manifest
    cache_dir: Str = ""  #: where built-in datasets are prepared; "" = $EDGETUNE_CACHE or ~/.cache/edgetune
    #: elpv only: defect4 (0, 1/3, 2/3, 1), binary (defective or not), type (mono/poly)
    elpv_task: Annotated[Str, one_of(ELPV_TASKS)] = "defect4"
    split: tuple[float, float, float] = (0.7, 0.15, 0.15)  #: train/val/test ratios
    split_seed: Int = 0
    strict: Bool = False  #: fail on corrupt images instead of skipping them
    #: offline expansion of the train split: hflip, vflip, rot90, affine
    expand: tuple[Annotated[Str, one_of(EXPANSIONS)], ...] = ()
    slice_grid: tuple[int, int] = (1, 1)  #: cut every train/val/test image into rows x cols tiles (after splitting)
    augment: Annotated[Str, one_of(AUG_PRESETS)] = "none"  #: online augmentation preset
    augment_strength: Annotated[Number, interval(0.0, 2.0)] = 1.0
    #: keep decoded, resized images in memory: auto, yes, no
    cache_images: Annotated[Str, one_of(CACHE_IMAGES)] = "auto"
    max_images: Count = 0  #: use at most this many images (stratified; 0 = all) — for smoke tests
    loader_workers: Count = 0  #: DataLoader worker processes (0 = in the training process)
    #: uniform (each image once per epoch) or balanced (classes drawn equally often)
    sampler: Annotated[Str, one_of(SAMPLERS)] = "uniform"
    #: auto: frozen-prefix activations cached when the augmentation allows; off
    activation_cache: Annotated[Str, one_of(ACTIVATION_CACHE)] = "auto"
    activation_cache_mb: Count = 2048  #: in-memory bound of the activation cache per process (MiB)
    #: auto: float16 where a parity check allows, else float32; float32
    activation_dtype: Annotated[Str, one_of(ACTIVATION_DTYPES)] = "auto"

    @field_validator("dataset", mode="after")
    @classmethod
    def _dataset_named(cls, v: str) -> str:
        if not v:
            raise bad(f"must be a built-in name ({', '.join(BUILTINS)}) or a path")
        return v

    @field_validator("split", mode="before")
    @classmethod
    def _split_ratios(cls, v: Any) -> tuple[float, ...]:
        r = items(v, number)
        if len(r) != 3 or any(x < 0 for x in r):
            raise bad(f"must be three non-negative ratios (train, val, test), got {r!r}")
        if abs(sum(r) - 1.0) > 1e-6 or min(r) <= 0:
            raise bad(f"ratios must be > 0 and sum to 1, got {r!r}")
        return r

    @field_validator("expand", mode="before")
    @classmethod
    def _expand_list(cls, v: Any) -> tuple[Any, ...]:
        return items(v, lambda x: x)

    @field_validator("slice_grid", mode="before")
    @classmethod
    def _grid(cls, v: Any) -> tuple[int, ...]:
        g = items(v, integer)
        if len(g) != 2 or any(not 1 <= x <= 16 for x in g):
            raise bad(f"must be two integers in [1, 16] (rows, cols), got {g!r}")
        return g


class ModelConfig(ConfigModel):
    """Backbone, weights, freezing and head."""

    section: ClassVar[str] = "model"

    backbone: Str = "efficientnet_lite0"
    weights: Str = "imagenet"  #: imagenet (resolved offline, error if missing), none (from scratch), or a file/dir path
    init: Str = ""  #: earlier edgetune run dir or checkpoint: start the backbone from it (source-domain pre-training)
    #: with init: also start the head from it when it has the same shape (continuing a run of the same task)
    init_head: Bool = False
    freeze: Number = 0.0  #: fraction in [0, 1] of parameterised backbone layers frozen (forward order), or a count > 1
    head: Annotated[Str, one_of(HEADS)] = "linear"
    head_hidden: tuple[int, int] = (512, 256)  #: widths of FC1, FC2 of the mlp head
    dropout: Annotated[Number, interval(0.0, 1.0, hi_open=True)] = 0.0
    img_size: Int = 0  #: network input size; 0 = the backbone's default
    #: BatchNorm statistics at evaluation/export: recompute (on training images before every evaluation),
    #: momentum (a momentum suited to the run's steps), keep (as the weights come)
    bn_stats: Annotated[Str, one_of(BN_STATS)] = "recompute"
    bn_images: Count = 512  #: training images used to recompute BatchNorm statistics (0 = all)

    @field_validator("backbone", mode="after")
    @classmethod
    def _backbone_named(cls, v: str) -> str:
        if not v:
            raise bad("must be a backbone name (see `python -m trainer --list-backbones`)")
        return v

    @field_validator("freeze", mode="after")
    @classmethod
    def _fraction_or_count(cls, v: float) -> float:
        if v < 0:
            raise bad(f"must be a fraction in [0, 1] or a layer count >= 2, got {v!r}")
        if v > 1 and not v.is_integer():
            raise bad(f"above 1 is a layer count and must be whole, got {v!r}")
        return v

    @field_validator("head_hidden", mode="before")
    @classmethod
    def _two_widths(cls, v: Any) -> tuple[int, ...]:
        w = items(v, integer)
        if len(w) != 2 or any(x < 1 for x in w):
            raise bad(f"must be two positive integers, got {w!r}")
        return w

    @field_validator("img_size", mode="after")
    @classmethod
    def _size(cls, v: int) -> int:
        if v != 0 and not 32 <= v <= 1024:
            raise bad(f"must be 0 (backbone default) or in [32, 1024], got {v!r}")
        return v


class LossConfig(ConfigModel):
    """Focal loss (γ=0 and no α is plain cross-entropy)."""

    section: ClassVar[str] = "loss"

    gamma: Annotated[Number, interval(0.0, 10.0)] = 0.0
    #: None, "auto" (inverse class frequency), "sqrt" (inverse square root of it) or one weight per class
    alpha: Union[str, tuple[float, ...], None] = None
    label_smoothing: Annotated[Number, interval(0.0, 1.0, hi_open=True)] = 0.0

    @field_validator("alpha", mode="before")
    @classmethod
    def _alpha_rule_or_weights(cls, v: Any) -> Any:
        if v is None or v in ALPHA_RULES:
            return v
        weights = items(v, number) if isinstance(v, (list, tuple)) else None
        if weights is None or any(a < 0 for a in weights):
            shown = weights if weights is not None else (string(v) if isinstance(v, (int, float)) else v)
            raise bad(
                f"must be null, {', '.join(map(repr, ALPHA_RULES))} or a list of non-negative class "
                f"weights, got {shown!r}"
            )
        return weights


class OptimConfig(ConfigModel):
    section: ClassVar[str] = "optim"

    optimizer: Annotated[Str, one_of(OPTIMIZERS)] = "adamw"
    lr: Annotated[Number, interval(0.0, 10.0, lo_open=True)] = 1e-3
    weight_decay: Annotated[Number, interval(0.0, 1.0)] = 1e-4
    momentum: Annotated[Number, interval(0.0, 1.0, hi_open=True)] = 0.9  #: SGD (Nesterov) only
    #: LR of the unfrozen backbone = lr * this; the head uses lr
    backbone_lr_mult: Annotated[Number, interval(0.0, 100.0)] = 0.1
    schedule: Annotated[Str, one_of(SCHEDULES)] = "cosine"
    warmup_epochs: Annotated[Number, interval(0.0, 1000.0)] = 0.0
    #: weight averaging (trainer/ema.py): EMA decay per step, 0 = off; the better of raw and averaged weights on
    #: validation is kept each epoch
    ema_decay: Annotated[Number, interval(0.0, 1.0, hi_open=True)] = 0.0


class TrainConfig(ConfigModel):
    """One training run with fixed hyperparameters."""

    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    epochs: Positive = 10
    batch_size: Positive = 32
    seed: Int = 0
    #: metric that selects the best epoch/checkpoint (trainer.metric)
    metric: Annotated[Str, one_of(METRIC_NAMES)] = DEFAULT_METRIC
    workers: Positive = 1  #: Ray Train DDP workers (1 = in-process)
    use_gpu: Bool = False
    amp: Bool = True  #: mixed precision (GPU only)
    channels_last: Bool = True  #: NHWC memory format for training (GPU and CPU)
    threads: Count = 0  #: torch intra-op threads per worker (0 = leave default)
    out: Str = ""  #: run directory (checkpoints, metrics, plots)
    robustness: Bool = True  #: after training, evaluate on downsampled / cropped+brightened test images
    progress: Bool = True  #: progress bar per epoch

    @property
    def mode(self) -> str:
        return get_metric(self.metric).mode

    # -- (de)serialisation -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-able nested dict (tuples as lists); ``from_dict`` reads it back."""
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> TrainConfig:
        d = {} if d is None else d
        if not isinstance(d, Mapping):
            raise ConfigError(f"config section <root> must be a mapping, got {d!r}")
        with user_errors(cls):
            return cls.model_validate(dict(d))

    @classmethod
    def from_yaml(cls, path: str | Path) -> TrainConfig:
        return cls.from_dict(load_yaml_mapping(path, "config"))

    def replace(self, overrides: Mapping[str, Any]) -> TrainConfig:
        """A copy with dotted-key overrides applied (``{"optim.lr": 1e-3}``), validated."""
        d = self.to_dict()
        for key, value in overrides.items():
            _set_dotted(d, key, value)
        return TrainConfig.from_dict(d)


# -- files and overrides ------------------------------------------------------------------------------------
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
            raise ConfigError(
                f"unknown config section {'.'.join(parts[: i + 1])!r} in override {key!r}; "
                f"sections: {sorted(k for k, v in d.items() if isinstance(v, dict))}"
            )
        cur = cur[p]
    if parts[-1] not in cur:
        raise ConfigError(f"unknown config key {key!r}; allowed here: {sorted(cur)}")
    cur[parts[-1]] = value
