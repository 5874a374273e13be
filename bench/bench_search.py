"""Head-to-head: `make tune`'s embedded default vs an engineer's own fine-tuning script, same split, same machine.

1. ``python -m tuner`` with its defaults (full elpv, local Ray, SQLite; cold caches: a fresh EDGETUNE_CACHE, so
   data preparation and the activation cache are paid inside its wall time) -> ``split.json`` + the final
   model's test predictions.
2. ``bench/baseline_plain.py`` (plain PyTorch, no edgetune imports) on that ``split.json``, right after.
3. Test accuracy, macro-F1, per-class recall, wall seconds, and a paired bootstrap 95 % interval of the
   accuracy (and macro-F1) difference on the shared test images.
4. The same for a second built-in dataset (textures), with a smaller time budget.
5. Secondary: the waste paper's grid (frozen fraction x LR) vs edgetune's TPE+ASHA without seed points vs
   random search, on an elpv subset, compared in wall seconds on val-selected test accuracy.

Also measured: per-trial overhead (trial launch -> first training batch) and the activation-cache speed-up
(epoch seconds, cached vs live path at the same cut). Writes bench/results/search.json.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, md_table, parse_args, work_dir, write_results  # noqa: E402

HERE = Path(__file__).resolve().parent
BUDGET = {
    # tune_args: added to `make tune`'s defaults (small = exactly the embedded default, the contract)
    "small": {"tune_args": [], "textures_time": 240, "grid": {"max_images": 300, "img": 64, "epochs": 3, "freeze": [0.0, 0.5, 1.0],
                                            "lr": [3e-4, 1e-3, 3e-3]}},
    "large": {"tune_args": ["--time-budget", "3600", "--epochs", "12", "--refit-share", "0.3"], "textures_time": 600, "grid": {"max_images": 1200, "img": 96, "epochs": 6,
                                            "freeze": [0.0, 0.25, 0.5, 0.75, 1.0], "lr": [1e-4, 3e-4, 1e-3, 3e-3]}},
}
BOOTSTRAP = 10_000


def _env(cache: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.update({"EDGETUNE_CACHE": str(cache), "EDGETUNE_LOCAL": "1", "PYTHONUNBUFFERED": "1"})
    return env


def run_tune(work: Path, name: str, extra: list[str]) -> dict[str, Any]:
    """`make tune` (python -m tuner) with its defaults plus ``extra``, cold caches; returns its summary."""
    out = work / name
    cache = work / f"cache-{name}"
    cmd = [sys.executable, "-m", "tuner", "--study", name, "--out", str(out),
           "--storage", f"sqlite:///{work / 'optuna.db'}", *extra]
    t0 = time.time()
    with open(work / f"{name}.log", "w") as log:
        rc = subprocess.run(cmd, cwd=ROOT, env=_env(cache), stdout=log, stderr=subprocess.STDOUT).returncode
    wall = time.time() - t0
    if rc != 0:
        raise SystemExit(f"bench-search: {' '.join(cmd)} failed ({rc}); see {work / f'{name}.log'}")
    summary = json.loads((out / "summary.json").read_text())
    return {"out": out, "wall_s": wall, "summary": summary, "cache": cache}


def run_baseline(work: Path, split: Path, name: str, cache: Path) -> dict[str, Any]:
    res = work / f"{name}.json"
    t0 = time.time()
    with open(work / f"{name}.log", "w") as log:
        rc = subprocess.run([sys.executable, str(HERE / "baseline_plain.py"), "--split", str(split), "--out", str(res)],
                            cwd=ROOT, env=_env(cache), stdout=log, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise SystemExit(f"bench-search: baseline failed ({rc}); see {work / f'{name}.log'}")
    out = json.loads(res.read_text())
    out["process_wall_s"] = time.time() - t0
    return out


def _macro_f1(y: np.ndarray, p: np.ndarray, k: int) -> float:
    f1 = []
    for c in range(k):
        tp, fp, fn = int(((p == c) & (y == c)).sum()), int(((p == c) & (y != c)).sum()), int(((p != c) & (y == c)).sum())
        f1.append(2 * tp / max(1, 2 * tp + fp + fn))
    return float(np.mean(f1))


def paired(tune_out: Path, base: dict[str, Any]) -> dict[str, Any]:
    """Both models' predictions on the same test files; paired bootstrap of the differences."""
    doc = json.loads((tune_out / "best" / "test_predictions.json").read_text())
    classes = doc["classes"]
    if classes != base["classes"]:
        raise SystemExit(f"bench-search: class lists differ: {classes} vs {base['classes']}")
    idx = {c: i for i, c in enumerate(classes)}
    edge = {it["source"]: (idx[it["label"]], idx[it["prediction"]]) for it in doc["items"]}
    files = base["test_files"]
    missing = [f for f in files if f not in edge]
    if missing or len(files) != len(edge):
        raise SystemExit(f"bench-search: the two test sets differ ({len(missing)} of the baseline's files missing)")
    y = np.asarray(base["test_labels"])
    if not np.array_equal(y, [edge[f][0] for f in files]):
        raise SystemExit("bench-search: labels of the shared test files differ")
    pe, pb = np.asarray([edge[f][1] for f in files]), np.asarray(base["test_predictions"])
    k = len(classes)
    rng = np.random.default_rng(0)
    n = len(y)
    da, df = [], []
    for _ in range(BOOTSTRAP):
        s = rng.integers(0, n, n)
        da.append(float((pe[s] == y[s]).mean() - (pb[s] == y[s]).mean()))
        df.append(_macro_f1(y[s], pe[s], k) - _macro_f1(y[s], pb[s], k))
    recall = {c: {"edgetune": float((pe[y == i] == i).mean()), "baseline": float((pb[y == i] == i).mean()),
                  "support": int((y == i).sum())} for i, c in enumerate(classes)}
    return {
        "n_test": n, "classes": classes,
        "edgetune": {"test_accuracy": float((pe == y).mean()), "test_macro_f1": _macro_f1(y, pe, k)},
        "baseline": {"test_accuracy": float((pb == y).mean()), "test_macro_f1": _macro_f1(y, pb, k)},
        "delta_test_accuracy": float((pe == y).mean() - (pb == y).mean()),
        "delta_test_macro_f1": _macro_f1(y, pe, k) - _macro_f1(y, pb, k),
        "ci95_delta_accuracy": [float(np.percentile(da, 2.5)), float(np.percentile(da, 97.5))],
        "ci95_delta_macro_f1": [float(np.percentile(df, 2.5)), float(np.percentile(df, 97.5))],
        "both_right": int(((pe == y) & (pb == y)).sum()), "only_edgetune_right": int(((pe == y) & (pb != y)).sum()),
        "only_baseline_right": int(((pe != y) & (pb == y)).sum()), "per_class_recall": recall,
    }


def study_overheads(tune_out: Path, storage: str, study: str) -> dict[str, Any]:
    """Per-trial launch -> first batch (setup_seconds + first_batch_seconds) and the trials' data paths."""
    import optuna

    s = optuna.load_study(study_name=study, storage=storage)
    timed = [t for t in s.trials if "first_batch_at" in t.user_attrs and t.datetime_start is not None]
    # Optuna's trial start = when Tune asked the searcher for it, i.e. just before the trial's launch
    launch = [float(t.user_attrs["first_batch_at"]) - t.datetime_start.timestamp() for t in timed]
    rows = [t.user_attrs for t in timed]
    paths = [a.get("data_path") for a in rows]
    return {"trials": len(s.trials), "states": {st: sum(t.state.name == st for t in s.trials)
                                                for st in ("COMPLETE", "PRUNED", "FAIL")},
            "launch_to_first_batch_s": {"median": float(np.median(launch)) if launch else None,
                                        "max": float(np.max(launch)) if launch else None},
            "data_paths": {p: paths.count(p) for p in set(paths)},
            "act_cache_builds": sum(int(a.get("act_cache_builds", 0)) for a in rows),
            "act_cache_disk_hits": sum(int(a.get("act_cache_disk_hits", 0)) for a in rows)}


def cache_speedup(work: Path) -> dict[str, Any]:
    """Epoch seconds of one configuration, cached vs live path, at the same cut (Lite0, 128 px, elpv)."""
    from trainer.config import TrainConfig
    from trainer.data import build_data, prepare_source
    from trainer.loop import train_loop
    from trainer.model import preprocess_spec_for

    base = TrainConfig.from_dict({"data": {"dataset": "elpv", "augment": "flips", "cache_dir": str(work / "cache-speed")},
                                  "model": {"backbone": "efficientnet_lite0", "img_size": 128, "freeze": 0.25},
                                  "epochs": 2, "threads": 2, "progress": False, "robustness": False})
    src = prepare_source(base.data)
    data = build_data(base.data, preprocess_spec_for(base.model), seed=0, source=src, with_test=False)
    out = {}
    for path, over in (("cached", {}), ("live", {"data.activation_cache": "off"})):
        d = work / f"speed-{path}"
        cfg = base.replace(over)
        train_loop({"train_config": cfg.to_dict(), "run_dir": str(d), "report_to": "local"}, data=data)
        hist = [json.loads(line) for line in (d / "history.jsonl").read_text().splitlines()]
        out[path] = {"data_path": hist[-1]["data_path"], "epoch_seconds": hist[-1]["epoch_seconds"],
                     "train_phase_seconds": hist[-1]["train_phase_seconds"],
                     "cache_build_seconds": hist[0].get("act_cache_seconds", 0.0)}
    out["speedup_epoch"] = out["live"]["epoch_seconds"] / out["cached"]["epoch_seconds"]
    out["setup"] = "efficientnet_lite0, 128 px, cut after blocks.3 (freeze 0.25), flips, batch 32, 2 threads, elpv full"
    return out


def grid_comparison(work: Path, b: dict[str, Any]) -> dict[str, Any]:
    """The waste paper's grid vs TPE+ASHA (no seed points) vs random search, on an elpv subset, in wall seconds;
    every method selects by validation macro-F1, its test accuracy is read off."""
    from bench_grid import run_grid_comparison

    return run_grid_comparison(work / "grid", b)


def headline(elpv: dict[str, Any]) -> dict[str, Any]:
    """The four headline keys of search.json, from the elpv head-to-head."""
    return {"delta_test_accuracy": elpv["delta_test_accuracy"], "delta_test_macro_f1": elpv["delta_test_macro_f1"],
            "tune_wall_s": elpv["tune_wall_s"], "baseline_wall_s": elpv["baseline_wall_s"]}


def main(argv: list[str] | None = None) -> int:
    from edgetune.logs import setup_cli_logging

    args = parse_args(__doc__.splitlines()[0], argv)
    setup_cli_logging(verbose=False)  # the in-process grid comparison's study logs as `python -m tuner` does
    b = BUDGET[args.budget]
    work = work_dir(args, "edgetune-bench-search-")
    t_start = time.time()
    storage = f"sqlite:///{work / 'optuna.db'}"

    print("bench-search: 1/5 make tune (embedded default, full elpv, cold caches)", flush=True)
    gpu = ["--gpus-per-trial", "1"] if args.budget == "large" and shutil.which("nvidia-smi") else []
    tune = run_tune(work, "elpv-default", [*b["tune_args"], *gpu])
    print(f"bench-search: tune took {tune['wall_s']:.0f} s; 2/5 the plain script on the same split", flush=True)
    base = run_baseline(work, tune["out"] / "split.json", "baseline-elpv", tune["cache"])
    elpv = paired(tune["out"], base)
    elpv.update({"tune_wall_s": tune["wall_s"], "baseline_wall_s": base["wall_s"],
                 "overheads": study_overheads(tune["out"], storage, "elpv-default"),
                 "refit": tune["summary"].get("refit"), "best_params": tune["summary"].get("best_params")})

    # the headline is the elpv head-to-head: recorded now, so a run stopped in a later stage still has it
    write_results("search", {"budget": args.budget, **headline(elpv), "partial": "elpv stage only (later stages not run)",
                             "elpv": elpv}, args.out)

    print("bench-search: 3/5 textures (second built-in dataset)", flush=True)
    ttune = run_tune(work, "textures-default", ["--data", "textures", "--time-budget", str(b["textures_time"])])
    tbase = run_baseline(work, ttune["out"] / "split.json", "baseline-textures", ttune["cache"])
    tex = paired(ttune["out"], tbase)
    tex.update({"tune_wall_s": ttune["wall_s"], "baseline_wall_s": tbase["wall_s"],
                "time_budget_s": b["textures_time"], "best_params": ttune["summary"].get("best_params")})

    print("bench-search: 4/5 activation cache speed-up", flush=True)
    speed = cache_speedup(work)
    print("bench-search: 5/5 grid comparison (secondary)", flush=True)
    grid = grid_comparison(work, b["grid"])

    head = headline(elpv)
    targets = {"delta_test_accuracy": 0.04, "delta_test_macro_f1": 0.07, "tune_wall_s": 900}
    met = {"delta_test_accuracy": head["delta_test_accuracy"] >= 0.04,
           "delta_test_macro_f1": head["delta_test_macro_f1"] >= 0.07, "tune_wall_s": head["tune_wall_s"] <= 900}
    rows = []
    for name, r in (("elpv (4-class, full)", elpv), ("textures", tex)):
        rows.append({"dataset": name, "n_test": r["n_test"], "tune_acc": r["edgetune"]["test_accuracy"],
                     "base_acc": r["baseline"]["test_accuracy"], "delta_acc": r["delta_test_accuracy"],
                     "ci95_acc": "[{:+.3f}, {:+.3f}]".format(*r["ci95_delta_accuracy"]),
                     "tune_f1": r["edgetune"]["test_macro_f1"], "base_f1": r["baseline"]["test_macro_f1"],
                     "delta_f1": r["delta_test_macro_f1"], "ci95_f1": "[{:+.3f}, {:+.3f}]".format(*r["ci95_delta_macro_f1"]),
                     "tune_s": r["tune_wall_s"], "base_s": r["baseline_wall_s"]})
    recall_rows = [{"class": c, **v} for c, v in elpv["per_class_recall"].items()]
    tables = {
        "Head-to-head: make tune (default) vs the plain fine-tuning script, same split": md_table(rows, list(rows[0])),
        "elpv per-class test recall": md_table(recall_rows, ["class", "support", "edgetune", "baseline"]),
        "Headlines": md_table([{**head, **{f"{k}_met": v for k, v in met.items()}}],
                              [*head, *(f"{k}_met" for k in met)]),
        "Activation cache: epoch seconds at the same cut": md_table(
            [{"path": p, **speed[p]} for p in ("cached", "live")],
            ["path", "epoch_seconds", "train_phase_seconds", "cache_build_seconds"]),
        **grid.get("tables", {}),
    }
    write_results("search", {
        "budget": args.budget, **head, "targets": targets, "targets_met": met,
        "elpv": elpv, "textures": tex, "cache_speedup": speed, "grid_comparison": grid.get("results"),
        "per_trial_overhead_s": elpv["overheads"]["launch_to_first_batch_s"],
        "cache_speedup_epoch": speed["speedup_epoch"],
        "definition": "delta = edgetune's final model (refit of the best configuration, selected on validation) "
                      "minus the plain script (best-val epoch), both evaluated once on the same test files; "
                      "ci95 = paired bootstrap (10,000 resamples of the shared test items).",
        "wall_seconds": time.time() - t_start,
    }, args.out, tables)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
