"""A trial's result keys are defined once (tuner/trial_record.RESULT_ATTRS), written by the searcher's one mapping
(attrs_from_result) and read back typed (TrialRecord.of) from a real Optuna storage."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import optuna
import pytest

from trainer.epoch_result import TRAIN_KEYS, EpochResult
from trainer.metric import METRICS
from tuner.trial_record import (
    METRIC_ATTRS,
    RESULT_ATTRS,
    SEARCHER_ATTRS,
    TrialRecord,
    TrialRecordError,
    attrs_from_result,
    records,
    seed_record,
)


def _last_result() -> dict[str, object]:
    """A trial's last reported row, as the training loop writes it (trainer/epoch_result.py)."""
    return EpochResult(
        epoch=3,
        epoch_seconds=41.5,
        lr=1e-4,
        train_seconds=130.0,
        train={k: 1.0 for k in TRAIN_KEYS},
        val={"val_loss": 0.5, "val_acc": 0.8, "val_macro_f1": 0.6, "val_balanced_acc": 0.7, "weights": "ema"},
        best={
            "best_val_macro_f1": 0.62,
            "best_epoch": 2,
            "resumed_from_epoch": 0,
            "checkpoint_score": -1,
            **{f"{k}_at_best": 0.61 for k in METRICS},
        },
        static={
            "params": 3_400_000,
            "size_mb": 13.1,
            "data_path": "cached",
            "setup_seconds": 9.5,
            "started_at": 1.7e9,
            "epochs_planned": 4,
            "latency_ms": 3.2,
            "node_id": "abc",
            "act_cache_builds": 1,
        },
    ).to_dict() | {"trial_id": "f00d_00001", "worker_node_ids": ["n1", "n2"]}


def _study(tmp_path: Path) -> optuna.Study:
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'o.db'}", study_name="s", direction="maximize")
    t = study.ask({"backbone": optuna.distributions.CategoricalDistribution(["mobilenet_v2", "resnet18"])})
    for k, v in attrs_from_result(_last_result()).items():  # what the searcher's tell writes
        t.set_user_attr(k, v)
    t.set_user_attr("fail_reason", None)
    t.set_user_attr("a_newer_attr", {"x": 1})
    study.tell(t, 0.62)
    study.ask()  # a RUNNING trial without attrs
    return study


def test_what_the_searcher_writes_reads_back_typed(tmp_path: Path) -> None:
    done, running = records(_study(tmp_path))
    assert done.state == "COMPLETE" and done.finished and done.values == (0.62,)
    assert done.best("val_macro_f1") == 0.62 and done.at_best("val_acc") == 0.61
    assert done.model_params == 3_400_000 and isinstance(done.model_params, int)
    assert done.epochs_trained == 3 and done.epochs_planned == 4 and done.weights == "ema"
    assert done.fidelity() == "3/4 ep, ema" and done.latency_ms == 3.2 and done.setup_seconds == 9.5
    assert done.ray_trial_id == "f00d_00001" and done.worker_node_ids == ("n1", "n2")
    assert done.act_cache_builds == 1 and done.started is not None and done.completed is not None
    assert dict(done.extra) == {"a_newer_attr": {"x": 1}}  # kept, as stored
    assert running.state == "RUNNING" and not running.finished and running.best("val_macro_f1") is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        done.stop_reason = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        done.metrics["val_acc"] = 1.0  # type: ignore[index]


def test_a_wrong_typed_attr_is_named_and_never_stops_a_report(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    study = _study(tmp_path)
    t = study.ask()
    t.set_user_attr("epoch_seconds", "slow")
    t.set_user_attr("val_acc", [1])
    study.tell(t, 0.1)
    odd = study.trials[2]
    with pytest.raises(TrialRecordError, match=r"trial #2: attr 'epoch_seconds' is 'slow', expected a number"):
        TrialRecord.of(odd)
    rec = records(study)[2]  # what the leaderboard, the latency tables and a resume read: logged, kept, not used
    assert rec.epoch_seconds is None and "val_acc" not in rec.metrics
    assert dict(rec.extra) == {"epoch_seconds": "slow", "val_acc": [1]}
    assert "trial #2: attr 'epoch_seconds' is 'slow', expected a number; kept as stored" in caplog.text


def test_every_result_key_has_one_typed_home() -> None:
    """Each attr the searcher writes is a typed field of TrialRecord (or a metric): adding a result key to
    RESULT_ATTRS without a field fails here."""
    typed = {f.metadata["attr"] or f.name for f in dataclasses.fields(TrialRecord) if "kind" in f.metadata} | set(
        METRIC_ATTRS
    )
    written = set(RESULT_ATTRS.values()) | set(SEARCHER_ATTRS)
    assert written - typed == set(), sorted(written - typed)
    assert typed - written == set(), sorted(typed - written)


def test_a_seed_point_stands_in_for_a_trial() -> None:
    s = seed_record({"backbone": "resnet18"})
    assert s.number == -1 and s.params["backbone"] == "resnet18" and s.best("val_macro_f1") is None
