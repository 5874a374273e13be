"""One epoch's result: what the training loop reports after each epoch (to Ray Train, Ray Tune or the run dir's
``history.jsonl``) and keeps in a checkpoint's history, a typed, frozen object.

One writer (:meth:`EpochResult.to_dict`: the flat row every reporter sends, the keys Ray Tune's schedulers and
Optuna read by name, :mod:`trainer.metric`) and one reader (:meth:`EpochResult.from_dict`, and
:func:`read_history` for a run dir's ``history.jsonl``). The loop builds it in steps (:func:`trainer.loop.run_epoch`,
then the checkpoint policy's best-epoch part) with :func:`dataclasses.replace`; nothing edits it in place.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from edgetune.errors import EdgetuneError
from trainer.metric import CHECKPOINT_SCORE

HISTORY_FILE = "history.jsonl"
#: The training pass's figures (:func:`trainer.loop.train_one_epoch`).
TRAIN_KEYS = ("train_loss", "train_acc", "seen", "train_phase_seconds", "images_per_s")
#: The epoch's own figures around the passes.
EPOCH_KEYS = ("epoch", "epoch_seconds", "lr", "train_seconds")
#: The best-epoch rule's keys besides ``best_<metric>`` and ``<metric>_at_best`` (:func:`trainer.loop._update_best`).
BEST_KEYS = ("best_epoch", "resumed_from_epoch", CHECKPOINT_SCORE)


class EpochResultError(EdgetuneError):
    """A reported row or history line that is not an epoch result (missing keys, wrong types, not JSON)."""


def _is_best(key: str) -> bool:
    return key in BEST_KEYS or key.startswith("best_") or key.endswith("_at_best")


def _is_val(key: str) -> bool:
    return (key.startswith(("val_", "raw_val_", "ema_val_")) or key == "weights") and not _is_best(key)


@dataclass(frozen=True)
class EpochResult:
    """One epoch: the training pass, validation (empty after a diverged pass), the best-epoch rule's part (empty
    until the checkpoint policy adds it), and the run's facts reported with every epoch (``static``)."""

    epoch: int
    epoch_seconds: float
    lr: float
    train_seconds: float  #: training seconds of the run so far
    train: Mapping[str, float]  #: :data:`TRAIN_KEYS`
    val: Mapping[str, Any] = field(default_factory=dict)  #: val_* (and raw_val_*, ema_val_*, weights)
    diverged: bool = False  #: the pass met a non-finite loss (never reported: the stop reason says it)
    stop_reason: str = ""  #: "diverged", "deadline" or "" (the run goes on)
    best: Mapping[str, Any] = field(default_factory=dict)  #: best_<metric>, best_epoch, checkpoint score, *_at_best
    static: Mapping[str, Any] = field(default_factory=dict)  #: the run's facts (model size, data path, latency…)

    def __post_init__(self) -> None:
        for name in ("train", "val", "best", "static"):
            object.__setattr__(self, name, MappingProxyType(dict(getattr(self, name))))

    def with_(self, **changes: Any) -> EpochResult:
        return replace(self, **changes)

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        """Pickled as plain containers (a refit's history comes back from its Ray task; mappingproxy does not
        pickle)."""
        plain = {name: dict(v) if isinstance(v, Mapping) else v for name, v in self.__dict__.items()}
        return (_rebuild, (plain,))

    def to_dict(self, with_static: bool = True) -> dict[str, Any]:
        """The flat row every reporter sends (``with_static=False``: as a checkpoint's history keeps it)."""
        d: dict[str, Any] = dict(self.static) if with_static else {}
        d.update({"epoch": self.epoch, **self.train, **self.val, "epoch_seconds": self.epoch_seconds, "lr": self.lr})
        d["train_seconds"] = self.train_seconds
        if self.stop_reason:
            d["stop_reason"] = self.stop_reason
        d.update(self.best)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EpochResult:
        """The epoch a reported row (or a history line) describes; EpochResultError naming what is wrong."""
        if not isinstance(d, Mapping):
            raise EpochResultError(f"an epoch result must be a mapping, got {type(d).__name__}")
        missing = [k for k in (*EPOCH_KEYS, *TRAIN_KEYS) if k not in d]
        if missing:
            raise EpochResultError(f"epoch result lacks {', '.join(missing)} (has: {', '.join(map(str, d))})")
        own = {*EPOCH_KEYS, *TRAIN_KEYS, "stop_reason"}
        try:
            return cls(
                epoch=int(d["epoch"]),
                epoch_seconds=float(d["epoch_seconds"]),
                lr=float(d["lr"]),
                train_seconds=float(d["train_seconds"]),
                train={k: float(d[k]) for k in TRAIN_KEYS},
                val={k: v for k, v in d.items() if _is_val(k)},
                stop_reason=str(d.get("stop_reason") or ""),
                diverged=d.get("stop_reason") == "diverged",
                best={k: v for k, v in d.items() if _is_best(k)},
                static={k: v for k, v in d.items() if k not in own and not _is_val(k) and not _is_best(k)},
            )
        except (TypeError, ValueError) as e:
            raise EpochResultError(f"epoch result has a field of the wrong type: {e}") from None


def _rebuild(fields_: dict[str, Any]) -> EpochResult:
    return EpochResult(**fields_)


def read_history(run_dir: str | Path) -> list[EpochResult]:
    """A run dir's ``history.jsonl``: every epoch it reported, in order ([] before the first)."""
    path = Path(run_dir) / HISTORY_FILE
    if not path.is_file():
        return []
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(EpochResult.from_dict(json.loads(line)))
        except json.JSONDecodeError as e:
            raise EpochResultError(f"{path}:{n} is not JSON: {e}") from None
    return out


def append_history(run_dir: str | Path, result: EpochResult) -> None:
    """Add one epoch to a run dir's ``history.jsonl`` (the one writer of the file)."""
    with open(Path(run_dir) / HISTORY_FILE, "a") as f:
        f.write(json.dumps(result.to_dict()) + "\n")
