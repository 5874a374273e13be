"""What a trial leaves in the study: the result keys the searcher copies into its Optuna user attrs, typed.

One definition of the keys (:data:`RESULT_ATTRS`: a trial's last reported result key -> its attr name), one writer
(:func:`attrs_from_result`, called by the searcher's tell, :mod:`tuner.searcher`, which adds its own
``ray_trial_id``/``fail_reason``/``launched_at``) and one reader (:meth:`TrialRecord.of`: the leaderboard, the final
fit's choice, the latency tables, the budget ledger, bench/). A value of the wrong type is refused naming the trial
and the attr; attrs this version does not know are kept in ``extra``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol

from edgetune.errors import EdgetuneError
from trainer.metric import METRICS, get_metric
from tuner.device import LATENCY_MS

if TYPE_CHECKING:
    pass


#: A trial's result key -> the Optuna user attr it is kept as (the searcher copies these from its last result).
RESULT_ATTRS: Mapping[str, str] = MappingProxyType(
    {
        "params": "params",
        "size_mb": "size_mb",
        "train_seconds": "train_seconds",
        "images_per_s": "images_per_s",
        # every selectable metric: its last value, its running best and its value at the best epoch
        **{k: k for m in METRICS.values() for k in (m.name, m.best_key, f"{m.name}_at_best")},
        "best_epoch": "best_epoch",
        "stop_reason": "stop_reason",
        "data_path": "data_path",
        "data_path_reason": "data_path_reason",
        "freeze_cut": "freeze_cut",
        "freeze_fraction": "freeze_fraction",
        "act_cache_builds": "act_cache_builds",
        "act_cache_disk_hits": "act_cache_disk_hits",
        "act_cache_memory_hits": "act_cache_memory_hits",
        "act_cache_dtype": "act_cache_dtype",
        "act_cache_seconds": "act_cache_seconds",
        "setup_seconds": "setup_seconds",
        "started_at": "started_at",
        "first_batch_at": "first_batch_at",
        "epoch_seconds": "epoch_seconds",
        LATENCY_MS: LATENCY_MS,
        "latency_p90_ms": "latency_p90_ms",
        "latency_kind": "latency_kind",  # device (timed on the target) | estimate (the driver's node)
        "latency_node": "latency_node",
        "latency_signature": "latency_signature",
        "latency_key": "latency_key",
        "latency_wait_s": "latency_wait_s",
        "precision": "precision",
        "target": "target",
        "target_latency_ms": "target_latency_ms",
        "target_latency_p90_ms": "target_latency_p90_ms",
        "target_node": "target_node",
        "target_device": "target_device",
        "target_latency_status": "target_latency_status",
        "rejected_reason": "rejected_reason",
        "node_id": "node_id",
        "epoch": "epochs_trained",
        "epochs_planned": "epochs_planned",  # the fidelity it completed (fitted to the search deadline, or max_t)
        "weights": "weights",  # raw | ema: which weights its best epoch kept (trainer/ema.py)
        "trial_id": "ray_trial_id",
        "worker_node_ids": "worker_node_ids",  # DDP trials: the node of every rank
        "checkpoint_uri": "checkpoint_uri",  # DDP trials: the Train run's checkpoint
        "resume_restarted": "resume_restarted",  # why a resumed trial restarted from epoch 1 (a lost checkpoint)
    }
)
#: Attrs the searcher sets itself (not from a result).
SEARCHER_ATTRS = ("fail_reason", "launched_at", "ray_trial_name")
#: The metric attrs (``TrialRecord.metrics``).
METRIC_ATTRS = tuple(k for m in METRICS.values() for k in (m.name, m.best_key, f"{m.name}_at_best"))


log = logging.getLogger(__name__)


class TrialRecordError(EdgetuneError):
    """A trial attr of the wrong type (a storage written by something else, or edited by hand)."""


def attrs_from_result(result: Mapping[str, Any]) -> dict[str, Any]:
    """The user attrs a trial's last result gives (the one writer's mapping, :data:`RESULT_ATTRS`)."""
    return {name: result[k] for k, name in RESULT_ATTRS.items() if k in result}


def _attr(kind: type, attr: str | None = None) -> Any:
    return field(default=None, metadata={"kind": kind, "attr": attr})


@dataclass(frozen=True)
class TrialRecord:
    """One trial of a study, as the study keeps it (Optuna's state, params and times; the attrs, typed)."""

    number: int
    state: str  #: COMPLETE, PRUNED, FAIL, RUNNING, WAITING
    params: Mapping[str, Any]  #: the sampled configuration (Optuna's params)
    values: tuple[float, ...] | None = None
    started: float | None = None  #: unix time Optuna started it (Ray asked for it)
    completed: float | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)  #: :data:`METRIC_ATTRS` it reported
    model_params: int | None = _attr(int, "params")
    size_mb: float | None = _attr(float)
    train_seconds: float | None = _attr(float)
    images_per_s: float | None = _attr(float)
    best_epoch: int | None = _attr(int)
    stop_reason: str | None = _attr(str)
    data_path: str | None = _attr(str)
    data_path_reason: str | None = _attr(str)
    freeze_cut: int | None = _attr(int)
    freeze_fraction: float | None = _attr(float)
    act_cache_builds: int | None = _attr(int)
    act_cache_disk_hits: int | None = _attr(int)
    act_cache_memory_hits: int | None = _attr(int)
    act_cache_seconds: float | None = _attr(float)
    act_cache_dtype: str | None = _attr(str)
    setup_seconds: float | None = _attr(float)
    started_at: float | None = _attr(float)  #: unix time the trainer started (after waiting for a slot)
    first_batch_at: float | None = _attr(float)
    epoch_seconds: float | None = _attr(float)
    latency_ms: float | None = _attr(float, LATENCY_MS)
    latency_p90_ms: float | None = _attr(float)
    latency_kind: str | None = _attr(str)  #: device (timed on the target) | estimate (the driver's node)
    latency_node: str | None = _attr(str)
    latency_wait_s: float | None = _attr(float)
    latency_signature: str | None = _attr(str)
    latency_key: str | None = _attr(str)
    precision: str | None = _attr(str)
    target: str | None = _attr(str)
    target_node: str | None = _attr(str)
    target_latency_status: str | None = _attr(str)
    target_latency_ms: float | None = _attr(float)
    target_latency_p90_ms: float | None = _attr(float)
    target_device: str | None = _attr(str)  #: JSON of the device's identity
    rejected_reason: str | None = _attr(str)
    node_id: str | None = _attr(str)
    worker_node_ids: tuple[str, ...] | None = _attr(tuple)  #: DDP trials: the node of every rank
    epochs_trained: int | None = _attr(int)
    epochs_planned: int | None = _attr(int)
    weights: str | None = _attr(str)
    ray_trial_id: str | None = _attr(str)
    checkpoint_uri: str | None = _attr(str)
    resume_restarted: str | None = _attr(str)  #: why a resumed trial restarted from epoch 1 (a lost checkpoint)
    fail_reason: str | None = _attr(str)
    launched_at: float | None = _attr(float)
    ray_trial_name: str | None = _attr(str)
    extra: Mapping[str, Any] = field(default_factory=dict)  #: every other attr, as stored

    def __post_init__(self) -> None:
        for name in ("params", "metrics", "extra"):
            object.__setattr__(self, name, MappingProxyType(dict(getattr(self, name))))

    @classmethod
    def of(cls, trial: Any, strict: bool = True) -> TrialRecord:
        """The record of an Optuna trial (``FrozenTrial``). A wrong-typed attr raises TrialRecordError; with
        ``strict=False`` it is logged and kept, as stored, in ``extra`` (its typed field left None)."""
        attrs = dict(trial.user_attrs)
        bad: dict[str, Any] = {}

        def typed_attr(attr: str, kind: type) -> Any:
            value = attrs.pop(attr, None)
            try:
                return _typed(value, kind, trial.number, attr)
            except TrialRecordError as e:
                if strict:
                    raise
                log.warning(f"{e}; kept as stored, not used")
                bad[attr] = value
                return None

        typed = {
            f.name: typed_attr(f.metadata["attr"] or f.name, f.metadata["kind"])
            for f in fields(cls)
            if "kind" in f.metadata
        }
        metrics = {k: v for k in METRIC_ATTRS if (v := typed_attr(k, float)) is not None}
        attrs.update(bad)
        return cls(
            number=int(trial.number),
            state=trial.state.name,
            params=dict(trial.params),
            values=tuple(trial.values) if trial.values else None,
            started=trial.datetime_start.timestamp() if trial.datetime_start else None,
            completed=trial.datetime_complete.timestamp() if trial.datetime_complete else None,
            metrics=metrics,
            extra=attrs,
            **typed,
        )

    @property
    def finished(self) -> bool:
        """It trained to a result (COMPLETE, or PRUNED by ASHA or the latency constraint)."""
        return self.state in ("COMPLETE", "PRUNED")

    def best(self, metric: str) -> float | None:
        """Its best-epoch value of ``metric`` (= its Optuna value for a single-objective study)."""
        return self.metrics.get(get_metric(metric).best_key)

    def at_best(self, name: str) -> float | None:
        """A validation metric at its best epoch (by the study's metric), else its last value."""
        v = self.metrics.get(f"{name}_at_best")
        return v if v is not None else self.metrics.get(name)

    def device_name(self) -> str | None:
        """Short name of the target device it was timed on (GPU or CPU model)."""
        if not self.target_device:
            return None
        try:
            d = json.loads(self.target_device)
        except (TypeError, ValueError):
            return str(self.target_device)
        return str(d.get("gpu_name") or d.get("cpu") or "?") if isinstance(d, dict) else str(d)

    def fidelity(self) -> str | None:
        """What it trained: ``<epochs> ep`` (of its planned ``epochs_planned``), with the weights it kept."""
        if self.epochs_trained is None:
            return None
        done, planned, w = self.epochs_trained, self.epochs_planned, self.weights
        return f"{done}{f'/{planned}' if planned and planned != done else ''} ep" + (f", {w}" if w else "")


def _typed(value: Any, kind: type, number: int, attr: str) -> Any:
    if value is None:
        return None
    if kind is str:
        return value if isinstance(value, str) else json.dumps(value)
    if kind is tuple:
        if not isinstance(value, (list, tuple)):
            raise TrialRecordError(f"trial #{number}: attr {attr!r} is {value!r}, expected a list")
        return tuple(str(v) for v in value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TrialRecordError(f"trial #{number}: attr {attr!r} is {value!r}, expected a number")
    return kind(value)


def seed_record(params: Mapping[str, Any]) -> TrialRecord:
    """A seed point standing in for a trial when none finished (the final fit's choice): number -1, no
    measurements."""
    return TrialRecord(number=-1, state="SEED", params=params)


class HasTrials(Protocol):
    """An Optuna study, or anything that lists trials the same way (the storage-wide latency table's)."""

    def get_trials(self, deepcopy: bool = ...) -> Any: ...


def records(study: HasTrials) -> list[TrialRecord]:
    """Every trial of an Optuna study, in number order. A trial attr of the wrong type (a storage written by
    something else, or edited by hand) is logged and left out of the typed fields: one odd trial never stops a
    study's finish, its report or a resume."""
    return [TrialRecord.of(t, strict=False) for t in study.get_trials(deepcopy=False)]
