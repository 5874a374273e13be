"""What one run of the training loop is given (:func:`trainer.loop.train_loop`), typed and validated in one place.

Ray Train hands a worker a plain dict (``train_loop_config``), so the loop accepts either a :class:`LoopConfig` or
its :meth:`LoopConfig.to_dict`; :meth:`LoopConfig.coerce` is the one reader: unknown keys, a wrong reporter or a
bad deadline are refused naming what is allowed. The run's :class:`~trainer.config.TrainConfig` travels as itself
(a dict given for it, e.g. from a YAML or an older caller, is validated into one here, once).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from edgetune.errors import ConfigError
from trainer.config import TrainConfig

#: Where the loop reports each epoch: in-process (a run dir), from a Ray Train worker, from a Tune trial.
REPORT_TO = ("local", "ray_train", "tune")


@dataclass(frozen=True)
class LoopConfig:
    train_config: TrainConfig  #: the run's config (a mapping given here is validated into one)
    run_dir: str | None = None  #: where checkpoints and reports go (``report_to="local"``)
    report_to: str = "local"
    static_metrics: Mapping[str, Any] = field(default_factory=dict)  #: reported with every epoch (a private copy)
    deadline: float | None = None  #: unix time: no epoch may end after it
    fit_to_deadline: bool = False  #: after the first epoch, fit the epoch count (and LR schedule) to the deadline
    source: Any = None  #: trainer.data.PreparedSource shared by a study's trials (None: prepare here)
    with_test: bool = True  #: load the test split (a tuning trial never does)

    def __post_init__(self) -> None:
        if isinstance(self.train_config, Mapping):
            object.__setattr__(self, "train_config", TrainConfig.from_dict(self.train_config))
        elif not isinstance(self.train_config, TrainConfig):
            raise ConfigError(
                f"loop config: train_config must be a TrainConfig (or its to_dict()), got "
                f"{type(self.train_config).__name__}"
            )
        if self.report_to not in REPORT_TO:
            raise ConfigError(f"loop config: report_to must be one of {list(REPORT_TO)}, got {self.report_to!r}")
        if self.deadline is not None and (
            isinstance(self.deadline, bool)
            or not isinstance(self.deadline, (int, float))
            or not math.isfinite(self.deadline)
        ):
            raise ConfigError(f"loop config: deadline must be a unix time or None, got {self.deadline!r}")
        if not isinstance(self.static_metrics, Mapping):
            raise ConfigError(f"loop config: static_metrics must be a mapping, got {self.static_metrics!r}")
        if self.run_dir is not None and not isinstance(self.run_dir, str):
            object.__setattr__(self, "run_dir", str(self.run_dir))
        object.__setattr__(self, "static_metrics", dict(self.static_metrics))  # picklable for Ray

    @classmethod
    def coerce(cls, value: LoopConfig | Mapping[str, Any]) -> LoopConfig:
        """The loop's one reader: a LoopConfig as is, or one built from a dict (unknown keys refused)."""
        if isinstance(value, LoopConfig):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"loop config must be a LoopConfig or a mapping, got {type(value).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(value) - set(known))
        if unknown:
            raise ConfigError(f"loop config: unknown key(s) {unknown}; allowed: {known}")
        if "train_config" not in value:
            raise ConfigError("loop config: train_config is required (a TrainConfig)")
        return cls(**dict(value))

    def to_dict(self) -> dict[str, Any]:
        """Ray Train's ``train_loop_config`` (what a worker's :func:`trainer.loop.train_worker` receives)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["static_metrics"] = dict(self.static_metrics)
        return d

    def replace(self, **changes: Any) -> LoopConfig:
        return LoopConfig.coerce({**self.to_dict(), **changes})
