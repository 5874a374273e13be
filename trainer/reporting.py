"""Where the training loop's per-epoch results and checkpoints go.

The one loop (:mod:`trainer.loop`) reports through a :class:`Reporter`:

- ``local``     in-process run: keeps ``run_dir/last`` and ``run_dir/best`` (by the config's metric)
- ``ray_train`` a Ray Train worker: ``ray.train.report`` (rank 0 attaches the checkpoint)
- ``tune``      a Ray Tune function trainable: ``tune.report`` with a ``tune.Checkpoint``

Each sends an epoch's :class:`trainer.epoch_result.EpochResult` as its flat row (``to_dict``) and tells the loop
where to resume from (the latest checkpoint, if any).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Protocol

from trainer.epoch_result import HISTORY_FILE, EpochResult, append_history
from trainer.metric import get_metric


class Reporter(Protocol):
    def report(self, result: EpochResult, checkpoint_dir: Path | None) -> None: ...

    def resume_dir(self) -> Path | None: ...


class LocalReporter:
    """In-process run: checkpoints under ``run_dir``; history appended to ``run_dir/history.jsonl``."""

    def __init__(self, run_dir: str | Path, metric: str, mode: str) -> None:
        self.run_dir = Path(run_dir)

        self.metric, self.mode = metric, mode
        self._rule = get_metric(metric)
        self.best: float | None = None
        self.run_dir.mkdir(parents=True, exist_ok=True)
        hist = self.run_dir / HISTORY_FILE
        if hist.exists():
            hist.unlink()

    def report(self, result: EpochResult, checkpoint_dir: Path | None) -> None:
        append_history(self.run_dir, result)
        if checkpoint_dir is None:
            return
        _replace_dir(checkpoint_dir, self.run_dir / "last", copy=True)
        value = float(result.val[self.metric])
        if self._rule.better(value, self.best):
            self.best = value
            _replace_dir(checkpoint_dir, self.run_dir / "best", copy=True)

    def resume_dir(self) -> Path | None:
        return None  # an in-process run starts fresh; resuming is Ray Train's (RayTrainReporter) and Tune's job


class RayTrainReporter:
    """Inside a Ray Train worker (also under Tune via ``TuneReportCallback``)."""

    def report(self, result: EpochResult, checkpoint_dir: Path | None) -> None:
        import ray.train

        ckpt = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(result.to_dict(), checkpoint=ckpt)

    def resume_dir(self) -> Path | None:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        return _materialise(ckpt) if ckpt else None


class TuneReporter:
    """Inside a Ray Tune function trainable (1-worker trials run the loop directly)."""

    def report(self, result: EpochResult, checkpoint_dir: Path | None) -> None:
        from ray import tune

        ckpt = tune.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        tune.report(result.to_dict(), checkpoint=ckpt)

    def resume_dir(self) -> Path | None:
        from ray import tune

        ckpt = tune.get_checkpoint()
        return _materialise(ckpt) if ckpt else None


def _materialise(ckpt: Any) -> Path:
    return Path(ckpt.to_directory())


def _replace_dir(src: Path, dst: Path, copy: bool) -> None:
    tmp = dst.with_name(dst.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    if copy:
        shutil.copytree(src, tmp)
    else:
        shutil.move(str(src), tmp)
    if dst.exists():
        shutil.rmtree(dst)
    tmp.rename(dst)


def make_reporter(kind: str, run_dir: str | Path | None, metric: str, mode: str) -> Reporter:
    if kind == "local":
        if not run_dir:
            raise ValueError("a local run needs a run directory")
        return LocalReporter(run_dir, metric, mode)
    if kind == "ray_train":
        return RayTrainReporter()
    if kind == "tune":
        return TuneReporter()
    raise ValueError(f"unknown reporter {kind!r}; allowed: local, ray_train, tune")
