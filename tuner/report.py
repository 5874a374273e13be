"""Study reports: the leaderboard (one row per trial, CSV + Markdown), the plots, the printed summary, and
``make report STUDIES=a,b`` (side-by-side comparison of studies in one storage). The study's finish (final model,
test evaluation, post-hoc selection) is :mod:`tuner.finish`."""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna  # noqa: TID253 - every output here is read from the study (its trials, attrs and plots)

from edgetune.dataclass_cli import HelpFormatter, add_version
from edgetune.logs import setup_cli_logging
from edgetune.markdown import markdown_table
from trainer.epoch_result import EpochResult
from trainer.metric import get_metric
from tuner.device import LATENCY_MS
from tuner.storage import rdb_storage
from tuner.summary import StudySummary
from tuner.trial_checkpoint import result_for
from tuner.trial_record import TrialRecord, records

if TYPE_CHECKING:
    from ray.tune import ResultGrid

    from tuner.options import TuneOptions


log = logging.getLogger(__name__)

#: Leaderboard columns; ``{metric}`` is the study's selection metric (trainer.metric), the value Optuna holds.
LEADER_COLUMNS = [
    "rank",
    "trial",
    "state",
    "backbone",
    "img",
    "freeze",
    "lr",
    "optimizer",
    "augment",
    "sampler",
    "epochs",
    "fidelity",
    "ens_weight",
    "best_epoch",
    "{metric}",
    "val_acc",
    "val_macro_f1",
    "test_acc",
    "test_macro_f1",
    "params",
    "size_mb",
    "accuracy_density",
    "train_seconds",
    "data_path",
    "stop_reason",
    LATENCY_MS,
    "precision",
    "target_latency_ms",
    "target_latency_p90_ms",
    "target_device",
    "rejected",
    "ray_trial_id",
]


def leader_columns(metric: str) -> list[str]:
    return list(dict.fromkeys(c.format(metric=metric) for c in LEADER_COLUMNS))  # once, also for val_macro_f1


def leaderboard_rows(study: optuna.Study, metric: str) -> list[dict[str, Any]]:
    """One row per trial, best first by the trial's best-epoch value of ``metric`` (= its Optuna value)."""
    m = get_metric(metric)
    rows: list[dict[str, Any]] = []
    for t in records(study):
        if t.state == "WAITING":  # an enqueued seed the budget never reached (a resumed study runs it first)
            continue
        p = t.params
        value = t.best(metric)
        if value is None and t.values and t.finished:
            value = t.values[0]
        params = t.model_params
        val_acc = t.at_best("val_acc")  # at the best epoch (by the study's metric)
        rows.append(
            {
                "trial": t.number,
                "state": t.state,
                "backbone": p.get("backbone"),
                "img": p.get("img"),
                "freeze": p.get("freeze"),
                "lr": p.get("lr"),
                "optimizer": p.get("optimizer"),
                "augment": p.get("augment"),
                "sampler": p.get("sampler"),
                "epochs": t.epochs_trained,
                "fidelity": t.fidelity(),
                "ens_weight": None,
                "best_epoch": t.best_epoch,
                metric: value,
                "val_acc": val_acc,
                "val_macro_f1": t.at_best("val_macro_f1"),
                "test_acc": None,
                "test_macro_f1": None,
                "params": params,
                "size_mb": t.size_mb,
                # accuracy density (model-selection study): validation accuracy per million parameters
                "accuracy_density": (val_acc / (params / 1e6)) if val_acc is not None and params else None,
                "train_seconds": t.train_seconds,
                "data_path": t.data_path,
                "stop_reason": t.stop_reason,
                LATENCY_MS: t.latency_ms,
                "precision": p.get("precision", t.precision),
                "target_latency_ms": t.target_latency_ms,
                "target_latency_p90_ms": t.target_latency_p90_ms,
                "target_device": t.device_name(),
                "rejected": t.rejected_reason or (t.fail_reason if "latency" in str(t.fail_reason or "") else None),
                "ray_trial_id": t.ray_trial_id,
                "checkpoint_uri": t.checkpoint_uri,
            }
        )
    rows.sort(key=lambda r: (m.sort_key(None if r[metric] is None else float(r[metric])), int(r["trial"])))
    for i, r in enumerate(rows, 1):
        r["rank"] = i
    return rows


def write_leaderboard(rows: list[dict[str, Any]], out: Path, metric: str) -> None:
    cols = leader_columns(metric)
    with open(out / "leaderboard.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    (out / "leaderboard.md").write_text(leaderboard_table(rows, cols[:-1]))


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"
    return str(v)


def leaderboard_table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    """The tuner's Markdown tables: :func:`edgetune.markdown.markdown_table` with 4 significant digits."""
    return markdown_table(rows, cols, _fmt) + "\n"


def summary_leaderboard(rows: list[dict[str, Any]], opts: TuneOptions) -> str:
    """The summary's Markdown leaderboard: the top 12 rows, with the latency columns the study measured."""
    latency_cols = (
        ["target_latency_ms", "target_latency_p90_ms", "target_device", "rejected"]
        if opts.target
        else [LATENCY_MS]
        if opts.latency_on
        else []
    )
    return leaderboard_table(
        rows[:12],
        [
            "rank",
            "trial",
            "state",
            "backbone",
            "img",
            "freeze",
            "fidelity",
            "ens_weight",
            opts.metric,
            "val_acc",
            "test_acc",
            "test_macro_f1",
            "data_path",
            "train_seconds",
            *latency_cols,
        ],
    )


def plots(
    study: optuna.Study,
    results: ResultGrid | None,
    rows: list[dict[str, Any]],
    out: Path,
    multi: bool,
    metric: str,
    refit_history: list[EpochResult] | None = None,
) -> list[str]:
    """The study's plots (Optuna's, then the learning curves) -> ``out``; the names of those made."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    warnings.filterwarnings("ignore", category=UserWarning, module=r"(optuna|matplotlib).*")
    made = []
    for name, fn in _study_plot_jobs(study, multi, metric).items():
        try:
            ax: Any = fn()
            fig: Any = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
            fig.set_size_inches(8, 5)
            fig.tight_layout()
            fig.savefig(out / name, dpi=100)
            plt.close(fig)
            made.append(name)
        except Exception as e:  # noqa: BLE001 - e.g. importances need >= 2 finished trials
            log.info(f"plot {name} skipped ({type(e).__name__}: {e})")
    _learning_curves(results, rows, out / "learning_curves.png", metric, refit_history)
    made.append("learning_curves.png")
    return made


def _first_value(t: optuna.trial.FrozenTrial) -> float:
    """The value a multi-objective study's plots show: its first objective (the study's metric)."""
    return float(t.values[0])


def _study_plot_jobs(study: optuna.Study, multi: bool, metric: str) -> dict[str, Callable[[], Any]]:
    """Optuna's plots of the study by file name, each drawn when called (it returns matplotlib axes)."""
    from optuna.visualization import matplotlib as ovm

    target = _first_value if multi else None
    jobs: dict[str, Callable[[], Any]] = {
        "optimization_history.png": partial(ovm.plot_optimization_history, study, target=target, target_name=metric),
        "param_importances.png": partial(ovm.plot_param_importances, study, target=target),
        "parallel_coordinate.png": partial(ovm.plot_parallel_coordinate, study, target=target),
    }
    if multi:
        jobs["pareto_front.png"] = partial(ovm.plot_pareto_front, study, target_names=[metric, LATENCY_MS])
    return jobs


def _learning_curves(
    results: ResultGrid | None,
    rows: list[dict[str, Any]],
    path: Path,
    metric: str,
    refit_history: list[EpochResult] | None,
) -> None:
    """The top 5 trials' per-epoch ``metric`` and the final fit's -> ``path``."""
    import matplotlib.pyplot as plt

    top = [r for r in rows if r["ray_trial_id"]][:5]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for r in top:
        res = result_for(results, r["ray_trial_id"])
        df = getattr(res, "metrics_dataframe", None)
        if df is not None and metric in df:
            ax.plot(df["epoch"], df[metric], marker="o", label=f"#{r['trial']} {r['backbone']}")
    if refit_history:
        pts = [(h.epoch, h.val[metric]) for h in refit_history if metric in h.val]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="s", color="black", linewidth=2, label="final fit")
    ax.set_xlabel("epoch")
    ax.set_ylabel(get_metric(metric).label)
    ax.set_title("learning curves of the top trials and the final fit")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def print_summary(summary: StudySummary, opts: TuneOptions) -> None:
    out = Path(summary.out)
    print("\n== edgetune study", summary.study, "==")
    print(summary.leaderboard_md)
    best = summary.final
    if best is not None:
        print(
            f"best: {best.trial} {best.backbone} {summary.metric}={best.value:.4f} "
            f"test_accuracy={best.test_accuracy:.4f} test_macro_f1={best.test_macro_f1:.4f} "
            f"(test n={best.test_images})"
        )
    print(
        f"outputs: {out}/leaderboard.csv, leaderboard.md"
        + (", best/metrics.json" if best is not None else "")
        + f", plots ({', '.join(summary.plots)})"
        + (f", bundle {summary.bundle}" if summary.bundle else "")
    )
    lat = summary.latency
    if lat:
        print(
            f"latency: {lat['architectures_timed']} architecture(s) in {lat['latency_table']}, Pareto front "
            f"{[p['trial'] for p in lat['pareto']]} in {lat['pareto_png']}"
            + (
                f", rejected by --max-latency-ms: {list(lat['rejected_by_constraint'])}"
                if lat["rejected_by_constraint"]
                else ""
            )
            + (
                f"; every study of the storage: {lat['storage_latency_table']}"
                if lat.get("storage_latency_table")
                else ""
            )
        )
    print(f"dashboard: make dashboard STORAGE={opts.storage}")


def _value(t: TrialRecord, metric: str) -> float | None:
    """A finished trial's best-epoch value, else its Optuna value."""
    v = t.best(metric)
    return v if v is not None else (t.values[0] if t.values else None)


def compare_studies(storage: str, names: list[str]) -> list[dict[str, Any]]:
    url, storage = storage, rdb_storage(storage)
    rows = []
    for n in names:
        try:
            s = optuna.load_study(study_name=n, storage=storage)
        except KeyError:
            known = [x.study_name for x in optuna.get_all_study_summaries(storage)]
            raise SystemExit(f"error: no study {n!r} in {url}; studies there: {known}") from None
        a = s.user_attrs
        trials = records(s)
        metric = get_metric(a.get("metric", "val_acc"))  # studies before the metric attr used val_acc
        done = [t for t in trials if t.finished and t.values]
        done.sort(key=lambda t: metric.sort_key(_value(t, metric.name)))
        best = done[0] if done else None
        rows.append(
            {
                "study": n,
                "dataset": a.get("dataset"),
                "dataset_hash": str(a.get("dataset_hash", ""))[:12],
                "split": f"{a.get('split_ratios')} seed {a.get('split_seed')}",
                "trials": len(trials),
                "complete": sum(t.state == "COMPLETE" for t in trials),
                "pruned": sum(t.state == "PRUNED" for t in trials),
                "metric": metric.name,
                "best_value": _value(best, metric.name) if best else None,
                "best_val_acc": best.metrics.get("val_acc_at_best") if best else None,
                "best_backbone": best.params.get("backbone") if best else None,
                "best_params": json.dumps(dict(best.params)) if best else "",
                "target": a.get("target"),
                "best_target_latency_ms": best.target_latency_ms if best else None,
                "best_target_latency_p90_ms": best.target_latency_p90_ms if best else None,
                "target_device": best.device_name() if best else None,
                "rejected_by_latency": sum(bool(t.rejected_reason) for t in trials),
                "budget": json.dumps(a.get("budget")),
                "edgetune": a.get("edgetune_version"),
            }
        )
    hashes = {r["dataset_hash"] for r in rows}
    if len(hashes) > 1:
        print("note: the studies used different datasets (hash differs): compare with care")
    return rows


def build_parser() -> argparse.ArgumentParser:
    """``python -m tuner.report``'s options (``--help`` shows each one's default, like the other CLIs)."""
    p = argparse.ArgumentParser(
        prog="python -m tuner.report", description="side-by-side table of studies", formatter_class=HelpFormatter
    )
    add_version(p)
    p.add_argument("--studies", required=True, help="comma-separated study names")
    p.add_argument("--storage", default="sqlite:///" + str(Path("runs/optuna.db").resolve()), help="Optuna storage URL")
    p.add_argument("--out", default="", help="where to save report.md/report.csv (default runs/)")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    setup_cli_logging(verbose=False)
    rows = compare_studies(a.storage, [s for s in a.studies.split(",") if s])
    cols = list(rows[0]) if rows else []
    md = leaderboard_table(rows, cols)
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
