"""The train state a checkpoint keeps beside the weights (``train_state.pt``), so that a run restored by Ray continues
where it stopped: the optimiser and schedule state, the last epoch, the best so far and the run's accumulated facts.

One writer (:func:`trainer.loop._train_state`, saved by the checkpoint as :meth:`TrainState.to_dict`: ``torch.save``
with ``weights_only`` loading takes plain containers, not a class) and one reader (:func:`trainer.loop_setup._resume`,
through :meth:`TrainState.from_dict`). ``tests/test_train_state.py`` checks that the writer sets exactly these fields
and that what it saves reads back.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any

from edgetune.errors import EdgetuneError

#: Facts of a run that a resumed run measures again itself rather than taking from the checkpoint.
REMEASURED_STATIC = ("setup_seconds",)


class TrainStateError(EdgetuneError):
    """A train state that lacks a required field or has one of the wrong type."""


@dataclass(frozen=True)
class TrainState:
    """What ``train_state.pt`` holds (frozen: read once, applied once)."""

    optimizer: Mapping[str, Any]  #: ``optimizer.state_dict()``
    scheduler: Mapping[str, Any]  #: ``scheduler.state_dict()``
    epoch: int  #: the last finished epoch (the resumed run starts at epoch + 1)
    best: float | None = None  #: the best value of the run's metric so far (None before the first)
    best_epoch: int = 0
    at_best: Mapping[str, Any] = field(default_factory=dict)  #: the metrics of the best epoch
    train_seconds: float = 0.0  #: training seconds so far (summed over resumes)
    static: Mapping[str, Any] = field(default_factory=dict)  #: the run's accumulated facts (data path, cache hits…)

    def __post_init__(self) -> None:
        object.__setattr__(self, "at_best", MappingProxyType(dict(self.at_best)))
        object.__setattr__(self, "static", MappingProxyType(dict(self.static)))

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainState:
        """The state a checkpoint's ``train_state.pt`` dict describes (TrainStateError naming what is wrong; keys this
        version does not know are ignored, so that a newer writer's extra facts do not stop a resume)."""
        if not isinstance(d, Mapping):
            raise TrainStateError(f"train state must be a mapping, got {type(d).__name__}")
        missing = [k for k in ("optimizer", "scheduler", "epoch") if k not in d]
        if missing:
            raise TrainStateError(f"train state lacks {', '.join(missing)} (has: {', '.join(map(str, d))})")
        try:
            return cls(
                optimizer=d["optimizer"],
                scheduler=d["scheduler"],
                epoch=int(d["epoch"]),
                best=None if d.get("best") is None else float(d["best"]),
                best_epoch=int(d.get("best_epoch", 0)),
                at_best=dict(d.get("at_best") or {}),
                train_seconds=float(d.get("train_seconds", 0.0)),
                static={k: v for k, v in dict(d.get("static") or {}).items() if k not in REMEASURED_STATIC},
            )
        except (TypeError, ValueError) as e:
            raise TrainStateError(f"train state has a field of the wrong type: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        """The dict the writer saves (plain containers: ``torch.load(weights_only=True)`` reads it back)."""
        return {f: (dict(v) if isinstance(v := getattr(self, f), MappingProxyType) else v) for f in self.field_names()}
