"""Build and run a study: Ray Tune (ASHA) driving Optuna (seeded multivariate TPE) in an RDB storage,
each trial a trainer run; then the best trial's test evaluation, leaderboard, plots and bundle."""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

import edgetune
from edgetune.errors import ConfigError, EdgetuneError

PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
METRICS = ("val_acc", "val_macro_f1", "val_loss")
STORAGE_PATH_ENV = "EDGETUNE_STORAGE_PATH"


@dataclass
class TuneOptions:
    """One study. The defaults are the embedded ``make tune`` budget: elpv, local Ray, SQLite, CPU; sized to
    finish in under 10 minutes on 2 cores (10 trials x up to 3 epochs at 96 px on 1,200 of elpv's images;
    8 trials on 800 images measured 4.5 min, test accuracy 0.74)."""

    data: str = "elpv"
    study: str = ""  #: default: "<dataset>-default"
    trials: int = 10
    epochs: int = 3  #: ASHA max_t (max epochs per trial)
    time_budget_s: float = 0.0  #: 0 = no limit
    storage: str = ""  #: Optuna storage URL; default sqlite:///<out>/../optuna.db (runs/optuna.db)
    storage_path: str = ""  #: Ray storage path for checkpoints (dir or s3://…); default $EDGETUNE_STORAGE_PATH or <out>/ray
    space: str = ""  #: search space YAML (default tuner/default_space.yaml)
    backbones: tuple[str, ...] = ()  #: restrict the backbone choices
    config: str = ""  #: base TrainConfig YAML (fixed settings of every trial)
    sets: tuple[str, ...] = ()  #: base config overrides key=value (win over img/max_images)
    img: int = 96  #: input size of every trial (0 = each backbone's default)
    max_images: int = 1200  #: stratified subset of the dataset (0 = all images)
    gpus_per_trial: float = 0.0  #: GPUs per worker
    workers_per_trial: int = 1  #: >1: each trial is a Ray Train DDP run
    cpus_per_worker: float = 1.0
    resources_per_worker: dict[str, float] = field(default_factory=dict)  #: extra custom resources per worker
    placement_strategy: str = "PACK"  #: placement of a DDP trial's workers (STRICT_SPREAD: one per node)
    max_concurrent: int = 0  #: 0 = as many as the cluster's resources allow
    grace_period: int = 1
    reduction_factor: int = 2
    seed: int = 0
    out: str = ""  #: default runs/<study>
    resume: bool = False
    multi_objective: bool = False  #: maximise val_acc and minimise latency_ms (Pareto front)
    max_latency_ms: float = 0.0  #: pick the best model within this ONNX Runtime batch-1 latency
    max_failures: int = 1
    address: str = ""  #: Ray address; "local" forces a local instance; "" = RAY_ADDRESS / running node / local
    export: bool = True
    metric: str = "val_acc"
    env_vars: dict[str, str] = field(default_factory=dict)  #: environment for every Ray worker

    def __post_init__(self) -> None:
        for name, lo in (("trials", 1), ("epochs", 1), ("workers_per_trial", 1), ("grace_period", 1),
                         ("reduction_factor", 2), ("max_concurrent", 0), ("max_failures", 0), ("img", 0),
                         ("max_images", 0)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ConfigError(f"{name} must be an integer >= {lo}, got {v!r}")
        if self.img and not 32 <= self.img <= 1024:
            raise ConfigError(f"img must be 0 (backbone default) or in [32, 1024], got {self.img}")
        if self.grace_period > self.epochs:
            self.grace_period = self.epochs
        if self.gpus_per_trial < 0 or self.cpus_per_worker <= 0:
            raise ConfigError(f"gpus_per_trial must be >= 0 and cpus_per_worker > 0, got {self.gpus_per_trial}, "
                              f"{self.cpus_per_worker}")
        if self.time_budget_s < 0 or self.max_latency_ms < 0:
            raise ConfigError("time budget and max latency must be >= 0")
        if self.metric not in METRICS:
            raise ConfigError(f"metric must be one of {METRICS}, got {self.metric!r}")
        if self.placement_strategy not in PLACEMENT_STRATEGIES:
            raise ConfigError(f"placement_strategy must be one of {PLACEMENT_STRATEGIES}, "
                              f"got {self.placement_strategy!r}")
        if any(not isinstance(v, (int, float)) or v < 0 for v in self.resources_per_worker.values()):
            raise ConfigError(f"resources_per_worker values must be numbers >= 0, got {self.resources_per_worker}")
        if self.multi_objective and self.metric == "val_loss":
            raise ConfigError("multi-objective mode maximises val_acc or val_macro_f1, not val_loss")
        if not self.study:
            self.study = f"{Path(self.data).name}-default"
        if not self.out:
            self.out = str(Path("runs") / self.study)
        if not self.storage:
            db = (Path(self.out).resolve().parent / "optuna.db")
            db.parent.mkdir(parents=True, exist_ok=True)
            self.storage = f"sqlite:///{db}"
        from tuner.storage import normalise_url

        normalise_url(self.storage)  # validates the URL early
        if not self.storage_path:
            self.storage_path = os.environ.get(STORAGE_PATH_ENV, "") or str(Path(self.out).resolve() / "ray")
        elif "://" not in self.storage_path:
            self.storage_path = str(Path(self.storage_path).resolve())  # Ray needs an absolute path


def base_config(opts: TuneOptions) -> dict[str, Any]:
    from trainer.config import TrainConfig, parse_override

    cfg = TrainConfig.from_yaml(opts.config) if opts.config else TrainConfig()
    over: dict[str, Any] = {"data.dataset": opts.data, "epochs": opts.epochs, "seed": opts.seed,
                            "progress": False, "robustness": False, "metric": opts.metric,
                            "use_gpu": opts.gpus_per_trial > 0, "workers": opts.workers_per_trial}
    if opts.img:
        over["model.img_size"] = opts.img
    if opts.max_images:
        over["data.max_images"] = opts.max_images
    if not opts.gpus_per_trial:
        over["threads"] = max(1, int(opts.cpus_per_worker))
    for s in opts.sets:
        k, v = parse_override(s)
        over[k] = v
    return cfg.replace(over).to_dict()


def _layer_count(backbone: str) -> int:
    from trainer.config import ModelConfig
    from trainer.model import create_model, freeze_backbone

    m = create_model(ModelConfig(backbone=backbone, weights="none"), num_classes=2)
    return int(freeze_backbone(m, 0.0)["layers_total"])


def _study_attrs(opts: TuneOptions, base: dict[str, Any], space: Any, data: Any) -> dict[str, Any]:
    return {
        "dataset": data.dataset_name, "dataset_hash": data.dataset_hash, "classes": data.classes,
        "split_seed": base["data"]["split_seed"], "split_ratios": base["data"]["split"],
        "search_space": {n: {k: v for k, v in asdict(p).items() if k != "name"} for n, p in space.params.items()},
        "dropped": space.dropped, "budget": {"trials": opts.trials, "max_epochs": opts.epochs,
                                             "time_budget_s": opts.time_budget_s, "img": opts.img,
                                             "max_images": base["data"]["max_images"],
                                             "workers_per_trial": opts.workers_per_trial,
                                             "gpus_per_trial": opts.gpus_per_trial},
        "metric": opts.metric, "multi_objective": opts.multi_objective,
        "edgetune_version": edgetune.__version__, "base_config": base,
    }


def _trial_dirname(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


def run_study(opts: TuneOptions) -> dict[str, Any]:
    """Run (or resume) a study; returns the summary written to ``<out>/summary.json``."""
    from trainer.backbones import weights_available
    from trainer.config import TrainConfig
    from trainer.data import build_data
    from trainer.model import preprocess_spec_for
    from tuner import cluster, report
    from tuner.space import load_space

    t_start = time.perf_counter()
    out = Path(opts.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    base = base_config(opts)
    weights = TrainConfig.from_dict(base).model.weights
    space = load_space(opts.space or None, list(opts.backbones) or None,
                       weights_check=lambda b: weights_available(b, weights), layer_count=_layer_count)
    for reason in space.dropped:
        print(f"edgetune: {reason}")
    # Prepare the dataset once (cache) and fingerprint it for the study attrs.
    first = TrainConfig.from_dict(base).replace({"model.backbone": space.backbones[0]})
    data = build_data(first.data, preprocess_spec_for(first.model), run_dir=out, seed=first.seed)
    n = {k: len(getattr(data, k)) for k in ("train", "val", "test")}
    print(f"edgetune: dataset {data.dataset_name}: {n['train']} train / {n['val']} val / "
          f"{n['test']} test images, classes {data.classes}"
          + (f", {len(data.skipped)} unreadable skipped" if data.skipped else ""))

    info = cluster.connect(opts.address or None, env_vars=opts.env_vars)
    try:
        results, study = _fit(opts, base, space, data, info)
        summary = report.finish_study(opts, results, study, out)
    finally:
        cluster.shutdown(info)
    summary["wall_seconds"] = time.perf_counter() - t_start
    summary["ray"] = {"mode": info["mode"], "address": info["address"], "storage_path": opts.storage_path}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    (out / "tune_options.yaml").write_text(yaml.safe_dump(asdict(opts), sort_keys=False))
    if opts.export and summary.get("best_checkpoint"):
        from trainer.export import export_bundle

        b = export_bundle(out, out / "bundle")
        summary["bundle"] = str(b)
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    report.print_summary(summary, opts)
    return summary


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


def _fit(opts: TuneOptions, base: dict[str, Any], space: Any, data: Any, info: dict[str, Any]) -> tuple[Any, Any]:
    """Build (or restore) the Tuner over the Optuna study and run it; returns (ResultGrid, study)."""
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from tuner.searcher import CheckpointAttrCallback, EdgetuneOptunaSearch, mark_stale_running_failed
    from tuner.storage import rdb_storage
    from tuner.trial import TrialResources, run_trial

    storage = rdb_storage(opts.storage)
    metric: Any = [opts.metric, "latency_ms"] if opts.multi_objective else opts.metric
    mode: Any = ["max", "min"] if opts.multi_objective else ("min" if opts.metric == "val_loss" else "max")
    if opts.resume:
        try:
            stale = mark_stale_running_failed(optuna.load_study(study_name=opts.study, storage=storage))
        except KeyError:
            raise EdgetuneError(f"cannot resume: study {opts.study!r} not found in {opts.storage}") from None
        if stale:
            print(f"edgetune: resume: marked stale RUNNING trial(s) {stale} as FAIL")
    searcher = EdgetuneOptunaSearch(
        space=space.define_by_run, metric=metric, mode=mode, max_t=opts.epochs,
        points_to_evaluate=None if opts.resume else space.points_to_evaluate()[:opts.trials] or None,
        sampler=optuna.samplers.TPESampler(seed=opts.seed, multivariate=True, group=True,
                                           constant_liar=True, n_startup_trials=min(5, opts.trials)),
        study_name=opts.study, storage=storage)
    attrs = _study_attrs(opts, base, space, data)
    existing = searcher.study.user_attrs
    if existing.get("dataset_hash") not in (None, attrs["dataset_hash"]):
        print(f"edgetune: warning: study {opts.study!r} was run on a different dataset "
              f"(hash {existing['dataset_hash'][:12]} vs {attrs['dataset_hash'][:12]})")
    for k, v in attrs.items():
        searcher.study.set_user_attr(k, v)
    scheduler = (FIFOScheduler() if opts.multi_objective else
                 ASHAScheduler(time_attr="training_iteration", max_t=opts.epochs,
                               grace_period=opts.grace_period, reduction_factor=opts.reduction_factor))
    res = TrialResources(workers=opts.workers_per_trial, use_gpu=opts.gpus_per_trial > 0,
                         cpus_per_worker=opts.cpus_per_worker, resources_per_worker=dict(opts.resources_per_worker),
                         placement_strategy=opts.placement_strategy, max_failures=opts.max_failures,
                         storage_path=opts.storage_path)
    if opts.workers_per_trial > 1:  # the trial only drives a TorchTrainer; its workers hold the resources
        resources: dict[str, float] = {"cpu": 0.01}
    else:
        resources = {"cpu": opts.cpus_per_worker, "gpu": opts.gpus_per_trial, **opts.resources_per_worker}
    trainable = tune.with_resources(tune.with_parameters(run_trial, base=base, space=space, res=res), resources)
    score_order = "min" if opts.metric == "val_loss" else "max"
    run_config = tune.RunConfig(
        name=opts.study, storage_path=opts.storage_path,
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=opts.metric,
                                                checkpoint_score_order=score_order),
        failure_config=tune.FailureConfig(max_failures=opts.max_failures),
        callbacks=[CheckpointAttrCallback(searcher)],
        progress_reporter=tune.CLIReporter(metric_columns=["epoch", "val_acc", "val_macro_f1", "train_seconds"],
                                           parameter_columns=[c for c in ("backbone", "freeze", "lr", "gamma")
                                                              if c in space.params],
                                           max_report_frequency=20, sort_by_metric=True),
        verbose=1)
    exp_path = f"{opts.storage_path.rstrip('/')}/{opts.study}"
    if opts.resume and tune.Tuner.can_restore(exp_path):
        print(f"edgetune: resuming Ray experiment {exp_path}")
        tuner = tune.Tuner.restore(exp_path, trainable, resume_unfinished=True, restart_errored=True)
    else:
        if opts.resume:
            print(f"edgetune: no Ray experiment to restore at {exp_path}; continuing the Optuna study with new trials")
        elif "://" not in exp_path and Path(exp_path).exists():
            shutil.rmtree(exp_path)
        tuner = tune.Tuner(trainable, param_space={}, run_config=run_config, tune_config=tune.TuneConfig(
            search_alg=searcher, scheduler=scheduler, num_samples=opts.trials,
            trial_dirname_creator=_trial_dirname, trial_name_creator=_trial_dirname,
            time_budget_s=opts.time_budget_s or None,
            max_concurrent_trials=_max_concurrent(opts, info["resources"]),
            metric=None if opts.multi_objective else opts.metric, mode=None if opts.multi_objective else mode))
    results = tuner.fit()
    return results, optuna.load_study(study_name=opts.study, storage=storage)
