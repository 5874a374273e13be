"""Where a trial's checkpoint is: Ray Tune's result of a trial, and its best checkpoint copied to a directory (a
local directory, or S3/GCS storage via pyarrow; a DDP trial's Train-run checkpoint by its URI). Used by the study's
finish (:mod:`tuner.report`: the final model, the post-hoc members) and the warm final fit (:mod:`tuner.refit`)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ray.tune import ResultGrid


def result_for(results: ResultGrid | None, ray_trial_id: str | None) -> Any:
    """Ray Tune's result of the trial ``ray_trial_id`` (None: no result grid, or no such trial)."""
    if results is None:
        return None
    for i in range(len(results)):  # ResultGrid indexes by position
        r = results[i]
        if r.metrics and r.metrics.get("trial_id") == ray_trial_id:
            return r
    return None


def materialise_best_checkpoint(result: Any, best: dict[str, Any], metric: str, mode: str, dest: Path) -> bool:
    """Copy the best trial's best checkpoint to ``dest`` (local dir, or S3/GCS storage via pyarrow)."""
    ckpt = None
    if result is not None:
        try:
            ckpt = result.get_best_checkpoint(metric, mode)
        except Exception:  # noqa: BLE001 - no scored checkpoints
            ckpt = None
        ckpt = ckpt or result.checkpoint
    if dest.exists():
        shutil.rmtree(dest)
    if ckpt is not None:
        ckpt.to_directory(str(dest))
        if not (dest / "model.pt").is_file() and result.checkpoint is not None and result.checkpoint.path != ckpt.path:
            # the best-scored one is a stand-in for a checkpoint Ray's retention deleted before a resume
            # (tuner/_ray_compat.fill_deleted_checkpoints): the trial's latest holds the weights it ended with
            shutil.rmtree(dest)
            result.checkpoint.to_directory(str(dest))
        return True
    # Train-in-Tune (DDP trials): the Tune result has no checkpoint; the Train run's is in the metrics/attrs.
    uri = ((result.metrics or {}).get("checkpoint_uri") if result is not None else None) or best.get("checkpoint_uri")
    if not uri:
        return False
    if "://" in uri:
        import pyarrow.fs

        fs, path = pyarrow.fs.FileSystem.from_uri(uri)
        dest.mkdir(parents=True)
        pyarrow.fs.copy_files(path, str(dest), source_filesystem=fs)
    elif Path(uri).is_dir():
        shutil.copytree(uri, dest)
    else:
        return False
    return True
