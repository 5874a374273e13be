"""Study outputs: best trial (test evaluation), leaderboard (CSV + Markdown), plots, summaries,
and ``make report STUDIES=a,b`` (side-by-side comparison of studies in one storage)."""

from __future__ import annotations

import argparse
import csv
import json
import logging
import shutil
import sys
import warnings
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import optuna  # noqa: TID253 - every output here is read from the study (its trials, attrs and plots)

from edgetune.dataclass_cli import HelpFormatter, add_version
from edgetune.errors import EdgetuneError
from edgetune.logs import setup_cli_logging
from edgetune.markdown import markdown_table
from edgetune.preprocess import PreprocessSpec
from trainer.checkpoint import read_meta
from trainer.config import ModelConfig, TrainConfig
from trainer.data import build_data
from trainer.epoch_result import EpochResult
from trainer.evaluate import report_from_probs
from trainer.export import eval_arrays
from trainer.metric import CHECKPOINT_SCORE, CHECKPOINT_SCORE_MODE, get_metric
from trainer.model import preprocess_spec_for
from trainer.run import evaluate_checkpoint
from tuner import posthoc
from tuner.device import LATENCY_MS
from tuner.storage import rdb_storage
from tuner.summary import FinalModel, StudySummary
from tuner.trial_checkpoint import materialise_best_checkpoint, result_for
from tuner.trial_record import TrialRecord, records

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ray.tune import ResultGrid

    from trainer.data import PreparedSource
    from tuner.options import TuneOptions
    from tuner.posthoc import PosthocResult
    from tuner.probe import ProbeResult
    from tuner.refit import RefitRun


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


def _rows(study: optuna.Study, metric: str) -> list[dict[str, Any]]:
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


def _mark_members(
    rows: list[dict[str, Any]], post: PosthocResult, final: dict[str, Any], probes: Sequence[ProbeResult], metric: str
) -> None:
    """Ensemble weights on the leaderboard's rows; one row per probe (fidelity: frozen features)."""
    for p in probes:
        rows.append(
            {
                **dict.fromkeys(leader_columns(metric)),
                "ray_trial_id": None,
                "params": None,
                "trial": p.name,
                "state": "PROBE",
                "backbone": p.backbone,
                "img": p.img,
                "fidelity": "linear head, frozen features",
                "ens_weight": None,
                metric: None,
                "val_acc": p.val_accuracy,
                "val_macro_f1": p.val_macro_f1,
                "train_seconds": p.seconds,
            }
        )
    for m in post.members if post is not None else ():
        if m["kind"] == "final":
            final["ens_weight"] = m["weight"]
        for r in rows:
            if (m["kind"] == "trial" and r["trial"] == int(m["name"].split()[-1])) or r["trial"] == m["name"]:
                r["ens_weight"] = m["weight"]


def _candidates(rows: list[dict[str, Any]], metric: str, max_latency_ms: float) -> list[dict[str, Any]]:
    """Finished trials, best first; with a latency budget only those within it (all, with a message, if none)."""
    ok = [r for r in rows if r[metric] is not None and r["state"] in ("COMPLETE", "PRUNED")]
    if max_latency_ms:
        within = [r for r in ok if r[LATENCY_MS] is not None and r[LATENCY_MS] <= max_latency_ms]
        if not within:
            log.info(f"no trial within --max-latency-ms {max_latency_ms}; picking the most accurate overall")
        ok = within or ok
    return ok


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


def finish_study(
    opts: TuneOptions,
    results: ResultGrid | None,
    study: optuna.Study,
    out: Path,
    source: PreparedSource | None = None,
    refit: RefitRun | None = None,
    deadline: float | None = None,
    probes: Sequence[ProbeResult] = (),
) -> tuple[StudySummary, Any]:
    """The final model -> out/best (the refit, else the best trial's checkpoint) and its one test evaluation;
    post-hoc selection over the study's models (tuner/posthoc.py: test-time views, ensemble, decision rule; then
    the final model's test figures are the selected model's); leaderboard (the refit row marked); plots. Returns
    (the summary, the :class:`tuner.posthoc.PosthocResult` or None)."""
    metric = opts.metric
    rows = _rows(study, metric)
    summary = _summary_head(opts, rows, out, refit)
    dest, post = out / "best", None
    final = _final_model(opts, results, rows, refit, dest)
    if final:
        summary, post = _evaluate_final(opts, results, rows, final, dest, source, refit, deadline, probes, summary)
        params_of = refit.of_trial if refit is not None and final["state"] == "REFIT" else final["trial"]
        params = refit.params if refit is not None and params_of == -1 else study.trials[params_of].params
        if summary.final is not None:
            summary = summary.with_(final=replace(summary.final, params=params))
        (out / "best_config.yaml").write_text((dest / "checkpoint.json").read_text())
        _mark_members(rows, post, final, probes, metric)
    else:
        log.info("no trial produced a checkpoint; nothing to evaluate")
    write_leaderboard(rows, out, metric)
    if opts.multi_objective:
        summary = summary.with_(
            pareto_front=[{"trial": t.number, "values": t.values, "params": t.params} for t in study.best_trials]
        )
    return summary.with_(
        plots=plots(
            study, results, rows, out, opts.multi_objective, metric, refit.history if refit is not None else None
        ),
        leaderboard_md=_summary_leaderboard(rows, opts),
    ), post


def _summary_head(opts: TuneOptions, rows: list[dict[str, Any]], out: Path, refit: RefitRun | None) -> StudySummary:
    """The summary's first part: the study, its storage, its trials' states and the final fit."""
    states = {s: sum(r["state"] == s for r in rows) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING")}
    return StudySummary(
        study=opts.study,
        storage=opts.storage,
        trials=len(rows),
        states=states,
        metric=opts.metric,
        out=str(out),
        refit=refit.to_dict() if refit is not None else None,
    )


def _final_model(
    opts: TuneOptions, results: ResultGrid | None, rows: list[dict[str, Any]], refit: RefitRun | None, dest: Path
) -> dict[str, Any] | None:
    """The final model's checkpoint -> ``dest`` and its leaderboard row: the refit's (its row put first in
    ``rows``), else the best candidate trial's that still has a checkpoint; None when there is none."""
    if refit is not None and refit.dir is not None:
        return _refit_row(rows, refit, dest, opts.metric)
    for cand in _candidates(rows, opts.metric, opts.max_latency_ms):  # an earlier run's trial may have no checkpoint
        if (
            materialise_best_checkpoint(
                result_for(results, cand["ray_trial_id"]), cand, CHECKPOINT_SCORE, CHECKPOINT_SCORE_MODE, dest
            )
            and (dest / "model.pt").is_file()
        ):
            return cand
        log.info(f"trial #{cand['trial']} has no checkpoint any more (earlier run of the study); skipped")
    return None


def _refit_row(rows: list[dict[str, Any]], refit: RefitRun, dest: Path, metric: str) -> dict[str, Any]:
    """The refit's checkpoint -> ``dest``; its leaderboard row (the refitted trial's, with the refit's figures),
    inserted first in ``rows``."""
    if refit.dir is None:
        raise EdgetuneError("the final fit left no checkpoint to copy")  # _final_model only calls it with one
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(refit.dir, dest)
    base_row = next(
        (r for r in rows if r["trial"] == refit.of_trial),
        {
            **dict.fromkeys(leader_columns(metric)),
            "backbone": refit.params.get("backbone"),
            "img": refit.params.get("img"),
            "freeze": refit.params.get("freeze"),
            "params": None,
            "ray_trial_id": None,
            LATENCY_MS: None,
        },
    )
    name = f"refit of #{refit.of_trial}" if refit.of_trial >= 0 else "final fit of the first seed point"
    final = {
        **base_row,
        "rank": 0,
        "trial": name,
        "state": "REFIT",
        "epochs": refit.epochs,
        "fidelity": f"{refit.epochs} ep (final fit)",
        "best_epoch": refit.best_epoch,
        metric: refit.value,
        "val_acc": refit.val.get("val_acc"),
        "val_macro_f1": refit.val.get("val_macro_f1"),
        "train_seconds": refit.seconds,
        "stop_reason": refit.stop_reason or None,
        "ray_trial_id": None,
    }
    if final["val_acc"] is not None and final["params"]:
        final["accuracy_density"] = final["val_acc"] / (final["params"] / 1e6)
    rows.insert(0, final)
    return final


def _summary_leaderboard(rows: list[dict[str, Any]], opts: TuneOptions) -> str:
    """The summary's Markdown leaderboard: the top 12 rows, with the latency columns the study measured."""
    latency_cols = (
        ["target_latency_ms", "target_latency_p90_ms", "target_device", "rejected"]
        if getattr(opts, "target", "")
        else [LATENCY_MS]
        if getattr(opts, "latency_on", False)
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


def _evaluate_final(
    opts: TuneOptions,
    results: ResultGrid | None,
    rows: list[dict[str, Any]],
    final: dict[str, Any],
    dest: Path,
    source: PreparedSource | None,
    refit: RefitRun | None,
    deadline: float | None,
    probes: Sequence[ProbeResult],
    summary: StudySummary,
) -> tuple[StudySummary, Any]:
    """The final model's test evaluation: the single model's, then post-hoc selection (whose chosen model's test
    report replaces it). Returns the summary with its final model (and post-hoc part), and the PosthocResult or
    None."""
    data, post = None, None
    if source is not None:
        cfg = TrainConfig.from_dict(read_meta(dest)["config"])
        data = build_data(cfg.data, preprocess_spec_for(cfg.model), seed=cfg.seed, source=source)
    metrics = evaluate_checkpoint(
        dest,
        dest,
        data=data,
        extra={  # the one read of the test split
            "study": opts.study,
            "trial_number": final["trial"],
            "trial_id": final["ray_trial_id"],
            "storage": opts.storage,
            "train_seconds": final["train_seconds"],
            "refit": final["state"] == "REFIT",
        },
    )
    if data is not None:
        post = _posthoc(opts, results, rows, final, dest, data, deadline, probes)
        metrics = _posthoc_metrics(post, metrics, data, dest)
        summary = summary.with_(posthoc=post.describe(), levers=_lever_rows(post, refit))
    final["test_acc"], final["test_macro_f1"] = metrics["test_accuracy"], metrics["test_macro_f1"]
    shutil.copy(dest / "confusion_matrix.png", Path(summary.out) / "confusion_matrix.png")
    model = FinalModel(
        trial=final["trial"],
        ray_trial_id=final["ray_trial_id"],
        backbone=final["backbone"],
        value=final[opts.metric],
        val_acc=final["val_acc"],
        test_accuracy=metrics["test_accuracy"],
        test_macro_f1=metrics["test_macro_f1"],
        checkpoint=str(dest),
        test_images=metrics.get("test_images"),
    )
    return summary.with_(final=model), post


#: Trials (best first) offered to post-hoc selection beside the final model and the probes.
MAX_TRIAL_MEMBERS = 6


def _member_dirs(
    results: ResultGrid | None, rows: list[dict[str, Any]], final: dict[str, Any], dest: Path, out: Path
) -> list[tuple[str, str]]:
    """Every other finished trial's best checkpoint at the final model's preprocessing spec ->
    ``out/members/trial_<n>``; (name, dir) pairs."""
    spec = read_meta(dest)["preprocess"]
    members: list[tuple[str, str]] = []
    for r in rows:  # best first
        if r["state"] not in ("COMPLETE", "PRUNED") or r["trial"] == final["trial"] or not r["ray_trial_id"]:
            continue
        if len(members) >= MAX_TRIAL_MEMBERS:
            break
        d = out / "members" / f"trial_{r['trial']}"
        res = result_for(results, r["ray_trial_id"])
        try:
            ok = materialise_best_checkpoint(res, r, CHECKPOINT_SCORE, CHECKPOINT_SCORE_MODE, d)
            if ok and (d / "model.pt").is_file() and read_meta(d)["preprocess"] == spec:
                members.append((f"trial {r['trial']}", str(d)))
        except Exception as e:  # noqa: BLE001 - a member that cannot be read is left out, with the reason
            log.info(f"post-hoc: trial #{r['trial']}'s checkpoint left out ({type(e).__name__}: {e})")
    return members


def _posthoc(
    opts: TuneOptions,
    results: ResultGrid | None,
    rows: list[dict[str, Any]],
    final: dict[str, Any],
    dest: Path,
    data: Any,
    deadline: float | None,
    probes: Sequence[ProbeResult] = (),
) -> Any:
    """Post-hoc selection (tuner/posthoc.py) over the final model and the trials at its spec."""
    spec = PreprocessSpec.from_dict(read_meta(dest)["preprocess"])
    rounds = opts.ensemble_rounds
    others = _member_dirs(results, rows, final, dest, Path(opts.out).resolve()) if rounds else []
    x_val, y_val = eval_arrays(data.val, spec)
    x_test, y_test = eval_arrays(data.test, spec)
    counts = np.asarray(data.class_counts, dtype=np.float64)
    prior = np.log(np.clip(counts / counts.sum(), 1e-6, 1.0))
    inputs = posthoc.Inputs(x_val, y_val, x_test, y_test, prior, list(data.classes))
    # probes at the final model's spec join as candidates (their heads: out/probes/, for the record)
    extra = []
    for p in probes if rounds else ():
        if preprocess_spec_for(ModelConfig(backbone=p.backbone, img_size=p.img)).to_dict() == spec.to_dict():
            extra.append((p.name, p.model(len(data.classes))))
    # a latency budget or a target device measured single models: the final model stays one model there
    single = bool(opts.max_latency_ms > 0 or getattr(opts, "target", ""))
    if single:
        log.info("post-hoc: a latency budget / target device: no test-time views or ensemble (one model's latency)")
    post = posthoc.select(
        str(dest),
        others,
        inputs,
        opts.metric,
        "auto" if rounds else "off",
        deadline=deadline,
        seed=opts.seed,
        rounds=max(1, rounds),
        extra=extra,
        views=not single,
    )
    d = post.decisions
    log.info(
        f"post-hoc: test-time flips {'kept' if post.tta else 'not kept'}, ensemble "
        f"{'of ' + str(len(post.members)) + ' members kept' if post.ensemble else 'not kept'}, decision rule "
        f"{'tau=' + str(post.tau) if post.tau else 'not kept'} (validation: {d})"
    )
    return post


def _posthoc_metrics(post: PosthocResult, metrics: dict[str, Any], data: Any, dest: Path) -> dict[str, Any]:
    """The selected model's test report replaces the single model's (kept as ``single_model``)."""
    if post.test_probs is None or not (post.tta or post.ensemble or post.tau):
        return metrics
    labels = np.asarray([data.test.raw(i)[1] for i in range(len(data.test))])
    sources = [data.test.source(i) for i in range(len(data.test))]
    single = {k: metrics[k] for k in ("test_accuracy", "test_macro_f1")}
    rep = report_from_probs(post.test_probs, labels, sources, list(data.classes), dest)
    metrics = {**metrics, **rep, "single_model": single, "final_model": post.describe()}
    (dest / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    return metrics


def _lever_rows(post: PosthocResult, refit: RefitRun | None) -> list[dict[str, Any]]:
    """The levers each measured on validation and test (summary.json ``levers``; bench/bench_search.py reads it)."""
    rows = []
    hist = (refit.history if refit is not None and refit.dir is not None else []) or []
    best = next((h.val for h in hist if h.epoch == (refit.best_epoch if refit else None)), None)
    if best and "raw_val_acc" in best:
        rows.append(
            {
                "name": "final fit (raw weights)",
                "used": best.get("weights") != "ema",
                "val_accuracy": best["raw_val_acc"],
                "val_macro_f1": best["raw_val_macro_f1"],
                "test_accuracy": None,
                "test_macro_f1": None,
            }
        )
        rows.append(
            {
                "name": "+ weight averaging",
                "used": best.get("weights") == "ema",
                "val_accuracy": best["ema_val_acc"],
                "val_macro_f1": best["ema_val_macro_f1"],
                "test_accuracy": None,
                "test_macro_f1": None,
            }
        )
    for lv in post.levers:
        rows.append(
            {
                "name": lv["name"],
                "used": lv["used"],
                "val_accuracy": lv["val"]["accuracy"],
                "val_macro_f1": lv["val"]["macro_f1"],
                "test_accuracy": lv["test"]["accuracy"],
                "test_macro_f1": lv["test"]["macro_f1"],
                **({"tau": lv["tau"]} if "tau" in lv else {}),
            }
        )
    return rows


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
