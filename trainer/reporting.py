"""Where the training loop's per-epoch results and checkpoints go.

The one loop (:mod:`trainer.loop`) reports through a :class:`Reporter`:

- ``local``     in-process run: keeps ``run_dir/last`` and ``run_dir/best`` (by the config's metric)
- ``ray_train`` a Ray Train worker: ``ray.train.report`` (rank 0 attaches the checkpoint)
- ``tune``      a Ray Tune function trainable: ``tune.report`` with a ``tune.Checkpoint``

Each sends an epoch's :class:`trainer.epoch_result.EpochResult` as its flat row (``to_dict``) and lends the loop
the checkpoint to resume from (the latest, if any) as a local directory for the length of a ``with`` block: Ray's
reporters copy it into a directory of this process's own (see :func:`_private_copy`) and remove it afterwards.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

from trainer.epoch_result import HISTORY_FILE, EpochResult, append_history
from trainer.metric import get_metric


class Reporter(Protocol):
    def report(self, result: EpochResult, checkpoint_dir: Path | None) -> None: ...

    def resume_checkpoint(self) -> AbstractContextManager[Path | None]: ...


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

    def resume_checkpoint(self) -> AbstractContextManager[Path | None]:
        return contextlib.nullcontext()  # an in-process run starts fresh; resuming is Ray Train's and Tune's job


class RayTrainReporter:
    """Inside a Ray Train worker (also under Tune via ``TuneReportCallback``)."""

    def report(self, result: EpochResult, checkpoint_dir: Path | None) -> None:
        import ray.train

        ckpt = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(result.to_dict(), checkpoint=ckpt)

    def resume_checkpoint(self) -> AbstractContextManager[Path | None]:
        import ray.train

        return _private_copy(ray.train.get_checkpoint())


class TuneReporter:
    """Inside a Ray Tune function trainable (1-worker trials run the loop directly)."""

    def report(self, result: EpochResult, checkpoint_dir: Path | None) -> None:
        from ray import tune

        ckpt = tune.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        tune.report(result.to_dict(), checkpoint=ckpt)

    def resume_checkpoint(self) -> AbstractContextManager[Path | None]:
        from ray import tune

        return _private_copy(tune.get_checkpoint())


@contextlib.contextmanager
def _private_copy(ckpt: Any) -> Iterator[Path | None]:
    """The Ray checkpoint's files in a directory of this process's own, removed when the block ends.

    Not ``ckpt.to_directory()`` with no path: that directory is named after the checkpoint, so the DDP ranks on
    one node share it, and its file lock only covers a download in progress: a rank that takes the lock after
    another has finished downloads again over the files that rank is reading. Under load that rank read a
    truncated ``model.pt``, restarted from epoch 1 while the others resumed, and DDP hung (the ranks no longer
    ran the same steps). The shared directories were also never removed (one per resume, in /tmp)."""
    if ckpt is None:
        yield None
        return
    own = Path(tempfile.mkdtemp(prefix="edgetune-resume-"))
    try:
        yield Path(ckpt.to_directory(str(own)))
    finally:
        shutil.rmtree(own, ignore_errors=True)


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
