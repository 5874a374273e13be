"""The optimisation metric: one definition of each selectable metric (name, mode, best-epoch rule).

Everything that ranks models reads it from here: the trainer's best checkpoint, Ray Tune's metric and ASHA,
the Optuna value of a trial, the leaderboard columns, study comparison and the final selection.

**Best-epoch rule**: a run's value is the value of its best epoch (highest for ``max``, lowest for ``min``;
ties keep the earlier epoch). Tune and ASHA see that running best (``best_<name>`` in every epoch's
result), the Optuna value is the same number, and the checkpoint kept for the run is that epoch's.

**Default** ``val_macro_f1``: on imbalanced data (elpv: 57 % of one class) accuracy rewards predicting the
majority class; macro-F1 weighs every class equally, so a model must recognise the rare classes to score.
Accuracy is always reported beside it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from edgetune.errors import ConfigError


@dataclass(frozen=True)
class Metric:
    name: str  #: key in every epoch's metrics
    mode: str  #: "max" or "min"
    label: str  #: human-readable (plot axes, dashboard)

    @property
    def best_key(self) -> str:
        """The running best-epoch value reported each epoch (what Tune, ASHA and Optuna optimise)."""
        return f"best_{self.name}"

    @property
    def worst(self) -> float:
        """The value a diverged epoch is given (finite, so every storage accepts it)."""
        return 0.0 if self.mode == "max" else 1e6

    def better(self, value: float, than: float | None) -> bool:
        """Whether ``value`` beats ``than`` (None: nothing yet). Ties do not (the earlier epoch stays)."""
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return False
        if than is None:
            return True
        return value > than if self.mode == "max" else value < than

    def sort_key(self, value: float | None) -> tuple[bool, float]:
        """Sort best first; runs without a value last."""
        if value is None:
            return (True, 0.0)
        return (False, -value if self.mode == "max" else value)


#: Reported each epoch for checkpoint retention (Ray's ``checkpoint_score_attribute``, mode ``max``): the epoch
#: number when this epoch is the run's best so far, else -1. The highest is the best epoch's checkpoint (the
#: running ``best_<name>`` ties on every later epoch, and Ray would keep the newest of a tie).
CHECKPOINT_SCORE = "checkpoint_score"
CHECKPOINT_SCORE_MODE = "max"

METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("val_macro_f1", "max", "validation macro-F1"),
        Metric("val_balanced_acc", "max", "validation balanced accuracy"),
        Metric("val_acc", "max", "validation accuracy"),
        Metric("val_loss", "min", "validation cross-entropy"),
    )
}
METRIC_NAMES = tuple(METRICS)
DEFAULT_METRIC = "val_macro_f1"


def get_metric(name: str) -> Metric:
    m = METRICS.get(name) if isinstance(name, str) else None
    if m is None:
        raise ConfigError(f"metric must be one of {list(METRIC_NAMES)}, got {name!r}")
    return m
