"""The training loop's input is one typed, validated schema (trainer.loop_config.LoopConfig), read in one place."""

from __future__ import annotations

import dataclasses
import pickle
import re

import pytest

from edgetune.errors import ConfigError
from trainer.config import TrainConfig
from trainer.loop_config import REPORT_TO, LoopConfig


def test_round_trip_through_the_dict_ray_train_hands_a_worker():
    lc = LoopConfig(
        train_config=TrainConfig().to_dict(),
        run_dir="/tmp/x",
        static_metrics={"latency_ms": 2.5},
        deadline=1e9,
        with_test=False,
    )
    d = lc.to_dict()
    assert isinstance(d, dict) and d["static_metrics"] == {"latency_ms": 2.5}
    back = LoopConfig.coerce(d)
    assert back == lc and LoopConfig.coerce(back) is back
    # the TrainConfig travels as itself: a dict given for it is validated into one, once
    assert isinstance(lc.train_config, TrainConfig) and lc.train_config == TrainConfig()
    assert LoopConfig(train_config=TrainConfig()) == LoopConfig(train_config=TrainConfig().to_dict())
    assert pickle.loads(pickle.dumps(lc)) == lc  # Ray serialises it
    assert lc.replace(report_to="tune").report_to == "tune" and lc.report_to == "local"
    with pytest.raises(dataclasses.FrozenInstanceError):
        lc.report_to = "tune"  # type: ignore[misc]


@pytest.mark.parametrize(
    "bad,match",
    [
        ({"run-dir": "x"}, r"unknown key\(s\) \['run-dir'\]; allowed: \['train_config', 'run_dir'"),
        ({"report_to": "stdout"}, "report_to must be one of " + re.escape(str(list(REPORT_TO)))),
        ({"deadline": "soon"}, "deadline must be a unix time or None"),
        ({"static_metrics": [1]}, "static_metrics must be a mapping"),
    ],
)
def test_bad_loop_config_is_refused_naming_what_is_allowed(bad, match):
    with pytest.raises(ConfigError, match=match):
        LoopConfig.coerce({"train_config": TrainConfig().to_dict(), **bad})
    with pytest.raises(ConfigError, match="train_config is required"):
        LoopConfig.coerce({"run_dir": "x"})
    with pytest.raises(ConfigError, match="train_config must be a TrainConfig"):
        LoopConfig(train_config="epochs=3")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="optim"):
        LoopConfig(train_config={"optim": {"lr": -1}})  # validated once, where it enters


def test_train_loop_refuses_a_bad_config_before_any_work(tmp_path):
    from trainer.loop import train_loop

    with pytest.raises(ConfigError, match="unknown key"):
        train_loop({"train_config": TrainConfig().to_dict(), "run_dir": str(tmp_path), "measure_latency": True})
    assert not any(tmp_path.iterdir())
