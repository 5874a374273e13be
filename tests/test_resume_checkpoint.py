"""Resuming from the checkpoint Ray restores a run with (trainer/loop_setup.py ``_resume``), in process, on a real
checkpoint written by the loop: a good one is continued (epoch, optimiser, best so far); one that is gone or
incomplete (Ray's experiment snapshot can name a checkpoint that retention deleted, or that a driver SIGKILL caught
half-deleted) restarts the run from epoch 1 with the reason, instead of failing every retry; a read error, an
unknown schema and weights that do not fit still raise. DDP ranks (a real 2-process gloo group) continue from the
same epoch or all restart, and each rank reads a copy of its own."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import shutil
import time
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

    @contextlib.contextmanager
    def resume_checkpoint(self):
        if isinstance(self.ckpt, Exception):
            raise self.ckpt
        yield self.ckpt


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


def test_each_process_reads_a_copy_of_its_own_removed_afterwards(tmp_path, last_checkpoint):
    """Ray's ``to_directory()`` with no path names the copy after the checkpoint, so DDP ranks on one node shared
    it, and a rank that took its lock after another had finished copied again over the files that rank was
    reading (a loaded run hung on it: rank 0 read a truncated model.pt). Two copies of one checkpoint open at once
    are two directories, each complete, and both are gone afterwards."""
    import ray.train

    from trainer.reporting import _private_copy

    ckpt = ray.train.Checkpoint.from_directory(str(_damaged(last_checkpoint, tmp_path / "stored", "")))
    with _private_copy(ckpt) as a, _private_copy(ckpt) as b:
        assert a is not None and b is not None and a != b
        for d in (a, b):
            assert (d / "model.pt").read_bytes() == (last_checkpoint / "model.pt").read_bytes()
    assert not a.exists() and not b.exists()
    with _private_copy(None) as none:
        assert none is None


def _ddp_rank(rank: int, store: str, run_dir: str, ckpt: str, out) -> None:
    """One DDP rank's setup (the real ``setup``; torch's DDP in place of Ray Train's ``prepare_model``, which
    needs a Ray Train worker), resuming from ``ckpt``; sends back where it starts."""
    import torch
    import torch.distributed as dist

    import trainer.loop_setup as ls

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        real = ls.make_reporter
        ls.make_reporter = lambda *a, **k: _Resuming(real(*a, **k), Path(ckpt))
        ls._wrap_ddp = lambda model, world: torch.nn.parallel.DistributedDataParallel(model)
        st = ls.setup(_loop_config(Path(run_dir), epochs=3))
        out.put((rank, st.start_epoch, st.resumed_from_epoch, st.static.get("resume_restarted", "")))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _two_ranks(tmp_path: Path, ckpts: tuple[Path, Path]) -> dict[int, tuple]:
    """Both ranks' (start epoch, resumed-from epoch, restart reason); fails as soon as a rank dies without one."""
    import queue

    tmp_path.mkdir(parents=True)
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [
        ctx.Process(target=_ddp_rank, args=(r, str(tmp_path / "store"), str(tmp_path / "run"), str(ckpts[r]), out))
        for r in (0, 1)
    ]
    for p in procs:
        p.start()
    try:
        got: dict[int, tuple] = {}
        deadline = time.monotonic() + 600  # generous: the two setups take ~10 s on a quiet machine
        while len(got) < len(procs):  # a state, not a time: each rank reports once its setup is done
            exited = [r for r, p in enumerate(procs) if p.exitcode is not None]  # before draining: no race
            try:
                while True:
                    rank, *rest = out.get(timeout=2)
                    got[rank] = tuple(rest)
            except queue.Empty:
                pass
            dead = [(r, procs[r].exitcode) for r in exited if r not in got]
            assert not dead, f"rank(s) exited without a result (rank, exit code): {dead}; see captured stderr"
            assert time.monotonic() < deadline, f"only ranks {sorted(got)} finished their setup in 600 s: {got}"
        for p in procs:
            p.join(timeout=300)
        assert [p.exitcode for p in procs] == [0, 0]
        return got
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()


def test_ddp_ranks_resume_from_the_same_epoch_or_all_restart(tmp_path, last_checkpoint):
    """A rank that cannot read the checkpoint while the other can: both restart from epoch 1 (before the fix the
    rank that read it resumed at epoch 2, the other started at 1, and training hung in DDP's first collective).
    Both readable: both continue from epoch 2."""
    damaged = _damaged(last_checkpoint, tmp_path / "damaged", "truncated weights")
    split = _two_ranks(tmp_path / "split", (damaged, last_checkpoint))
    assert [split[r][:2] for r in (0, 1)] == [(1, 0), (1, 0)], split
    for r in (0, 1):
        assert "DDP ranks read different checkpoints" in split[r][2], split
    alike = _two_ranks(tmp_path / "alike", (last_checkpoint, last_checkpoint))
    assert [alike[r] for r in (0, 1)] == [(2, 1, ""), (2, 1, "")], alike
