"""Resuming from the checkpoint Ray restores a run with (trainer/loop_setup.py ``_resume``), in process, on a real
checkpoint written by the loop: a good one is continued (epoch, optimiser, best so far); one that is gone or
incomplete (Ray's experiment snapshot can name a checkpoint that retention deleted, or that a driver SIGKILL caught
half-deleted) restarts the run from epoch 1 with the reason, instead of failing every retry."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from trainer.config import TrainConfig

pytestmark = pytest.mark.slow


def _loop_config(run_dir: Path, epochs: int) -> dict:
    cfg = TrainConfig.from_dict({
        "data": {"dataset": "textures", "max_images": 45},
        "model": {"backbone": "efficientnet_lite0", "img_size": 32, "freeze": 1.0},
        "optim": {"lr": 1e-2}, "epochs": epochs, "batch_size": 16, "threads": 1, "progress": False,
        "robustness": False})
    return {"train_config": cfg.to_dict(), "run_dir": str(run_dir), "report_to": "local"}


class _Resuming:
    """The local reporter, resuming from ``ckpt`` (what Ray's reporters do with the restored checkpoint)."""

    def __init__(self, inner, ckpt):
        self.inner, self.ckpt = inner, ckpt

    def report(self, metrics, checkpoint_dir):
        self.inner.report(metrics, checkpoint_dir)

    def resume_dir(self):
        if isinstance(self.ckpt, Exception):
            raise self.ckpt
        return self.ckpt


@pytest.fixture(scope="module")
def last_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from trainer.loop import train_loop

    run = tmp_path_factory.mktemp("first")
    train_loop(_loop_config(run, epochs=1))
    assert (run / "last" / "model.pt").is_file() and (run / "last" / "train_state.pt").is_file()
    return run / "last"


def _setup_resuming(monkeypatch, tmp_path: Path, ckpt):
    import trainer.loop_setup as ls

    real = ls.make_reporter
    monkeypatch.setattr(ls, "make_reporter", lambda *a, **k: _Resuming(real(*a, **k), ckpt))
    return ls.setup(_loop_config(tmp_path / "second", epochs=3))


def test_a_good_checkpoint_is_continued(monkeypatch, tmp_path, last_checkpoint):
    st = _setup_resuming(monkeypatch, tmp_path, last_checkpoint)
    assert (st.start_epoch, st.resumed_from_epoch) == (2, 1) and st.best is not None
    assert "resume_restarted" not in st.static


def _damaged(src: Path, dst: Path, how: str) -> Path:
    shutil.copytree(src, dst)
    if how == "no weights":
        (dst / "model.pt").unlink()
    elif how == "truncated weights":
        data = (dst / "model.pt").read_bytes()
        (dst / "model.pt").write_bytes(data[: len(data) // 3])
    elif how == "no train state":
        (dst / "train_state.pt").unlink()
    return dst


@pytest.mark.parametrize("how", ["no weights", "truncated weights", "no train state", "gone"])
def test_a_lost_or_incomplete_checkpoint_restarts_from_epoch_1_and_says_why(monkeypatch, tmp_path, caplog,
                                                                           last_checkpoint, how):
    ckpt = (FileNotFoundError(f"Path not found: {tmp_path / 'deleted'}") if how == "gone"
            else _damaged(last_checkpoint, tmp_path / "ckpt", how))
    with caplog.at_level(logging.WARNING, logger="trainer.loop_setup"):
        st = _setup_resuming(monkeypatch, tmp_path, ckpt)
    assert (st.start_epoch, st.resumed_from_epoch, st.best) == (1, 0, None)
    assert "gone or incomplete" in st.static["resume_restarted"]
    assert "restarting this run from epoch 1" in caplog.text


def test_weights_that_do_not_fit_the_model_still_raise(monkeypatch, tmp_path, last_checkpoint):
    """Only a lost checkpoint restarts: one that loads but belongs to another model is a real error."""
    import torch

    bad = _damaged(last_checkpoint, tmp_path / "other", "")
    blob = torch.load(bad / "model.pt", map_location="cpu", weights_only=True)
    blob["model_state"] = {"not.a.layer": torch.zeros(1)}
    torch.save(blob, bad / "model.pt")
    with pytest.raises(RuntimeError, match="state_dict"):
        _setup_resuming(monkeypatch, tmp_path, bad)
