"""OptunaSearch with the gaps of Ray's integration fixed.

Ray's ``OptunaSearch`` tells ASHA-stopped trials to Optuna as COMPLETE and writes no user attrs.
:class:`EdgetuneOptunaSearch` records a trial that stopped before ``max_t`` as PRUNED (its
intermediate values are kept; Optuna takes the last one as its value), a crashed one as FAIL, and
puts user attrs on every trial (params count, model size, train seconds, images/s, val macro-F1,
checkpoint URI, Ray trial id, node id). :class:`CheckpointAttrCallback` feeds it checkpoint URIs.
"""

from __future__ import annotations

import logging
import statistics
import time
from typing import Any

# The searcher subclasses Ray Tune's OptunaSearch and Callback over an Optuna study, so this module is Ray's and
# Optuna's at its top (tuner.run imports it only where the search starts).
import optuna  # noqa: TID253 - the study the searcher drives
from ray.tune.callback import Callback  # noqa: TID253 - base class of CheckpointAttrCallback
from ray.tune.search import Searcher  # noqa: TID253 - its FINISHED sentinel
from ray.tune.search.optuna import OptunaSearch  # noqa: TID253 - base class of EdgetuneOptunaSearch

from tuner import _optuna_compat, _ray_compat
from tuner.trial import checkpoint_uri
from tuner.trial_record import attrs_from_result

log = logging.getLogger(__name__)

#: How much longer than the trials so far a new trial's planned end is assumed to take (see min_trial_seconds).
NEW_TRIAL_MARGIN = 1.5

#: Times a sampled configuration known to break the latency constraint is re-sampled within one ``suggest``.
REJECT_RESAMPLES = 20


def result_epoch(result: dict[str, Any]) -> int:
    """The epoch a result is about: the loop's own count (``epoch``), the step of learning curves and ASHA's time
    attribute. Ray's ``training_iteration`` counts a trial's reports and is not reset when the loop restarts a
    trial from epoch 1 after a lost checkpoint; a result without an epoch (a trial rejected before training)
    falls back to it."""
    return int(result.get("epoch") or result.get("training_iteration") or 0)


def planned_epochs(result: dict[str, Any], max_t: int) -> int:
    """The fidelity a trial planned: ``max_t``, or fewer when it fitted its schedule to the search deadline after its
    first epoch (``epochs_planned``). A trial that reached it finished what it started: COMPLETE at that fidelity."""
    planned = result.get("epochs_planned")
    return min(int(planned), max_t) if planned else max_t


class EdgetuneOptunaSearch(OptunaSearch):
    """Also: no new trial once the search deadline is too close for one to reach its first ASHA rung
    (``Searcher.FINISHED``), and the told value is the trial's best-epoch value (``best_<metric>``)."""

    def __init__(
        self,
        *args: Any,
        max_t: int,
        deadline: float | None = None,
        grace_period: int = 1,
        reject: Any = None,
        **kwargs: Any,
    ) -> None:
        self._max_t = int(max_t)
        self._reject = reject  #: config -> (reason, attrs) for a sampled trial known to break the latency constraint
        self._curve_storage = kwargs.get("storage")  #: the study's optuna storage (multi-objective curves)
        self.rejected_before_start = 0
        self._deadline = deadline
        self._grace = max(1, int(grace_period))
        self._attrs: dict[str, dict[str, Any]] = {}
        self._last: dict[str, dict[str, Any]] = {}
        self._epoch_s: list[float] = []
        self._setup_s: list[float] = []
        _ray_compat.check_version()
        _optuna_compat.check_version()
        super().__init__(*args, **kwargs)

    def min_trial_seconds(self) -> float:
        """Seconds a new trial needs to finish what it starts: set-up plus its planned ``max_t`` epochs (medians of
        what trials so far took; 0 before any). A trial is not started unless its planned end fits the time left."""
        if not self._epoch_s:
            return 0.0
        setup = statistics.median(self._setup_s) if self._setup_s else 0.0
        # a margin: the next trial may be a slower backbone, and its first epoch builds its activation cache
        return NEW_TRIAL_MARGIN * (setup + self._max_t * statistics.median(self._epoch_s))

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        if self._deadline is not None and time.time() + self.min_trial_seconds() >= self._deadline:
            return Searcher.FINISHED  # type: ignore[return-value]  # Ray's sentinel for "no more trials"
        config = super().suggest(trial_id)
        for _ in range(REJECT_RESAMPLES):
            found = self._reject(config) if self._reject is not None and isinstance(config, dict) else None
            if not found:
                break
            # the architecture is already known to be too slow for --max-latency-ms: PRUNED before it starts
            reason, attrs = found
            ot_trial = _ray_compat.searcher_trials(self).pop(trial_id)
            for k, v in {**attrs, "rejected_reason": reason}.items():
                ot_trial.set_user_attr(k, v)
            self.study.tell(ot_trial, None, state=optuna.trial.TrialState.PRUNED)
            self.rejected_before_start += 1
            config = super().suggest(trial_id)
        return config

    @property
    def study(self) -> optuna.Study:
        study: optuna.Study = _ray_compat.searcher_study(self)  # set up by OptunaSearch before use
        return study

    def add_attrs(self, trial_id: str, **attrs: Any) -> None:
        self._attrs.setdefault(trial_id, {}).update(attrs)

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        first = trial_id not in self._last
        if first and "setup_seconds" in result:
            self._setup_s.append(float(result["setup_seconds"]))
        if "epoch_seconds" in result and result.get("stop_reason") != "diverged":
            self._epoch_s.append(float(result["epoch_seconds"]))
        self._last[trial_id] = dict(result)
        replaced = self._replace_stale(trial_id, restarted=bool(result.get("resume_restarted")))
        ot = _ray_compat.searcher_trials(self).get(trial_id)
        if first and not replaced and ot is not None:
            self._set_ray_id(ot, trial_id)
        if isinstance(self.metric, list):
            self._record_curve(trial_id, result)
        elif self.metric not in result:
            return  # a result without the metric (a trial the latency constraint rejected): nothing to report
        super().on_trial_result(trial_id, {**result, "training_iteration": result_epoch(result)})  # step = epoch

    @staticmethod
    def _set_ray_id(ot_trial: Any, trial_id: str) -> None:
        """The Ray trial id on the Optuna trial from its first result (a resume after a driver kill finds a trial
        left running, and its Ray directory, by it)."""
        try:
            ot_trial.set_user_attr("ray_trial_id", trial_id)
        except Exception as e:  # noqa: BLE001 - never lose a result because of one attr
            log.warning("could not set user attr ray_trial_id on trial %s: %s", trial_id, e)

    def _record_curve(self, trial_id: str, result: dict[str, Any]) -> None:
        """Multi-objective studies: ``Trial.report`` is single-objective only, and Ray's OptunaSearch records no
        learning curve. Keep the first objective per epoch as intermediate values through the storage's public
        API, so every trained trial shows its curve (optuna-dashboard) and can be told from one that never
        trained."""
        ot = _ray_compat.searcher_trials(self).get(trial_id)
        value, step = result.get(self.metric[0]), result_epoch(result)
        if ot is not None and value is not None and step:
            self._report_value(ot, float(value), int(step))

    def _report_value(self, ot_trial: Any, value: float, step: int) -> None:
        """``Trial.report`` for single-objective studies; the storage's public API for multi-objective ones."""
        if not isinstance(self.metric, list):
            ot_trial.report(value, step)
            return
        storage = self._curve_storage
        if storage is None:
            return
        try:
            sid = storage.get_study_id_from_name(self.study.study_name)
            tid = storage.get_trial_id_from_study_id_trial_number(sid, ot_trial.number)
            storage.set_trial_intermediate_value(tid, step, value)
        except Exception as e:  # noqa: BLE001 - a curve point is never worth failing the study
            log.warning("could not record epoch %s of trial %s: %s", step, ot_trial.number, e)

    def _replace_stale(self, trial_id: str, restarted: bool = False) -> bool:
        """After a driver restart, a resumed trial's Optuna twin may have been marked FAIL: give it a new one (with
        the Ray trial id, and the epochs before the kill unless the loop ``restarted`` it from epoch 1 after a lost
        checkpoint). Returns whether it did."""
        ot = _ray_compat.searcher_trials(self).get(trial_id)
        if ot is None:
            return False
        frozen = _optuna_compat.stored_trial(self.study, ot)
        if not (frozen.state.is_finished() and trial_id not in _ray_compat.searcher_completed(self)):
            return False
        self.study.enqueue_trial(frozen.params, skip_if_exists=False)
        twin = self.study.ask(fixed_distributions=frozen.distributions)
        for step, value in sorted(frozen.intermediate_values.items()) if not restarted else ():
            self._report_value(twin, value, step)  # the epochs before the kill, continued from its checkpoint
        _ray_compat.searcher_trials(self)[trial_id] = twin
        self.add_attrs(trial_id, resumed_from_trial=frozen.number)
        self._set_ray_id(twin, trial_id)
        return True

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        if trial_id in _ray_compat.searcher_completed(self) or trial_id not in _ray_compat.searcher_trials(self):
            super().on_trial_complete(trial_id, result, error)
            return
        last = result or self._last.get(trial_id) or {}
        self._replace_stale(trial_id, restarted=bool(last.get("resume_restarted")))
        ot_trial = _ray_compat.searcher_trials(self)[trial_id]
        attrs = attrs_from_result(last)
        attrs["ray_trial_id"] = trial_id
        attrs.update(self._attrs.get(trial_id, {}))
        for k, v in attrs.items():
            try:
                ot_trial.set_user_attr(k, v)
            except Exception as e:  # noqa: BLE001 - never lose the tell because of one attr
                log.warning("could not set user attr %s on trial %s: %s", k, trial_id, e)
        iteration = result_epoch(last)
        multi = isinstance(self.metric, list)
        if not multi and iteration and not error and last.get(self.metric) is not None:
            self._report_final(ot_trial, float(last[self.metric]), iteration)
        value: Any = None
        if last.get("stop_reason") == "diverged":
            ot_trial.set_user_attr("fail_reason", "loss diverged (NaN/inf): ended at once, not retried")
        if last.get("rejected_reason") and not error:
            state = optuna.trial.TrialState.PRUNED  # the latency constraint rejected it before its first epoch
        elif (
            error
            or not last
            or (not multi and last.get(self.metric) is None)
            or (multi and any(last.get(m) is None for m in self.metric))
        ):
            state = optuna.trial.TrialState.FAIL
            if not error and self._deadline is not None and time.time() >= self._deadline:
                ot_trial.set_user_attr("fail_reason", "the search deadline passed before it could start")
            elif multi and str(last.get("target_latency_status", "")).startswith("unavailable"):
                ot_trial.set_user_attr(
                    "fail_reason", f"no latency for the second objective: {last['target_latency_status']}"
                )
        elif (iteration < planned_epochs(last, self._max_t) or last.get("stop_reason")) and not multi:
            state = optuna.trial.TrialState.PRUNED  # ASHA, the search deadline, or divergence stopped it early
        else:
            state = optuna.trial.TrialState.COMPLETE
            value = [last.get(m) for m in self.metric] if multi else last.get(self.metric)
        try:
            self.study.tell(ot_trial, value, state=state)
        except Exception as e:  # noqa: BLE001 - e.g. NaN values: record as FAIL rather than crash the study
            log.warning("telling trial %s to Optuna failed (%s); marking it FAIL", trial_id, e)
            self.study.tell(ot_trial, None, state=optuna.trial.TrialState.FAIL)
        _ray_compat.searcher_completed(self).add(trial_id)

    def close_unfinished(self) -> int:
        """After ``Tuner.fit``: trials this searcher asked for that Ray never completed (a pending trial the search
        deadline overtook) are told FAIL with the reason instead of staying RUNNING in the study."""
        n = 0
        for trial_id, ot_trial in _ray_compat.searcher_trials(self).items():
            if trial_id in _ray_compat.searcher_completed(self):
                continue
            _ray_compat.searcher_completed(self).add(trial_id)
            try:
                ot_trial.set_user_attr("fail_reason", "never started: the search ended (deadline or trial cap) first")
            except optuna.exceptions.UpdateFinishedTrialError:
                continue  # already told
            self.study.tell(ot_trial, None, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
            n += 1
        return n

    def _report_final(self, ot_trial: optuna.Trial, value: float, step: int) -> None:
        """Ray tells the last result (the one that stopped the trial) only at completion: keep it as an
        intermediate value too, so PRUNED trials carry their learning curve up to where ASHA stopped them."""
        frozen = _optuna_compat.stored_trial(self.study, ot_trial)
        if step not in frozen.intermediate_values and not frozen.state.is_finished():
            ot_trial.report(value, step)


class CheckpointAttrCallback(Callback):
    """Records each trial's latest checkpoint URI and trial dir as user attrs (set at completion)."""

    def __init__(self, searcher: EdgetuneOptunaSearch) -> None:
        self.searcher = searcher

    def on_checkpoint(self, iteration: int, trials: list[Any], trial: Any, checkpoint: Any, **info: Any) -> None:
        self.searcher.add_attrs(trial.trial_id, checkpoint_uri=checkpoint_uri(checkpoint))

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.searcher.add_attrs(trial.trial_id, ray_trial_name=str(trial), launched_at=time.time())


def mark_stale_running_failed(study: optuna.Study) -> list[int]:
    """Trials left RUNNING by a killed driver -> FAIL (returns their numbers)."""
    stale = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.RUNNING]
    for t in stale:
        _optuna_compat.fail_stale(study, t, "driver stopped while running; resumed")
    return [t.number for t in stale]
