"""Weight averaging in the loop (trainer/ema.py), the study's budget ledger (tuner/ledger.py) and the probe head
(tuner/probe.py): real tiny training runs, real timestamps, real features."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tests.trainer_fixtures import tiny_config
from trainer.config import TrainConfig
from trainer.epoch_result import read_history
from trainer.loop import train_loop
from tuner.ledger import Ledger, trial_stages


def test_ema_is_validated_beside_the_raw_weights_and_the_better_is_kept(tmp_path: Path) -> None:
    cfg = tiny_config(**{"epochs": 2, "model.freeze": 0.5, "optim.ema_decay": 0.9})
    train_loop({"train_config": cfg, "run_dir": str(tmp_path), "report_to": "local"})
    hist = [r.to_dict() for r in read_history(tmp_path)]
    for h in hist:
        assert h["weights"] in ("raw", "ema")
        chosen = h["ema_val_macro_f1"] if h["weights"] == "ema" else h["raw_val_macro_f1"]
        other = h["raw_val_macro_f1"] if h["weights"] == "ema" else h["ema_val_macro_f1"]
        assert h["val_macro_f1"] == chosen and chosen >= other
    from trainer.model import model_from_checkpoint

    model, meta = model_from_checkpoint(tmp_path / "best")
    assert meta["metrics"]["weights"] in ("raw", "ema")  # the checkpoint is the weights its result scored


def test_ema_moves_towards_the_weights_with_warm_up() -> None:
    from trainer.ema import Ema

    lin = torch.nn.Linear(2, 1)
    ema = Ema(lin, 0.99)
    before = ema.module.weight.detach().clone()
    with torch.no_grad():
        lin.weight.add_(1.0)
    ema.update()  # first update: decay min(0.99, 2/11): mostly the new weights
    d = 2 / 11
    assert torch.allclose(ema.module.weight, d * before + (1 - d) * lin.weight)
    with pytest.raises(ValueError, match="decay"):
        Ema(lin, 1.0)


def test_ledger_kinds_idle_and_useful_fraction() -> None:
    led = Ledger(cores=2, t0=100.0)
    led.add("data preparation", "overhead", 100.0, 110.0, cores=1)
    led.add("final fit", "compute", 110.0, 190.0)  # both cores
    led.add("trial 3", "waste", 110.0, 120.0, cores=1, note="cut")
    s = led.summary(end=200.0)
    assert s.core_seconds["compute"] == 160.0 and s.core_seconds["waste"] == 10.0
    assert s.core_seconds["overhead"] == 10.0 and s.core_seconds["idle"] == 200.0 - 180.0
    assert s.useful_fraction == pytest.approx(160.0 / 200.0)
    d = s.to_dict()
    assert d["stages"][1]["start"] == 10.0 and d["useful_fraction"] == 0.8
    assert any("useful fraction 0.800" in line for line in s.lines())
    with pytest.raises(ValueError, match="kind"):
        led.add("x", "fun", 100.0, 101.0)


def test_trial_stages_count_finished_runs_as_compute_and_cut_ones_as_waste() -> None:
    import datetime as dt

    def trial(n: int, state: str, start: float, end: float, **attrs: object) -> SimpleNamespace:
        return SimpleNamespace(
            number=n,
            state=SimpleNamespace(name=state),
            params={},
            values=None,
            user_attrs=attrs,
            datetime_start=dt.datetime.fromtimestamp(start - 30),  # waited for a slot
            datetime_complete=dt.datetime.fromtimestamp(end),
        )

    study = SimpleNamespace(
        get_trials=lambda deepcopy=False: [
            trial(0, "COMPLETE", 1000.0, 1100.0, started_at=1000.0, setup_seconds=5.0),
            trial(1, "PRUNED", 1000.0, 1050.0, started_at=1000.0, stop_reason="deadline"),
            trial(2, "FAIL", 1000.0, 1010.0, started_at=1000.0),
            trial(3, "COMPLETE", 10.0, 20.0, started_at=10.0),  # an earlier run of the study: not in this ledger
        ]
    )
    led = Ledger(cores=2, t0=900.0)
    trial_stages(led, study, 1.0)
    kinds = {(s.name, s.kind, round(s.seconds)) for s in led.stages}
    assert kinds == {
        ("trial 0 set-up", "overhead", 5),
        ("trial 0", "compute", 95),
        ("trial 1", "waste", 50),
        ("trial 2", "waste", 10),
    }


def test_probe_head_separates_real_features() -> None:
    """The L2-chosen softmax head on standardised features of two real textures (brick vs grass crops)."""
    from skimage import data as skd

    from tuner.probe import fit_head

    rng = np.random.default_rng(0)

    def crops(img: np.ndarray, n: int) -> np.ndarray:
        out = []
        for _ in range(n):
            i, j = rng.integers(0, img.shape[0] - 32), rng.integers(0, img.shape[1] - 32)
            c = img[i : i + 32, j : j + 32].astype(np.float64)
            out.append([c.mean(), c.std(), np.abs(np.diff(c, axis=0)).mean(), np.abs(np.diff(c, axis=1)).mean()])
        return np.asarray(out)

    f = np.concatenate([crops(skd.brick(), 60), crops(skd.grass(), 60)])
    y = np.repeat([0, 1], 60)
    mean, std = f[::2].mean(0), f[::2].std(0) + 1e-6
    w, b, l2, nll = fit_head((f[::2] - mean) / std, y[::2], (f[1::2] - mean) / std, y[1::2], 2)
    pred = ((f[1::2] - mean) / std @ w.T + b).argmax(1)
    assert (pred == y[1::2]).mean() > 0.9 and nll < 0.3 and w.shape == (2, 4)


def test_a_trial_that_reaches_its_planned_fidelity_is_complete() -> None:
    from tuner.searcher import planned_epochs

    assert planned_epochs({"epoch": 2}, 4) == 4  # no fit: ASHA's max_t
    assert planned_epochs({"epoch": 2, "epochs_planned": 2}, 4) == 2  # fitted to the deadline: 2 is its end
    assert planned_epochs({"epochs_planned": 9}, 4) == 4


def test_probe_plan_follows_the_seeds_sizes() -> None:
    from tuner.probe import plan

    space = SimpleNamespace(
        backbones=["efficientnet_lite0", "efficientnet_lite1"],
        points_to_evaluate=lambda: [
            {"backbone": "efficientnet_lite0", "img": 128},
            {"backbone": "efficientnet_lite0", "img": 128},
            {"backbone": "efficientnet_lite1"},
        ],
    )
    base = TrainConfig().replace({"model.img_size": 160, "model.backbone": "efficientnet_lite0"})
    assert plan(space, base) == [("efficientnet_lite0", 128), ("efficientnet_lite1", 160)]
    assert plan(space, base, fixed_img=96) == [("efficientnet_lite0", 96), ("efficientnet_lite1", 96)]
