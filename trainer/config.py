"""Typed, validated, frozen configuration of one training run (pydantic models).

``TrainConfig.from_dict`` accepts nested mappings (YAML files) and rejects unknown keys,
naming the allowed ones; ``parse_override`` reads ``section.key=value`` strings (``--set``);
``cfg.replace({...})`` returns a new, validated config (configs are frozen).
Every error is a :class:`edgetune.errors.ConfigError` that names the dotted key, says what was wrong and
what is allowed (pydantic's ``ValidationError`` is translated by :func:`_explain`).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, ClassVar, Union

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError

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
CACHE_IMAGES = ("auto", "yes", "no")
ACTIVATION_CACHE = ("auto", "off")
ACTIVATION_DTYPES = ("auto", "float32")
ALPHA_RULES = ("auto", "sqrt")


# -- value types: YAML scalars are coerced as before (whole floats to int, numeric strings to float, numbers to
# str); bools are never numbers, numbers never bools. A failed check raises _bad(...), worded without the key,
# which _explain puts in front. --------------------------------------------------------------------------------
def _bad(what: str) -> PydanticCustomError:
    return PydanticCustomError("edgetune_config", "{what}", {"what": what})


def _number(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise _bad(f"must be a number, got {v!r}")
    try:
        f = float(v)
    except ValueError:
        raise _bad(f"must be a number, got {v!r}") from None
    if not math.isfinite(f):
        raise _bad(f"must be a number, got {f!r}")
    return f


def _integer(v: Any) -> int:
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad(f"must be an integer, got {v!r}")
    return v


def _boolean(v: Any) -> bool:
    if not isinstance(v, bool):
        raise _bad(f"must be true or false, got {v!r}")
    return v


def _string(v: Any) -> str:
    if isinstance(v, bool) or not isinstance(v, (str, int, float)):
        raise _bad(f"must be a string, got {v!r}")
    return str(v)


def _items(v: Any, item: Callable[[Any], Any]) -> tuple[Any, ...]:
    if not isinstance(v, (list, tuple)):
        raise _bad(f"must be a list, got {v!r}")
    return tuple(item(x) for x in v)


def _one_of(allowed: tuple[str, ...]) -> AfterValidator:
    """The check of a choice field against its (single) choice list."""
    def check(v: str) -> str:
        if v not in allowed:
            raise _bad(f"must be one of {list(allowed)}, got {v!r}")
        return v
    return AfterValidator(check)


def _interval(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> Any:
    """``Field`` bounds of a number; _explain words a violation as ``must be in [lo, hi], got v``."""
    return Field(gt=lo if lo_open else None, ge=None if lo_open else lo,
                 lt=hi if hi_open else None, le=None if hi_open else hi)


Number = Annotated[float, BeforeValidator(_number)]
Int = Annotated[int, BeforeValidator(_integer)]
Bool = Annotated[bool, BeforeValidator(_boolean)]
Str = Annotated[str, BeforeValidator(_string)]
Count = Annotated[Int, Field(ge=0)]  #: an integer >= 0
Positive = Annotated[Int, Field(ge=1)]  #: an integer >= 1


_state = threading.local()


@contextmanager
def _user_errors(root: type[_Config]) -> Iterator[None]:
    """Outermost validation only: pydantic's ValidationError -> ConfigError (nested sections pass theirs up, so
    pydantic reports them with their full location)."""
    if getattr(_state, "active", False):
        yield
        return
    _state.active = True
    try:
        yield
    except ValidationError as e:
        raise ConfigError(_explain(e, root)) from None
    finally:
        _state.active = False


class _Config(BaseModel):
    """Frozen; unknown keys are errors; invalid values raise ConfigError, also on direct construction."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    section: ClassVar[str] = ""  #: dotted prefix of this model's keys in TrainConfig ("" = the top level)

    def __init__(self, **data: Any) -> None:
        with _user_errors(type(self)):
            super().__init__(**data)


class DataConfig(_Config):
    """Where the images come from and how they are split, expanded and augmented."""

    section: ClassVar[str] = "data"

    dataset: Str = "textures"  #: built-in name (elpv, textures) or a path to an ImageFolder tree / CSV manifest
    cache_dir: Str = ""  #: where built-in datasets are prepared; "" = $EDGETUNE_CACHE or ~/.cache/edgetune
    #: elpv only: defect4 (0, 1/3, 2/3, 1), binary (defective or not), type (mono/poly)
    elpv_task: Annotated[Str, _one_of(ELPV_TASKS)] = "defect4"
    split: tuple[float, float, float] = (0.7, 0.15, 0.15)  #: train/val/test ratios
    split_seed: Int = 0
    strict: Bool = False  #: fail on corrupt images instead of skipping them
    #: offline expansion of the train split: hflip, vflip, rot90, affine
    expand: tuple[Annotated[Str, _one_of(EXPANSIONS)], ...] = ()
    slice_grid: tuple[int, int] = (1, 1)  #: cut every train/val/test image into rows x cols tiles (after splitting)
    augment: Annotated[Str, _one_of(AUG_PRESETS)] = "none"  #: online augmentation preset
    augment_strength: Annotated[Number, _interval(0.0, 2.0)] = 1.0
    #: keep decoded, resized images in memory: auto, yes, no
    cache_images: Annotated[Str, _one_of(CACHE_IMAGES)] = "auto"
    max_images: Count = 0  #: use at most this many images (stratified; 0 = all) — for smoke tests
    loader_workers: Count = 0  #: DataLoader worker processes (0 = in the training process)
    #: uniform (each image once per epoch) or balanced (classes drawn equally often)
    sampler: Annotated[Str, _one_of(SAMPLERS)] = "uniform"
    #: auto: frozen-prefix activations cached when the augmentation allows; off
    activation_cache: Annotated[Str, _one_of(ACTIVATION_CACHE)] = "auto"
    activation_cache_mb: Count = 2048  #: in-memory bound of the activation cache per process (MiB)
    #: auto: float16 where a parity check allows, else float32; float32
    activation_dtype: Annotated[Str, _one_of(ACTIVATION_DTYPES)] = "auto"

    @field_validator("dataset", mode="after")
    @classmethod
    def _dataset_named(cls, v: str) -> str:
        if not v:
            raise _bad(f"must be a built-in name ({', '.join(BUILTINS)}) or a path")
        return v

    @field_validator("split", mode="before")
    @classmethod
    def _split_ratios(cls, v: Any) -> tuple[float, ...]:
        r = _items(v, _number)
        if len(r) != 3 or any(x < 0 for x in r):
            raise _bad(f"must be three non-negative ratios (train, val, test), got {r!r}")
        if abs(sum(r) - 1.0) > 1e-6 or min(r) <= 0:
            raise _bad(f"ratios must be > 0 and sum to 1, got {r!r}")
        return r

    @field_validator("expand", mode="before")
    @classmethod
    def _expand_list(cls, v: Any) -> tuple[Any, ...]:
        return _items(v, lambda x: x)

    @field_validator("slice_grid", mode="before")
    @classmethod
    def _grid(cls, v: Any) -> tuple[int, ...]:
        g = _items(v, _integer)
        if len(g) != 2 or any(not 1 <= x <= 16 for x in g):
            raise _bad(f"must be two integers in [1, 16] (rows, cols), got {g!r}")
        return g


class ModelConfig(_Config):
    """Backbone, weights, freezing and head."""

    section: ClassVar[str] = "model"

    backbone: Str = "efficientnet_lite0"
    weights: Str = "imagenet"  #: imagenet (resolved offline, error if missing), none (from scratch), or a file/dir path
    init: Str = ""  #: earlier edgetune run dir or checkpoint: start the backbone from it (source-domain pre-training)
    freeze: Number = 0.0  #: fraction in [0, 1] of parameterised backbone layers frozen (forward order), or a count > 1
    head: Annotated[Str, _one_of(HEADS)] = "linear"
    head_hidden: tuple[int, int] = (512, 256)  #: widths of FC1, FC2 of the mlp head
    dropout: Annotated[Number, _interval(0.0, 1.0, hi_open=True)] = 0.0
    img_size: Int = 0  #: network input size; 0 = the backbone's default
    #: BatchNorm statistics at evaluation/export: recompute (on training images before every evaluation),
    #: momentum (a momentum suited to the run's steps), keep (as the weights come)
    bn_stats: Annotated[Str, _one_of(BN_STATS)] = "recompute"
    bn_images: Count = 512  #: training images used to recompute BatchNorm statistics (0 = all)

    @field_validator("backbone", mode="after")
    @classmethod
    def _backbone_named(cls, v: str) -> str:
        if not v:
            raise _bad("must be a backbone name (see `python -m trainer --list-backbones`)")
        return v

    @field_validator("freeze", mode="after")
    @classmethod
    def _fraction_or_count(cls, v: float) -> float:
        if v < 0:
            raise _bad(f"must be a fraction in [0, 1] or a layer count >= 2, got {v!r}")
        if v > 1 and not v.is_integer():
            raise _bad(f"above 1 is a layer count and must be whole, got {v!r}")
        return v

    @field_validator("head_hidden", mode="before")
    @classmethod
    def _two_widths(cls, v: Any) -> tuple[int, ...]:
        w = _items(v, _integer)
        if len(w) != 2 or any(x < 1 for x in w):
            raise _bad(f"must be two positive integers, got {w!r}")
        return w

    @field_validator("img_size", mode="after")
    @classmethod
    def _size(cls, v: int) -> int:
        if v != 0 and not 32 <= v <= 1024:
            raise _bad(f"must be 0 (backbone default) or in [32, 1024], got {v!r}")
        return v


class LossConfig(_Config):
    """Focal loss (γ=0 and no α is plain cross-entropy)."""

    section: ClassVar[str] = "loss"

    gamma: Annotated[Number, _interval(0.0, 10.0)] = 0.0
    #: None, "auto" (inverse class frequency), "sqrt" (inverse square root of it) or one weight per class
    alpha: Union[str, tuple[float, ...], None] = None
    label_smoothing: Annotated[Number, _interval(0.0, 1.0, hi_open=True)] = 0.0

    @field_validator("alpha", mode="before")
    @classmethod
    def _alpha_rule_or_weights(cls, v: Any) -> Any:
        if v is None or v in ALPHA_RULES:
            return v
        weights = _items(v, _number) if isinstance(v, (list, tuple)) else None
        if weights is None or any(a < 0 for a in weights):
            shown = weights if weights is not None else (_string(v) if isinstance(v, (int, float)) else v)
            raise _bad(f"must be null, {', '.join(map(repr, ALPHA_RULES))} or a list of non-negative class "
                       f"weights, got {shown!r}")
        return weights


class OptimConfig(_Config):
    section: ClassVar[str] = "optim"

    optimizer: Annotated[Str, _one_of(OPTIMIZERS)] = "adamw"
    lr: Annotated[Number, _interval(0.0, 10.0, lo_open=True)] = 1e-3
    weight_decay: Annotated[Number, _interval(0.0, 1.0)] = 1e-4
    momentum: Annotated[Number, _interval(0.0, 1.0, hi_open=True)] = 0.9  #: SGD (Nesterov) only
    #: LR of the unfrozen backbone = lr * this; the head uses lr
    backbone_lr_mult: Annotated[Number, _interval(0.0, 100.0)] = 0.1
    schedule: Annotated[Str, _one_of(SCHEDULES)] = "cosine"
    warmup_epochs: Annotated[Number, _interval(0.0, 1000.0)] = 0.0


class TrainConfig(_Config):
    """One training run with fixed hyperparameters."""

    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    epochs: Positive = 10
    batch_size: Positive = 32
    seed: Int = 0
    #: metric that selects the best epoch/checkpoint (trainer.metric)
    metric: Annotated[Str, _one_of(METRIC_NAMES)] = DEFAULT_METRIC
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
        with _user_errors(cls):
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


# -- pydantic's errors, worded as edgetune's ------------------------------------------------------------------
_BOUNDS = ("ge", "gt", "le", "lt")  #: the attributes of the bound objects pydantic keeps in FieldInfo.metadata
_RANGE_ERRORS = {"greater_than_equal", "greater_than", "less_than_equal", "less_than"}
_NOT_A_MAPPING = {"model_type", "model_attributes_type", "dict_type"}


def _explain(e: ValidationError, root: type[_Config]) -> str:
    """One message per problem, joined by "; ": unknown keys grouped per section (with the allowed ones),
    then each bad value with its dotted key."""
    unknown: dict[tuple[Any, ...], list[str]] = {}
    lines: list[str] = []
    for err in e.errors():
        loc = tuple(err["loc"])
        if err["type"] == "extra_forbidden":
            unknown.setdefault(loc[:-1], []).append(str(loc[-1]))
        else:
            lines.append(_explain_one(err, loc, root))
    for where, keys in reversed(unknown.items()):
        prefix = _dotted(root, where)
        model = _model_at(root, where)
        lines.insert(0, f"unknown config key(s) {sorted(f'{prefix}.{k}' if prefix else k for k in keys)}; "
                        f"allowed in {prefix or 'the top level'}: {sorted(model.model_fields)}")
    return "; ".join(dict.fromkeys(lines))


def _explain_one(err: Any, loc: tuple[Any, ...], root: type[_Config]) -> str:
    name = _dotted(root, loc)
    got = err.get("input")
    if err["type"] == "edgetune_config":
        return f"{name} {err['msg']}"
    if err["type"] in _NOT_A_MAPPING:
        return f"config section {name or '<root>'} must be a mapping, got {got!r}"
    if err["type"] in _RANGE_ERRORS:
        field = _model_at(root, loc[:-1]).model_fields[str(loc[-1])]
        b = {k: getattr(m, k) for m in field.metadata for k in _BOUNDS if getattr(m, k, None) is not None}
        if field.annotation is int and set(b) == {"ge"}:
            return f"{name} must be an integer >= {b['ge']}, got {got!r}"
        lo, hi = b.get("ge", b.get("gt")), b.get("le", b.get("lt"))
        return f"{name} must be in {'(' if 'gt' in b else '['}{lo}, {hi}{')' if 'lt' in b else ']'}, got {got!r}"
    return f"{name}: {err['msg']}, got {got!r}"


def _dotted(root: type[_Config], loc: tuple[Any, ...]) -> str:
    """("model", "head") -> "model.head"; an item of a list field -> "data.expand item"."""
    parts = [root.section] if root.section else []
    parts += [str(p) for p in loc if isinstance(p, str)]
    return ".".join(parts) + (" item" if loc and not isinstance(loc[-1], str) else "")


def _model_at(root: type[_Config], loc: tuple[Any, ...]) -> type[_Config]:
    model = root
    for p in loc:
        ann = model.model_fields[str(p)].annotation
        if not (isinstance(ann, type) and issubclass(ann, _Config)):
            break
        model = ann
    return model


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
            raise ConfigError(f"unknown config section {'.'.join(parts[: i + 1])!r} in override {key!r}; "
                              f"sections: {sorted(k for k, v in d.items() if isinstance(v, dict))}")
        cur = cur[p]
    if parts[-1] not in cur:
        raise ConfigError(f"unknown config key {key!r}; allowed here: {sorted(cur)}")
    cur[parts[-1]] = value

