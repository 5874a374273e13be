"""The search stage of a study: Ray Tune (ASHA) driving Optuna (seeded multivariate TPE) in the study's RDB storage,
each trial a trainer run (:func:`tuner.trial.run_trial`); the trials' fidelity planned from the probes' measured
speed so that every trial finishes what it starts before the search deadline. :func:`search` hands on
:class:`Searched` (the options and base config as planned, Ray Tune's result grid, the Optuna study)."""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import edgetune
from edgetune.errors import EdgetuneError
from trainer.config import TrainConfig
from trainer.metric import CHECKPOINT_SCORE, CHECKPOINT_SCORE_MODE
from tuner import _ray_compat
from tuner.budget import Clock
from tuner.device import LATENCY_MS
from tuner.latency_study import rejector
from tuner.ledger import Ledger, trial_stages
from tuner.options import TuneOptions
from tuner.probe import finish_reserve, trial_epoch_seconds
from tuner.refit import _refit_resources
from tuner.storage import rdb_storage
from tuner.trial import TrialContext, TrialResources, run_trial
from tuner.trial_record import records

if TYPE_CHECKING:
    import optuna
    from ray import tune
    from ray.tune import ResultGrid
    from ray.tune.schedulers import TrialScheduler

    from trainer.data import PreparedSource
    from tuner.device import LatencySetup
    from tuner.ledger import Ledger
    from tuner.searcher import EdgetuneOptunaSearch
    from tuner.space import SearchSpace


log = logging.getLogger(__name__)


def _study_attrs(opts: TuneOptions, base: TrainConfig, space: SearchSpace, source: PreparedSource) -> dict[str, Any]:
    return {
        "dataset": source.name,
        "dataset_hash": source.dataset_hash,
        "classes": source.classes,
        "split_seed": base.data.split_seed,
        "split_ratios": list(base.data.split),
        "split_counts": {k: len(v) for k, v in source.parts.items()},
        "search_space": {n: {k: v for k, v in asdict(p).items() if k != "name"} for n, p in space.params.items()},
        "dropped": space.dropped,
        "budget": {
            "trials": opts.trials,
            "max_epochs": opts.epochs,
            "time_budget_s": opts.time_budget_s,
            "img": opts.img,
            "max_images": base.data.max_images,
            "workers_per_trial": opts.workers_per_trial,
            "gpus_per_trial": opts.gpus_per_trial,
            "refit": opts.refit,
            "refit_share": opts.refit_share,
        },
        "metric": opts.metric,
        "metric_mode": opts.metric_def.mode,
        "multi_objective": opts.multi_objective,
        "target": opts.target or None,
        "max_latency_ms": opts.max_latency_ms,
        "edgetune_version": edgetune.__version__,
        "base_config": base.to_dict(),
    }


def trial_dirname(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


@dataclass(frozen=True)
class Searched:
    """What the search stage hands on: the options and base config as planned (the trials' epochs fitted to the
    search window from the probes' speed), Ray Tune's result grid and the Optuna study."""

    opts: TuneOptions
    base: TrainConfig
    results: ResultGrid
    study: Any  #: optuna.Study


def search(
    opts: TuneOptions,
    base: TrainConfig,
    space: SearchSpace,
    source: PreparedSource,
    info: dict[str, Any],
    clock: Clock,
    ledger: Ledger,
    latency: LatencySetup | None,
    probes: list[Any],
) -> Searched:
    """The finish reserve and the trials' fidelity from the probes' measured speed, then the search (:func:`_fit`)
    up to its deadline; its trials and driver entered in the budget ledger."""
    if probes:
        clock.finish_reserve_s = min(
            finish_reserve(probes, source, opts.ensemble_rounds > 0), MAX_FINISH_SHARE * opts.time_budget_s
        )
        log.info(
            f"kept {clock.finish_reserve_s:.0f} s at the end for post-hoc selection, test evaluation and export "
            "(from the probes' measured forward speed)"
        )
    deadline = clock.search_deadline(opts.refit, opts.refit_share)
    if probes and deadline:
        opts, base = _plan_trials(opts, base, probes, source, deadline)
    t_search = time.time()
    results, study = _fit(opts, base, space, source, info, deadline, latency)
    trial_stages(ledger, study, opts.cpus_per_worker * opts.workers_per_trial)
    ledger.add("search driver (Ray Tune, Optuna)", "overhead", t_search, time.time(), cores=0.0)
    return Searched(opts=opts, base=base, results=results, study=study)


def _plan_trials(
    opts: TuneOptions, base: TrainConfig, probes: list[Any], source: PreparedSource, deadline: float
) -> tuple[TuneOptions, TrainConfig]:
    """Every run finishes what it starts: the trials' fidelity (their epochs, ASHA's max_t and their LR schedule) is
    planned before the first starts, from the probes' measured speed, so the first wave ends before the search
    deadline with its schedule annealed (at most ``--epochs``, at least 1)."""
    if opts.gpus_per_trial or opts.workers_per_trial > 1:
        return opts, base
    est = trial_epoch_seconds(probes, source, base, _refit_resources(opts)[0], opts.cpus_per_worker)
    fit = int((deadline - time.time()) // max(est, 1e-6))
    epochs = max(1, min(opts.epochs, fit))
    log.info(
        f"trials: ~{est:.0f} s per epoch at {opts.cpus_per_worker:g} CPU (from the probes' speed): "
        f"{epochs} epoch(s) per trial fit the {max(0.0, deadline - time.time()):.0f} s of the search window"
    )
    if epochs == opts.epochs:
        return opts, base
    return replace(opts, epochs=epochs, grace_period=min(opts.grace_period, epochs)), base.replace({"epochs": epochs})


#: The most of the budget kept for the finish, whatever the probes measured (a busy node measures slow).
MAX_FINISH_SHARE = 0.2


def _max_concurrent(opts: TuneOptions, resources: dict[str, float]) -> int | None:
    """DDP trials reserve almost nothing for the trial itself: cap them by what their workers need."""
    if opts.max_concurrent:
        return opts.max_concurrent
    if opts.workers_per_trial <= 1:
        return None
    if opts.gpus_per_trial:
        fit = resources.get("GPU", 0.0) / (opts.gpus_per_trial * opts.workers_per_trial)
    else:
        fit = resources.get("CPU", 0.0) / (opts.cpus_per_worker * opts.workers_per_trial)
    return max(1, int(fit))


def trial_resources(opts: TuneOptions) -> tuple[Any, dict[str, float]]:
    """(TrialResources, the Tune trial's own resource request)."""
    res = TrialResources(
        workers=opts.workers_per_trial,
        use_gpu=opts.gpus_per_trial > 0,
        cpus_per_worker=opts.cpus_per_worker,
        resources_per_worker=dict(opts.resources_per_worker),
        placement_strategy=opts.placement_strategy,
        max_failures=opts.max_failures,
        storage_path=opts.storage_path,
    )
    if opts.workers_per_trial > 1:  # the trial only drives a TorchTrainer; its workers hold the resources
        return res, {"cpu": 0.01}
    return res, {"cpu": opts.cpus_per_worker, "gpu": opts.gpus_per_trial, **opts.resources_per_worker}


def _fail_stale_trials(opts: TuneOptions, storage: Any) -> set[str]:
    """Resume: the trials a killed driver left RUNNING -> FAIL (Ray resumes them as new twins); their Ray ids."""
    import optuna

    from tuner.searcher import mark_stale_running_failed  # noqa: PLC0415 - lazy: ray

    try:
        study = optuna.load_study(study_name=opts.study, storage=storage)
    except KeyError:
        raise EdgetuneError(f"cannot resume: study {opts.study!r} not found in {opts.storage}") from None
    stale = mark_stale_running_failed(study)
    if stale:
        log.info(f"resume: marked stale RUNNING trial(s) {stale} as FAIL")
    return {str(t.ray_trial_id) for t in records(study) if t.number in stale and t.ray_trial_id}


def _fit(
    opts: TuneOptions,
    base: TrainConfig,
    space: SearchSpace,
    source: PreparedSource,
    info: dict[str, Any],
    deadline: float | None,
    latency: LatencySetup | None = None,
) -> tuple[Any, Any]:
    """Build (or restore) the Tuner over the Optuna study and run it; returns (ResultGrid, study)."""
    import optuna

    from tuner.searcher import EdgetuneOptunaSearch  # noqa: PLC0415 - lazy: ray

    storage = rdb_storage(opts.storage)
    stale_ray_ids = _fail_stale_trials(opts, storage) if opts.resume else set()
    searcher = _searcher(opts, base, space, source, storage, deadline, latency)
    _record_study_attrs(searcher.study, _study_attrs(opts, base, space, source), opts.study)
    scheduler = _scheduler(opts)
    trainable = _trainable(opts, base, space, source, deadline, latency)
    run_config = _run_config(opts, space, searcher)
    tuner = _tuner(opts, trainable, run_config, searcher, scheduler, info, deadline, stale_ray_ids)
    # A trial overtaken by the search deadline returns without a result (run_trial); Ray's strict check would turn
    # that into an error of the whole study. Missing metrics are handled by the searcher (FAIL with the reason).
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    results = tuner.fit()
    if isinstance(searcher, EdgetuneOptunaSearch):
        searcher.close_unfinished()
    return results, optuna.load_study(study_name=opts.study, storage=storage)


#: Ray Tune's num_samples where ``--trials`` sets no cap: the time budget ends the search.
UNCAPPED_TRIALS = 100_000


def _n_trials(opts: TuneOptions) -> int:
    return opts.trials or UNCAPPED_TRIALS


def _searcher(
    opts: TuneOptions,
    base: TrainConfig,
    space: SearchSpace,
    source: PreparedSource,
    storage: Any,
    deadline: float | None,
    latency: LatencySetup | None,
) -> EdgetuneOptunaSearch:
    """Optuna (seeded multivariate TPE, the space's seed points first) over the study in ``storage``, as Ray Tune's
    search algorithm; single- or multi-objective (the metric, and latency_ms to minimise)."""
    import optuna

    from tuner.searcher import EdgetuneOptunaSearch  # noqa: PLC0415 - lazy: ray

    m = opts.metric_def
    seeds = space.points_to_evaluate()
    n_trials = _n_trials(opts)
    searcher = EdgetuneOptunaSearch(
        space=space.define_by_run,
        metric=[m.best_key, LATENCY_MS] if opts.multi_objective else m.best_key,
        mode=["max", "min"] if opts.multi_objective else m.mode,
        max_t=opts.epochs,
        deadline=deadline,
        grace_period=opts.grace_period,
        points_to_evaluate=None if opts.resume else seeds[:n_trials] or None,
        sampler=optuna.samplers.TPESampler(
            seed=opts.seed,
            multivariate=True,
            group=True,
            constant_liar=True,
            n_startup_trials=min(len(seeds) + 3, n_trials),
        ),
        study_name=opts.study,
        storage=storage,
        reject=rejector(opts, base, space, source, latency),
    )
    searcher.study.set_metric_names([opts.metric, LATENCY_MS] if opts.multi_objective else [opts.metric])
    return searcher


def _record_study_attrs(study: optuna.Study, attrs: dict[str, Any], name: str) -> None:
    """The study's user attrs (:func:`_study_attrs`); a warning when it was run on another dataset before."""
    existing = study.user_attrs
    if existing.get("dataset_hash") not in (None, attrs["dataset_hash"]):
        log.warning(
            f"warning: study {name!r} was run on a different dataset "
            f"(hash {existing['dataset_hash'][:12]} vs {attrs['dataset_hash'][:12]})"
        )
    for k, v in attrs.items():
        study.set_user_attr(k, v)


def _scheduler(opts: TuneOptions) -> TrialScheduler:
    """ASHA on the loop's epochs; FIFO for a multi-objective study (no single value to rank rungs by)."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if opts.multi_objective:
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr="epoch",  # the loop's own count (tuner.searcher.result_epoch), as the curves' steps
        max_t=opts.epochs,
        grace_period=opts.grace_period,
        reduction_factor=opts.reduction_factor,
    )


def _trainable(
    opts: TuneOptions,
    base: TrainConfig,
    space: SearchSpace,
    source: PreparedSource,
    deadline: float | None,
    latency: LatencySetup | None,
) -> Any:
    """:func:`tuner.trial.run_trial` with its context and the trial's resource request."""
    from ray import tune

    res, resources = trial_resources(opts)
    ctx = TrialContext(base=base, space=space, res=res, source=source, deadline=deadline, latency=latency)
    return tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), resources)


def _run_config(opts: TuneOptions, space: SearchSpace, searcher: EdgetuneOptunaSearch) -> tune.RunConfig:
    """Where the experiment lives, which checkpoints Ray keeps, retries, the searcher's checkpoint callback and the
    progress table."""
    from ray import tune

    from tuner.searcher import CheckpointAttrCallback  # noqa: PLC0415 - lazy: ray

    return tune.RunConfig(
        name=opts.study,
        storage_path=opts.storage_path,
        # Ray keeps the best epoch's checkpoint (trainer.metric.CHECKPOINT_SCORE), plus the latest for restarts
        checkpoint_config=tune.CheckpointConfig(
            num_to_keep=1, checkpoint_score_attribute=CHECKPOINT_SCORE, checkpoint_score_order=CHECKPOINT_SCORE_MODE
        ),
        failure_config=tune.FailureConfig(max_failures=opts.max_failures),
        callbacks=[CheckpointAttrCallback(searcher)],
        progress_reporter=tune.CLIReporter(
            metric_columns=["epoch", opts.metric_def.best_key, "val_acc", "data_path", "train_seconds"],
            parameter_columns=[c for c in ("backbone", "freeze", "lr", "img") if c in space.params],
            max_report_frequency=30,
            # Ray's sort fails on a trial that ended without a result (one the search deadline overtook)
            sort_by_metric=False,
        ),
        verbose=1,
    )


def _tuner(
    opts: TuneOptions,
    trainable: Any,
    run_config: tune.RunConfig,
    searcher: EdgetuneOptunaSearch,
    scheduler: TrialScheduler,
    info: dict[str, Any],
    deadline: float | None,
    stale_ray_ids: set[str],
) -> tune.Tuner:
    """``--resume``: Ray's experiment restored where there is one (checkpoints its retention deleted stand in as
    empty); else a new Tuner (an earlier local experiment of the same name removed first)."""
    from ray import tune

    exp_path = f"{opts.storage_path.rstrip('/')}/{opts.study}"
    if opts.resume and tune.Tuner.can_restore(exp_path):
        log.info(f"resuming Ray experiment {exp_path}")
        filled = _ray_compat.fill_deleted_checkpoints(exp_path, stale_ray_ids)
        if filled:
            log.info(
                f"resume: {len(filled)} checkpoint(s) deleted by Ray's retention after its last snapshot stand "
                "in as empty (a trial restored from one restarts from epoch 1): " + ", ".join(filled)
            )
        return tune.Tuner.restore(exp_path, trainable, resume_unfinished=True, restart_errored=True)
    if opts.resume:
        log.info(f"no Ray experiment to restore at {exp_path}; continuing the Optuna study with new trials")
    elif "://" not in exp_path and Path(exp_path).exists():
        shutil.rmtree(exp_path)
    backstop = (deadline - time.time() + 60.0) if deadline else None  # trials stop at epoch boundaries first
    multi = opts.multi_objective
    return tune.Tuner(
        trainable,
        param_space={},
        run_config=run_config,
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=_n_trials(opts),
            trial_dirname_creator=trial_dirname,
            trial_name_creator=trial_dirname,
            time_budget_s=max(1.0, backstop) if backstop else None,
            # a 1-worker trial's process (torch imported, the activation cache's LRU warm) serves the next trial
            reuse_actors=opts.workers_per_trial <= 1,
            max_concurrent_trials=_max_concurrent(opts, info["resources"]),
            metric=None if multi else opts.metric_def.best_key,
            mode=None if multi else opts.metric_def.mode,
        ),
    )
