"""The train state beside a checkpoint's weights is a typed, frozen object with one writer (trainer/loop.py's
checkpoint) and one reader (trainer/loop_setup._resume through trainer.train_state.TrainState)."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import torch

from trainer.train_state import TrainState, TrainStateError

ROOT = Path(__file__).resolve().parents[1]


def _writer_keys() -> set[str]:
    """The fields trainer/loop.py's one writer sets: its one torch.save of TRAIN_STATE saves a TrainState's
    ``to_dict()``, and its one ``TrainState(...)`` call names every field by keyword."""
    tree = ast.parse((ROOT / "trainer" / "loop.py").read_text())
    saves = [
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.Call) and ast.unparse(n.func) == "torch.save" and "TRAIN_STATE" in ast.unparse(n)
    ]
    assert len(saves) == 1, [ast.unparse(s)[:80] for s in saves]
    first = saves[0].args[0]
    assert isinstance(first, ast.Call) and ast.unparse(first).endswith(".to_dict()"), ast.unparse(first)
    builds = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and ast.unparse(n.func) == "TrainState"]
    assert len(builds) == 1, [ast.unparse(b)[:80] for b in builds]
    assert not builds[0].args, "the writer names every field by keyword"
    return {k.arg for k in builds[0].keywords if k.arg}


def test_the_writer_saves_exactly_the_fields_the_reader_knows():
    assert _writer_keys() == set(TrainState.field_names())


def test_what_the_writer_saves_the_reader_reads_back(tmp_path):
    """trainer.loop's writer -> torch.save -> a weights-only torch.load -> TrainState.from_dict: the same state."""
    from types import SimpleNamespace

    from trainer.loop import _train_state

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1, momentum=0.9)
    st = SimpleNamespace(
        opt=opt,
        sched=torch.optim.lr_scheduler.StepLR(opt, 1),
        best=0.75,
        best_epoch=2,
        at_best={"val_acc_at_best": 0.75},
        train_seconds_total=12.5,
        static={"data_path": "cached", "setup_seconds": 4.0},
    )
    written = _train_state(st, 3)  # type: ignore[arg-type]
    torch.save(written.to_dict(), tmp_path / "train_state.pt")
    back = TrainState.from_dict(torch.load(tmp_path / "train_state.pt", map_location="cpu", weights_only=True))
    assert (back.epoch, back.best, back.best_epoch, back.train_seconds) == (3, 0.75, 2, 12.5)
    assert dict(back.at_best) == {"val_acc_at_best": 0.75}
    assert dict(back.static) == {"data_path": "cached"}  # setup_seconds is measured again by the resumed run
    assert back.optimizer == written.optimizer and back.scheduler == written.scheduler
    assert back.to_dict().keys() == written.to_dict().keys() == set(TrainState.field_names())


def _state() -> dict:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1)
    return {
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "epoch": 3,
        "best": 0.75,
        "best_epoch": 2,
        "at_best": {"val_acc": 0.75},
        "train_seconds": 12.5,
        "static": {"data_path": "cached", "setup_seconds": 4.0},
    }


def test_round_trip_through_a_weights_only_file(tmp_path):
    s = TrainState.from_dict(_state())
    torch.save(s.to_dict(), tmp_path / "train_state.pt")
    back = TrainState.from_dict(torch.load(tmp_path / "train_state.pt", map_location="cpu", weights_only=True))
    assert (back.epoch, back.best, back.best_epoch, back.train_seconds) == (3, 0.75, 2, 12.5)
    assert dict(back.at_best) == {"val_acc": 0.75}
    assert dict(back.static) == {"data_path": "cached"}  # setup_seconds is measured again by the resumed run
    assert back.optimizer["param_groups"][0]["lr"] == 0.1


def test_frozen_and_validated():
    s = TrainState.from_dict(_state())
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.epoch = 4  # type: ignore[misc]
    with pytest.raises(TypeError):
        s.static["x"] = 1  # type: ignore[index]
    d = _state()
    del d["scheduler"]
    with pytest.raises(TrainStateError, match="lacks scheduler"):
        TrainState.from_dict(d)
    with pytest.raises(TrainStateError, match="wrong type"):
        TrainState.from_dict({**_state(), "epoch": "third"})
    older = {k: v for k, v in _state().items() if k in ("optimizer", "scheduler", "epoch")}
    assert TrainState.from_dict(older).best is None  # the optional fields default
