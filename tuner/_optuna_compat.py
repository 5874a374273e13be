"""The one place edgetune touches Optuna internals (no public API exists for these).

Optuna's public API reaches a trial through ``Study.ask``/``Study.tell`` and ``Study.get_trials``; two things
edgetune needs have no public form: reading one trial's current stored state cheaply from a live
``optuna.Trial``, and writing a user attr onto a trial a killed driver left RUNNING (only its ``FrozenTrial`` is
available then). ``tests/test_compat_pins.py`` pins both on the installed Optuna, and :func:`check_version`
refuses an untested Optuna release with a clear message (``EDGETUNE_ALLOW_UNTESTED_OPTUNA=1`` to try anyway).
"""

from __future__ import annotations

from typing import Any

import optuna  # noqa: TID253 - this adapter exists to use optuna

from tuner.compat import require_tested

#: Optuna release lines these internals were read from and are tested with.
TESTED_OPTUNA = ("5.",)


def check_version(version: str | None = None) -> str:
    """Optuna's version, or an error naming the tested lines when it is not one of them."""
    return require_tested("optuna", optuna.__version__ if version is None else version, TESTED_OPTUNA, "optuna==5.*")


def stored_trial(study: optuna.Study, trial: Any) -> optuna.trial.FrozenTrial:
    """The stored state of a live ``optuna.Trial`` (``Study._storage.get_trial(Trial._trial_id)``)."""
    frozen: optuna.trial.FrozenTrial = study._storage.get_trial(trial._trial_id)
    return frozen


def fail_stale(study: optuna.Study, frozen: optuna.trial.FrozenTrial, reason: str) -> None:
    """A trial a killed driver left RUNNING -> FAIL with ``fail_reason`` (public ``Study.tell`` sets the state;
    the user attr needs the storage, as only the FrozenTrial is at hand)."""
    study._storage.set_trial_user_attr(frozen._trial_id, "fail_reason", reason)
    study.tell(frozen.number, state=optuna.trial.TrialState.FAIL)
