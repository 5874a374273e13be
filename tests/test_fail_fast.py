"""What fails before a study starts (no Ray): a search space key no TrainConfig has, a time budget too small for one
trial; and a study that produced no model exits non-zero with the reason."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from edgetune.errors import ConfigError
from trainer.config import TrainConfig
from tuner.space import DEFAULT_SPACE, load_space

TYPO = "params:\n  dropout: {type: float, key: model.dropuot, low: 0.0, high: 0.4}\n"


def _values(prm: Any) -> list[Any]:
    if prm.type == "categorical":
        return list(prm.choices)
    return [prm.low, prm.high] if prm.type == "float" else [int(prm.low), int(prm.high)]


def test_every_parameter_of_the_default_space_applies_to_a_valid_train_config() -> None:
    space = load_space(DEFAULT_SPACE)
    space.add_device_params(["fp32", "fp16", "int8"])
    assert {"backbone", "dropout", "balance", "head_hidden"} <= set(space.params)
    base = TrainConfig()
    for name, prm in space.params.items():
        for v in _values(prm):
            over = space.to_overrides({name: v})
            cfg = base.replace(over)  # ConfigError on an unknown key or a refused value
            for key, value in over.items():
                section, _, field = key.rpartition(".")
                got = getattr(getattr(cfg, section) if section else cfg, field)
                assert got == value or (isinstance(value, list) and list(got) == value), (name, key, got, value)


def test_a_space_key_typo_is_refused_at_load_naming_the_key_and_the_allowed_ones(tmp_path: Path) -> None:
    (tmp_path / "space.yaml").write_text(TYPO)
    with pytest.raises(ConfigError, match=r"'dropout'.*model\.dropuot.*allowed here: .*'dropout'"):
        load_space(tmp_path / "space.yaml")


def test_a_key_set_by_a_choice_is_checked_too(tmp_path: Path) -> None:
    (tmp_path / "space.yaml").write_text(
        "params:\n  balance: {type: categorical, choices: [none, sampler],\n"
        "            sets: {none: {}, sampler: {data.smapler: balanced}}}\n"
    )
    with pytest.raises(ConfigError, match=r"'balance'.*data\.smapler.*allowed here"):
        load_space(tmp_path / "space.yaml")


def test_a_value_the_config_refuses_is_refused_at_load(tmp_path: Path) -> None:
    (tmp_path / "space.yaml").write_text(
        "params:\n  optimizer: {type: categorical, key: optim.optimizer, choices: [adamw, rmsprop]}\n"
    )
    with pytest.raises(ConfigError, match=r"'optimizer'.*rmsprop"):
        load_space(tmp_path / "space.yaml")


def test_a_space_key_typo_fails_the_study_before_ray_starts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    from tuner import cluster
    from tuner.options import TuneOptions
    from tuner.run import run_study

    def no_ray(*a: Any, **k: Any) -> None:
        raise AssertionError("Ray was started for a study whose space has a bad key")

    monkeypatch.setattr(cluster, "connect", no_ray)
    monkeypatch.setattr(ray, "init", no_ray)
    (tmp_path / "space.yaml").write_text(TYPO)
    opts = TuneOptions(
        data="textures",
        trials=1,
        epochs=1,
        space=str(tmp_path / "space.yaml"),
        out=str(tmp_path / "out"),
        storage=f"sqlite:///{tmp_path / 'o.db'}",
    )
    with pytest.raises(ConfigError, match="dropuot"):
        run_study(opts)
    assert not (tmp_path / "out" / "split.json").exists()  # not even the data was prepared


def test_a_budget_too_small_for_one_trial_is_refused_naming_the_minimum() -> None:
    from tuner.options import MIN_TIME_BUDGET_S, TuneOptions

    assert 60 <= MIN_TIME_BUDGET_S <= 100
    with pytest.raises(ConfigError, match=rf"20 s is too small.*minimum is {MIN_TIME_BUDGET_S:g} s"):
        TuneOptions(data="textures", time_budget_s=20, out="/tmp/edgetune-opts-test")
    assert TuneOptions(data="textures", time_budget_s=MIN_TIME_BUDGET_S, out="/tmp/edgetune-opts-test")
    assert TuneOptions(data="textures", time_budget_s=0, trials=1, out="/tmp/edgetune-opts-test")


def test_the_cli_refuses_a_too_small_budget_with_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tuner.__main__ import main

    assert (
        main(
            [
                "--data",
                "textures",
                "--time-budget",
                "20",
                "--out",
                str(tmp_path / "o"),
                "--storage",
                f"sqlite:///{tmp_path / 'o.db'}",
            ]
        )
        == 2
    )
    assert "minimum is 90 s" in capsys.readouterr().err


def test_a_study_that_produced_no_model_exits_1_with_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import tuner.launcher
    import tuner.run
    from tuner.__main__ import main
    from tuner.summary import FinalModel, StudySummary

    summary = StudySummary(
        study="s",
        storage="sqlite:///x.db",
        metric="val_macro_f1",
        trials=2,
        states={"COMPLETE": 0, "PRUNED": 0, "FAIL": 2, "RUNNING": 0},
        out=str(tmp_path),
        refit={"skipped": "no trial and no seed point to fit"},
    )
    monkeypatch.setattr(tuner.run, "run_study", lambda opts, started_at=None: summary)
    monkeypatch.setattr(tuner.launcher, "launched_cluster", lambda *a: None)
    args = [
        "--data",
        "textures",
        "--trials",
        "2",
        "--out",
        str(tmp_path / "o"),
        "--storage",
        f"sqlite:///{tmp_path / 'o.db'}",
    ]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "produced no model" in err and "2 FAIL" in err and "no trial and no seed point" in err
    model = FinalModel(0, None, "resnet18", 0.5, 0.5, 0.5, 0.5, str(tmp_path / "best"))
    monkeypatch.setattr(tuner.run, "run_study", lambda opts, started_at=None: summary.with_(final=model))
    assert main(args) == 0


def test_every_seed_point_of_the_default_space_builds_a_valid_train_config() -> None:
    """The seed configurations (points_to_evaluate, tried first) are whole trials: each one's values, applied together
    as a trial applies them, give a TrainConfig that carries every value."""
    from tuner.space import build_trial_config

    space = load_space(DEFAULT_SPACE)
    assert space.seeds
    for seed in space.seeds:
        over = space.to_overrides(dict(seed["params"]))
        cfg = build_trial_config(TrainConfig(), over)
        for key, value in over.items():
            section, _, field = key.rpartition(".")
            got = getattr(getattr(cfg, section) if section else cfg, field)
            assert got == value or (isinstance(value, list) and list(got) == value), (seed["name"], key, got, value)
