"""The study's finish: the final model (the refit, else the best trial that still has a checkpoint) -> ``<out>/best``,
its one test evaluation, post-hoc selection over the study's models (:mod:`tuner.posthoc`), the leaderboard with the
final model's row, the plots, and the summary's part they fill (:class:`tuner.summary.StudySummary`). The
leaderboard rows, tables and plots themselves are :mod:`tuner.report`'s."""

from __future__ import annotations

import logging
import shutil
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna  # noqa: TID253 - the final model and its members are read from the study

from edgetune.errors import EdgetuneError
from trainer.checkpoint import read_meta
from trainer.config import TrainConfig
from trainer.data import build_data
from trainer.metric import CHECKPOINT_SCORE, CHECKPOINT_SCORE_MODE
from trainer.model import preprocess_spec_for
from trainer.run import evaluate_checkpoint
from tuner.device import LATENCY_MS
from tuner.posthoc_study import lever_rows, posthoc_metrics, run_posthoc
from tuner.report import leader_columns, leaderboard_rows, plots, summary_leaderboard, write_leaderboard
from tuner.summary import FinalModel, StudySummary
from tuner.trial_checkpoint import materialise_best_checkpoint, result_for

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ray.tune import ResultGrid

    from trainer.data import PreparedSource
    from tuner.options import TuneOptions
    from tuner.posthoc import PosthocResult
    from tuner.probe import ProbeResult
    from tuner.refit import RefitRun


log = logging.getLogger(__name__)


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
    rows = leaderboard_rows(study, metric)
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
        leaderboard_md=summary_leaderboard(rows, opts),
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
        post = run_posthoc(opts, results, rows, final, dest, data, deadline, probes)
        metrics = posthoc_metrics(post, metrics, data, dest)
        summary = summary.with_(posthoc=post.describe(), levers=lever_rows(post, refit))
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
