"""An epoch's result is a typed, frozen object (trainer/epoch_result.py) with one writer (``to_dict``: the row
every reporter sends, history.jsonl's lines, a checkpoint's history) and one reader (``from_dict`` /
``read_history``): a real run's rows read back equal, a bad row is refused with the reason, no other module spells
history.jsonl."""

from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path

import pytest

from tests.source_scan import files_spelling
from tests.trainer_fixtures import tiny_config
from trainer.epoch_result import HISTORY_FILE, TRAIN_KEYS, EpochResult, EpochResultError, read_history
from trainer.metric import METRICS

ROOT = Path(__file__).resolve().parents[1]


def _result(**changes: object) -> EpochResult:
    r = EpochResult(
        epoch=2,
        epoch_seconds=3.5,
        lr=1e-3,
        train_seconds=7.0,
        train={k: 1.0 for k in TRAIN_KEYS},
        val={"val_loss": 0.5, "val_acc": 0.8, "val_macro_f1": 0.6, "val_balanced_acc": 0.7},
        best={"best_val_macro_f1": 0.6, "best_epoch": 2, "resumed_from_epoch": 0, "checkpoint_score": 2},
        static={"params": 1000, "data_path": "cached", "epochs_planned": 4},
    )
    return r.with_(**changes)


def test_a_real_runs_rows_read_back_equal(tmp_path: Path) -> None:
    from trainer.loop import train_loop

    last = train_loop({"train_config": tiny_config(epochs=2), "run_dir": str(tmp_path), "report_to": "local"})
    hist = read_history(tmp_path)
    assert isinstance(last, EpochResult) and [r.epoch for r in hist] == [1, 2]
    assert hist[-1] == last  # the file's last line is the returned result, field for field
    for r in hist:
        assert EpochResult.from_dict(r.to_dict()) == r
        assert r.val and r.best["best_epoch"] in (1, 2) and "data_path" in r.static
    # the checkpoint keeps the history without the run's repeated facts
    meta = json.loads((tmp_path / "last" / "checkpoint.json").read_text())
    assert meta["history"] == [r.to_dict(with_static=False) for r in hist]


def test_the_result_is_frozen_and_crosses_a_process_boundary() -> None:
    r = _result()
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.epoch = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        r.val["val_acc"] = 1.0  # type: ignore[index]
    back = pickle.loads(pickle.dumps(r))  # a refit's history comes back from its Ray task
    assert back == r and isinstance(back.val, type(r.val))


def test_a_diverged_epoch_reads_back_as_diverged() -> None:
    worst = {n: m.worst for n, m in METRICS.items()}
    r = _result(diverged=True, stop_reason="diverged", val=worst)
    d = r.to_dict()
    assert d["stop_reason"] == "diverged" and "diverged" not in d and d["val_loss"] == 1e6
    assert EpochResult.from_dict(d) == r


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ([1, 2], "must be a mapping"),
        ({"epoch": 1}, "lacks epoch_seconds, lr, train_seconds, train_loss"),
        ({**_result().to_dict(), "lr": "fast"}, "wrong type"),
    ],
)
def test_a_bad_row_is_refused_with_the_reason(row: object, message: str) -> None:
    with pytest.raises(EpochResultError, match=message):
        EpochResult.from_dict(row)  # type: ignore[arg-type]


def test_a_broken_history_line_names_the_file_and_line(tmp_path: Path) -> None:
    (tmp_path / HISTORY_FILE).write_text(json.dumps(_result().to_dict()) + "\n{oops\n")
    with pytest.raises(EpochResultError, match=r"history.jsonl:2 is not JSON"):
        read_history(tmp_path)
    assert read_history(tmp_path / "none") == []


def test_no_other_module_spells_history_jsonl() -> None:
    """One writer and one reader of the file: its name is spelled as a path only in trainer/epoch_result.py."""
    assert files_spelling(HISTORY_FILE) == ["trainer/epoch_result.py"]
