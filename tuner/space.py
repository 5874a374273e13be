"""Search space from YAML -> an Optuna define-by-run function (suggestions only, no work inside).

Each parameter names the :class:`trainer.config.TrainConfig` key it sets; ``when`` makes it
conditional (e.g. hidden widths only for the MLP head). Backbones whose pretrained weights
cannot be resolved are removed from the space with a printed reason.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from edgetune.errors import ConfigError
from trainer.config import TrainConfig, load_yaml_mapping

DEFAULT_SPACE = Path(__file__).with_name("default_space.yaml")
TYPES = ("categorical", "float", "int")


def device_img_choices() -> list[int]:
    """Input sizes searched with a target device when the space has no ``img`` parameter: the default space's
    (one definition, ``default_space.yaml``)."""
    return list(parse_space_doc(load_yaml_mapping(DEFAULT_SPACE, "search space"), DEFAULT_SPACE).params["img"].choices)


def build_trial_config(base: TrainConfig, overrides: dict[str, Any]) -> TrainConfig:
    """A trial's TrainConfig: the study's base config with a sampled configuration's overrides (ConfigError naming
    an unknown key and the allowed ones)."""
    return base.replace(overrides)


def flatten_params(config: dict[str, Any]) -> dict[str, Any]:
    """Ray may nest keys containing '/'; our parameter names are flat."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        if isinstance(v, dict):
            for k2, v2 in flatten_params(v).items():
                out[f"{k}/{k2}"] = v2
        else:
            out[k] = v
    return out


@dataclass
class Param:
    name: str
    type: str
    key: str
    choices: list[Any] = field(default_factory=list)
    low: float = 0.0
    high: float = 1.0
    log: bool = False
    when: dict[str, list[Any]] = field(default_factory=dict)
    #: categorical only, instead of ``key``: the overrides each choice sets (e.g. class balancing by sampler or α)
    sets: dict[Any, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.type not in TYPES:
            raise ConfigError(f"search space parameter {self.name!r}: type must be one of {TYPES}, got {self.type!r}")
        if bool(self.key) == bool(self.sets):
            raise ConfigError(
                f"search space parameter {self.name!r} needs exactly one of 'key' (the TrainConfig key "
                f"it sets) or 'sets' (choice -> overrides)"
            )
        if self.sets and (self.type != "categorical" or set(self.sets) != set(self.choices)):
            raise ConfigError(
                f"search space parameter {self.name!r}: 'sets' needs a categorical with one entry per "
                f"choice {self.choices}, got {sorted(map(str, self.sets))}"
            )
        if self.type == "categorical" and not self.choices:
            raise ConfigError(f"search space parameter {self.name!r}: categorical needs a non-empty 'choices' list")
        if self.type != "categorical":
            if not self.low < self.high:
                raise ConfigError(f"search space parameter {self.name!r}: need low < high, got {self.low}, {self.high}")
            if self.log and self.low <= 0:
                raise ConfigError(f"search space parameter {self.name!r}: log scale needs low > 0, got {self.low}")

    def contains(self, v: Any) -> bool:
        if self.type == "categorical":
            return v in self.choices
        return isinstance(v, (int, float)) and self.low <= v <= self.high


@dataclass
class SearchSpace:
    params: dict[str, Param]
    seeds: list[dict[str, Any]] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)  #: human-readable reasons for removed choices/seeds
    #: backbones left out for missing pretrained weights -> the full reason (every place looked)
    missing_weights: dict[str, str] = field(default_factory=dict)

    def dropped_report(self, verbose: bool = False, explicit: bool = False) -> list[str]:
        """Lines to print about what was left out: one summary line for the backbones without weights (which,
        and how to provide them); the per-backbone detail (every place looked) only when ``verbose`` or when the
        user named the backbones explicitly (``--backbones``)."""
        detail = verbose or explicit
        lines = [r for r in self.dropped if detail or not r.startswith("backbone ")]
        if self.missing_weights and not detail:
            lines.insert(
                0,
                f"backbones left out (no pretrained weights found): {', '.join(self.missing_weights)}; "
                "put their files into $EDGETUNE_WEIGHTS_DIR or the torch hub cache, or set "
                "model.weights (--set model.weights=PATH|none); --verbose lists every place looked",
            )
        return lines

    # -- Optuna define-by-run ------------------------------------------------------------
    def define_by_run(self, trial: Any) -> None:
        values: dict[str, Any] = {}
        for p in self.params.values():
            if p.when and not all(values.get(k) in allowed for k, allowed in p.when.items()):
                continue
            if p.type == "categorical":
                values[p.name] = trial.suggest_categorical(p.name, p.choices)
            elif p.type == "float":
                values[p.name] = trial.suggest_float(p.name, p.low, p.high, log=p.log)
            else:
                values[p.name] = trial.suggest_int(p.name, int(p.low), int(p.high), log=p.log)

    def to_overrides(self, sampled: dict[str, Any]) -> dict[str, Any]:
        """Sampled parameter values -> TrainConfig dotted overrides."""
        out: dict[str, Any] = {}
        for name, v in sampled.items():
            if name not in self.params:
                raise ConfigError(f"sampled parameter {name!r} is not in the search space {sorted(self.params)}")
            prm = self.params[name]
            if prm.sets:
                out.update(prm.sets[v])
                continue
            key = prm.key
            if key == "model.head_hidden" and isinstance(v, str):
                v = [int(x) for x in v.split("x")]
            elif key == "loss.alpha" and v in ("none", None):
                v = None
            out[key] = v
        return out

    def add_device_params(self, precisions: list[str], img_fixed: bool = False) -> None:
        """With a target device (``--target``), latency is an objective: the input size and the precisions the
        device supports join the search (a precision sets no training key; it is the deployed precision; one
        choice is still a parameter, so that every trial and the hand-off name the precision it was timed at)."""
        if not img_fixed and "img" not in self.params:
            self.params["img"] = Param(
                name="img", type="categorical", key="model.img_size", choices=device_img_choices()
            )
        if precisions and "precision" not in self.params:
            self.params["precision"] = Param(
                name="precision", type="categorical", choices=list(precisions), key="", sets={p: {} for p in precisions}
            )

    def check_keys(self, base: TrainConfig) -> None:
        """Every key the space can set applies to ``base``: each parameter's value (each choice; a range's ends) and
        each override a ``sets:`` choice sets is applied to it once, so that a key typo (``model.dropuot``) or a
        value the config refuses fails when the space is loaded, before any trial (ConfigError naming the
        parameter, the key and the allowed ones)."""
        for prm in self.params.values():
            values = prm.choices if prm.type == "categorical" else [prm.low, prm.high]
            if prm.type == "int":
                values = [int(v) for v in values]
            for v in values:
                over = self.to_overrides({prm.name: v})
                try:
                    base.replace(over)
                except ConfigError as e:
                    what = f"sets {over}" if prm.sets else f"key {prm.key!r} = {over.get(prm.key, v)!r}"
                    raise ConfigError(f"search space parameter {prm.name!r} ({what}): {e}") from None

    def points_to_evaluate(self) -> list[dict[str, Any]]:
        return [dict(s["params"]) for s in self.seeds]

    @property
    def backbones(self) -> list[str]:
        p = self.params.get("backbone")
        return list(p.choices) if p else []


# -- the YAML document: its shape (keys, field types) is validated by these models; Param checks the values ----------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _null_is_default(cls, v: Any, info: Any) -> Any:
        """``key:`` with nothing after it (YAML null) means the default."""
        f = cls.model_fields[info.field_name]
        if v is None and not f.is_required():
            return f.get_default(call_default_factory=True)
        return v


class ParamSpec(_Strict):
    """One entry of ``params:`` as written (frozen); :meth:`to_param` makes the runtime :class:`Param`, which
    checks the values against each other (type, ranges, ``sets`` against ``choices``). Each field's description
    is the error text for a value of the wrong type."""

    type: str = Field(description=f"must be one of {TYPES}")
    key: str = Field("", description="must be the TrainConfig dotted key it sets (a string)")
    sets: dict[Any, dict[str, Any]] = Field(
        default_factory=dict, description="must map each choice to a mapping of overrides"
    )
    choices: list[Any] = Field(default_factory=list, description="must be a list of values")
    low: float = Field(0.0, description="must be a number")
    high: float = Field(1.0, description="must be a number")
    log: bool = Field(False, description="must be true or false")
    when: dict[str, list[Any]] = Field(
        default_factory=dict, description="must map parameter names to a value or a list of values"
    )

    @model_validator(mode="before")
    @classmethod
    def _needs_type_and_key(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and ("type" not in data or ("key" not in data and "sets" not in data)):
            raise PydanticCustomError("space_required", "needs 'type' and 'key' (or 'sets')")
        return data

    @field_validator("when", mode="before")
    @classmethod
    def _one_value_is_a_list(cls, v: Any) -> Any:
        if isinstance(v, Mapping):
            return {k: (x if isinstance(x, list) else [x]) for k, x in v.items()}
        return v

    def to_param(self, name: str) -> Param:
        return Param(
            name=name,
            type=self.type,
            key=self.key,
            sets={k: dict(v) for k, v in self.sets.items()},
            choices=list(self.choices),
            low=self.low,
            high=self.high,
            log=self.log,
            when={k: list(v) for k, v in self.when.items()},
        )


class SeedSpec(_Strict):
    """One entry of ``seeds:``: a named point tried first (parameters not given are sampled)."""

    name: str = Field("?", description="must be a string")
    params: dict[str, Any] = Field(default_factory=dict, description="must map parameter names to values")


class SpaceDoc(_Strict):
    """A search space file: ``params`` (name -> :class:`ParamSpec`) and ``seeds``."""

    params: dict[str, ParamSpec] = Field(default_factory=dict, description="must map parameter names to their specs")
    seeds: list[SeedSpec] = Field(default_factory=list, description="must be a list of {name, params} entries")

    @model_validator(mode="after")
    def _conditions_name_parameters(self) -> SpaceDoc:
        for name, spec in self.params.items():
            for dep in spec.when:
                if dep not in self.params:
                    raise PydanticCustomError(
                        "space_unknown_dependency",
                        "search space parameter {name} depends on unknown parameter {dep}",
                        {"name": repr(name), "dep": repr(dep)},
                    )
        return self


def parse_space_doc(doc: Mapping[str, Any], source: str | Path) -> SpaceDoc:
    """The validated document, or a :class:`ConfigError` naming each bad parameter, field and what is allowed."""
    try:
        return SpaceDoc.model_validate(doc)
    except ValidationError as e:
        raise ConfigError("; ".join(_explain(e, doc, source))) from None


def _explain(e: ValidationError, doc: Mapping[str, Any], source: str | Path) -> list[str]:
    """One line per problem: unknown keys grouped per place, a value of the wrong type with its field's rule."""
    lines: list[str] = []
    unknown: dict[tuple[Any, ...], list[str]] = {}
    for err in e.errors():
        loc = tuple(err["loc"])
        if err["type"] == "extra_forbidden":
            unknown.setdefault(loc[:-1], []).append(str(loc[-1]))
            continue
        if err["type"] == "space_unknown_dependency":
            lines.append(err["msg"])
            continue
        entry, rest = (loc[:2], loc[2:]) if loc and loc[0] in ("params", "seeds") and len(loc) >= 2 else ((), loc)
        where = _where(entry, source)
        if not rest:  # the entry itself: not a mapping, or no type/key
            if err["type"] == "space_required":
                lines.append(f"{where} {err['msg']}")
            elif entry[0] == "params":
                lines.append(f"search space {source}: parameter {entry[1]!r} must be a mapping")
            else:
                lines.append(f"{where} must be a mapping, got {err['input']!r}")
            continue
        model = _MODELS[entry[0] if entry else ""]
        name = str(rest[0])
        rule = model.model_fields[name].description if name in model.model_fields else err["msg"]
        lines.append(f"{where}: {name!r} {rule}, got {_dig(doc, entry + rest[:1])!r}")
    for entry, keys in unknown.items():
        model = _MODELS[entry[0] if entry else ""]
        if not entry:
            lines.append(
                f"search space {source}: unknown top-level key(s) {sorted(keys)}; "
                f"allowed: {', '.join(model.model_fields)}"
            )
        else:
            lines.append(
                f"{_where(entry, source)}: unknown field(s) {sorted(keys)}; allowed: {sorted(model.model_fields)}"
            )
    return list(dict.fromkeys(lines))


_MODELS: dict[Any, type[BaseModel]] = {"": SpaceDoc, "params": ParamSpec, "seeds": SeedSpec}


def _where(entry: tuple[Any, ...], source: str | Path) -> str:
    if not entry:
        return f"search space {source}"
    if entry[0] == "params":
        return f"search space parameter {entry[1]!r}"
    return f"search space {source}: seed configuration {entry[1] + 1}"


def _dig(doc: Any, loc: tuple[Any, ...]) -> Any:
    for k in loc:
        try:
            doc = doc[k]
        except (KeyError, IndexError, TypeError):
            return None
    return doc


def load_space(
    path: str | Path | None = None,
    backbones: list[str] | None = None,
    weights_check: Callable[[str], tuple[bool, str]] | None = None,
    layer_count: Callable[[str], int] | None = None,
    fixed: dict[str, Any] | None = None,
    base: TrainConfig | None = None,
) -> SearchSpace:
    """Load a space YAML; ``backbones`` overrides the backbone choices; unavailable weights are dropped;
    parameters named in ``fixed`` (e.g. ``{"img": 96}`` from ``--img``) are not searched (the base config sets
    them) and disappear from the seeds. Every key the space sets is applied to ``base`` (default
    ``TrainConfig()``) once (:meth:`SearchSpace.check_keys`): a bad key fails here, naming it."""
    p = Path(path) if path else DEFAULT_SPACE
    doc = parse_space_doc(load_yaml_mapping(p, "search space"), p)
    params = {name: spec.to_param(name) for name, spec in doc.params.items()}
    for name in fixed or {}:
        if name in params:
            del params[name]
            for prm in params.values():
                prm.when.pop(name, None)
    space = SearchSpace(params=params, seeds=[s.model_dump() for s in doc.seeds])
    if backbones:
        if "backbone" not in params:
            raise ConfigError("the search space has no 'backbone' parameter to restrict")
        params["backbone"].choices = list(backbones)
    space.check_keys(base if base is not None else TrainConfig())
    if "backbone" in params and weights_check is not None:
        keep = []
        for b in params["backbone"].choices:
            ok, reason = weights_check(b)
            if ok:
                keep.append(b)
            else:
                space.dropped.append(f"backbone {b} left out: {reason}")
                space.missing_weights[b] = reason
        if not keep:
            raise ConfigError(
                "no backbone in the search space has resolvable pretrained weights:\n  " + "\n  ".join(space.dropped)
            )
        params["backbone"].choices = keep
    space.seeds = _usable_seeds(space, layer_count)
    return space


def _usable_seeds(space: SearchSpace, layer_count: Callable[[str], int] | None) -> list[dict[str, Any]]:
    seeds = []
    for s in space.seeds:
        name, pts = s.get("name", "?"), dict(s.get("params") or {})
        pts = {k: v for k, v in pts.items() if k in space.params}
        if "backbone" in pts and "backbone" in space.params and pts["backbone"] not in space.params["backbone"].choices:
            space.dropped.append(f"seed configuration '{name}' left out: backbone {pts['backbone']} not in the space")
            continue
        if "freeze" in pts and pts["freeze"] > 1 and layer_count is not None and "backbone" in pts:
            pts["freeze"] = min(1.0, pts["freeze"] / layer_count(pts["backbone"]))  # layer count -> fraction
        bad = [k for k, v in pts.items() if not space.params[k].contains(v)]
        if bad:
            space.dropped.append(f"seed configuration '{name}' left out: {bad} outside the space")
            continue
        seeds.append({"name": name, "params": pts})
    return seeds
