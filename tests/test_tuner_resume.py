"""Fault tolerance: resume a study after its driver was SIGKILLed mid-study (no finished trial lost, stale
RUNNING trials -> FAIL, the requested count reached), and a trial that crashes once is restarted from its
last checkpoint (the epoch count continues) and ends COMPLETE."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from tests.test_tuner_helpers import ROOT, TINY_ARGS, run_tuner, tuner_env, write_space

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.timeout(1200)]

FINISHED = ("COMPLETE", "PRUNED")


def _snapshot(storage: str, study: str) -> dict[int, tuple[str, object, dict]]:
    try:
        trials = optuna.load_study(study_name=study, storage=storage).get_trials(deepcopy=False)
    except KeyError:
        return {}
    return {t.number: (t.state.name, t.value, dict(t.intermediate_values)) for t in trials}


def _ray_snapshot_has(exp: Path, ray_ids: list[str]) -> bool:
    """Whether Ray's newest experiment snapshot (``experiment_state-*.json``) already names these trials: a trial
    created after the last snapshot is unknown to ``Tuner.restore`` and cannot be resumed (it is replaced by a new
    trial instead), so the kill waits for the snapshot."""
    states = sorted(exp.glob("experiment_state-*.json"), key=lambda p: p.stat().st_mtime)
    try:
        text = states[-1].read_text() if states else ""
    except OSError:
        return False
    return bool(ray_ids) and all(i in text for i in ray_ids)


def _running_ray_ids(storage: str, study: str) -> list[str]:
    trials = optuna.load_study(study_name=study, storage=storage).get_trials(deepcopy=False)
    return [str(t.user_attrs.get("ray_trial_id", "")) for t in trials if t.state.name == "RUNNING"]


def _safe_to_kill(snap: dict[int, tuple[str, object, dict]]) -> bool:
    """One trial finished, and every RUNNING trial has reported (and checkpointed) exactly its first epoch. The
    running trial is held there by the trainer's test switch (``EDGETUNE_HOLD_AFTER_EPOCH``: the second trial to
    finish epoch 1 waits before epoch 2), so neither ASHA (first rung at the grace period, 2) nor the end of its
    epochs can finish it before the kill, however slow or loaded the machine. The first epoch's checkpoint is
    then the trial's best and latest, so Ray restores it and the trial continues from it. (A kill later on can
    leave Ray's snapshot naming a checkpoint its retention deleted, ray-project/ray#27790: the resume then puts a
    stand-in there and the trial restarts from epoch 1; tests/test_ray_restore_pin.py, test_resume_checkpoint.py.)"""
    running = [iv for s, _, iv in snap.values() if s == "RUNNING"]
    return (
        any(s in FINISHED for s, _, _ in snap.values()) and bool(running) and all(iv and max(iv) == 1 for iv in running)
    )


def _wait_group_gone(pgid: int, timeout: float = 60.0) -> None:
    """Until no process of the killed process group is left (Ray's processes die with the driver)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)


def test_resume_after_driver_killed(tmp_path):
    storage = f"sqlite:///{tmp_path}/optuna.db"
    hold = tmp_path / "hold"
    # 4 epochs, ASHA grace period 2; the second trial to finish epoch 1 is held there (trainer test switch) until
    # the driver is killed, so the state "one trial finished, the next one has checkpointed its first epoch and is
    # still running" is arranged, not raced for; the kill comes once Optuna and Ray's snapshot both show it
    args = [
        *TINY_ARGS,
        "--space",
        str(write_space(tmp_path)),
        "--study",
        "res",
        "--trials",
        "4",
        "--epochs",
        "4",
        "--grace-period",
        "2",
        "--img",
        "128",
        "--max-images",
        "150",
        "--max-concurrent",
        "1",
        "--storage",
        storage,
        "--out",
        str(tmp_path / "out"),
        "--address",
        "local",
    ]
    log = open(tmp_path / "first.log", "w")  # noqa: SIM115
    env = tuner_env(EDGETUNE_HOLD_AFTER_EPOCH="1", EDGETUNE_HOLD_DIR=str(hold))
    driver = subprocess.Popen(
        [sys.executable, "-m", "tuner", *args],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 900  # generous: a loaded machine is slow, the state itself does not go away
        while time.time() < deadline:
            if (
                list(hold.glob("holding-*"))
                and _safe_to_kill(_snapshot(storage, "res"))
                and _ray_snapshot_has(
                    tmp_path / "out" / "ray" / "res", [i for i in _running_ray_ids(storage, "res") if i]
                )
            ):
                break
            assert driver.poll() is None, (
                "the driver ended before a trial was held:\n" + (tmp_path / "first.log").read_text()[-3000:]
            )
            time.sleep(0.2)
        else:
            raise AssertionError("no trial finished while the next one was held within 900 s")
    finally:
        # the driver and its local Ray instance (same process group) are killed by their own handle
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=60)
        log.close()
    _wait_group_gone(driver.pid)
    before = _snapshot(storage, "res")
    finished = {n: v for n, v in before.items() if v[0] in FINISHED}
    stale = [n for n, v in before.items() if v[0] == "RUNNING"]
    assert finished and stale, before

    run_tuner([*args, "--resume"], tmp_path / "resume.log")
    text = (tmp_path / "resume.log").read_text()
    assert f"marked stale RUNNING trial(s) {stale} as FAIL" in text
    assert "resuming Ray experiment" in text
    after = _snapshot(storage, "res")
    for n, v in finished.items():
        assert after[n] == v, f"finished trial {n} changed: {v} -> {after[n]}"
    for n in stale:
        assert after[n][0] == "FAIL"
    s = optuna.load_study(study_name="res", storage=storage)
    for n in stale:
        assert "driver stopped" in s.trials[n].user_attrs["fail_reason"]
    done = [t for t in s.trials if t.state.name in FINISHED]
    assert len(done) >= 4, [(t.number, t.state.name) for t in s.trials]
    assert all(t.state.name in (*FINISHED, "FAIL") for t in s.trials)
    assert all("train_seconds" in t.user_attrs for t in done)
    # the killed trial was continued by Ray: its new Optuna twin carries the same parameters
    resumed = [t for t in s.trials if "resumed_from_trial" in t.user_attrs]
    # every stale trial was resumed by Ray as a new Optuna twin with the same parameters (not silently dropped)
    assert sorted(t.user_attrs["resumed_from_trial"] for t in resumed) == sorted(stale), [
        (t.number, t.state.name, t.user_attrs.get("resumed_from_trial")) for t in s.trials
    ]
    for t in resumed:
        assert t.params == s.trials[t.user_attrs["resumed_from_trial"]].params
    assert (tmp_path / "out" / "best" / "metrics.json").is_file()


def test_crashed_trial_restarts_from_its_checkpoint(tmp_path):
    storage = f"sqlite:///{tmp_path}/optuna.db"
    marker = tmp_path / "failed-once"
    env = tuner_env(EDGETUNE_FAIL_AT_EPOCH="1", EDGETUNE_FAIL_MARKER=str(marker))
    run_tuner(
        [
            *TINY_ARGS,
            "--space",
            str(write_space(tmp_path)),
            "--study",
            "crash",
            "--trials",
            "1",
            "--epochs",
            "3",
            "--max-failures",
            "1",
            "--storage",
            storage,
            "--out",
            str(tmp_path / "out"),
            "--address",
            "local",
        ],
        tmp_path / "tune.log",
        env=env,
    )
    assert marker.is_file(), "the failure switch did not fire"
    assert "injected failure at epoch 1" in (tmp_path / "tune.log").read_text()
    (t,) = optuna.load_study(study_name="crash", storage=storage).trials
    assert t.state.name == "COMPLETE"
    assert sorted(t.intermediate_values) == [1, 2, 3]
    assert t.user_attrs["epochs_trained"] == 3
    (progress,) = (tmp_path / "out" / "ray" / "crash").glob("trial_*/progress.csv")
    with open(progress) as f:
        epochs = [int(float(r["epoch"])) for r in csv.DictReader(f)]
    assert epochs == [1, 2, 3], f"restarted from scratch instead of the epoch-1 checkpoint: {epochs}"
