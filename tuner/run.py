"""Build and run a study: Ray Tune (ASHA) driving Optuna (seeded multivariate TPE) in an RDB storage,
each trial a trainer run; then the best trial's test evaluation, leaderboard, plots and bundle."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

import edgetune
from edgetune.errors import ConfigError, EdgetuneError


@dataclass
class TuneOptions:
    data: str = "elpv"
    study: str = ""  #: default: "<dataset>-default"
    trials: int = 8
    epochs: int = 4  #: ASHA max_t (max epochs per trial)
    time_budget_s: float = 0.0  #: 0 = no limit
    storage: str = ""  #: default sqlite:///<out>/../optuna.db (runs/optuna.db)
    space: str = ""  #: search space YAML (default tuner/default_space.yaml)
    backbones: tuple[str, ...] = ()  #: restrict the backbone choices
    config: str = ""  #: base TrainConfig YAML (fixed settings of every trial)
    sets: tuple[str, ...] = ()  #: base config overrides key=value
    img: int = 0
    gpus_per_trial: float = 0.0
    workers_per_trial: int = 1
    cpus_per_worker: float = 1.0
    max_concurrent: int = 0  #: 0 = as many as the cluster's resources allow
    grace_period: int = 1
    reduction_factor: int = 2
    seed: int = 0
    out: str = ""  #: default runs/<study>
    resume: bool = False
    multi_objective: bool = False  #: maximise val_acc and minimise latency_ms (Pareto front)
    max_latency_ms: float = 0.0  #: pick the best model within this ONNX Runtime batch-1 latency
    max_failures: int = 1
    address: str = ""
    export: bool = True
    metric: str = "val_acc"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, lo in (("trials", 1), ("epochs", 1), ("workers_per_trial", 1), ("grace_period", 1),
                         ("reduction_factor", 2)):
            v = getattr(self, name)
            if not isinstance(v, int) or v < lo:
                raise ConfigError(f"{name} must be an integer >= {lo}, got {v!r}")
        if self.grace_period > self.epochs:
            self.grace_period = self.epochs
        if self.gpus_per_trial < 0 or self.cpus_per_worker <= 0:
            raise ConfigError("gpus_per_trial must be >= 0 and cpus_per_worker > 0")
        if self.time_budget_s < 0 or self.max_latency_ms < 0:
            raise ConfigError("time budget and max latency must be >= 0")
        if not self.study:
            self.study = f"{Path(self.data).name}-default"
        if not self.out:
            self.out = str(Path("runs") / self.study)
        if not self.storage:
            db = (Path(self.out).resolve().parent / "optuna.db")
            db.parent.mkdir(parents=True, exist_ok=True)
            self.storage = f"sqlite:///{db}"


def base_config(opts: TuneOptions) -> dict[str, Any]:
    from trainer.config import TrainConfig, parse_override

    cfg = TrainConfig.from_yaml(opts.config) if opts.config else TrainConfig()
    over: dict[str, Any] = {"data.dataset": opts.data, "epochs": opts.epochs, "seed": opts.seed,
                            "progress": False, "robustness": False, "metric": opts.metric,
                            "use_gpu": opts.gpus_per_trial > 0, "workers": opts.workers_per_trial}
    if opts.img:
        over["model.img_size"] = opts.img
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
                                             "time_budget_s": opts.time_budget_s},
        "metric": opts.metric, "multi_objective": opts.multi_objective,
        "edgetune_version": edgetune.__version__, "base_config": base,
    }


def _trial_dirname(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


def run_study(opts: TuneOptions) -> dict[str, Any]:
    """Run (or resume) a study; returns the summary written to ``<out>/summary.json``."""
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from trainer.backbones import weights_available
    from trainer.config import TrainConfig
    from trainer.data import build_data
    from trainer.model import preprocess_spec_for
    from tuner import cluster, report
    from tuner.searcher import CheckpointAttrCallback, EdgetuneOptunaSearch, mark_stale_running_failed
    from tuner.space import load_space
    from tuner.trial import run_trial

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
    print(f"edgetune: dataset {data.dataset_name}: {len(data.train)} train / {len(data.val)} val / "
          f"{len(data.test)} test images, classes {data.classes}"
          + (f", {len(data.skipped)} unreadable skipped" if data.skipped else ""))

    info = cluster.connect(opts.address or None)
    storage = optuna.storages.RDBStorage(opts.storage, heartbeat_interval=None)
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
        points_to_evaluate=None if opts.resume else space.points_to_evaluate() or None,
        sampler=optuna.samplers.TPESampler(seed=opts.seed, multivariate=True, group=True,
                                           constant_liar=True, n_startup_trials=min(5, opts.trials)),
        study_name=opts.study, storage=storage)
    for k, v in _study_attrs(opts, base, space, data).items():
        searcher.study.set_user_attr(k, v)
    scheduler = (FIFOScheduler() if opts.multi_objective else
                 ASHAScheduler(time_attr="training_iteration", max_t=opts.epochs,
                               grace_period=opts.grace_period, reduction_factor=opts.reduction_factor))
    workers = opts.workers_per_trial
    if workers > 1:
        resources: dict[str, float] = {"cpu": 0.01}
    else:
        resources = {"cpu": opts.cpus_per_worker, "gpu": opts.gpus_per_trial}
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=base, space=space, storage_path=str(out / "ray"),
                             workers=workers, use_gpu=opts.gpus_per_trial > 0, cpus_per_worker=opts.cpus_per_worker),
        resources)
    tune_metric = opts.metric
    run_config = tune.RunConfig(
        name=opts.study, storage_path=str(out / "ray"),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=tune_metric,
                                                checkpoint_score_order="min" if opts.metric == "val_loss" else "max"),
        failure_config=tune.FailureConfig(max_failures=opts.max_failures),
        callbacks=[CheckpointAttrCallback(searcher)],
        progress_reporter=tune.CLIReporter(metric_columns=["epoch", "val_acc", "val_macro_f1", "train_seconds"],
                                           parameter_columns=["backbone", "freeze", "lr", "gamma"],
                                           max_report_frequency=20, sort_by_metric=True),
        verbose=1)
    exp_dir = out / "ray" / opts.study
    try:
        if opts.resume and tune.Tuner.can_restore(str(exp_dir)):
            tuner = tune.Tuner.restore(str(exp_dir), trainable, resume_unfinished=True, restart_errored=True)
            print(f"edgetune: resuming Ray experiment {exp_dir}")
        else:
            if exp_dir.exists() and not opts.resume:
                shutil.rmtree(exp_dir)
            tuner = tune.Tuner(trainable, param_space={}, run_config=run_config, tune_config=tune.TuneConfig(
                search_alg=searcher, trial_dirname_creator=_trial_dirname, trial_name_creator=_trial_dirname, scheduler=scheduler, num_samples=opts.trials,
                time_budget_s=opts.time_budget_s or None, max_concurrent_trials=opts.max_concurrent or None,
                metric=None if opts.multi_objective else tune_metric,
                mode=None if opts.multi_objective else mode))
        results = tuner.fit()
        study = optuna.load_study(study_name=opts.study, storage=storage)
        summary = report.finish_study(opts, results, study, out)
    finally:
        cluster.shutdown(info)
    summary["wall_seconds"] = time.perf_counter() - t_start
    summary["ray"] = {"mode": info["mode"], "address": info["address"]}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    (out / "tune_options.yaml").write_text(yaml.safe_dump({k: v for k, v in asdict(opts).items() if k != "extra"},
                                                          sort_keys=False))
    if opts.export and summary.get("best_checkpoint"):
        from trainer.export import export_bundle

        b = export_bundle(out, out / "bundle")
        summary["bundle"] = str(b)
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    report.print_summary(summary, opts)
    return summary
