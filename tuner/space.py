"""Search space from YAML -> an Optuna define-by-run function (suggestions only, no work inside).

Each parameter names the :class:`trainer.config.TrainConfig` key it sets; ``when`` makes it
conditional (e.g. hidden widths only for the MLP head). Backbones whose pretrained weights
cannot be resolved are removed from the space with a printed reason.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgetune.errors import ConfigError
from trainer.config import load_yaml_mapping

DEFAULT_SPACE = Path(__file__).with_name("default_space.yaml")
TYPES = ("categorical", "float", "int")


#: Input sizes searched with a target device when the space has no ``img`` parameter.
DEVICE_IMG_CHOICES = (128, 160, 192, 224)


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
            raise ConfigError(f"search space parameter {self.name!r} needs exactly one of 'key' (the TrainConfig key "
                              f"it sets) or 'sets' (choice -> overrides)")
        if self.sets and (self.type != "categorical" or set(self.sets) != set(self.choices)):
            raise ConfigError(f"search space parameter {self.name!r}: 'sets' needs a categorical with one entry per "
                              f"choice {self.choices}, got {sorted(map(str, self.sets))}")
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
            lines.insert(0, f"backbones left out (no pretrained weights found): {', '.join(self.missing_weights)}; "
                            "put their files into $EDGETUNE_WEIGHTS_DIR or the torch hub cache, or set "
                            "model.weights (--set model.weights=PATH|none); --verbose lists every place looked")
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
        device supports join the search (a precision sets no training key; it is the deployed precision)."""
        if not img_fixed and "img" not in self.params:
            self.params["img"] = Param(name="img", type="categorical", key="model.img_size",
                                       choices=list(DEVICE_IMG_CHOICES))
        if len(precisions) > 1 and "precision" not in self.params:
            self.params["precision"] = Param(name="precision", type="categorical", choices=list(precisions),
                                             key="", sets={p: {} for p in precisions})

    def points_to_evaluate(self) -> list[dict[str, Any]]:
        return [dict(s["params"]) for s in self.seeds]

    @property
    def backbones(self) -> list[str]:
        p = self.params.get("backbone")
        return list(p.choices) if p else []


def load_space(path: str | Path | None = None, backbones: list[str] | None = None,  # noqa: C901
               weights_check: Callable[[str], tuple[bool, str]] | None = None,
               layer_count: Callable[[str], int] | None = None,
               fixed: dict[str, Any] | None = None) -> SearchSpace:
    """Load a space YAML; ``backbones`` overrides the backbone choices; unavailable weights are dropped;
    parameters named in ``fixed`` (e.g. ``{"img": 96}`` from ``--img``) are not searched (the base config sets
    them) and disappear from the seeds."""
    p = Path(path) if path else DEFAULT_SPACE
    doc = load_yaml_mapping(p, "search space")
    unknown = set(doc) - {"params", "seeds"}
    if unknown:
        raise ConfigError(f"search space {p}: unknown top-level key(s) {sorted(unknown)}; allowed: params, seeds")
    params: dict[str, Param] = {}
    for name, spec in (doc.get("params") or {}).items():
        if not isinstance(spec, dict):
            raise ConfigError(f"search space {p}: parameter {name!r} must be a mapping")
        allowed = {"type", "key", "sets", "choices", "low", "high", "log", "when"}
        bad = set(spec) - allowed
        if bad:
            raise ConfigError(f"search space parameter {name!r}: unknown field(s) {sorted(bad)}; allowed: {sorted(allowed)}")
        if "type" not in spec or ("key" not in spec and "sets" not in spec):
            raise ConfigError(f"search space parameter {name!r} needs 'type' and 'key' (or 'sets')")
        when = {k: (v if isinstance(v, list) else [v]) for k, v in (spec.get("when") or {}).items()}
        sets = spec.get("sets") or {}
        if not isinstance(sets, dict) or not all(isinstance(v, dict) for v in sets.values()):
            raise ConfigError(f"search space parameter {name!r}: 'sets' must map each choice to a mapping of overrides")
        params[name] = Param(name=name, type=spec["type"], key=spec.get("key", ""), sets=sets,
                             choices=list(spec.get("choices") or []),
                             low=float(spec.get("low", 0.0)), high=float(spec.get("high", 1.0)),
                             log=bool(spec.get("log", False)), when=when)
    for prm in params.values():
        for dep in prm.when:
            if dep not in params:
                raise ConfigError(f"search space parameter {prm.name!r} depends on unknown parameter {dep!r}")
    for name in fixed or {}:
        if name in params:
            del params[name]
            for prm in params.values():
                prm.when.pop(name, None)
    space = SearchSpace(params=params, seeds=list(doc.get("seeds") or []))
    if backbones:
        if "backbone" not in params:
            raise ConfigError("the search space has no 'backbone' parameter to restrict")
        params["backbone"].choices = list(backbones)
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
            raise ConfigError("no backbone in the search space has resolvable pretrained weights:\n  "
                              + "\n  ".join(space.dropped))
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
