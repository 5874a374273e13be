"""Run (or resume) a study, stage by stage within its time budget, each stage in the budget ledger: options,
storage and space checked; data prepared once; the probes (tuner/probe.py); the search (Ray Tune + Optuna,
tuner/search.py); the final fit (tuner/refit.py); the finish (final model, test evaluation, post-hoc selection,
tuner/finish.py); the hand-off (bundle). Its options: tuner/options.py; the device-in-the-loop parts (latency
setup, outputs, the winner's hand-off): tuner/latency_study.py."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainer.backbones import weights_available
from trainer.config import ModelConfig, TrainConfig, parse_override
from trainer.data import build_data, prepare_source
from trainer.imagestore import resize_key
from trainer.model import create_model, freeze_backbone, preprocess_spec_for
from tuner import cluster, finish, refit, report
from tuner.budget import Clock
from tuner.latency_study import hand_off, latency_outputs, latency_setup
from tuner.ledger import Ledger, plot_timeline
from tuner.options import DEFAULT_EMA_DECAY, EXPORT_RESERVE_S, TuneOptions, options_yaml
from tuner.probe import probe_stage
from tuner.search import search
from tuner.space import load_space
from tuner.storage import check_storage
from tuner.summary import StudySummary, write_summary

if TYPE_CHECKING:
    from trainer.data import PreparedSource
    from tuner.ledger import Ledger
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
    searched = search(opts, base, space, source, info, clock, ledger, latency, probes)
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


def _probes(
    opts: TuneOptions, base: TrainConfig, space: SearchSpace, source: PreparedSource, clock: Clock, ledger: Ledger
) -> list[Any]:
    """The probe stage (tuner/probe.py) within ``probe_share`` of the budget: in a study bounded by its time budget
    alone (none with a ``--trials`` cap, without a budget, on a resume, or in a multi-objective study)."""
    if not opts.probe_share or not opts.time_budget_s or opts.trials or opts.resume or opts.multi_objective:
        return []
    return probe_stage(opts, base, space, source, opts.probe_share * opts.time_budget_s, ledger)


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
