"""Secondary search comparison for bench_search.py: the waste paper's grid (frozen fraction x LR, every point to
max epochs) vs edgetune's TPE+ASHA (``tuner.run``, no seed points: a seeded point that is also a grid corner would
not be the search's win) vs random search, on an elpv subset. Compared in WALL SECONDS; every method selects by
validation macro-F1 (the study metric) and its selected model's test accuracy is read off."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
from common import md_table

GRID_SPACE = """\
params:
  freeze: {type: float, key: model.freeze, low: 0.0, high: 1.0}
  lr: {type: float, key: optim.lr, low: %(lo)g, high: %(hi)g, log: true}
"""


def _base(b: dict[str, Any], cache: Path) -> Any:
    from trainer.config import TrainConfig

    return TrainConfig.from_dict(
        {
            "data": {"dataset": "elpv", "max_images": b["max_images"], "augment": "flips", "cache_dir": str(cache)},
            "model": {"backbone": "efficientnet_lite0", "img_size": b["img"]},
            "optim": {"backbone_lr_mult": 1.0},
            "epochs": b["epochs"],
            "batch_size": 32,
            "threads": 2,
            "progress": False,
            "robustness": False,
        }
    )


def _point(base: Any, over: dict[str, Any], data: Any, test: Any, run_dir: Path, t_start: float) -> dict[str, Any]:
    from trainer.epoch_result import read_history
    from trainer.loop import train_loop
    from trainer.run import evaluate_checkpoint

    cfg = base.replace(over)
    t0 = time.perf_counter()
    train_loop({"train_config": cfg, "run_dir": str(run_dir), "report_to": "local"}, data=data)
    hist = [r.to_dict() for r in read_history(run_dir)]
    best = max(hist, key=lambda h: (h["val_macro_f1"], -h["epoch"]))
    m = evaluate_checkpoint(run_dir / "best", run_dir / "eval", data=test, robustness=False)
    return {
        "overrides": over,
        "epochs": len(hist),
        "best_epoch": best["epoch"],
        "val_macro_f1": best["val_macro_f1"],
        "val_acc": best["val_acc"],
        "test_acc": m["test_accuracy"],
        "test_macro_f1": m["test_macro_f1"],
        "seconds": time.perf_counter() - t0,
        "done_at_s": time.perf_counter() - t_start,
    }


def _curve(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    best: dict[str, Any] | None = None
    out = []
    for p in sorted(points, key=lambda p: p["done_at_s"]):
        if best is None or p["val_macro_f1"] > best["val_macro_f1"]:
            best = p
        out.append(
            {
                "wall_s": p["done_at_s"],
                "val_macro_f1": best["val_macro_f1"],
                "test_acc": best["test_acc"],
                "test_macro_f1": best["test_macro_f1"],
            }
        )
    return out


def tpe_study(work: Path, b: dict[str, Any], time_budget_s: float) -> Any:
    """edgetune's TPE+ASHA (``tuner.run``) on the grid's space for ``time_budget_s``; returns its study summary."""
    from tuner.options import TuneOptions
    from tuner.run import run_study

    (work / "space.yaml").write_text(GRID_SPACE % {"lo": min(b["lr"]), "hi": max(b["lr"])})
    opts = TuneOptions(
        data="elpv",
        study="grid-tpe",
        space=str(work / "space.yaml"),
        img=b["img"],
        max_images=b["max_images"],
        epochs=b["epochs"],
        trials=0,
        time_budget_s=time_budget_s,
        out=str(work / "tpe"),
        storage=f"sqlite:///{work / 'optuna.db'}",
        export=False,
        refit=False,
        sets=("batch_size=32", "data.augment=flips", "optim.backbone_lr_mult=1.0", f"data.cache_dir={work / 'cache'}"),
        address="local",
        grace_period=1,
    )
    return run_study(opts)


def random_search(
    base: Any, data: Any, work: Path, b: dict[str, Any], time_budget_s: float, max_points: int
) -> tuple[list[dict[str, Any]], float]:
    """Random points of the same space until ``time_budget_s`` or ``max_points``; returns them and the wall seconds."""
    rng = np.random.default_rng(0)
    t2 = time.perf_counter()
    rand: list[dict[str, Any]] = []
    while time.perf_counter() - t2 < time_budget_s and len(rand) < max_points:
        over = {
            "model.freeze": float(rng.uniform(0, 1)),
            "optim.lr": float(10 ** rng.uniform(np.log10(min(b["lr"])), np.log10(max(b["lr"])))),
        }
        rand.append(_point(base, over, data, data, work / f"rand-{len(rand)}", t2))
    return rand, time.perf_counter() - t2


def run_grid_comparison(work: Path, b: dict[str, Any]) -> dict[str, Any]:
    from trainer.data import build_data, prepare_source
    from trainer.model import preprocess_spec_for

    work.mkdir(parents=True, exist_ok=True)
    base = _base(b, work / "cache")
    src = prepare_source(base.data)
    data = build_data(base.data, preprocess_spec_for(base.model), seed=0, source=src)
    t0 = time.perf_counter()
    grid = [
        _point(base, {"model.freeze": f, "optim.lr": lr}, data, data, work / f"grid-f{f}-lr{lr}", t0)
        for f in b["freeze"]
        for lr in b["lr"]
    ]
    grid_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    summary = tpe_study(work, b, grid_s / 3)
    tpe_s = time.perf_counter() - t1
    rand, rand_s = random_search(base, data, work, b, tpe_s, len(grid))
    rows = [
        {"method": "grid (waste protocol)", "configs": len(grid), "wall_s": grid_s, **_final(_curve(grid))},
        {
            "method": "edgetune TPE+ASHA (no seeds), 1/3 of the grid's wall time",
            "configs": summary.trials,
            "wall_s": tpe_s,
            "val_macro_f1": summary.final.value if summary.final else None,
            "test_acc": summary.final.test_accuracy if summary.final else None,
            "test_macro_f1": summary.final.test_macro_f1 if summary.final else None,
        },
        {
            "method": "random search, same wall time as edgetune",
            "configs": len(rand),
            "wall_s": rand_s,
            **_final(_curve(rand)),
        },
    ]
    grid_rows = [{"freeze": p["overrides"]["model.freeze"], "lr": p["overrides"]["optim.lr"], **p} for p in grid]
    return {
        "results": {"setup": b, "methods": rows, "grid": grid, "random": rand, "test_images": len(data.test)},
        "tables": {
            f"Grid vs TPE+ASHA vs random (elpv subset of {b['max_images']}, {b['img']} px, "
            f"{len(data.test)} test images), wall seconds": md_table(
                rows, ["method", "configs", "wall_s", "val_macro_f1", "test_acc", "test_macro_f1"]
            ),
            "Grid points (best-val epoch)": md_table(
                grid_rows, ["freeze", "lr", "best_epoch", "val_macro_f1", "test_acc", "test_macro_f1", "seconds"]
            ),
        },
    }


def _final(curve: list[dict[str, Any]]) -> dict[str, Any]:
    return {k: curve[-1][k] for k in ("val_macro_f1", "test_acc", "test_macro_f1")} if curve else {}
