"""Resuming from the checkpoint Ray restores a run with (trainer/loop_setup.py ``_resume``), in process, on a real
checkpoint written by the loop: a good one is continued (epoch, optimiser, best so far); one that is gone or
incomplete (Ray's experiment snapshot can name a checkpoint that retention deleted, or that a driver SIGKILL caught
half-deleted) restarts the run from epoch 1 with the reason, instead of failing every retry; a read error, an
unknown schema and weights that do not fit still raise."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from trainer.config import TrainConfig

pytestmark = pytest.mark.slow


def _loop_config(run_dir: Path, epochs: int) -> dict:
    cfg = TrainConfig.from_dict(
        {
            "data": {"dataset": "textures", "max_images": 45},
            "model": {"backbone": "efficientnet_lite0", "img_size": 32, "freeze": 1.0},
            "optim": {"lr": 1e-2},
            "epochs": epochs,
            "batch_size": 16,
            "threads": 1,
            "progress": False,
            "robustness": False,
        }
    )
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
    elif how == "truncated train state":
        data = (dst / "train_state.pt").read_bytes()
        (dst / "train_state.pt").write_bytes(data[: len(data) // 2])
    elif how == "no train state":
        (dst / "train_state.pt").unlink()
    return dst


@pytest.mark.parametrize(
    "how", ["stand-in", "no weights", "truncated weights", "truncated train state", "no train state"]
)
def test_a_lost_or_incomplete_checkpoint_restarts_from_epoch_1_and_says_why(
    monkeypatch, tmp_path, caplog, last_checkpoint, how
):
    if how == "stand-in":  # what the tuner puts where Ray's retention deleted the snapshot's checkpoint
        from tuner import _ray_compat

        ckpt = tmp_path / "ray" / "trial_abc" / "checkpoint_000000"
        (tmp_path / "ray" / "trial_abc" / "checkpoint_000001").mkdir(parents=True)
        assert _ray_compat.fill_deleted_checkpoints(str(tmp_path / "ray"), {"abc"}) == [str(ckpt)]
    else:
        ckpt = _damaged(last_checkpoint, tmp_path / "ckpt", how)
    with caplog.at_level(logging.WARNING, logger="trainer.loop_setup"):
        st = _setup_resuming(monkeypatch, tmp_path, ckpt)
    assert (st.start_epoch, st.resumed_from_epoch, st.best) == (1, 0, None)
    assert "gone or incomplete" in st.static["resume_restarted"]
    assert "restarting this run from epoch 1" in caplog.text


def test_a_read_error_or_an_unknown_schema_still_raises(monkeypatch, tmp_path, last_checkpoint):
    """Not a lost checkpoint: a failing read (Ray retries the trial) and a checkpoint of a schema this version
    does not know keep raising, progress is not thrown away."""
    import json

    from edgetune.errors import EdgetuneError

    with pytest.raises(OSError, match="read timed out"):
        _setup_resuming(monkeypatch, tmp_path, OSError("read timed out"))
    newer = _damaged(last_checkpoint, tmp_path / "newer", "")
    import torch

    blob = torch.load(newer / "model.pt", map_location="cpu", weights_only=True)
    blob["meta"]["schema_version"] = 99
    torch.save(blob, newer / "model.pt")
    meta = json.loads((newer / "checkpoint.json").read_text())
    (newer / "checkpoint.json").write_text(json.dumps({**meta, "schema_version": 99}))
    with pytest.raises(EdgetuneError, match="schema"):
        _setup_resuming(monkeypatch, tmp_path, newer)
    refused = _damaged(last_checkpoint, tmp_path / "refused", "")  # an archive holding a type weights_only refuses
    blob = torch.load(refused / "model.pt", map_location="cpu", weights_only=True)
    blob["meta"]["odd"] = _Odd()
    torch.save(blob, refused / "model.pt")
    with pytest.raises(EdgetuneError, match="not a readable edgetune checkpoint"):
        _setup_resuming(monkeypatch, tmp_path, refused)


class _Odd:
    """A type ``torch.load(weights_only=True)`` refuses (UnpicklingError: a bug to see, not a damaged file)."""


def test_weights_that_do_not_fit_the_model_still_raise(monkeypatch, tmp_path, last_checkpoint):
    """Only a lost checkpoint restarts: one that loads but belongs to another model is a real error."""
    import torch

    bad = _damaged(last_checkpoint, tmp_path / "other", "")
    blob = torch.load(bad / "model.pt", map_location="cpu", weights_only=True)
    blob["model_state"] = {"not.a.layer": torch.zeros(1)}
    torch.save(blob, bad / "model.pt")
    with pytest.raises(RuntimeError, match="state_dict"):
        _setup_resuming(monkeypatch, tmp_path, bad)
