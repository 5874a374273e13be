"""The searcher on a multi-objective study (``--target`` / ``--multi-objective``) without Tune around it: learning
curves are kept as intermediate values, and a resumed trial's twin gets them too (``Trial.report`` is
single-objective only in Optuna)."""

from __future__ import annotations

import optuna

from tuner.searcher import EdgetuneOptunaSearch
from tuner.storage import rdb_storage


def _space(trial):
    trial.suggest_float("lr", 1e-4, 1e-2, log=True)


def test_multi_objective_curves_and_resumed_twin(tmp_path):
    storage = rdb_storage(f"sqlite:///{tmp_path / 'o.db'}")
    s = EdgetuneOptunaSearch(
        space=_space,
        metric=["best_val_macro_f1", "latency_ms"],
        mode=["max", "min"],
        max_t=3,
        study_name="m",
        storage=storage,
    )
    assert s.suggest("a") is not None
    s.on_trial_result("a", {"best_val_macro_f1": 0.5, "latency_ms": 3.0, "training_iteration": 1})
    s.on_trial_result("a", {"best_val_macro_f1": 0.6, "latency_ms": 3.0, "training_iteration": 2})
    study = optuna.load_study(study_name="m", storage=storage)
    [t] = study.trials
    assert t.intermediate_values == {1: 0.5, 2: 0.6}
    # a driver restart marked it FAIL (mark_stale_running_failed); the resumed trial reports again
    study.tell(t.number, state=optuna.trial.TrialState.FAIL)
    s.on_trial_result("a", {"best_val_macro_f1": 0.7, "latency_ms": 3.0, "training_iteration": 3})
    s.on_trial_complete("a", {"best_val_macro_f1": 0.7, "latency_ms": 3.0, "training_iteration": 3})
    study = optuna.load_study(study_name="m", storage=storage)
    twin = study.trials[-1]
    assert twin.number != t.number and twin.params == t.params
    assert twin.intermediate_values == {1: 0.5, 2: 0.6, 3: 0.7}
    assert twin.state.name == "COMPLETE" and twin.values == [0.7, 3.0]


def test_steps_are_epochs_and_a_restarted_twin_starts_a_new_curve(tmp_path):
    """Steps are the loop's epochs, not Ray's report count (which a restart from epoch 1 after a lost checkpoint
    does not reset); a twin whose run restarted gets no curve from before the kill, and every trial names its Ray
    trial id from its first result (a later resume finds its directory by it)."""
    storage = rdb_storage(f"sqlite:///{tmp_path / 'o.db'}")
    s = EdgetuneOptunaSearch(
        space=_space, metric="best_val_macro_f1", mode="max", max_t=3, study_name="r", storage=storage
    )
    assert s.suggest("a") is not None
    for it in (1, 2):
        s.on_trial_result("a", {"best_val_macro_f1": 0.1 * it, "epoch": it, "training_iteration": it})
    study = optuna.load_study(study_name="r", storage=storage)
    [t] = study.trials
    assert t.intermediate_values == {1: 0.1, 2: 0.2} and t.user_attrs["ray_trial_id"] == "a"
    study.tell(t.number, state=optuna.trial.TrialState.FAIL)  # the driver was killed; the resume marked it FAIL
    why = "the checkpoint to resume from is gone or incomplete (...)"
    for epoch in (1, 2, 3):  # Ray counts on (3, 4, 5); the loop restarted from epoch 1
        s.on_trial_result(
            "a",
            {
                "best_val_macro_f1": 0.5 + 0.1 * epoch,
                "epoch": epoch,
                "training_iteration": 2 + epoch,
                "resume_restarted": why,
            },
        )
    twin = optuna.load_study(study_name="r", storage=storage).trials[-1]
    assert twin.number != t.number and twin.params == t.params
    assert twin.user_attrs["ray_trial_id"] == "a"
    assert twin.intermediate_values == {1: 0.6, 2: 0.7, 3: 0.8}  # its own run's curve, by epoch
    s.on_trial_complete("a", {"best_val_macro_f1": 0.8, "epoch": 3, "training_iteration": 5, "resume_restarted": why})
    twin = optuna.load_study(study_name="r", storage=storage).trials[-1]
    assert twin.state.name == "COMPLETE" and twin.user_attrs["resume_restarted"] == why
    assert twin.user_attrs["resumed_from_trial"] == t.number and twin.user_attrs["epochs_trained"] == 3
