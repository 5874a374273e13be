"""The study summary: what a finished study hands on (``<out>/summary.json``), a typed, frozen object.

One writer (:func:`write_summary`, called once by :func:`tuner.run.run_study` when the study is over) and one reader
(:func:`read_summary`: the field loop, bench/, the tests, anything that looks at a run afterwards). The stages of a
study fill it in turn with :func:`dataclasses.replace` (the search's finish, the hand-off, the ledger); nothing
edits it in place. The file keeps the flat keys it has always had (``best_test_accuracy``, ``useful_fraction``…),
so earlier runs' summaries read back; ``schema`` says which layout wrote it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from edgetune.errors import EdgetuneError
from edgetune.fsutil import atomic_write_text

SUMMARY_FILE = "summary.json"
#: The layout :meth:`StudySummary.to_dict` writes (a file without the key is an earlier run's, the same layout).
SUMMARY_SCHEMA = 1


class SummaryError(EdgetuneError):
    """A summary.json that cannot be read: missing, not JSON, a newer layout, or a field of the wrong type."""


def _frozen(v: Any) -> Any:
    """Deeply read-only: mappings become MappingProxyType, lists tuples."""
    if isinstance(v, Mapping):
        return MappingProxyType({k: _frozen(x) for k, x in v.items()})
    if isinstance(v, (list, tuple)):
        return tuple(_frozen(x) for x in v)
    return v


def _plain(v: Any) -> Any:
    """The JSON-ready form of a :func:`_frozen` value."""
    if isinstance(v, Mapping):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    return v


@dataclass(frozen=True)
class FinalModel:
    """The study's final model and its one test evaluation (the ``best_*`` keys of summary.json)."""

    trial: int | str  #: the trial number, or "refit of #n" for a final fit
    ray_trial_id: str | None
    backbone: str | None
    value: float | None  #: the study metric on validation
    val_acc: float | None
    test_accuracy: float
    test_macro_f1: float
    checkpoint: str  #: ``<out>/best``
    test_images: int | None = None
    params: Mapping[str, Any] = field(default_factory=dict)  #: the configuration it was trained with

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", _frozen(self.params))

    _KEYS = (
        ("trial", "best_trial"),
        ("ray_trial_id", "best_ray_trial_id"),
        ("backbone", "best_backbone"),
        ("value", "best_value"),
        ("val_acc", "best_val_acc"),
        ("test_accuracy", "best_test_accuracy"),
        ("test_macro_f1", "best_test_macro_f1"),
        ("checkpoint", "best_checkpoint"),
        ("test_images", "test_images"),
        ("params", "best_params"),
    )

    def to_flat(self) -> dict[str, Any]:
        return {key: _plain(getattr(self, name)) for name, key in self._KEYS}

    @classmethod
    def from_flat(cls, d: Mapping[str, Any]) -> FinalModel | None:
        """The final model the flat keys describe; None when the study has none (no ``best_checkpoint``)."""
        if not d.get("best_checkpoint"):
            return None
        given: dict[str, Any] = {name: d[key] for name, key in cls._KEYS if key in d}
        return cls(**given)


@dataclass(frozen=True)
class StudySummary:
    """A finished study: its trials, its final model, post-hoc selection, latency, hand-off and budget ledger."""

    study: str
    storage: str
    metric: str
    out: str
    trials: int = 0
    states: Mapping[str, int] = field(default_factory=dict)  #: trials per state (COMPLETE, PRUNED, FAIL, RUNNING)
    final: FinalModel | None = None  #: None: the study produced no model
    refit: Mapping[str, Any] | None = None  #: :meth:`tuner.refit.RefitRun.to_dict`
    posthoc: Mapping[str, Any] | None = None  #: :meth:`tuner.posthoc.PosthocResult.describe`
    levers: Sequence[Mapping[str, Any]] = ()  #: what each final-fit step measured (bench/bench_search.py)
    pareto_front: Sequence[Mapping[str, Any]] = ()  #: multi-objective studies
    plots: Sequence[str] = ()
    leaderboard_md: str = ""
    probes: Sequence[Mapping[str, Any]] = ()
    latency: Mapping[str, Any] | None = None  #: the latency outputs (and, with a target, the hand-off's ``winner``)
    bundle: str | None = None  #: the exported bundle
    ray: Mapping[str, Any] = field(default_factory=dict)  #: mode, address, storage_path
    ledger: Mapping[str, Any] = field(default_factory=dict)  #: :meth:`tuner.ledger.LedgerSummary.to_dict`
    useful_fraction: float | None = None
    ledger_lines: Sequence[str] = ()
    wall_seconds: float | None = None
    time_budget_s: float | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.name != "final":
                object.__setattr__(self, f.name, _frozen(getattr(self, f.name)))

    def with_(self, **changes: Any) -> StudySummary:
        """A copy with ``changes`` (the next stage's part of the summary)."""
        return replace(self, **changes)

    def failure(self) -> str | None:
        """Why the study produced nothing to deploy (``python -m tuner`` exits 1 with it), or None."""
        if self.final is not None:
            return None
        counts = ", ".join(f"{n} {s}" for s, n in self.states.items() if n) or "none"
        refit = self.refit or {}
        why = refit.get("skipped") or refit.get("stop_reason")
        why = f"; no final fit: {why}" if why else ""
        return (
            f"study {self.study!r} produced no model: no trial finished with a checkpoint (trials: "
            f"{self.trials}, states: {counts}){why}; see the trial errors above and in "
            f"{self.out}/leaderboard.csv; a larger --time-budget or --trials may be needed"
        )

    def to_dict(self) -> dict[str, Any]:
        """The flat JSON layout of summary.json (``schema`` first; the final model's ``best_*`` keys inline)."""
        d: dict[str, Any] = {"schema": SUMMARY_SCHEMA}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "final":
                d.update(v.to_flat() if v is not None else {})
            elif v is not None:
                d[f.name] = _plain(v)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StudySummary:
        """The summary a summary.json dict describes (SummaryError naming what is wrong; unknown keys are ignored)."""
        if not isinstance(d, Mapping):
            raise SummaryError(f"a study summary must be a JSON object, got {type(d).__name__}")
        schema = d.get("schema", SUMMARY_SCHEMA)
        if schema != SUMMARY_SCHEMA:
            raise SummaryError(f"summary layout {schema!r} is not one this version reads ({SUMMARY_SCHEMA})")
        missing = [k for k in ("study", "storage", "metric", "out") if not isinstance(d.get(k), str)]
        if missing:
            raise SummaryError(f"summary lacks (or has a non-text) {', '.join(missing)}")
        wrong = [
            f"{k} ({type(d[k]).__name__}, expected {' or '.join(t.__name__ for t in types)})"
            for k, types in _TYPES.items()
            if d.get(k) is not None and not isinstance(d[k], types)
        ]
        if wrong:
            raise SummaryError(f"summary has fields of the wrong type: {', '.join(wrong)}")
        own = {f.name for f in fields(cls)} - {"final"}
        try:
            return cls(final=FinalModel.from_flat(d), **{k: v for k, v in d.items() if k in own})
        except TypeError as e:
            raise SummaryError(f"summary has a field missing or of the wrong type: {e}") from None


#: The JSON types of the summary's fields (and the final model's flat keys), checked by the reader.
_TYPES: dict[str, tuple[type, ...]] = {
    "trials": (int,),
    "states": (dict,),
    "refit": (dict,),
    "posthoc": (dict,),
    "levers": (list,),
    "pareto_front": (list,),
    "plots": (list,),
    "leaderboard_md": (str,),
    "probes": (list,),
    "latency": (dict,),
    "bundle": (str,),
    "ray": (dict,),
    "ledger": (dict,),
    "useful_fraction": (int, float),
    "ledger_lines": (list,),
    "wall_seconds": (int, float),
    "time_budget_s": (int, float),
    "best_trial": (int, str),
    "best_test_accuracy": (int, float),
    "best_test_macro_f1": (int, float),
    "best_checkpoint": (str,),
    "best_params": (dict,),
    "test_images": (int,),
}


def write_summary(summary: StudySummary, out: str | Path) -> Path:
    """``<out>/summary.json`` (atomically: a reader never sees half a file)."""
    path = Path(out) / SUMMARY_FILE
    atomic_write_text(path, json.dumps(summary.to_dict(), indent=2, default=str))
    return path


def read_summary(path: str | Path) -> StudySummary:
    """The summary of a study's output directory (or of the summary.json given)."""
    p = Path(path)
    if p.is_dir():
        p = p / SUMMARY_FILE
    try:
        d = json.loads(p.read_text())
    except FileNotFoundError:
        raise SummaryError(f"no study summary at {p} (a study writes it when it ends)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SummaryError(f"{p} cannot be read as a study summary: {e}") from None
    return StudySummary.from_dict(d)
