"""Head-to-head over split seeds: `make tune`'s embedded default vs an engineer's own fine-tuning script.

For each split seed (``--seeds``, default 0,1,2; elpv 4-class, full), one after the other, never concurrently:

1. ``python -m tuner`` with its defaults plus ``--set data.split_seed=<seed>`` (own study, own out folder,
   cold caches: a fresh EDGETUNE_CACHE, so data preparation and the activation cache are paid inside its
   wall time) -> ``split.json`` + the final model's test predictions + ``summary.json``.
2. ``bench/baseline_plain.py`` (plain PyTorch, no edgetune imports, 8 epochs) on that ``split.json``, right after.
3. For the first seed only: the plain script again, given the same wall clock as that tune (equal compute):
   epochs = max(1, floor((tune wall - fixed overhead) / median epoch seconds)), both measured from the
   8-epoch run's own history.

Then: test accuracy and macro-F1 per seed and pooled over the seeds (the per-seed paired arrays concatenated),
with paired-bootstrap 95 % intervals of the differences (items resampled within each seed, 10,000 resamples);
the tuner's lever table (summary.json ``levers``: what each final-fit step adds), aggregated over the seeds;
then the same head-to-head on textures (the second built-in dataset, smaller time budget). ``--extra`` adds the
secondary stages: the activation-cache speed-up and the waste paper's grid vs TPE+ASHA vs random search.
Writes bench/results/search.json after every seed (marked ``partial`` until the end).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, md_table, parse_args, work_dir, write_results  # noqa: E402

from edgetune.errors import ConfigError  # noqa: E402
from tuner.summary import read_summary  # noqa: E402
from tuner.trial_record import records  # noqa: E402

HERE = Path(__file__).resolve().parent
BUDGET = {
    # tune_args: added to `make tune`'s defaults (small = exactly the embedded default, the contract)
    "small": {
        "tune_args": [],
        "textures_time": 240,
        "grid": {"max_images": 300, "img": 64, "epochs": 3, "freeze": [0.0, 0.5, 1.0], "lr": [3e-4, 1e-3, 3e-3]},
    },
    "large": {
        "tune_args": ["--time-budget", "3600", "--epochs", "12", "--refit-share", "0.3"],
        "textures_time": 600,
        "grid": {
            "max_images": 1200,
            "img": 96,
            "epochs": 6,
            "freeze": [0.0, 0.25, 0.5, 0.75, 1.0],
            "lr": [1e-4, 3e-4, 1e-3, 3e-3],
        },
    },
}
BOOTSTRAP = 10_000
DEFAULT_SEEDS = (0, 1, 2)
BASELINE_EPOCHS = 8  # baseline_plain.py's default recipe
#: issue 19 §6: pooled gains with intervals above 0, no seed clearly worse, not worse at equal compute,
#: the tune's time mostly useful, every tune inside make tune's 900 s
TARGETS = {
    "delta_test_accuracy": 0.03,
    "delta_test_macro_f1": 0.06,
    "ci95_low_above": 0.0,
    "min_seed_delta_test_accuracy": -0.01,
    "delta_equal_time": 0.0,
    "useful_fraction": 0.85,
    "tune_wall_s": 900,
}


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> [0, 1, 2]; distinct non-negative integers, at least one."""
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--seeds takes a comma list of split seeds (e.g. 0,1,2), got {text!r}") from None
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds takes distinct non-negative integers (e.g. 0,1,2), got {text!r}")
    return seeds


def _add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--seeds",
        default=",".join(map(str, DEFAULT_SEEDS)),
        help="comma list of elpv split seeds (data.split_seed), run in this order; the first one also "
        "gets the equal-time baseline (default 0,1,2; SEEDS=0 for a quick check)",
    )
    p.add_argument(
        "--extra",
        action="store_true",
        help="also run the secondary stages: activation-cache speed-up and the grid comparison",
    )


def _env(cache: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.update({"EDGETUNE_CACHE": str(cache), "EDGETUNE_LOCAL": "1", "PYTHONUNBUFFERED": "1"})
    return env


def run_tune(work: Path, name: str, extra: list[str]) -> dict[str, Any]:
    """`make tune` (python -m tuner) with its defaults plus ``extra``, cold caches; returns its summary."""
    out = work / name
    cache = work / f"cache-{name}"
    cmd = [
        sys.executable,
        "-m",
        "tuner",
        "--study",
        name,
        "--out",
        str(out),
        "--storage",
        f"sqlite:///{work / 'optuna.db'}",
        *extra,
    ]
    t0 = time.time()
    with open(work / f"{name}.log", "w") as log:
        rc = subprocess.run(cmd, cwd=ROOT, env=_env(cache), stdout=log, stderr=subprocess.STDOUT).returncode
    wall = time.time() - t0
    if rc != 0:
        raise SystemExit(f"bench-search: {' '.join(cmd)} failed ({rc}); see {work / f'{name}.log'}")
    summary = read_summary(out).to_dict()  # the one reader of summary.json; its JSON layout goes into search.json
    return {"out": out, "wall_s": wall, "summary": summary, "cache": cache}


def run_baseline(work: Path, split: Path, name: str, cache: Path, epochs: int | None = None) -> dict[str, Any]:
    """bench/baseline_plain.py on ``split`` (its default 8 epochs, or ``epochs``); returns its results JSON."""
    res = work / f"{name}.json"
    cmd = [sys.executable, str(HERE / "baseline_plain.py"), "--split", str(split), "--out", str(res)]
    if epochs is not None:
        cmd += ["--epochs", str(epochs)]
    t0 = time.time()
    with open(work / f"{name}.log", "w") as log:
        rc = subprocess.run(cmd, cwd=ROOT, env=_env(cache), stdout=log, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise SystemExit(f"bench-search: baseline failed ({rc}); see {work / f'{name}.log'}")
    out = json.loads(res.read_text())
    out["process_wall_s"] = time.time() - t0
    return out


def equal_time_epochs(base: dict[str, Any], tune_wall_s: float) -> dict[str, Any]:
    """Epochs of the plain script that fit ``tune_wall_s``, from an earlier run's own history: fixed overhead =
    its ``wall_s`` minus the sum of its epochs' ``seconds``; epochs = max(1, floor((tune wall - overhead) /
    median epoch seconds))."""
    secs = [float(h["seconds"]) for h in base.get("history", [])]
    if not secs:
        raise SystemExit("bench-search: the baseline's history has no epoch seconds to fit the equal-time run")
    median = float(np.median(secs))
    overhead = max(0.0, float(base["wall_s"]) - sum(secs))
    epochs = max(1, math.floor((tune_wall_s - overhead) / median)) if median > 0 else 1
    return {
        "epochs": int(epochs),
        "median_epoch_s": median,
        "overhead_s": overhead,
        "tune_wall_s": float(tune_wall_s),
        "fitted_from_epochs": len(secs),
    }


def _macro_f1(y: np.ndarray, p: np.ndarray, k: int) -> float:
    f1 = []
    for c in range(k):
        tp, fp, fn = (
            int(((p == c) & (y == c)).sum()),
            int(((p == c) & (y != c)).sum()),
            int(((p != c) & (y == c)).sum()),
        )
        f1.append(2 * tp / max(1, 2 * tp + fp + fn))
    return float(np.mean(f1))


def _macro_f1_rows(y: np.ndarray, p: np.ndarray, k: int) -> np.ndarray:
    """``_macro_f1`` of every row of the (resamples x items) label and prediction matrices."""
    f1 = np.zeros(y.shape[0])
    for c in range(k):
        pc, yc = p == c, y == c
        tp = (pc & yc).sum(1)
        fp = (pc & ~yc).sum(1)
        fn = (~pc & yc).sum(1)
        f1 += 2 * tp / np.maximum(1, 2 * tp + fp + fn)
    return f1 / k


Group = tuple[np.ndarray, np.ndarray, np.ndarray]  # (labels, edgetune predictions, baseline predictions)


def bootstrap_deltas(groups: Sequence[Group], k: int, n_boot: int = BOOTSTRAP, seed: int = 0) -> dict[str, list[float]]:
    """Paired bootstrap 95 % intervals of Δ accuracy and Δ macro-F1 (edgetune - baseline) on the concatenation of
    ``groups``, resampling items within each group (stratified by group, e.g. by split seed)."""
    y = np.concatenate([g[0] for g in groups])
    pe = np.concatenate([g[1] for g in groups])
    pb = np.concatenate([g[2] for g in groups])
    sizes = [len(g[0]) for g in groups]
    offsets = np.cumsum([0, *sizes[:-1]])
    rng = np.random.default_rng(seed)
    da, df = [], []
    chunk = max(1, min(n_boot, 2_000_000 // max(1, len(y))))
    done = 0
    while done < n_boot:
        m = min(chunk, n_boot - done)
        idx = np.concatenate([o + rng.integers(0, n, (m, n)) for o, n in zip(offsets, sizes, strict=True)], axis=1)
        ys, es, bs = y[idx], pe[idx], pb[idx]
        da.append((es == ys).mean(1) - (bs == ys).mean(1))
        df.append(_macro_f1_rows(ys, es, k) - _macro_f1_rows(ys, bs, k))
        done += m
    a, f = np.concatenate(da), np.concatenate(df)
    return {
        "ci95_delta_accuracy": [float(np.percentile(a, 2.5)), float(np.percentile(a, 97.5))],
        "ci95_delta_macro_f1": [float(np.percentile(f, 2.5)), float(np.percentile(f, 97.5))],
    }


def compare(classes: list[str], groups: Sequence[Group], n_boot: int = BOOTSTRAP) -> dict[str, Any]:
    """Both models on the concatenated ``groups`` (per-seed paired arrays): accuracy, macro-F1 (the per-seed
    definition, on the concatenation), their differences with stratified paired-bootstrap intervals."""
    y = np.concatenate([g[0] for g in groups])
    pe = np.concatenate([g[1] for g in groups])
    pb = np.concatenate([g[2] for g in groups])
    k = len(classes)
    recall = {
        c: {
            "edgetune": float((pe[y == i] == i).mean()) if (y == i).any() else None,
            "baseline": float((pb[y == i] == i).mean()) if (y == i).any() else None,
            "support": int((y == i).sum()),
        }
        for i, c in enumerate(classes)
    }
    return {
        "n_test": len(y),
        "classes": classes,
        "edgetune": {"test_accuracy": float((pe == y).mean()), "test_macro_f1": _macro_f1(y, pe, k)},
        "baseline": {"test_accuracy": float((pb == y).mean()), "test_macro_f1": _macro_f1(y, pb, k)},
        "delta_test_accuracy": float((pe == y).mean() - (pb == y).mean()),
        "delta_test_macro_f1": _macro_f1(y, pe, k) - _macro_f1(y, pb, k),
        **bootstrap_deltas(groups, k, n_boot),
        "both_right": int(((pe == y) & (pb == y)).sum()),
        "only_edgetune_right": int(((pe == y) & (pb != y)).sum()),
        "only_baseline_right": int(((pe != y) & (pb == y)).sum()),
        "per_class_recall": recall,
    }


def paired_arrays(tune_out: Path, base: dict[str, Any]) -> tuple[list[str], Group]:
    """The classes and (labels, edgetune predictions, baseline predictions) on the shared test files, in the
    baseline's file order; stops if the class lists, the test files or their labels differ."""
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
    return classes, (y, pe, pb)


def paired(tune_out: Path, base: dict[str, Any], n_boot: int = BOOTSTRAP) -> dict[str, Any]:
    """Both models' predictions on the same test files; paired bootstrap of the differences."""
    classes, group = paired_arrays(tune_out, base)
    return compare(classes, [group], n_boot)


def study_overheads(tune_out: Path, storage: str, study: str) -> dict[str, Any]:
    """Per-trial launch -> first batch (setup_seconds + first_batch_seconds) and the trials' data paths."""
    import optuna

    trials = records(optuna.load_study(study_name=study, storage=storage))
    timed = [t for t in trials if t.first_batch_at is not None and t.started is not None]
    # Optuna's trial start = when Tune asked the searcher for it, i.e. just before the trial's launch
    launch = [float(t.first_batch_at or 0.0) - float(t.started or 0.0) for t in timed]
    paths = [t.data_path for t in timed]
    return {
        "trials": len(trials),
        "states": {st: sum(t.state == st for t in trials) for st in ("COMPLETE", "PRUNED", "FAIL")},
        "launch_to_first_batch_s": {
            "median": float(np.median(launch)) if launch else None,
            "max": float(np.max(launch)) if launch else None,
        },
        "data_paths": {p: paths.count(p) for p in set(paths)},
        "act_cache_builds": sum(t.act_cache_builds or 0 for t in timed),
        "act_cache_disk_hits": sum(t.act_cache_disk_hits or 0 for t in timed),
    }


def cache_speedup(work: Path) -> dict[str, Any]:
    """Epoch seconds of one configuration, cached vs live path, at the same cut (Lite0, 128 px, elpv)."""
    from trainer.config import TrainConfig
    from trainer.data import build_data, prepare_source
    from trainer.epoch_result import read_history
    from trainer.loop import train_loop
    from trainer.model import preprocess_spec_for

    base = TrainConfig.from_dict(
        {
            "data": {"dataset": "elpv", "augment": "flips", "cache_dir": str(work / "cache-speed")},
            "model": {"backbone": "efficientnet_lite0", "img_size": 128, "freeze": 0.25},
            "epochs": 2,
            "threads": 2,
            "progress": False,
            "robustness": False,
        }
    )
    src = prepare_source(base.data)
    data = build_data(base.data, preprocess_spec_for(base.model), seed=0, source=src, with_test=False)
    out = {}
    for path, over in (("cached", {}), ("live", {"data.activation_cache": "off"})):
        d = work / f"speed-{path}"
        cfg = base.replace(over)
        train_loop({"train_config": cfg, "run_dir": str(d), "report_to": "local"}, data=data)
        hist = [r.to_dict() for r in read_history(d)]
        out[path] = {
            "data_path": hist[-1]["data_path"],
            "epoch_seconds": hist[-1]["epoch_seconds"],
            "train_phase_seconds": hist[-1]["train_phase_seconds"],
            "cache_build_seconds": hist[0].get("act_cache_seconds", 0.0),
        }
    out["speedup_epoch"] = out["live"]["epoch_seconds"] / out["cached"]["epoch_seconds"]
    out["setup"] = "efficientnet_lite0, 128 px, cut after blocks.3 (freeze 0.25), flips, batch 32, 2 threads, elpv full"
    return out


def grid_comparison(work: Path, b: dict[str, Any]) -> dict[str, Any]:
    """The waste paper's grid vs TPE+ASHA (no seed points) vs random search, on an elpv subset, in wall seconds;
    every method selects by validation macro-F1, its test accuracy is read off."""
    from bench_grid import run_grid_comparison

    return run_grid_comparison(work / "grid", b)


LEVER_METRICS = ("val_accuracy", "val_macro_f1", "test_accuracy", "test_macro_f1")


def _lever_order(lists: Sequence[Sequence[dict[str, Any]]]) -> list[str]:
    """Lever names in their order, merged over the seeds (a name one seed lacks keeps its place after the name
    it follows where it occurs)."""
    order: list[str] = []
    for levers in lists:
        prev: str | None = None
        for lv in levers:
            name = str(lv.get("name"))
            if name not in order:
                order.insert(order.index(prev) + 1 if prev is not None else 0, name)
            prev = name
    return order


def aggregate_levers(per_seed: Sequence[Any]) -> list[dict[str, Any]]:
    """One row per lever name over the seeds' ``summary.json`` ``levers`` lists (a seed without one, e.g. an
    older summary, is left out): the MEAN OVER SEEDS of val accuracy / macro-F1 and of test accuracy / macro-F1
    (None where no seed has the value), ``n_seeds``, and each mean's gain over the previous row."""
    lists = [
        [lv for lv in levers if isinstance(lv, dict)] for levers in per_seed if isinstance(levers, list) and levers
    ]
    lists = [levers for levers in lists if levers]
    rows: list[dict[str, Any]] = []
    for name in _lever_order(lists):
        found = [lv for levers in lists for lv in levers if str(lv.get("name")) == name]
        row: dict[str, Any] = {"lever": name, "n_seeds": len(found)}
        for m in LEVER_METRICS:
            vals = [float(lv[m]) for lv in found if lv.get(m) is not None]
            row[m] = float(np.mean(vals)) if vals else None
        prev = rows[-1] if rows else None
        for m in LEVER_METRICS:
            row[f"gain_{m}"] = (
                row[m] - prev[m] if prev is not None and row[m] is not None and prev[m] is not None else None
            )
        rows.append(row)
    return rows


def _flat(cmp: dict[str, Any]) -> dict[str, Any]:
    """The flat head-to-head keys of one comparison (``compare``'s output)."""
    return {
        "delta_test_accuracy": cmp["delta_test_accuracy"],
        "delta_test_macro_f1": cmp["delta_test_macro_f1"],
        "ci95_delta_test_accuracy": cmp["ci95_delta_accuracy"],
        "ci95_delta_test_macro_f1": cmp["ci95_delta_macro_f1"],
        "n_test": cmp["n_test"],
        "edgetune_test_accuracy": cmp["edgetune"]["test_accuracy"],
        "edgetune_test_macro_f1": cmp["edgetune"]["test_macro_f1"],
        "baseline_test_accuracy": cmp["baseline"]["test_accuracy"],
        "baseline_test_macro_f1": cmp["baseline"]["test_macro_f1"],
    }


def seed_result(
    seed: int,
    summary: dict[str, Any],
    tune_wall_s: float,
    base: dict[str, Any],
    cmp: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One split seed's entry of search.json ``seeds``: the head-to-head (``compare``'s output ``cmp``), walls,
    the tune summary's ``useful_fraction``, ``levers`` (None if absent) and ``ledger`` (only if present)."""
    row: dict[str, Any] = {
        "seed": seed,
        **_flat(cmp),
        "tune_wall_s": float(tune_wall_s),
        "baseline_wall_s": float(base["wall_s"]),
        "baseline_epochs": base.get("args", {}).get("epochs", BASELINE_EPOCHS),
        "useful_fraction": summary.get("useful_fraction"),
        "levers": summary.get("levers"),
    }
    if "ledger" in summary:
        row["ledger"] = summary["ledger"]
    row.update(
        {
            "refit": summary.get("refit"),
            "best_params": summary.get("best_params"),
            "both_right": cmp["both_right"],
            "only_edgetune_right": cmp["only_edgetune_right"],
            "only_baseline_right": cmp["only_baseline_right"],
            "per_class_recall": cmp["per_class_recall"],
            **(extra or {}),
        }
    )
    return row


def equal_time_result(seed: int, fit: dict[str, Any], base: dict[str, Any], cmp: dict[str, Any]) -> dict[str, Any]:
    """The equal-compute head-to-head: the tune vs the plain script run for ``fit["epochs"]`` on the same split."""
    return {
        "seed": seed,
        **_flat(cmp),
        **fit,
        "baseline_wall_s": float(base["wall_s"]),
        "baseline_epochs": base.get("args", {}).get("epochs", fit["epochs"]),
    }


def headline(
    seed_rows: Sequence[dict[str, Any]], pooled: dict[str, Any], equal_time: dict[str, Any] | None
) -> dict[str, Any]:
    """The headline keys of search.json: pooled deltas and intervals (vs the plain 8-epoch script), the
    equal-time deltas (first seed), the worst seed's useful_fraction, the largest walls, the per-seed rows."""
    uf = [float(r["useful_fraction"]) for r in seed_rows if r.get("useful_fraction") is not None]
    et = equal_time or {}
    return {
        "delta_test_accuracy": pooled["delta_test_accuracy"],
        "delta_test_macro_f1": pooled["delta_test_macro_f1"],
        "ci95_delta_test_accuracy": pooled["ci95_delta_accuracy"],
        "ci95_delta_test_macro_f1": pooled["ci95_delta_macro_f1"],
        "delta_equal_time_accuracy": et.get("delta_test_accuracy"),
        "delta_equal_time_macro_f1": et.get("delta_test_macro_f1"),
        "useful_fraction": min(uf) if uf else None,
        "tune_wall_s": max(float(r["tune_wall_s"]) for r in seed_rows),
        "baseline_wall_s": max(float(r["baseline_wall_s"]) for r in seed_rows),
        "n_test_pooled": pooled["n_test"],
        "seeds": list(seed_rows),
    }


def targets_met(head: dict[str, Any]) -> dict[str, bool]:
    """Each target of ``TARGETS`` on ``headline``'s output (an absent value does not meet its target)."""
    t = TARGETS
    lo_acc, lo_f1 = head["ci95_delta_test_accuracy"][0], head["ci95_delta_test_macro_f1"][0]
    eq = (head["delta_equal_time_accuracy"], head["delta_equal_time_macro_f1"])
    met = {
        "pooled_delta_test_accuracy": head["delta_test_accuracy"] >= t["delta_test_accuracy"]
        and lo_acc > t["ci95_low_above"],
        "pooled_delta_test_macro_f1": head["delta_test_macro_f1"] >= t["delta_test_macro_f1"]
        and lo_f1 > t["ci95_low_above"],
        "no_seed_below": all(r["delta_test_accuracy"] >= t["min_seed_delta_test_accuracy"] for r in head["seeds"]),
        "equal_time": all(v is not None and v >= t["delta_equal_time"] for v in eq),
        "useful_fraction": head["useful_fraction"] is not None and head["useful_fraction"] >= t["useful_fraction"],
        "tune_wall_s": head["tune_wall_s"] <= t["tune_wall_s"],
    }
    met["all"] = all(met.values())
    return met


def _ci(v: list[float] | None) -> str:
    return "–" if not v else "[{:+.3f}, {:+.3f}]".format(*v)


def _pm(v: float | None) -> str:
    return "–" if v is None else f"{v:+.3f}"


def _h2h_row(run: str, r: dict[str, Any]) -> dict[str, Any]:
    return {
        "run": run,
        "n_test": r["n_test"],
        "tune_acc": r["edgetune_test_accuracy"],
        "base_acc": r["baseline_test_accuracy"],
        "delta_acc": _pm(r["delta_test_accuracy"]),
        "ci95_acc": _ci(r["ci95_delta_test_accuracy"]),
        "tune_f1": r["edgetune_test_macro_f1"],
        "base_f1": r["baseline_test_macro_f1"],
        "delta_f1": _pm(r["delta_test_macro_f1"]),
        "ci95_f1": _ci(r["ci95_delta_test_macro_f1"]),
        "tune_s": r.get("tune_wall_s"),
        "base_s": r.get("baseline_wall_s"),
        "base_epochs": r.get("baseline_epochs"),
        "useful_fraction": r.get("useful_fraction"),
    }


def h2h_rows(
    head: dict[str, Any], pooled: dict[str, Any], equal_time: dict[str, Any] | None, textures: dict[str, Any] | None
) -> list[dict[str, Any]]:
    """The head-to-head rows: one per seed, the pooled row, the equal-time row and the textures row."""
    rows = [_h2h_row(f"elpv seed {r['seed']}", r) for r in head["seeds"]]
    rows.append(
        _h2h_row(
            f"elpv pooled ({len(head['seeds'])} seeds; tune_s, base_s: max)",
            {
                **_flat(pooled),
                "tune_wall_s": head["tune_wall_s"],
                "baseline_wall_s": head["baseline_wall_s"],
                "baseline_epochs": BASELINE_EPOCHS,
                "useful_fraction": head["useful_fraction"],
            },
        )
    )
    if equal_time:
        rows.append(_h2h_row(f"elpv seed {equal_time['seed']}, equal time ({equal_time['epochs']} epochs)", equal_time))
    if textures:
        rows.append(
            _h2h_row(
                "textures (default split)",
                {
                    **_flat(textures),
                    "tune_wall_s": textures["tune_wall_s"],
                    "baseline_wall_s": textures["baseline_wall_s"],
                    "baseline_epochs": BASELINE_EPOCHS,
                },
            )
        )
    return rows


def headline_rows(head: dict[str, Any], met: dict[str, bool]) -> list[dict[str, Any]]:
    """Each headline with its value, its target and whether it is met."""
    t = TARGETS
    worst = min(head["seeds"], key=lambda r: r["delta_test_accuracy"])
    return [
        {
            "headline": "pooled Δ test accuracy [95 % CI]",
            "value": f"{_pm(head['delta_test_accuracy'])} {_ci(head['ci95_delta_test_accuracy'])}",
            "target": f"≥ +{t['delta_test_accuracy']:.2f}, CI low > 0",
            "met": met["pooled_delta_test_accuracy"],
        },
        {
            "headline": "pooled Δ test macro-F1 [95 % CI]",
            "value": f"{_pm(head['delta_test_macro_f1'])} {_ci(head['ci95_delta_test_macro_f1'])}",
            "target": f"≥ +{t['delta_test_macro_f1']:.2f}, CI low > 0",
            "met": met["pooled_delta_test_macro_f1"],
        },
        {
            "headline": "worst seed Δ test accuracy",
            "value": f"{_pm(worst['delta_test_accuracy'])} (seed {worst['seed']})",
            "target": f"≥ {t['min_seed_delta_test_accuracy']:+.2f}",
            "met": met["no_seed_below"],
        },
        {
            "headline": "equal-time Δ accuracy / Δ macro-F1",
            "value": f"{_pm(head['delta_equal_time_accuracy'])} / {_pm(head['delta_equal_time_macro_f1'])}",
            "target": "≥ 0 / ≥ 0",
            "met": met["equal_time"],
        },
        {
            "headline": "useful_fraction (min over seeds)",
            "value": head["useful_fraction"],
            "target": f"≥ {t['useful_fraction']}",
            "met": met["useful_fraction"],
        },
        {
            "headline": "tune wall s (max over seeds)",
            "value": head["tune_wall_s"],
            "target": f"≤ {t['tune_wall_s']}",
            "met": met["tune_wall_s"],
        },
    ]


def build_tables(
    head: dict[str, Any],
    met: dict[str, bool],
    pooled: dict[str, Any],
    equal_time: dict[str, Any] | None,
    levers: list[dict[str, Any]],
    textures: dict[str, Any] | None,
) -> dict[str, str]:
    """search.json's Markdown tables: per-seed head-to-head with the pooled and equal-time rows, headlines
    against their targets, the lever table, pooled per-class recall."""
    rows = h2h_rows(head, pooled, equal_time, textures)
    recall_rows = [{"class": c, **v} for c, v in pooled["per_class_recall"].items()]
    tables = {
        "Head-to-head: make tune (default) vs the plain fine-tuning script, same split per seed": md_table(
            rows, list(rows[0])
        ),
        "Headlines vs targets": md_table(headline_rows(head, met), ["headline", "value", "target", "met"]),
        "elpv per-class test recall, pooled over seeds": md_table(
            recall_rows, ["class", "support", "edgetune", "baseline"]
        ),
    }
    if levers:
        tables["Levers of the final fit (mean over seeds; gain = vs the row above)"] = md_table(
            levers, ["lever", "n_seeds", *LEVER_METRICS, *(f"gain_{m}" for m in LEVER_METRICS)]
        )
    return tables


def build_report(
    budget: str,
    planned: Sequence[int],
    seed_rows: Sequence[dict[str, Any]],
    classes: list[str],
    groups: Sequence[Group],
    equal_time: dict[str, Any] | None,
    stages: dict[str, Any],
    partial: str | None,
    n_boot: int = BOOTSTRAP,
) -> tuple[dict[str, Any], dict[str, str]]:
    """search.json's payload and tables from the seeds run so far (``groups``: their paired arrays)."""
    pooled = compare(classes, groups, n_boot)
    head = headline(seed_rows, pooled, equal_time)
    met = targets_met(head)
    levers = aggregate_levers([r.get("levers") for r in seed_rows])
    textures = stages.get("textures")
    tables = build_tables(head, met, pooled, equal_time, levers, textures)
    speed, grid = stages.get("cache_speedup"), stages.get("grid_comparison")
    if speed:
        tables["Activation cache: epoch seconds at the same cut"] = md_table(
            [{"path": p, **speed[p]} for p in ("cached", "live")],
            ["path", "epoch_seconds", "train_phase_seconds", "cache_build_seconds"],
        )
    if grid:
        tables.update(grid.get("tables", {}))
    payload: dict[str, Any] = {
        "budget": budget,
        **head,
        "seeds_planned": list(planned),
        "targets": TARGETS,
        "targets_met": met,
        "pooled": pooled,
        "equal_time": equal_time,
        "levers": levers,
        "levers_aggregation": "per lever name: mean over the seeds that report it (val and test); gain = vs the row above",
        "textures": textures,
        "per_trial_overhead_s": {
            str(r["seed"]): (r.get("overheads") or {}).get("launch_to_first_batch_s") for r in seed_rows
        },
        "definition": "delta = edgetune's final model (python -m tuner defaults, --set data.split_seed=<seed>) minus "
        "the plain script (baseline_plain.py, 8 epochs, best-val epoch), both evaluated once on the same "
        "test files of that split; pooled = the seeds' paired test arrays concatenated (macro-F1 on the "
        "concatenation); ci95 = paired bootstrap, 10,000 resamples of the items within each seed; "
        "equal time = the plain script on the first seed with epochs = max(1, floor((tune wall - "
        "overhead) / median epoch s)) from its 8-epoch run; useful_fraction = min over seeds of "
        "summary.json's useful_fraction; tune_wall_s / baseline_wall_s = largest over seeds.",
    }
    if speed:
        payload["cache_speedup"] = speed
        payload["cache_speedup_epoch"] = speed["speedup_epoch"]
    if grid:
        payload["grid_comparison"] = grid.get("results")
    if partial:
        payload["partial"] = partial
    return payload, tables


def run_seed(
    work: Path, storage: str, seed: int, tune_args: list[str], with_equal_time: bool
) -> tuple[list[str], Group, dict[str, Any], dict[str, Any] | None]:
    """One split seed: the tune, the 8-epoch plain script on its split right after, and (``with_equal_time``)
    the plain script for the tune's wall clock; returns the classes, paired arrays, the seed's row and the
    equal-time result."""
    name = f"elpv-seed{seed}"
    tune = run_tune(work, name, [*tune_args, "--set", f"data.split_seed={seed}"])
    print(
        f"bench-search: seed {seed}: tune took {tune['wall_s']:.0f} s; the plain script on the same split", flush=True
    )
    split = tune["out"] / "split.json"
    base = run_baseline(work, split, f"baseline-{name}", tune["cache"])
    classes, group = paired_arrays(tune["out"], base)
    row = seed_result(
        seed,
        tune["summary"],
        tune["wall_s"],
        base,
        compare(classes, [group]),
        {"study": name, "overheads": study_overheads(tune["out"], storage, name)},
    )
    equal_time = None
    if with_equal_time:
        fit = equal_time_epochs(base, tune["wall_s"])
        print(
            f"bench-search: seed {seed}: the plain script for the tune's wall clock ({fit['epochs']} epochs)",
            flush=True,
        )
        beq = run_baseline(work, split, f"baseline-{name}-equal-time", tune["cache"], fit["epochs"])
        equal_time = equal_time_result(seed, fit, beq, paired(tune["out"], beq))
    return classes, group, row, equal_time


def run_textures(work: Path, time_budget: int) -> dict[str, Any]:
    """The second built-in dataset: the tune on its default split and the plain script on the same split."""
    ttune = run_tune(work, "textures-default", ["--data", "textures", "--time-budget", str(time_budget)])
    tbase = run_baseline(work, ttune["out"] / "split.json", "baseline-textures", ttune["cache"])
    tex = paired(ttune["out"], tbase)
    tex.update(
        {
            "tune_wall_s": ttune["wall_s"],
            "baseline_wall_s": tbase["wall_s"],
            "time_budget_s": time_budget,
            "best_params": ttune["summary"].get("best_params"),
        }
    )
    return tex


def main(argv: list[str] | None = None) -> int:
    from edgetune.logs import setup_cli_logging

    args = parse_args(__doc__.splitlines()[0], argv, _add_args)
    seeds = parse_seeds(args.seeds)
    setup_cli_logging(verbose=False)  # the in-process grid comparison's study logs as `python -m tuner` does
    b = BUDGET[args.budget]
    work = work_dir(args, "edgetune-bench-search-")
    t_start = time.time()
    storage = f"sqlite:///{work / 'optuna.db'}"
    gpu = ["--gpus-per-trial", "1"] if args.budget == "large" and shutil.which("nvidia-smi") else []
    n_stages = len(seeds) + 1 + (2 if args.extra else 0)
    rows: list[dict[str, Any]] = []
    groups: list[Group] = []
    classes: list[str] | None = None
    equal_time: dict[str, Any] | None = None
    stages: dict[str, Any] = {}

    def save(partial: str | None) -> None:
        assert classes is not None
        payload, tables = build_report(args.budget, seeds, rows, classes, groups, equal_time, stages, partial)
        write_results("search", {**payload, "wall_seconds": time.time() - t_start}, args.out, tables)

    for i, seed in enumerate(seeds):
        print(
            f"bench-search: {i + 1}/{n_stages} split seed {seed}: make tune (embedded default, full elpv, cold caches)",
            flush=True,
        )
        cls, group, row, et = run_seed(work, storage, seed, [*b["tune_args"], *gpu], with_equal_time=i == 0)
        if classes is None:
            classes = cls
        elif cls != classes:
            raise SystemExit(f"bench-search: seed {seed}'s classes {cls} differ from the first seed's {classes}")
        if i == 0:
            equal_time = et
        rows.append(row)
        groups.append(group)
        left = [s for s in seeds if s not in {r["seed"] for r in rows}]
        save(
            f"elpv seeds done {[r['seed'] for r in rows]}, not yet run {left}; textures"
            f"{', cache speed-up, grid' if args.extra else ''} not run yet"
        )

    print(f"bench-search: {len(seeds) + 1}/{n_stages} textures (second built-in dataset)", flush=True)
    stages["textures"] = run_textures(work, b["textures_time"])

    if args.extra:
        save("cache speed-up and grid comparison (--extra) not run yet")
        print(f"bench-search: {len(seeds) + 2}/{n_stages} activation cache speed-up (--extra)", flush=True)
        stages["cache_speedup"] = cache_speedup(work)
        print(f"bench-search: {n_stages}/{n_stages} grid comparison (--extra, secondary)", flush=True)
        stages["grid_comparison"] = grid_comparison(work, b["grid"])
    save(None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
