"""The study's budget ledger: where every wall second and core-second of a study went.

Each stage (Ray start, data preparation, a probe, a trial, the final fit, post-hoc selection, the test evaluation,
export) is a frozen :class:`Stage` with its wall interval, the cores it held and its kind:

- ``compute``: model compute that feeds the result (training steps and validation of a run that finished what it
  started, feature extraction, the final test evaluation, export parity);
- ``overhead``: work that is needed but is not model compute (Ray start, data preparation, a trial's set-up,
  plots, writing files);
- ``waste``: compute thrown away (a run cut before it finished, a failed trial).

Cores not held by any stage at a moment are idle. **Useful fraction** = compute core-seconds / (study wall seconds x
cores). The ledger is written to ``summary.json`` (``ledger``, ``useful_fraction``) and drawn as a timeline
(``timeline.png``: stages per core over time).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuner.trial_record import records

if TYPE_CHECKING:
    import optuna


log = logging.getLogger(__name__)

KINDS = ("compute", "overhead", "waste")


@dataclass(frozen=True)
class Stage:
    """One interval of the study on ``cores`` cores (unix times)."""

    name: str
    kind: str
    start: float
    end: float
    cores: float
    note: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"ledger stage kind must be one of {KINDS}, got {self.kind!r}")
        if self.end < self.start:
            object.__setattr__(self, "end", self.start)

    @property
    def seconds(self) -> float:
        return self.end - self.start

    @property
    def core_seconds(self) -> float:
        return self.seconds * self.cores


@dataclass(frozen=True)
class LedgerSummary:
    """The ledger at the end of a study: what ``summary.json`` carries."""

    t0: float
    wall_s: float
    cores: float
    stages: tuple[Stage, ...]
    core_seconds: dict[str, float]  #: per kind, plus ``idle``
    useful_fraction: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "wall_s": round(self.wall_s, 2),
            "cores": self.cores,
            "core_seconds": {k: round(v, 1) for k, v in self.core_seconds.items()},
            "useful_fraction": round(self.useful_fraction, 4),
            "stages": [
                {
                    **asdict(s),
                    "start": round(s.start - self.t0, 2),
                    "end": round(s.end - self.t0, 2),
                    "seconds": round(s.seconds, 2),
                    "core_seconds": round(s.core_seconds, 1),
                }
                for s in self.stages
            ],
        }

    def lines(self) -> list[str]:
        """A printable table: seconds and core-seconds per stage name (trials grouped), then the totals."""
        by: dict[tuple[str, str], list[float]] = {}
        for s in self.stages:
            name = "trial" if s.name.startswith("trial ") else s.name
            acc = by.setdefault((name, s.kind), [0.0, 0.0, 0.0])
            acc[0] += s.seconds
            acc[1] += s.core_seconds
            acc[2] += 1
        out = [f"{'stage':<28} {'kind':<9} {'n':>3} {'wall s':>8} {'core-s':>8}"]
        for (name, kind), (sec, core_s, n) in by.items():
            out.append(f"{name:<28} {kind:<9} {int(n):>3} {sec:>8.1f} {core_s:>8.1f}")
        cs: dict[str, float] = self.core_seconds
        out.append(
            f"study {self.wall_s:.0f} s x {self.cores:g} cores = {self.wall_s * self.cores:.0f} core-s: "
            + ", ".join(f"{k} {cs.get(k, 0.0):.0f}" for k in (*KINDS, "idle"))
            + f"; useful fraction {self.useful_fraction:.3f}"
        )
        return out


@dataclass
class Ledger:
    """Stages as they happen (driver side). ``cores``: the cores the study holds (the cluster's CPUs, or GPUs)."""

    cores: float
    t0: float = field(default_factory=time.time)
    stages: list[Stage] = field(default_factory=list)

    def add(self, name: str, kind: str, start: float, end: float, cores: float | None = None, note: str = "") -> Stage:
        s = Stage(
            name=name,
            kind=kind,
            start=max(start, self.t0),
            end=end,
            cores=self.cores if cores is None else min(float(cores), self.cores),
            note=note,
        )
        self.stages.append(s)
        return s

    @contextlib.contextmanager
    def stage(self, name: str, kind: str = "overhead", cores: float | None = None, note: str = "") -> Iterator[None]:
        """Time a block as one stage (recorded even when the block raises)."""
        t = time.time()
        try:
            yield
        finally:
            self.add(name, kind, t, time.time(), cores, note)

    def summary(self, end: float | None = None) -> LedgerSummary:
        end = time.time() if end is None else end
        wall = max(1e-9, end - self.t0)
        per = {k: 0.0 for k in KINDS}
        for s in self.stages:
            per[s.kind] += s.core_seconds
        held = sum(per.values())
        per["idle"] = max(0.0, wall * self.cores - held)
        return LedgerSummary(
            t0=self.t0,
            wall_s=wall,
            cores=self.cores,
            stages=tuple(self.stages),
            core_seconds=per,
            useful_fraction=per["compute"] / (wall * self.cores),
        )


def trial_stages(ledger: Ledger, study: optuna.Study, cores_per_trial: float) -> None:
    """One stage per trial of the study that ran in this ledger's time (from Optuna's start/complete times and the
    trial's own set-up and training seconds): set-up is overhead; training is compute when the trial finished its
    planned fidelity (COMPLETE) or was stopped by ASHA by design (PRUNED), waste when it failed or was cut."""
    for t in records(study):
        launched = t.started_at or t.launched_at
        if t.started is None or not launched:
            continue  # never ran (it waited for a slot until the search ended), or an earlier version's trial
        # the run's own start (the trainer's set-up; Optuna's start is when Ray asked for the trial, which may then
        # wait for a free slot) and Optuna's completion
        start = launched  # a trial stopped before its first result has only Ray's launch time
        end = t.completed if t.completed is not None else time.time()
        if end <= ledger.t0:
            continue  # an earlier run of the study
        setup = t.setup_seconds or 0.0
        stop = t.stop_reason or ""
        finished = t.state == "COMPLETE" or (t.state == "PRUNED" and not stop and not t.rejected_reason)
        kind = "compute" if finished else "waste"
        why = t.state + (f" ({stop})" if stop else "")
        if setup and start + setup < end:
            ledger.add(f"trial {t.number} set-up", "overhead", start, start + setup, cores_per_trial)
            start += setup
        ledger.add(f"trial {t.number}", kind, start, end, cores_per_trial, why)


def plot_timeline(summary: LedgerSummary, path: Path) -> bool:
    """Stages per core over time (greedy lanes: each stage takes the first free cores)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"compute": "#2a9d8f", "overhead": "#e9c46a", "waste": "#e76f51"}
    lanes_free: list[float] = []  # per core lane: when it becomes free
    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.5 * max(1, int(summary.cores))), dpi=100)
    for s in sorted(summary.stages, key=lambda s: s.start):
        if s.cores <= 0:  # holds no core (e.g. the search driver waiting on its trials): not a lane
            continue
        need = max(1, round(s.cores))
        picked: list[int] = []
        for i, free in enumerate(lanes_free):
            if free <= s.start + 1e-6 and len(picked) < need:
                picked.append(i)
        while len(picked) < need:
            lanes_free.append(0.0)
            picked.append(len(lanes_free) - 1)
        for i in picked:
            lanes_free[i] = s.end
            ax.broken_barh(
                [(s.start - summary.t0, s.seconds)],
                (i + 0.1, 0.8),
                facecolors=colours[s.kind],
                edgecolor="white",
                linewidth=0.5,
            )
            if s.seconds > 0.06 * summary.wall_s:
                ax.text(s.start - summary.t0 + s.seconds / 2, i + 0.5, s.name, ha="center", va="center", fontsize=7)
    ax.set_xlim(0, summary.wall_s)
    ax.set_ylim(0, max(len(lanes_free), int(summary.cores)))
    ax.set_xlabel("seconds since the study started")
    ax.set_ylabel("core")
    ax.set_title(
        f"budget ledger: useful fraction {summary.useful_fraction:.2f} "
        f"(compute {summary.core_seconds['compute']:.0f} of {summary.wall_s * summary.cores:.0f} core-s)"
    )
    for k, c in colours.items():
        ax.barh([0], [0], color=c, label=k)
    ax.legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
