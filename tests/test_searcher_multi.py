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
    s = EdgetuneOptunaSearch(space=_space, metric=["best_val_macro_f1", "latency_ms"], mode=["max", "min"], max_t=3,
                             study_name="m", storage=storage)
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
