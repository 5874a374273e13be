"""How many epochs the refit gets from the budget left (tuner.refit.plan_epochs): pure arithmetic, no Ray; what the
refit hands the report (tuner.refit.RefitRun)."""

from __future__ import annotations

import math

import pytest

from tuner.budget import FINISH_RESERVE_S
from tuner.options import TuneOptions
from tuner.refit import BUDGETED_REFIT_CAP, THREAD_EFFICIENCY, plan_epochs
from tuner.trial_record import TrialRecord


def _trial(epoch_s: float, trained: int, setup_s: float = 0.0) -> TrialRecord:
    return TrialRecord(
        number=0, state="COMPLETE", params={}, epoch_seconds=epoch_s, epochs_trained=trained, setup_seconds=setup_s
    )


def test_epochs_come_from_the_time_left_at_the_refits_speed():
    opts = TuneOptions(epochs=4)
    # a 1-thread trial took 70 s per epoch; the refit gets 2 threads: 70 / (2 * efficiency) s per epoch
    per = 70.0 / (2 * THREAD_EFFICIENCY)
    n, why = plan_epochs(opts, _trial(70.0, 4), FINISH_RESERVE_S + 8 * per + 1, refit_cpus=2)
    assert n == 8 and "8 epochs" in why
    n, _ = plan_epochs(opts, _trial(70.0, 4), FINISH_RESERVE_S + 8 * 70.0 + 1, refit_cpus=1)
    assert n == 8  # same threads as the trial: its own epoch time
    n, _ = plan_epochs(opts, _trial(1.0, 4), 10_000.0, refit_cpus=2)
    assert n == BUDGETED_REFIT_CAP  # a budget is used to its end, up to the cap (refit_max_epochs 0)
    n, _ = plan_epochs(TuneOptions(epochs=4, trials=3), _trial(1.0, 4), 10_000.0, refit_cpus=2)
    assert n == 12  # a trial-capped study: 3 x epochs
    n, _ = plan_epochs(TuneOptions(epochs=4, refit_max_epochs=7), _trial(1.0, 4), 10_000.0, refit_cpus=2)
    assert n == 7


def test_a_trial_stopped_by_the_deadline_sets_the_bar_at_what_it_trained():
    opts = TuneOptions(epochs=6)
    left = FINISH_RESERVE_S + 4.5 * 50.0
    n, why = plan_epochs(opts, _trial(50.0, 3), left, refit_cpus=1)
    assert n == 4  # the trial trained 3 of its 6 epochs (its LR schedule unfinished): 4 full-schedule epochs is longer
    n, why = plan_epochs(opts, _trial(50.0, 4), left, refit_cpus=1)
    assert n == 0 and "not more than the 4 the best trial trained" in why
    n, why = plan_epochs(opts, _trial(50.0, 6), left, refit_cpus=1)
    assert n == 0 and "not more than the 6" in why


def test_no_budget_and_no_measurement():
    opts = TuneOptions(epochs=4, trials=3, time_budget_s=0)
    assert plan_epochs(opts, _trial(50.0, 4), math.inf)[0] == 8
    n, why = plan_epochs(opts, _trial(0.0, 4), 1000.0)
    assert n == 0 and "no epoch time" in why


def test_a_warm_refit_needs_only_one_more_epoch():
    """A final fit that continues the trial's weights adds to what it trained: one epoch is worth it."""
    opts = TuneOptions(epochs=6)
    left = FINISH_RESERVE_S + 2.5 * 50.0
    assert plan_epochs(opts, _trial(50.0, 6), left, refit_cpus=1)[0] == 0  # from scratch: shorter than the trial
    n, why = plan_epochs(opts, _trial(50.0, 6), left, refit_cpus=1, warm=True)
    assert n == 2 and "2 epochs" in why
    n, why = plan_epochs(opts, _trial(50.0, 6), FINISH_RESERVE_S + 10.0, refit_cpus=1, warm=True)
    assert n == 0 and "not more than" not in why


def test_the_refit_run_is_frozen_and_kept_in_the_summary_as_a_dict(tmp_path):
    """tuner.refit writes a RefitRun once (a new one per step, dataclasses.replace); tuner.report reads it and keeps
    its to_dict() in summary.json."""
    import dataclasses
    import json

    from tuner.refit import RefitRun

    run = RefitRun(of_trial=3, params={"backbone": "lite0"}, epochs=5, dir=tmp_path, val={"val_acc": 0.9})
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.skipped = "no"  # type: ignore[misc]
    d = json.loads(json.dumps(dataclasses.replace(run, skipped="why").to_dict()))
    assert d["dir"] == str(tmp_path) and d["skipped"] == "why" and d["of_trial"] == 3 and d["val"] == {"val_acc": 0.9}
    assert set(d) == {f.name for f in dataclasses.fields(RefitRun)}


def test_the_refit_tasks_outcome_enters_the_ledger():
    """The refit's Ray task hands back a RefitOutcome; its set-up is overhead, its epochs compute when it ran its
    schedule to the end, waste when the deadline cut it."""
    from trainer.epoch_result import TRAIN_KEYS, EpochResult
    from tuner.ledger import Ledger
    from tuner.refit import RefitOutcome, _ledger_entries

    epoch = EpochResult(epoch=1, epoch_seconds=30.0, lr=1e-3, train_seconds=30.0, train=dict.fromkeys(TRAIN_KEYS, 1.0))
    led = Ledger(cores=2.0, t0=0.0)
    _ledger_entries(led, RefitOutcome(files={}, history=[epoch], setup_seconds=5.0), 10.0, 50.0, 2.0)
    assert [(s.name, s.kind, s.start, s.end) for s in led.stages] == [
        ("final fit set-up", "overhead", 10.0, 15.0),
        ("final fit", "compute", 15.0, 50.0),
    ]
    cut = RefitOutcome(files={}, history=[epoch.with_(stop_reason="deadline")])
    _ledger_entries(led, cut, 60.0, 70.0, 2.0)
    assert (led.stages[-1].kind, led.stages[-1].note) == ("waste", "deadline")
