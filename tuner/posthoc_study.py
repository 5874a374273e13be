"""Post-hoc selection applied to a finished study (the algorithm is :mod:`tuner.posthoc`): the candidate models
(the final model, the other trials' best checkpoints at its preprocessing spec, the probes' heads), the selection
under the finish's deadline, the selected model's test report, and the lever table each step measured."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgetune.preprocess import PreprocessSpec
from trainer.checkpoint import read_meta
from trainer.config import ModelConfig
from trainer.evaluate import report_from_probs
from trainer.export import eval_arrays
from trainer.metric import CHECKPOINT_SCORE, CHECKPOINT_SCORE_MODE
from trainer.model import preprocess_spec_for
from tuner import posthoc
from tuner.trial_checkpoint import materialise_best_checkpoint, result_for

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ray.tune import ResultGrid

    from tuner.options import TuneOptions
    from tuner.posthoc import PosthocResult
    from tuner.probe import ProbeResult
    from tuner.refit import RefitRun


log = logging.getLogger(__name__)


#: Trials (best first) offered to post-hoc selection beside the final model and the probes.
MAX_TRIAL_MEMBERS = 6


def member_dirs(
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


def run_posthoc(
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
    others = member_dirs(results, rows, final, dest, Path(opts.out).resolve()) if rounds else []
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


def posthoc_metrics(post: PosthocResult, metrics: dict[str, Any], data: Any, dest: Path) -> dict[str, Any]:
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


def lever_rows(post: PosthocResult, refit: RefitRun | None) -> list[dict[str, Any]]:
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
