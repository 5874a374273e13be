"""Pins the Ray and Optuna internals edgetune uses (tuner/_ray_compat.py, tuner/_optuna_compat.py).

If a Ray or Optuna upgrade moves one of them, a test here fails and names it; the version checks refuse an
untested release at start with a clear message.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import optuna
import pytest

from edgetune.device import token_available
from edgetune.errors import EdgetuneError
from tuner import _optuna_compat, _ray_compat

REPO = Path(__file__).resolve().parents[1]
PRIVATE = re.compile(
    r"\._ot_study|\._ot_trials|\._completed_trials|\._storage\b|\._trial_id\b|"
    r"_training_actor_item_queue|ray\._common|ray\._private|ray\._raylet|autoscaler\._private|"
    r"optuna\._"
)


def test_private_access_only_in_the_adapters() -> None:
    hits = sorted(
        str(p.relative_to(REPO))
        for d in ("trainer", "tuner", "edge_server", "edge_client")
        for p in (REPO / d).rglob("*.py")
        if PRIVATE.search(p.read_text())
    )
    assert hits == ["tuner/_optuna_compat.py", "tuner/_ray_compat.py"]


def test_installed_versions_are_the_tested_ones() -> None:
    import ray

    assert _ray_compat.check_version() == ray.__version__
    assert _optuna_compat.check_version() == optuna.__version__


def test_untested_versions_are_refused_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EDGETUNE_ALLOW_UNTESTED_RAY", raising=False)
    monkeypatch.delenv("EDGETUNE_ALLOW_UNTESTED_OPTUNA", raising=False)
    with pytest.raises(
        EdgetuneError, match=r"tested with ray 2\.60\.x; found ray 3\.1\.0.*EDGETUNE_ALLOW_UNTESTED_RAY"
    ):
        _ray_compat.check_version("3.1.0")
    with pytest.raises(EdgetuneError, match=r"tested with optuna 5\.x; found optuna 6\.0\.0"):
        _optuna_compat.check_version("6.0.0")
    monkeypatch.setenv("EDGETUNE_ALLOW_UNTESTED_RAY", "1")
    assert _ray_compat.check_version("3.1.0") == "3.1.0"


def test_optuna_search_internals(tmp_path: Path) -> None:
    """OptunaSearch keeps its study, the Ray id -> optuna.Trial map and the told ids where the adapter reads them."""
    from ray import tune

    from tuner.searcher import EdgetuneOptunaSearch

    storage = f"sqlite:///{tmp_path}/s.db"
    search = EdgetuneOptunaSearch(
        space={"lr": tune.loguniform(1e-4, 1e-1)},
        metric="m",
        mode="max",
        study_name="pin",
        storage=optuna.storages.RDBStorage(storage),
        max_t=2,
    )
    cfg = search.suggest("ray-trial-1")
    assert cfg is not None and "lr" in cfg
    study = _ray_compat.searcher_study(search)
    assert isinstance(study, optuna.Study) and study.study_name == "pin"
    live = _ray_compat.searcher_trials(search)["ray-trial-1"]
    assert isinstance(live, optuna.Trial)
    assert "ray-trial-1" not in _ray_compat.searcher_completed(search)
    frozen = _optuna_compat.stored_trial(study, live)
    assert frozen.state == optuna.trial.TrialState.RUNNING and frozen.params == cfg
    search.on_trial_complete("ray-trial-1", {"m": 0.5, "training_iteration": 2})
    assert "ray-trial-1" in _ray_compat.searcher_completed(search)
    assert _optuna_compat.stored_trial(study, live).state == optuna.trial.TrialState.COMPLETE


def test_fail_stale_marks_a_running_trial_failed_with_reason(tmp_path: Path) -> None:
    from tuner.searcher import mark_stale_running_failed

    storage = f"sqlite:///{tmp_path}/s.db"
    study = optuna.create_study(study_name="stale", storage=storage)
    study.ask()  # left RUNNING, as by a killed driver
    study.tell(study.ask(), 1.0)
    assert mark_stale_running_failed(optuna.load_study(study_name="stale", storage=storage)) == [0]
    t0, t1 = optuna.load_study(study_name="stale", storage=storage).get_trials()
    assert t0.state == optuna.trial.TrialState.FAIL
    assert t0.user_attrs["fail_reason"] == "driver stopped while running; resumed"
    assert t1.state == optuna.trial.TrialState.COMPLETE and "fail_reason" not in t1.user_attrs


def test_tune_report_callback_forwards_through_its_queue() -> None:
    """TuneReportCallback puts each report on ``_training_actor_item_queue`` (set in __init__)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    assert "self._training_actor_item_queue =" in inspect.getsource(TuneReportCallback.__init__)
    assert "self._training_actor_item_queue.put(metrics)" in inspect.getsource(TuneReportCallback.after_report)

    class Queue:
        def __init__(self) -> None:
            self.items: list[dict[str, object]] = []

        def put(self, item: dict[str, object]) -> None:
            self.items.append(item)

    cb = TuneReportCallback.__new__(TuneReportCallback)
    cb._training_actor_item_queue = Queue()  # type: ignore[attr-defined]
    _ray_compat.forward_report(cb, {"a": 1})
    assert cb._training_actor_item_queue.items == [{"a": 1}]  # type: ignore[attr-defined]


def test_address_file_honours_ray_tmpdir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    assert Path(_ray_compat.address_file()) == tmp_path / "ray" / "ray_current_cluster"


def test_auth_mode_switch_reaches_rays_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``set_auth_mode`` relies on ``ray._raylet.Config.initialize`` re-reading ``RAY_AUTH_MODE`` (what Ray's own
    ``_enable_token_auth`` does); ``token_available`` on Ray's token locations."""
    import os

    from ray._raylet import AuthenticationMode, Config, get_authentication_mode

    assert callable(Config.initialize)
    before = os.environ.get("RAY_AUTH_MODE")
    try:
        _ray_compat.set_auth_mode("token")
        assert get_authentication_mode() == AuthenticationMode.TOKEN
        _ray_compat.set_auth_mode("disabled")
        assert get_authentication_mode() != AuthenticationMode.TOKEN
    finally:  # this process's Ray config as it was (later tests start clusters from it)
        if before is None:
            os.environ.pop("RAY_AUTH_MODE", None)
            Config.initialize("")
        else:
            _ray_compat.set_auth_mode(before)
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "none"))
    assert not token_available()
    (tmp_path / "none").write_text("t")
    assert token_available()
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    monkeypatch.setenv("RAY_AUTH_TOKEN", "abc")
    assert token_available()
