"""The one place edgetune touches Ray internals (no public API exists for these).

Everything else under ``tuner/`` uses Ray's public API. Each function here names the private attribute or
module it relies on; ``tests/test_compat_pins.py`` pins their behaviour on the installed Ray, and
:func:`check_version` refuses an untested Ray release with a clear message (``EDGETUNE_ALLOW_UNTESTED_RAY=1``
to try anyway).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from tuner.compat import require_tested

#: Ray release lines these internals were read from and are tested with.
TESTED_RAY = ("2.60.",)


def check_version(version: str | None = None) -> str:
    """Ray's version, or an error naming the tested lines when it is not one of them."""
    if version is None:
        import ray

        version = ray.__version__
    return require_tested("ray", version, TESTED_RAY, "ray[default,tune,train]==2.60.*")


# --- ray.tune.search.optuna.OptunaSearch: its Optuna study and the Ray trial -> Optuna trial map ---------------


def searcher_study(search: Any) -> Any:
    """The ``optuna.Study`` an ``OptunaSearch`` asks and tells (``OptunaSearch._ot_study``)."""
    return search._ot_study


def searcher_trials(search: Any) -> dict[str, Any]:
    """Ray trial id -> the live ``optuna.Trial`` (``OptunaSearch._ot_trials``, mutable)."""
    trials: dict[str, Any] = search._ot_trials
    return trials


def searcher_completed(search: Any) -> set[str]:
    """Ray trial ids already told to Optuna (``OptunaSearch._completed_trials``, mutable)."""
    done: set[str] = search._completed_trials
    return done


# --- ray.tune.integration.ray_train.TuneReportCallback: forward one report to the Tune trial -----------------


def forward_report(callback: Any, metrics: dict[str, Any]) -> None:
    """What ``TuneReportCallback.after_report`` does with a report, for a report edgetune has extended
    (``TuneReportCallback._training_actor_item_queue``)."""
    callback._training_actor_item_queue.put(metrics)


# --- ray start: the address file of the node started on this machine ------------------------------------------


def address_file() -> str:
    """The file where ``ray start`` records its node's address (``ray._common.utils.get_ray_address_file``;
    honours ``RAY_TMPDIR``)."""
    from ray._common.utils import get_ray_address_file

    path: str = get_ray_address_file(None)
    return path


# --- ray up: where the cluster launcher caches a cluster.yaml's resolved config --------------------------------


def launcher_cache_file(config: dict[str, Any]) -> Path:
    """``ray up``'s cache of a resolved cluster config (``ray.autoscaler._private.util.prepare_config`` and the
    sha256 naming of ``ray.autoscaler._private.commands._bootstrap_config``)."""
    from ray.autoscaler._private.util import prepare_config

    cfg = prepare_config(config)
    digest = hashlib.sha256(json.dumps([cfg], sort_keys=True).encode("utf-8")).hexdigest()
    return Path(tempfile.gettempdir()) / f"ray-config-{digest}"


# --- token authentication (Ray 2.60 enables it by default) ------------------------------------------------------


def set_auth_mode(mode: str) -> None:
    """Set ``RAY_AUTH_MODE`` (``token`` | ``disabled``) for this process (and the workers it starts) and make
    Ray's cached config see it (``ray._raylet.Config.initialize``, what Ray's own ``_enable_token_auth`` does). A
    head started with its mode unset turns token auth on when a token exists; a client with its mode unset does
    not, so joining such a head fails until this is done."""
    from ray._raylet import Config  # type: ignore[attr-defined]

    os.environ["RAY_AUTH_MODE"] = mode
    Config.initialize("")


# --- Ray Tune's trial checkpoints: checkpoint_<6 digits> per trial directory (ray.train._internal.storage) ------

_CHECKPOINT_DIR = re.compile(r"^checkpoint_(\d{6})$")


def fill_deleted_checkpoints(exp_path: str, trial_ids: set[str]) -> list[str]:
    """Before ``Tuner.restore``: in the directory ``trial_<id>`` of each Ray trial in ``trial_ids`` (those the
    driver left running), recreate as an empty directory with ``DELETED_CHECKPOINT_MARKER`` each
    ``checkpoint_<k>`` missing below the trial's newest one; returns their paths.

    Ray's experiment snapshot can name a trial checkpoint that its retention (``num_to_keep``) deleted after the
    snapshot was written; the restore then fails every retry ("does not exist on storage anymore",
    ray-project/ray#27790) and the trial ends ERROR. With the stand-in the restore goes ahead and the loop
    restarts that trial from epoch 1, saying why (trainer/loop_setup.py). Any pyarrow filesystem (local, s3://,
    gs://), as Ray's storage path."""
    import pyarrow.fs as pafs

    from trainer.loop_setup import DELETED_CHECKPOINT_MARKER  # noqa: PLC0415 - lazy: torch

    fs, root = pafs.FileSystem.from_uri(exp_path) if "://" in exp_path else (pafs.LocalFileSystem(), exp_path)
    made: list[str] = []
    for trial in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
        if trial.type != pafs.FileType.Directory or trial.base_name.removeprefix("trial_") not in trial_ids:
            continue
        found = {
            int(m.group(1))
            for e in fs.get_file_info(pafs.FileSelector(trial.path))
            if e.type == pafs.FileType.Directory and (m := _CHECKPOINT_DIR.match(e.base_name))
        }
        for k in sorted(set(range(max(found, default=0))) - found):
            path = f"{trial.path}/checkpoint_{k:06d}"
            fs.create_dir(path)
            with fs.open_output_stream(f"{path}/{DELETED_CHECKPOINT_MARKER}") as f:
                f.write(
                    b"deleted by Ray's checkpoint retention before the driver stopped; a restore from here "
                    b"restarts the trial from epoch 1\n"
                )
            made.append(path)
    return made
