"""Pins what tuner/_ray_compat.fill_deleted_checkpoints relies on, on a real local Ray: a trial is restored from the
checkpoint Ray's experiment snapshot names; if retention deleted that checkpoint after the snapshot (what a driver
SIGKILL can leave, ray-project/ray#27790) the restore fails every retry; with the empty stand-in the restore goes
ahead and the trainable sees the marker (the trainer then restarts the run from epoch 1,
tests/test_resume_checkpoint.py).

The race is reproduced exactly: a trial checkpoints iterations 0 and 1 and errors; the snapshot names
``checkpoint_000001``; then, as if the trial had gone on before the driver died, ``checkpoint_000002`` appears and
``checkpoint_000001`` is deleted (retention keeps the newest)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]


def _trainable(config: dict) -> None:
    import tempfile

    from ray import tune

    start, seen = 0, "none"
    ckpt = tune.get_checkpoint()
    if ckpt is not None:
        # as_directory, not to_directory(): no copy left behind in /tmp (checkpoint_tmp_<uuid>) after the test
        with ckpt.as_directory() as dstr:
            d = Path(dstr)
            if (d / "it.json").is_file():
                start, seen = json.loads((d / "it.json").read_text())["it"] + 1, "checkpoint"
            else:
                from trainer.loop_setup import DELETED_CHECKPOINT_MARKER

                seen = "stand-in" if (d / DELETED_CHECKPOINT_MARKER).is_file() else "empty"
    for it in range(start, 3):
        if it == 2 and not Path(config["ok"]).exists():
            raise RuntimeError("fail at iteration 2 (the first run)")
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "it.json").write_text(json.dumps({"it": it}))
            tune.report({"it": it, "seen": seen}, checkpoint=tune.Checkpoint.from_directory(tmp))


def test_a_deleted_snapshot_checkpoint_fails_the_restore_and_a_stand_in_lets_it_restart(tmp_path: Path) -> None:
    import ray
    from ray import tune

    from tuner import _ray_compat
    from tuner.search import trial_dirname

    ok = tmp_path / "ok"
    ray.init(address="local", num_cpus=1, include_dashboard=False, logging_level="ERROR")  # never another Ray here
    try:
        run = tune.RunConfig(
            name="pin", storage_path=str(tmp_path / "ray"), verbose=0, failure_config=tune.FailureConfig(max_failures=0)
        )
        names = tune.TuneConfig(trial_dirname_creator=trial_dirname)  # trial_<id>, as edgetune's studies name them
        first = tune.Tuner(_trainable, param_space={"ok": str(ok)}, run_config=run, tune_config=names).fit()
        assert first.errors and first[0].metrics["it"] == 1
        exp = str(tmp_path / "ray" / "pin")
        [trial_dir] = [p for p in Path(exp).iterdir() if p.is_dir() and (p / "checkpoint_000001").is_dir()]
        shutil.copytree(trial_dir / "checkpoint_000001", trial_dir / "checkpoint_000002")
        (trial_dir / "checkpoint_000002" / "it.json").write_text(json.dumps({"it": 1}))
        shutil.rmtree(trial_dir / "checkpoint_000001")  # retention deleted the one the snapshot names

        ok.touch()  # from now on the trainable would finish
        failed = tune.Tuner.restore(exp, _trainable, resume_errored=True).fit()
        assert failed.errors and "does not exist on storage anymore" in str(failed.errors[0])

        trial_id = trial_dir.name.removeprefix("trial_")
        assert _ray_compat.fill_deleted_checkpoints(exp, {"someone-else"}) == []  # only the trials asked for
        made = _ray_compat.fill_deleted_checkpoints(exp, {trial_id})
        assert made == [f"{trial_dir}/checkpoint_000001"]
        assert (trial_dir / "checkpoint_000000" / "it.json").is_file()  # present ones are left alone
        restarted = tune.Tuner.restore(exp, _trainable, resume_errored=True).fit()
        assert not restarted.errors and restarted[0].metrics["seen"] == "stand-in"
        assert restarted[0].metrics["it"] == 2
    finally:
        ray.shutdown()


def test_the_winner_copy_skips_a_stand_in_best_checkpoint(tmp_path: Path) -> None:
    """A stand-in kept as a trial's best-scored checkpoint (it had the old run's score) is not copied as the
    winner: the trial's latest checkpoint, which holds the weights it ended with, is."""
    from types import SimpleNamespace

    from ray import tune

    from trainer.loop_setup import DELETED_CHECKPOINT_MARKER
    from tuner.trial_checkpoint import materialise_best_checkpoint

    stand_in, latest = tmp_path / "checkpoint_000001", tmp_path / "checkpoint_000004"
    stand_in.mkdir()
    (stand_in / DELETED_CHECKPOINT_MARKER).write_text("x")
    latest.mkdir()
    (latest / "model.pt").write_bytes(b"weights")
    result = SimpleNamespace(
        get_best_checkpoint=lambda metric, mode: tune.Checkpoint.from_directory(str(stand_in)),
        checkpoint=tune.Checkpoint.from_directory(str(latest)),
        metrics={},
    )
    assert materialise_best_checkpoint(result, {}, "checkpoint_score", "max", tmp_path / "best")
    assert (tmp_path / "best" / "model.pt").read_bytes() == b"weights"
