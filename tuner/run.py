"""Build and run a study: Ray Tune (ASHA) driving Optuna (seeded multivariate TPE) in an RDB storage,
each trial a trainer run; then the best trial's test evaluation, leaderboard, plots and bundle. Its options:
tuner/options.py; the device-in-the-loop parts (latency setup, outputs, the winner's hand-off):
tuner/latency_study.py."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import edgetune
from edgetune.errors import EdgetuneError
from trainer.backbones import weights_available
from trainer.config import ModelConfig, TrainConfig, parse_override
from trainer.data import build_data, prepare_source
from trainer.imagestore import resize_key
from trainer.metric import CHECKPOINT_SCORE, CHECKPOINT_SCORE_MODE
from trainer.model import create_model, freeze_backbone, preprocess_spec_for
from tuner import _ray_compat, cluster, finish, refit, report
from tuner.budget import Clock
from tuner.device import LATENCY_MS
from tuner.latency_study import hand_off, latency_outputs, latency_setup, rejector
from tuner.ledger import Ledger, plot_timeline, trial_stages
from tuner.options import DEFAULT_EMA_DECAY, EXPORT_RESERVE_S, TuneOptions, options_yaml
from tuner.probe import finish_reserve, probe_stage, trial_epoch_seconds
from tuner.refit import _refit_resources
from tuner.space import load_space
from tuner.storage import check_storage, rdb_storage
from tuner.summary import StudySummary, write_summary
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


def base_config(opts: TuneOptions) -> TrainConfig:
    """The study's base TrainConfig: the train config file (else the defaults) with the tuner's options and
    ``--set`` overrides applied, validated once; every trial applies its sampled values to it."""
    cfg = TrainConfig.from_yaml(opts.train_config) if opts.train_config else TrainConfig()
    over: dict[str, Any] = {
        "data.dataset": opts.data,
        "epochs": opts.epochs,
        "seed": opts.seed,
        "progress": False,
        "robustness": False,
        "metric": opts.metric,
        "use_gpu": opts.gpus_per_trial > 0,
        "workers": opts.workers_per_trial,
        "optim.ema_decay": opts.ema_decay,
    }
    if opts.img:
        over["model.img_size"] = opts.img
    if opts.max_images:
        over["data.max_images"] = opts.max_images
    if not opts.gpus_per_trial:
        over["threads"] = max(1, int(opts.cpus_per_worker))
    for s in opts.sets:
        k, v = parse_override(s)
        over[k] = v
    return cfg.replace(over)


def _layer_count(backbone: str) -> int:
    m = create_model(ModelConfig(backbone=backbone, weights="none"), num_classes=2)
    return int(freeze_backbone(m, 0.0)["layers_total"])


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


def _trial_dirname(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


def fixed_params(opts: TuneOptions) -> dict[str, Any] | None:
    """Space parameters a flag fixes (not searched; the base config sets them): ``--img``, and ``--ema-decay`` when
    it is not the default (so ``--ema-decay 0`` turns weight averaging off even where the space searches it)."""
    fixed: dict[str, Any] = {}
    if opts.img:
        fixed["img"] = opts.img
    if opts.ema_decay != DEFAULT_EMA_DECAY:
        fixed["ema_decay"] = opts.ema_decay
    return fixed or None


def process_start() -> float:
    """When this process started (the CLI's budget counts from it)."""
    try:
        import psutil

        return float(psutil.Process().create_time())
    except Exception:  # noqa: BLE001 - psutil comes with ray; without it, now
        return time.time()


def study_specs(base: TrainConfig, space: SearchSpace, seeds_only: bool = False) -> list[Any]:
    """The distinct preprocessing specs (backbone x input size) the space can ask for; ``seeds_only``: those of its
    seed points only (a small budget reaches few others: a trial that asks for another spec resizes it itself, into
    the same content-keyed disk cache)."""
    sizes = list(space.params["img"].choices) if "img" in space.params else [base.model.img_size]
    backbones = space.backbones or [base.model.backbone]
    pairs = [(b, int(size)) for b in backbones for size in sizes]
    if seeds_only:
        seeds = [
            (p["backbone"], int(p.get("img", base.model.img_size)))
            for p in space.points_to_evaluate()
            if p.get("backbone") in backbones and ("img" not in space.params or "img" in p)
        ]
        pairs = [p for p in pairs if p in seeds] or pairs[:1]
    out: dict[str, Any] = {}
    for b, size in pairs:
        spec = preprocess_spec_for(ModelConfig(backbone=b, img_size=size))
        out.setdefault(json.dumps(resize_key(spec), sort_keys=True), spec)
    return list(out.values())


def prepare_study_data(base: TrainConfig, space: SearchSpace, out: Path, seeds_only: bool = False) -> Any:
    """Once per study: scan, hash and split the dataset (``split.json``) and resize it for every spec the space
    can ask for (the node's disk cache, keyed by content). Returns the :class:`trainer.data.PreparedSource`
    that trials start from."""
    cfg = base
    t0 = time.perf_counter()
    source = prepare_source(cfg.data)
    specs = study_specs(base, space, seeds_only)
    for i, spec in enumerate(specs):
        build_data(cfg.data, spec, run_dir=out if i == 0 else None, seed=cfg.seed, source=source)
    source.decoded.clear()
    n = {k: len(v) for k, v in source.parts.items()}
    log.info(
        f"dataset {source.name}: {n['train']} train / {n['val']} val / {n['test']} test images, "
        f"classes {source.classes}"
        + (f", {len(source.skipped)} unreadable skipped" if source.skipped else "")
        + f"; prepared once for {len(specs)} input size(s) in {time.perf_counter() - t0:.1f} s"
    )
    return source


def run_study(opts: TuneOptions, started_at: float | None = None) -> StudySummary:
    """Run (or resume) a study; returns the summary written to ``<out>/summary.json`` (tuner/summary.py). The time
    budget counts from ``started_at`` (unix time; ``python -m tuner`` passes its process start, so interpreter and
    import time count too), else from this call. Every stage is entered in the study's budget
    ledger (tuner/ledger.py)."""
    clock = Clock(opts.time_budget_s, started_at if started_at is not None else time.time())
    ledger = Ledger(cores=float(os.cpu_count() or 1), t0=clock.t0)
    ledger.add("start-up (interpreter, imports)", "overhead", clock.t0, time.time(), cores=1)
    out = Path(opts.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    with ledger.stage("options, storage, space", cores=1):
        check_storage(opts.storage)
        base = base_config(opts)
        weights = base.model.weights
        space = load_space(
            opts.space or None,
            list(opts.backbones) or None,
            weights_check=lambda b: weights_available(b, weights),
            layer_count=_layer_count,
            fixed=fixed_params(opts),
            base=base,  # every key the space sets applies to it (a typo fails here)
        )
    for line in space.dropped_report(verbose=opts.verbose, explicit=bool(opts.backbones)):
        log.info(line)

    held: dict[str, Any] = {}  # the Ray connection, wherever a stage made it (shut down whatever happens)

    def connect() -> dict[str, Any]:
        with ledger.stage("Ray start"):
            held["info"] = cluster.connect(
                opts.address or None, env_vars=opts.env_vars, include_dashboard=opts.workers_per_trial > 1
            )
        ledger.cores = _study_cores(opts, held["info"])
        return dict(held["info"])

    try:
        if opts.target:
            connect()  # a missing target fails before the data is prepared
        summary = _run_stages(opts, base, space, held.get("info"), connect, clock, ledger, out)
    finally:
        if held.get("info") is not None:
            with ledger.stage("Ray shutdown"):
                cluster.shutdown(held["info"])
    info = held["info"]
    summary = _close_ledger(summary, ledger, out).with_(
        ray={"mode": info["mode"], "address": info["address"], "storage_path": opts.storage_path},
        wall_seconds=time.time() - clock.t0,
        time_budget_s=opts.time_budget_s,
    )
    write_summary(summary, out)
    report.print_summary(summary, opts)
    for line in summary.ledger_lines:
        print(line)
    return summary


def _run_stages(
    opts: TuneOptions,
    base: TrainConfig,
    space: SearchSpace,
    info: dict[str, Any] | None,
    connect: Any,
    clock: Clock,
    ledger: Ledger,
    out: Path,
) -> StudySummary:
    """Data preparation, the search, the final fit, post-hoc selection and the test evaluation, the hand-off."""
    latency = latency_setup(opts, space) if opts.target else None
    with ledger.stage("data preparation", cores=1):
        source = prepare_study_data(base, space, out, seeds_only=bool(opts.time_budget_s))
    if info is None:
        info = connect()
    if opts.latency_on and latency is None:
        latency = latency_setup(opts, space)
    probes = _probes(opts, base, space, source, clock, ledger)
    searched = _search(opts, base, space, source, info, clock, ledger, latency, probes)
    opts, base, results, study = searched.opts, searched.base, searched.results, searched.study
    refit_run = (
        refit.refit_best(opts, study, base, space, source, clock, out, ledger=ledger, results=results)
        if opts.refit
        else None
    )
    end = clock.end()
    with ledger.stage("post-hoc selection, test evaluation, plots", "compute"):
        summary, post = finish.finish_study(
            opts,
            results,
            study,
            out,
            source=source,
            refit=refit_run,
            deadline=(end - EXPORT_RESERVE_S) if end else None,
            probes=probes,
        )
    summary = summary.with_(
        probes=[p.row() for p in probes],
        latency=latency_outputs(opts, study, out) if latency is not None else None,
    )
    (out / "tune_options.yaml").write_text(options_yaml(opts))  # `python -m tuner --config` reads it back
    if opts.export and summary.final is not None:
        with ledger.stage("export (ONNX, parity gate)", "compute"):
            summary = hand_off(opts, summary, out, source, latency, final=post)  # with a target, timed on the device
    return summary


@dataclass(frozen=True)
class Searched:
    """What the search stage hands on: the options and base config as planned (the trials' epochs fitted to the
    search window from the probes' speed), Ray Tune's result grid and the Optuna study."""

    opts: TuneOptions
    base: TrainConfig
    results: ResultGrid
    study: Any  #: optuna.Study


def _search(
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


def _probes(
    opts: TuneOptions, base: TrainConfig, space: SearchSpace, source: PreparedSource, clock: Clock, ledger: Ledger
) -> list[Any]:
    """The probe stage (tuner/probe.py) within ``probe_share`` of the budget: in a study bounded by its time budget
    alone (none with a ``--trials`` cap, without a budget, on a resume, or in a multi-objective study)."""
    if not opts.probe_share or not opts.time_budget_s or opts.trials or opts.resume or opts.multi_objective:
        return []
    return probe_stage(opts, base, space, source, opts.probe_share * opts.time_budget_s, ledger)


#: The most of the budget kept for the finish, whatever the probes measured (a busy node measures slow).
MAX_FINISH_SHARE = 0.2


def _study_cores(opts: TuneOptions, info: dict[str, Any]) -> float:
    """The cores the study holds: the cluster's GPUs for a GPU study, else its CPUs."""
    res = info.get("resources") or {}
    key = "GPU" if opts.gpus_per_trial else "CPU"
    return float(res.get(key) or os.cpu_count() or 1)


def _close_ledger(summary: StudySummary, ledger: Ledger, out: Path) -> StudySummary:
    """The summary with the study's budget ledger (and its timeline plot)."""
    led = ledger.summary()
    plots = list(summary.plots)
    try:
        if plot_timeline(led, out / "timeline.png"):
            plots.append("timeline.png")
    except Exception as e:  # noqa: BLE001 - a plot is never worth failing the study
        log.info(f"timeline plot skipped ({type(e).__name__}: {e})")
    return summary.with_(
        ledger=led.to_dict(), useful_fraction=round(led.useful_fraction, 4), ledger_lines=led.lines(), plots=plots
    )


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
            trial_dirname_creator=_trial_dirname,
            trial_name_creator=_trial_dirname,
            time_budget_s=max(1.0, backstop) if backstop else None,
            # a 1-worker trial's process (torch imported, the activation cache's LRU warm) serves the next trial
            reuse_actors=opts.workers_per_trial <= 1,
            max_concurrent_trials=_max_concurrent(opts, info["resources"]),
            metric=None if multi else opts.metric_def.best_key,
            mode=None if multi else opts.metric_def.mode,
        ),
    )
