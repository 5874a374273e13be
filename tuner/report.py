"""Study outputs: best trial (test evaluation), leaderboard (CSV + Markdown), plots, summaries,
and ``make report STUDIES=a,b`` (side-by-side comparison of studies in one storage)."""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import optuna

LEADER_COLUMNS = ["rank", "trial", "state", "backbone", "freeze", "lr", "dropout", "gamma", "head", "batch_size",
                  "epochs", "params", "size_mb", "val_acc", "val_macro_f1", "test_acc", "train_seconds",
                  "accuracy_density", "latency_ms", "ray_trial_id"]


def _rows(study: optuna.Study, metric: str) -> list[dict[str, Any]]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        a, p = t.user_attrs, t.params
        best = a.get(f"best_{metric}", a.get(metric))
        if best is None and t.values:
            best = t.values[0]
        params = a.get("params")
        rows.append({
            "trial": t.number, "state": t.state.name, "backbone": p.get("backbone"), "freeze": p.get("freeze"),
            "lr": p.get("lr"), "dropout": p.get("dropout"), "gamma": p.get("gamma"), "head": p.get("head"),
            "batch_size": p.get("batch_size"), "epochs": a.get("epochs_trained"), "params": params,
            "size_mb": a.get("size_mb"), "val_acc": best, "val_macro_f1": a.get("val_macro_f1"), "test_acc": None,
            "train_seconds": a.get("train_seconds"),
            "accuracy_density": (best / (params / 1e6)) if best is not None and params else None,
            "latency_ms": a.get("latency_ms"), "ray_trial_id": a.get("ray_trial_id"),
            "checkpoint_uri": a.get("checkpoint_uri"),
        })
    sign = 1.0 if metric == "val_loss" else -1.0  # best first: lowest loss, highest accuracy/F1
    rows.sort(key=lambda r: (r["val_acc"] is None, sign * float(r["val_acc"] or 0.0), r["trial"]))
    for i, r in enumerate(rows, 1):
        r["rank"] = i
    return rows


def _candidates(rows: list[dict[str, Any]], max_latency_ms: float) -> list[dict[str, Any]]:
    """Finished trials, best first; with a latency budget only those within it (all, with a message, if none)."""
    ok = [r for r in rows if r["val_acc"] is not None and r["state"] in ("COMPLETE", "PRUNED")]
    if max_latency_ms:
        within = [r for r in ok if r["latency_ms"] is not None and r["latency_ms"] <= max_latency_ms]
        if not within:
            print(f"edgetune: no trial within --max-latency-ms {max_latency_ms}; picking the most accurate overall")
        ok = within or ok
    return ok


def _pick_best(rows: list[dict[str, Any]], max_latency_ms: float) -> dict[str, Any] | None:
    ok = _candidates(rows, max_latency_ms)
    return ok[0] if ok else None


def _result_for(results: Any, ray_trial_id: str | None) -> Any:
    for r in results:
        if r.metrics and r.metrics.get("trial_id") == ray_trial_id:
            return r
    return None


def materialise_best_checkpoint(result: Any, best: dict[str, Any], metric: str, mode: str, dest: Path) -> bool:
    """Copy the best trial's best checkpoint to ``dest`` (local dir, or S3/GCS storage via pyarrow)."""
    ckpt = None
    if result is not None:
        try:
            ckpt = result.get_best_checkpoint(metric, mode)
        except Exception:  # noqa: BLE001 - no scored checkpoints
            ckpt = None
        ckpt = ckpt or result.checkpoint
    if dest.exists():
        shutil.rmtree(dest)
    if ckpt is not None:
        ckpt.to_directory(str(dest))
        return True
    # Train-in-Tune (DDP trials): the Tune result has no checkpoint; the Train run's is in the metrics/attrs.
    uri = ((result.metrics or {}).get("checkpoint_uri") if result is not None else None) or best.get("checkpoint_uri")
    if not uri:
        return False
    if "://" in uri:
        import pyarrow.fs

        fs, path = pyarrow.fs.FileSystem.from_uri(uri)
        dest.mkdir(parents=True)
        pyarrow.fs.copy_files(path, str(dest), source_filesystem=fs)
    elif Path(uri).is_dir():
        shutil.copytree(uri, dest)
    else:
        return False
    return True


def write_leaderboard(rows: list[dict[str, Any]], out: Path) -> None:
    with open(out / "leaderboard.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=LEADER_COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    (out / "leaderboard.md").write_text(markdown_table(rows, LEADER_COLUMNS[:-1]))


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"
    return str(v)


def markdown_table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def plots(study: optuna.Study, results: Any, rows: list[dict[str, Any]], out: Path, multi: bool) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import warnings

    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    warnings.filterwarnings("ignore", category=UserWarning, module=r"(optuna|matplotlib).*")
    made = []
    target = (lambda t: t.values[0]) if multi else None
    jobs = {"optimization_history.png": lambda: ovm.plot_optimization_history(study, target=target, target_name="val"),
            "param_importances.png": lambda: ovm.plot_param_importances(study, target=target),
            "parallel_coordinate.png": lambda: ovm.plot_parallel_coordinate(study, target=target)}
    if multi:
        jobs["pareto_front.png"] = lambda: ovm.plot_pareto_front(study, target_names=["val_acc", "latency_ms"])
    for name, fn in jobs.items():
        try:
            ax: Any = fn()
            fig: Any = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
            fig.set_size_inches(8, 5)
            fig.tight_layout()
            fig.savefig(out / name, dpi=100)
            plt.close(fig)
            made.append(name)
        except Exception as e:  # noqa: BLE001 - e.g. importances need >= 2 finished trials
            print(f"edgetune: plot {name} skipped ({type(e).__name__}: {e})")
    top = [r for r in rows if r["ray_trial_id"]][:5]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for r in top:
        res = _result_for(results, r["ray_trial_id"])
        df = getattr(res, "metrics_dataframe", None)
        if df is not None and "val_acc" in df:
            ax.plot(df["epoch"], df["val_acc"], marker="o", label=f"#{r['trial']} {r['backbone']}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("val accuracy")
    ax.set_title("learning curves of the top trials")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "learning_curves.png")
    plt.close(fig)
    made.append("learning_curves.png")
    return made


def finish_study(opts: Any, results: Any, study: optuna.Study, out: Path) -> dict[str, Any]:
    """Best trial -> out/best (checkpoint + test metrics); leaderboard; plots. Returns the summary."""
    from trainer.run import evaluate_checkpoint

    mode = "min" if opts.metric == "val_loss" else "max"
    rows = _rows(study, opts.metric)
    states = {s: sum(r["state"] == s for r in rows) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING")}
    summary: dict[str, Any] = {"study": opts.study, "storage": opts.storage, "trials": len(rows), "states": states,
                               "out": str(out)}
    dest, best = out / "best", None
    for cand in _candidates(rows, opts.max_latency_ms):  # a trial of an earlier run may have no checkpoint left
        if materialise_best_checkpoint(_result_for(results, cand["ray_trial_id"]), cand, opts.metric, mode, dest) \
                and (dest / "model.pt").is_file():
            best = cand
            break
        print(f"edgetune: trial #{cand['trial']} has no checkpoint any more (earlier run of the study); skipped")
    if best:
        metrics = evaluate_checkpoint(dest, dest, extra={
            "study": opts.study, "trial_number": best["trial"], "trial_id": best["ray_trial_id"],
            "storage": opts.storage, "train_seconds": best["train_seconds"]})
        best["test_acc"] = metrics["test_accuracy"]
        shutil.copy(dest / "confusion_matrix.png", out / "confusion_matrix.png")
        summary.update({"best_trial": best["trial"], "best_ray_trial_id": best["ray_trial_id"],
                        "best_backbone": best["backbone"], "best_val_acc": best["val_acc"],
                        "best_test_accuracy": metrics["test_accuracy"], "best_test_macro_f1": metrics["test_macro_f1"],
                        "best_checkpoint": str(dest), "best_params": study.trials[best["trial"]].params})
        (out / "best_config.yaml").write_text((dest / "checkpoint.json").read_text())
    else:
        print("edgetune: no trial produced a checkpoint; nothing to evaluate")
    write_leaderboard(rows, out)
    if opts.multi_objective:
        summary["pareto_front"] = [{"trial": t.number, "values": t.values, "params": t.params}
                                   for t in study.best_trials]
    summary["plots"] = plots(study, results, rows, out, opts.multi_objective)
    summary["leaderboard_md"] = markdown_table(rows[:10], ["rank", "trial", "state", "backbone", "epochs",
                                                            "val_acc", "test_acc", "params", "train_seconds",
                                                            "latency_ms"])
    return summary


def print_summary(summary: dict[str, Any], opts: Any) -> None:
    out = Path(summary["out"])
    print("\n== edgetune study", summary["study"], "==")
    print(summary.get("leaderboard_md", ""))
    if "best_test_accuracy" in summary:
        print(f"best: trial #{summary['best_trial']} {summary['best_backbone']} val_acc={summary['best_val_acc']:.4f} "
              f"test_accuracy={summary['best_test_accuracy']:.4f} test_macro_f1={summary['best_test_macro_f1']:.4f}")
    print(f"outputs: {out}/leaderboard.csv, leaderboard.md, best/metrics.json, plots ({', '.join(summary['plots'])})"
          + (f", bundle {summary['bundle']}" if summary.get("bundle") else ""))
    print(f"dashboard: make dashboard STORAGE={opts.storage}")


def compare_studies(storage: str, names: list[str]) -> list[dict[str, Any]]:
    from tuner.storage import rdb_storage

    url, storage = storage, rdb_storage(storage)
    rows = []
    for n in names:
        try:
            s = optuna.load_study(study_name=n, storage=storage)
        except KeyError:
            known = [x.study_name for x in optuna.get_all_study_summaries(storage)]
            raise SystemExit(f"error: no study {n!r} in {url}; studies there: {known}") from None
        a = s.user_attrs
        trials = s.get_trials(deepcopy=False)
        done = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED") and t.values]
        best = max(done, key=lambda t: t.user_attrs.get("best_val_acc", t.values[0]), default=None)
        rows.append({"study": n, "dataset": a.get("dataset"), "dataset_hash": str(a.get("dataset_hash", ""))[:12],
                     "split": f"{a.get('split_ratios')} seed {a.get('split_seed')}", "trials": len(trials),
                     "complete": sum(t.state.name == "COMPLETE" for t in trials),
                     "pruned": sum(t.state.name == "PRUNED" for t in trials),
                     "best_val_acc": best.user_attrs.get("best_val_acc", best.values[0]) if best else None,
                     "best_backbone": best.params.get("backbone") if best else None,
                     "best_params": json.dumps(best.params) if best else "",
                     "budget": json.dumps(a.get("budget")), "edgetune": a.get("edgetune_version")})
    hashes = {r["dataset_hash"] for r in rows}
    if len(hashes) > 1:
        print("note: the studies used different datasets (hash differs): compare with care")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tuner.report", description="side-by-side table of studies")
    p.add_argument("--studies", required=True, help="comma-separated study names")
    p.add_argument("--storage", default="sqlite:///" + str(Path("runs/optuna.db").resolve()))
    p.add_argument("--out", default="", help="where to save report.md/report.csv (default runs/)")
    a = p.parse_args(argv)
    rows = compare_studies(a.storage, [s for s in a.studies.split(",") if s])
    cols = list(rows[0]) if rows else []
    md = markdown_table(rows, cols)
    print(md)
    out = Path(a.out or "runs")
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(md)
    with open(out / "report.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    print(f"saved {out / 'report.md'} and {out / 'report.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
