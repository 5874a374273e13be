"""The one TorchTrainer factory (trainer.ray_trainer): make train's DDP run and the tuner's DDP trials keep the
best epoch's checkpoint by trainer.metric's rule, and a DDP trial forwards that checkpoint to the study."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.trainer_fixtures import tiny_config
from trainer.metric import CHECKPOINT_SCORE, CHECKPOINT_SCORE_MODE


def _trainers(tmp_path: Path) -> dict[str, Any]:
    from trainer.run import _ddp_trainer
    from tuner.trial import TrialResources, ddp_trainer

    cfg = tiny_config(**{"workers": 2})
    res = TrialResources(
        workers=2,
        cpus_per_worker=0.5,
        resources_per_worker={"slot": 1.0},
        placement_strategy="STRICT_SPREAD",
        max_failures=3,
        storage_path=str(tmp_path / "ray"),
    )
    return {
        "make train": _ddp_trainer(cfg, tmp_path, cpus=2.0),
        "tuner trial": ddp_trainer({"train_config": cfg.to_dict(), "report_to": "ray_train"}, res, "t1"),
    }


def test_both_ddp_callers_keep_the_best_checkpoint(tmp_path: Path) -> None:
    trainers = _trainers(tmp_path)
    for who, t in trainers.items():
        ck = t.run_config.checkpoint_config
        kept = (ck.num_to_keep, ck.checkpoint_score_attribute, ck.checkpoint_score_order)
        assert kept == (1, CHECKPOINT_SCORE, CHECKPOINT_SCORE_MODE), f"{who} keeps {kept}, not the best epoch"
    run, trial = trainers["make train"], trainers["tuner trial"]
    # each caller's own resources and restarts still reach Ray
    assert run.scaling_config.resources_per_worker == {"CPU": 0.995}
    assert run.run_config.failure_config.max_failures == 2
    assert trial.scaling_config.resources_per_worker == {"slot": 1.0, "CPU": 0.5}
    assert trial.scaling_config.placement_strategy == "STRICT_SPREAD"
    assert trial.run_config.failure_config.max_failures == 3
    assert trial.run_config.name == "train-trial_id=t1"


def test_ddp_trial_forwards_the_best_epochs_checkpoint(tmp_path: Path) -> None:
    """The Train run keeps the best and the latest checkpoint; the study must be given the best one."""
    from ray.train import Checkpoint

    from tuner.trial import best_checkpoint

    best: dict = {}
    seen = []
    for epoch, score in ((1, 1), (2, -1), (3, 3), (4, -1)):  # what trainer.loop reports: epoch if best, else -1
        d = tmp_path / f"epoch{epoch}"
        d.mkdir()
        best = best_checkpoint(best, {"epoch": epoch, CHECKPOINT_SCORE: score}, Checkpoint.from_directory(str(d)))
        best = best_checkpoint(best, {"epoch": epoch, CHECKPOINT_SCORE: score}, None)  # a rank without one
        seen.append(Path(best["checkpoint_uri"]).name)
    assert seen == ["epoch1", "epoch1", "epoch3", "epoch3"]


@pytest.mark.slow
@pytest.mark.ray
def test_factory_trainer_keeps_the_best_not_the_latest(tmp_path: Path) -> None:
    """A real Ray Train run from the factory: of epochs scored 1, -1 the run keeps epoch 1 (and the latest)."""
    import ray

    from trainer.ray_trainer import make_torch_trainer

    ray.init(address="local", num_cpus=1, include_dashboard=False, logging_level="ERROR")  # never another Ray here
    try:
        result = make_torch_trainer(
            {},
            workers=1,
            use_gpu=False,
            name="t",
            storage_path=str(tmp_path),
            max_failures=0,
            resources_per_worker={"CPU": 1.0},
            loop_fn=_scored_loop,
        ).fit()
    finally:
        ray.shutdown()
    assert result.error is None
    best = result.get_best_checkpoint(CHECKPOINT_SCORE, CHECKPOINT_SCORE_MODE)
    assert best is not None and (Path(best.path) / "epoch").read_text() == "1"
    assert (Path(result.checkpoint.path) / "epoch").read_text() == "3"  # the latest, for a restart
    on_disk = sorted(int(f.read_text()) for f in (tmp_path / "t").glob("checkpoint_*/epoch"))
    assert on_disk == [1, 3]  # the best (whose URI the tuner records) and the latest


def _scored_loop(config: dict) -> None:
    import tempfile

    import ray.train

    for epoch, score in ((1, 1), (2, -1), (3, -1)):
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "epoch").write_text(str(epoch))
            ray.train.report(
                {"epoch": epoch, CHECKPOINT_SCORE: score}, checkpoint=ray.train.Checkpoint.from_directory(d)
            )


DDP_SPACE = """\
params:
  backbone: {type: categorical, key: model.backbone, choices: [efficientnet_lite0]}
  freeze: {type: float, key: model.freeze, low: 0.9, high: 1.0}
  lr: {type: float, key: optim.lr, low: 1.0e-6, high: 1.0e-2, log: true}
  head: {type: categorical, key: model.head, choices: [linear]}
seeds:
  - name: best epoch before the last
    params: {backbone: efficientnet_lite0, freeze: 1.0, lr: 3.0e-2, head: linear}
"""


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(900)
def test_ddp_trial_records_and_exports_its_best_epoch(tmp_path: Path) -> None:
    """A 2-worker trial: the study's checkpoint (user attr, then out/best) is the best epoch's, not the last's."""
    import optuna

    from tests.test_tuner_helpers import TINY_ARGS, run_tuner
    from trainer.checkpoint import read_meta

    (tmp_path / "space.yaml").write_text(DDP_SPACE)
    db = f"sqlite:///{tmp_path}/optuna.db"
    run_tuner(
        [
            *TINY_ARGS,
            "--set",
            "threads=1",
            "--no-refit",
            "--study",
            "ddp",
            "--trials",
            "1",
            "--epochs",
            "4",
            "--workers-per-trial",
            "2",
            "--cpus-per-worker",
            "0.5",
            "--space",
            str(tmp_path / "space.yaml"),
            "--storage",
            db,
            "--out",
            str(tmp_path / "out"),
            "--address",
            "local",
        ],
        tmp_path / "tuner.log",
        timeout=800,
    )
    (trial,) = optuna.load_study(study_name="ddp", storage=db).trials
    uri = Path(trial.user_attrs["checkpoint_uri"])
    latest = max((read_meta(d) for d in uri.parent.glob("checkpoint_*") if d.is_dir()), key=lambda m: m["epoch"])
    f1 = {h["epoch"]: h["val_macro_f1"] for h in latest["history"]}  # the whole run's history
    best = min(e for e, v in f1.items() if v == max(f1.values()))
    assert best < latest["epoch"] == 4, f"this run must peak before its last epoch to tell best from latest: {f1}"
    assert read_meta(uri)["epoch"] == best
    assert read_meta(tmp_path / "out" / "best")["epoch"] == best
