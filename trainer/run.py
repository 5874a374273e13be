"""One training run end to end: train (in-process or Ray Train DDP), then test-split evaluation of
the best checkpoint, robustness report and plots. ``REPEATS=n`` repeats it with n seeds."""

from __future__ import annotations

import json
import logging
import math
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from edgetune.errors import EdgetuneError
from edgetune.preprocess import PreprocessSpec
from trainer.checkpoint import load_checkpoint, versions
from trainer.config import TrainConfig
from trainer.data import build_data
from trainer.epoch_result import EpochResult, read_history
from trainer.evaluate import plot_confusion, plot_history, robustness_report, test_report
from trainer.loop import train_loop
from trainer.loop_config import LoopConfig
from trainer.metric import CHECKPOINT_SCORE, CHECKPOINT_SCORE_MODE
from trainer.model import count_params, model_from_checkpoint, model_size_mb, preprocess_spec_for
from trainer.ray_trainer import make_torch_trainer

log = logging.getLogger(__name__)

SUMMARY_KEYS = ("test_accuracy", "test_macro_f1", "params", "size_mb", "accuracy_density", "train_seconds")


def evaluate_checkpoint(
    ckpt_path: str | Path,
    out_dir: str | Path,
    data: Any = None,
    robustness: bool = True,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Test-split evaluation of a checkpoint; writes metrics.json, confusion matrix, robustness report."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, meta = model_from_checkpoint(ckpt_path)
    cfg = TrainConfig.from_dict(meta["config"])
    spec = PreprocessSpec.from_dict(meta["preprocess"])
    if data is None:
        data = build_data(cfg.data, spec, run_dir=None, seed=cfg.seed)
    if list(data.classes) != list(meta["classes"]):
        raise EdgetuneError(f"dataset classes {data.classes} differ from the checkpoint's {meta['classes']}")
    metrics = test_report(model, data.test, data.classes, out)
    params = count_params(model)
    metrics.update(
        {
            "params": params,
            "size_mb": model_size_mb(model),
            # accuracy density (model-selection study): test accuracy per million parameters
            "accuracy_density": metrics["test_accuracy"] / (params / 1e6) if params else 0.0,
            "backbone": meta["backbone"],
            "classes": data.classes,
            "best_epoch": meta["epoch"],
            "best_val": {k: v for k, v in meta["metrics"].items() if k.startswith("val_")},
            "dataset": data.dataset_name,
            "dataset_hash": data.dataset_hash,
            "skipped_images": len(data.skipped),
            "checkpoint": str(Path(meta.get("path", ckpt_path))),
            "preprocess": spec.to_dict(),
            "config": meta["config"],
            "versions": versions(),
        }
    )
    if robustness and cfg.robustness:
        metrics["robustness"] = robustness_report(model, data.test, spec, out, seed=cfg.seed)
    metrics.update(extra or {})
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def _ddp_trainer(cfg: TrainConfig, run_dir: Path, cpus: float, max_failures: int = 2) -> Any:
    """The run's ``TorchTrainer`` (:func:`trainer.ray_trainer.make_torch_trainer`): ``cfg.workers`` DDP workers
    sharing ``cpus`` on CPU; a killed/crashed worker group restarts from the last checkpoint."""
    per_worker = max(0.5, min(1.0, (cpus - 0.01) / cfg.workers))
    return make_torch_trainer(
        {"train_config": cfg, "run_dir": None, "report_to": "ray_train"},
        workers=cfg.workers,
        use_gpu=cfg.use_gpu,
        name="ddp",
        storage_path=str((run_dir / "ray").resolve()),
        max_failures=max_failures,
        resources_per_worker=None if cfg.use_gpu else {"CPU": per_worker},
    )


def _train_ddp(cfg: TrainConfig, run_dir: Path, max_failures: int = 2) -> list[EpochResult]:
    """Ray Train TorchTrainer with ``cfg.workers`` DDP workers (gloo on CPU, nccl on GPU)."""
    import ray

    if not ray.is_initialized():
        ray.init(log_to_driver=True)
    trainer = _ddp_trainer(cfg, run_dir, ray.available_resources().get("CPU", 1.0), max_failures)
    result = trainer.fit()
    if result.error:
        raise EdgetuneError(f"distributed training failed: {result.error}")
    best = result.get_best_checkpoint(CHECKPOINT_SCORE, CHECKPOINT_SCORE_MODE) or result.checkpoint
    if best is None:
        raise EdgetuneError("distributed training reported no checkpoint")
    with best.as_directory() as d:
        if (run_dir / "best").exists():
            shutil.rmtree(run_dir / "best")
        shutil.copytree(d, run_dir / "best")
    last = result.checkpoint or best
    with last.as_directory() as d:
        return [EpochResult.from_dict(h) for h in load_checkpoint(d)["meta"].get("history", [])]


def run_training(cfg: TrainConfig, run_dir: str | Path) -> dict[str, Any]:
    """Train with ``cfg`` into ``run_dir`` and evaluate the best checkpoint on the test split."""
    out = Path(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    spec = preprocess_spec_for(cfg.model)
    data = build_data(cfg.data, spec, run_dir=out, seed=cfg.seed)
    t0 = time.perf_counter()
    if cfg.workers > 1:
        results = _train_ddp(cfg, out)
    else:
        train_loop(LoopConfig(train_config=cfg, run_dir=str(out)), data=data)
        results = read_history(out)
        if results and results[-1].stop_reason == "diverged":
            log.info(
                f"the loss diverged (NaN/inf) at epoch {results[-1].epoch}; training stopped there "
                f"(try a lower optim.lr than {cfg.optim.lr})"
            )
        if not (out / "best" / "model.pt").is_file():
            raise EdgetuneError(
                f"no checkpoint: the loss diverged (NaN/inf) in the first epoch; lower optim.lr (now {cfg.optim.lr})"
            )
    train_seconds = time.perf_counter() - t0
    keep = (
        "epoch",
        "train_loss",
        "train_acc",
        "val_loss",
        "val_acc",
        "val_macro_f1",
        "val_balanced_acc",
        "epoch_seconds",
        "images_per_s",
        "data_path",
        "stop_reason",
        "resumed_from_epoch",
    )
    history = [{k: v for k, v in r.to_dict().items() if k in keep} for r in results]
    plot_history(history, out / "learning_curves.png", title=f"{cfg.model.backbone}")
    metrics = evaluate_checkpoint(
        out / "best",
        out,
        data=data,
        extra={
            "train_seconds": train_seconds,
            "epochs": cfg.epochs,
            "workers": cfg.workers,
            "train_images_per_s": statistics.fmean(h["images_per_s"] for h in history) if history else 0.0,
            "history": history,
        },
    )
    return metrics


def run_repeats(cfg: TrainConfig, run_dir: str | Path, repeats: int) -> dict[str, Any]:
    """Repeat a run with seeds seed..seed+n-1 (model-selection study protocol); mean ± std summary."""
    if repeats < 1:
        raise EdgetuneError(f"repeats must be >= 1, got {repeats}")
    if repeats == 1:
        return run_training(cfg, run_dir)
    out = Path(run_dir)
    runs = []
    for i in range(repeats):
        seed_cfg = cfg.replace({"seed": cfg.seed + i})
        m = run_training(seed_cfg, out / f"seed_{cfg.seed + i}")
        runs.append(m)
        print(f"repeat {i + 1}/{repeats}: seed {cfg.seed + i} test_accuracy={m['test_accuracy']:.4f}")
    summary: dict[str, Any] = {"repeats": repeats, "seeds": [cfg.seed + i for i in range(repeats)]}
    for k in ("test_accuracy", "test_macro_f1", "train_seconds", "accuracy_density"):
        vals = [float(r[k]) for r in runs]
        summary[k] = statistics.fmean(vals)
        summary[f"{k}_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
    for k in ("params", "size_mb", "backbone", "classes", "dataset", "dataset_hash"):
        summary[k] = runs[0][k]
    cm = [
        [sum(r["test_confusion_matrix"][i][j] for r in runs) for j in range(len(runs[0]["classes"]))]
        for i in range(len(runs[0]["classes"]))
    ]
    summary["test_confusion_matrix_sum"] = cm

    plot_confusion(
        np.asarray(cm),
        runs[0]["classes"],
        out / "confusion_matrix.png",
        title=f"{repeats} seeds, accuracy {summary['test_accuracy']:.3f} ± {summary['test_accuracy_std']:.3f}",
    )
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    return summary


def format_summary(m: dict[str, Any]) -> str:
    def fmt(k: str) -> str:
        v = m.get(k)
        if isinstance(v, float):
            s = f"{v:.4f}" if not math.isnan(v) else "nan"
            if f"{k}_std" in m:
                s += f" ± {m[f'{k}_std']:.4f}"
            return s
        return str(v)

    return "  ".join(f"{k}={fmt(k)}" for k in SUMMARY_KEYS if k in m)
