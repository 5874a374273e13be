"""Build and run a study: Ray Tune (ASHA) driving Optuna (seeded multivariate TPE) in an RDB storage,
each trial a trainer run; then the best trial's test evaluation, leaderboard, plots and bundle."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

import edgetune
from edge_server.timing import TimingProtocol
from edgetune.dataclass_cli import opt
from edgetune.errors import ConfigError, EdgetuneError
from trainer.metric import CHECKPOINT_SCORE, CHECKPOINT_SCORE_MODE, DEFAULT_METRIC, Metric, get_metric
from trainer.ray_trainer import PLACEMENT_STRATEGIES
from tuner.refit import FINISH_RESERVE_S

log = logging.getLogger(__name__)

STORAGE_PATH_ENV = "EDGETUNE_STORAGE_PATH"


@dataclass(frozen=True)
class TuneOptions:
    """One study. The defaults are the embedded ``make tune``: the full elpv dataset, local Ray, SQLite, CPU,
    and a wall-clock budget (search + refit + export) that ends within 15 minutes on 2 cores.

    Frozen: the derived defaults (study, out, storage, storage_path, the grace period clamp, multi-objective with a
    target) are filled in at construction; a changed copy is ``dataclasses.replace(opts, ...)``. Each field's help is
    its ``python -m tuner`` help (the CLI is derived from these fields: tuner/__main__.py)."""

    data: str = opt("elpv", "built-in dataset (elpv, textures) or an ImageFolder/CSV path")
    study: str = opt("", "study name (default <dataset>-default)")
    trials: int = opt(0, "optional cap on the number of trials (0 = the time budget decides)")
    epochs: int = opt(4, "max epochs per trial (ASHA max_t; each trial's LR schedule)")
    time_budget_s: float = opt(
        840.0, "seconds for search + refit + export, counted from the start (0 = none; then --trials is needed)")
    storage: str = opt("", "Optuna storage URL (default sqlite:///<out>/../optuna.db, i.e. runs/optuna.db; "
                       "postgresql://… for shared)")
    storage_path: str = opt("", "Ray storage for trial checkpoints: a directory or s3://bucket/prefix "
                            "(default $EDGETUNE_STORAGE_PATH, else <out>/ray); must be shared on a multi-node cluster")
    space: str = opt("", "search space YAML (default tuner/default_space.yaml)")
    backbones: tuple[str, ...] = opt((), "restrict the backbone choices")
    config: str = opt("", "base TrainConfig YAML for every trial")
    sets: tuple[str, ...] = opt((), "base config override (repeatable; wins over img/max_images)")
    img: int = opt(0, "fix the input size of every trial (0 = searched where the space has `img`, "
                   "else backbone default)")
    max_images: int = opt(0, "stratified subset of the dataset (0 = all)")
    gpus_per_trial: float = opt(0.0, "GPUs per worker of a trial")
    workers_per_trial: int = opt(1, ">1: each trial is a Ray Train DDP run")
    cpus_per_worker: float = opt(1.0, "CPUs per worker of a trial")
    resources_per_worker: dict[str, float] = opt(
        factory=dict, help="extra custom Ray resources per worker (e.g. slot=1)")
    placement_strategy: str = opt(
        "PACK", "placement of a DDP trial's workers (STRICT_SPREAD: each on its own node)")
    max_concurrent: int = opt(0, "trials at once (0 = as many as the cluster's resources allow)")
    # bench/README.md "ASHA grace period" measures it
    grace_period: int = opt(2, "ASHA's first rung in epochs (at most --epochs)")
    reduction_factor: int = opt(2, "ASHA's reduction factor")
    seed: int = opt(0, "seed of the sampler and of every trial's training")
    out: str = opt("", "output dir (default runs/<study>)")
    resume: bool = opt(False, "continue the same study and Ray experiment")
    multi_objective: bool = opt(False, "maximise the metric and minimise p50 latency (on --target, else an "
                                "estimate on the driver's node)")
    max_latency_ms: float = opt(0.0, "latency constraint (p50, ms): slower architectures are rejected before "
                                "training (PRUNED, with reason)")
    target: str = opt("", "device in the loop: time every architecture on the Ray node carrying "
                      "edge_target:<TARGET> (join it with `make edge-node HEAD=<host:port> TARGET=<name>`); "
                      "implies --multi-objective")
    precisions: tuple[str, ...] = opt(
        (), "with --target: the deployed precisions the search may pick (comma list of fp32, fp16, int8; default: "
            "all the target supports)")
    # the timing protocol: edge_server.timing.TimingProtocol
    timing_warmup: int = opt(TimingProtocol.warmup, "untimed runs before each timing")
    timing_runs: int = opt(TimingProtocol.runs, "timed runs per architecture (p50/p90 over them)")
    timing_timeout_s: float = opt(
        600.0, "seconds a trial waits for its timing (edge node down) before it is marked with the reason")
    timing_backend: str = opt(
        "auto", "runtime of the timing on the device (auto: TensorRT where present, else ONNX Runtime)")
    max_failures: int = opt(1, "restarts of a crashed trial from its last checkpoint")
    address: str = opt("", "Ray cluster address; 'local' forces a local instance "
                       "(default: RAY_ADDRESS, a running node started by `ray start`/`ray up` on this machine, "
                       "or local)")
    export: bool = opt(True, "export the best trial (the refit, where there is one) as a bundle")
    metric: str = opt(DEFAULT_METRIC, "selects epochs, trials and the final model (default val_macro_f1: see "
                      "README, 'Why macro-F1')")
    refit: bool = opt(True, "retrain the best configuration for longer after the search (the exported model)")
    refit_share: float = opt(0.55, "share of the time budget kept for the refit")
    refit_max_epochs: int = opt(0, "cap on refit epochs (0 = 3 x --epochs)")
    env_vars: dict[str, str] = opt(factory=dict, help="environment for every Ray worker")
    verbose: bool = opt(False, "list every place looked for each backbone left out for missing weights")

    def __post_init__(self) -> None:  # noqa: C901
        put = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 - frozen: derived defaults only
        put("backbones", tuple(self.backbones))
        put("sets", tuple(self.sets))
        put("precisions", tuple(self.precisions))
        put("resources_per_worker", dict(self.resources_per_worker))  # a copy: the caller's dict is not shared
        put("env_vars", dict(self.env_vars))
        for name, lo in (
            ("trials", 0),
            ("epochs", 1),
            ("workers_per_trial", 1),
            ("grace_period", 1),
            ("reduction_factor", 2),
            ("max_concurrent", 0),
            ("max_failures", 0),
            ("img", 0),
            ("max_images", 0),
            ("refit_max_epochs", 0),
        ):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ConfigError(f"{name} must be an integer >= {lo}, got {v!r}")
        if self.img and not 32 <= self.img <= 1024:
            raise ConfigError(f"img must be 0 (searched / backbone default) or in [32, 1024], got {self.img}")
        if self.grace_period > self.epochs:
            put("grace_period", self.epochs)
        if self.gpus_per_trial < 0 or self.cpus_per_worker <= 0:
            raise ConfigError(
                f"gpus_per_trial must be >= 0 and cpus_per_worker > 0, got {self.gpus_per_trial}, "
                f"{self.cpus_per_worker}"
            )
        if self.time_budget_s < 0 or self.max_latency_ms < 0:
            raise ConfigError("time budget and max latency must be >= 0")
        if not self.time_budget_s and not self.trials:
            raise ConfigError("give a time budget (--time-budget / TIME=, seconds) or a trial count (--trials)")
        if not 0.0 <= self.refit_share < 0.9:
            raise ConfigError(f"refit_share must be in [0, 0.9), got {self.refit_share}")
        get_metric(self.metric)
        if self.placement_strategy not in PLACEMENT_STRATEGIES:
            raise ConfigError(
                f"placement_strategy must be one of {PLACEMENT_STRATEGIES}, got {self.placement_strategy!r}"
            )
        if any(not isinstance(v, (int, float)) or v < 0 for v in self.resources_per_worker.values()):
            raise ConfigError(f"resources_per_worker values must be numbers >= 0, got {self.resources_per_worker}")
        self._check_latency()
        if self.target:
            put("multi_objective", True)  # objectives: the metric and the target's p50 latency
        if self.multi_objective and get_metric(self.metric).mode != "max":
            raise ConfigError(f"multi-objective mode maximises a score metric, not {self.metric}")
        if not self.study:
            put("study", f"{Path(self.data).name}-default")
        if not self.out:
            put("out", str(Path("runs") / self.study))
        if not self.storage:
            db = Path(self.out).resolve().parent / "optuna.db"
            db.parent.mkdir(parents=True, exist_ok=True)
            put("storage", f"sqlite:///{db}")
        from tuner.storage import normalise_url

        normalise_url(self.storage)  # validates the URL early
        if not self.storage_path:
            put("storage_path", os.environ.get(STORAGE_PATH_ENV, "") or str(Path(self.out).resolve() / "ray"))
        elif "://" not in self.storage_path:
            put("storage_path", str(Path(self.storage_path).resolve()))  # Ray needs an absolute path

    @property
    def metric_def(self) -> Metric:
        return get_metric(self.metric)

    def _check_latency(self) -> None:
        """Target name, timing protocol, backend and timeout (ConfigError naming what is allowed)."""
        from edge_server.timing import TIMING_BACKENDS

        self.timing_protocol  # noqa: B018 - TimingProtocol validates timing_warmup / timing_runs
        if self.timing_backend not in TIMING_BACKENDS:
            raise ConfigError(f"timing_backend must be one of {TIMING_BACKENDS}, got {self.timing_backend!r}")
        from edge_server.runners.tensorrt import PRECISIONS

        bad = [p for p in self.precisions if p not in PRECISIONS]
        if bad:
            raise ConfigError(f"precisions: {bad} not allowed; choose from {list(PRECISIONS)}")
        if self.precisions and not self.target:
            raise ConfigError("precisions needs --target (the precisions are the target device's)")
        if self.target:
            from tuner.device import target_resource

            target_resource(self.target)  # validates the name
        if self.timing_timeout_s <= 0:
            raise ConfigError(f"timing_timeout_s must be > 0, got {self.timing_timeout_s}")

    @property
    def timing_protocol(self) -> TimingProtocol:
        """How each architecture is timed (batch 1, one thread; ConfigError naming the bad field)."""
        return TimingProtocol(warmup=self.timing_warmup, runs=self.timing_runs)

    @property
    def latency_on(self) -> bool:
        """Whether trials get a latency: a target, a latency objective or a latency constraint."""
        return bool(self.target) or self.multi_objective or self.max_latency_ms > 0


def base_config(opts: TuneOptions) -> dict[str, Any]:
    from trainer.config import TrainConfig, parse_override

    cfg = TrainConfig.from_yaml(opts.config) if opts.config else TrainConfig()
    over: dict[str, Any] = {
        "data.dataset": opts.data,
        "epochs": opts.epochs,
        "seed": opts.seed,
        "progress": False,
        "robustness": False,
        "metric": opts.metric,
        "use_gpu": opts.gpus_per_trial > 0,
        "workers": opts.workers_per_trial,
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
    return cfg.replace(over).to_dict()


def _layer_count(backbone: str) -> int:
    from trainer.config import ModelConfig
    from trainer.model import create_model, freeze_backbone

    m = create_model(ModelConfig(backbone=backbone, weights="none"), num_classes=2)
    return int(freeze_backbone(m, 0.0)["layers_total"])


def _study_attrs(opts: TuneOptions, base: dict[str, Any], space: Any, source: Any) -> dict[str, Any]:
    return {
        "dataset": source.name,
        "dataset_hash": source.dataset_hash,
        "classes": source.classes,
        "split_seed": base["data"]["split_seed"],
        "split_ratios": base["data"]["split"],
        "split_counts": {k: len(v) for k, v in source.parts.items()},
        "search_space": {n: {k: v for k, v in asdict(p).items() if k != "name"} for n, p in space.params.items()},
        "dropped": space.dropped,
        "budget": {
            "trials": opts.trials,
            "max_epochs": opts.epochs,
            "time_budget_s": opts.time_budget_s,
            "img": opts.img,
            "max_images": base["data"]["max_images"],
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
        "base_config": base,
    }


def _trial_dirname(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


@dataclass
class Clock:
    """The study's wall-clock budget from ``t0`` (unix time)."""

    budget_s: float
    t0: float = field(default_factory=time.time)

    def left(self) -> float:
        return (self.t0 + self.budget_s - time.time()) if self.budget_s else float("inf")

    def end(self) -> float | None:
        return self.t0 + self.budget_s if self.budget_s else None

    def search_deadline(self, refit: bool, refit_share: float) -> float | None:
        """No trial epoch ends after this: what remains is for the refit (a share of the budget) and the finish."""
        if not self.budget_s:
            return None
        keep = FINISH_RESERVE_S + (refit_share * self.budget_s if refit else 0.0)
        return self.t0 + self.budget_s - keep


def process_start() -> float:
    """When this process started (the CLI's budget counts from it)."""
    try:
        import psutil

        return float(psutil.Process().create_time())
    except Exception:  # noqa: BLE001 - psutil comes with ray; without it, now
        return time.time()


def study_specs(base: dict[str, Any], space: Any) -> list[Any]:
    """The distinct preprocessing specs (backbone x input size) the space can ask for."""
    from trainer.config import ModelConfig
    from trainer.imagestore import resize_key
    from trainer.model import preprocess_spec_for

    sizes = list(space.params["img"].choices) if "img" in space.params else [base["model"]["img_size"]]
    backbones = space.backbones or [base["model"]["backbone"]]
    out: dict[str, Any] = {}
    for b in backbones:
        for size in sizes:
            spec = preprocess_spec_for(ModelConfig(backbone=b, img_size=int(size)))
            out.setdefault(json.dumps(resize_key(spec), sort_keys=True), spec)
    return list(out.values())


def prepare_study_data(base: dict[str, Any], space: Any, out: Path) -> Any:
    """Once per study: scan, hash and split the dataset (``split.json``) and resize it for every spec the space
    can ask for (the node's disk cache, keyed by content). Returns the :class:`trainer.data.PreparedSource`
    that trials start from."""
    from trainer.config import TrainConfig
    from trainer.data import build_data, prepare_source

    cfg = TrainConfig.from_dict(base)
    t0 = time.perf_counter()
    source = prepare_source(cfg.data)
    specs = study_specs(base, space)
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


def run_study(opts: TuneOptions, started_at: float | None = None) -> dict[str, Any]:
    """Run (or resume) a study; returns the summary written to ``<out>/summary.json``. The time budget counts
    from ``started_at`` (unix time; ``python -m tuner`` passes its process start, so interpreter and import time
    count too), else from this call."""
    from trainer.backbones import weights_available
    from trainer.config import TrainConfig
    from tuner import cluster, refit, report
    from tuner.space import load_space
    from tuner.storage import check_storage

    clock = Clock(opts.time_budget_s, started_at if started_at is not None else time.time())
    out = Path(opts.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    check_storage(opts.storage)
    base = base_config(opts)
    weights = TrainConfig.from_dict(base).model.weights
    space = load_space(
        opts.space or None,
        list(opts.backbones) or None,
        weights_check=lambda b: weights_available(b, weights),
        layer_count=_layer_count,
        fixed={"img": opts.img} if opts.img else None,
    )
    for line in space.dropped_report(verbose=opts.verbose, explicit=bool(opts.backbones)):
        log.info(line)
    connect = lambda: cluster.connect(  # noqa: E731
        opts.address or None, env_vars=opts.env_vars, include_dashboard=opts.workers_per_trial > 1)
    info = connect() if opts.target else None  # a missing target fails before the data is prepared
    try:
        latency = _latency_setup(opts, space) if opts.target else None
        source = prepare_study_data(base, space, out)
        if info is None:
            info = connect()
        if opts.latency_on and latency is None:
            latency = _latency_setup(opts, space)
        deadline = clock.search_deadline(opts.refit, opts.refit_share)
        results, study = _fit(opts, base, space, source, info, deadline, latency)
        refit_run = refit.refit_best(opts, study, base, space, source, clock, out) if opts.refit else None
        summary = report.finish_study(opts, results, study, out, source=source, refit=refit_run)
        if latency is not None:
            summary["latency"] = _latency_outputs(opts, study, out)
        (out / "tune_options.yaml").write_text(yaml.safe_dump(asdict(opts), sort_keys=False))
        if opts.export and summary.get("best_checkpoint"):
            from edgetune.bundle import load_bundle
            from trainer.export import export_bundle

            searched = str((summary.get("best_params") or {}).get("precision", "fp32"))
            b = export_bundle(out, out / "bundle", source=source, precision=searched,
                              target_latency=lambda p: _winner_latency(opts, summary, p))
            summary["bundle"] = str(b)
            deploy = dict(load_bundle(b).meta["deploy_precision"])
            if deploy["deployed"] != searched:
                log.warning(f"the search picked {searched} but the bundle deploys at {deploy['deployed']}: "
                            f"{deploy['why']}")
            if opts.target:  # hand-off: the winner's own ONNX timed on the device (and its engine kept there)
                summary["latency"]["winner"] = {**_time_winner(opts, b, deploy["deployed"]), "deploy": deploy}
    finally:
        if info is not None:
            cluster.shutdown(info)
    summary["ray"] = {"mode": info["mode"], "address": info["address"], "storage_path": opts.storage_path}
    summary["wall_seconds"] = time.time() - clock.t0
    summary["time_budget_s"] = opts.time_budget_s
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    report.print_summary(summary, opts)
    return summary


def _latency_setup(opts: TuneOptions, space: Any) -> Any:
    """Device in the loop (tuner/device.py): check the target's nodes, ask which precisions it supports (they join
    the space, with the input size), start the study's latency service. Needs Ray connected."""
    from tuner import device, latency_service

    protocol = opts.timing_protocol.to_dict()
    target = opts.target or None
    if target:
        nodes = device.require_target(target)
        caps = device.device_capabilities(target, opts.timing_backend)
        log.info(f"target {target}: {len(nodes)} live node(s) ({', '.join(n[:12] for n in nodes)}); device "
                 f"{caps['device'].get('gpu_name') or caps['device'].get('cpu')} ({caps['device'].get('backend')}); "
                 f"precisions {caps['precisions']}")
        space.add_device_params(device.search_precisions(caps["precisions"], opts.precisions, target),
                                img_fixed=bool(opts.img))
    else:
        log.info("no --target: latency is an estimate timed on the driver's node (alongside training), "
                 "not a device's latency")
    device.LatencyCache(_rdb(opts.storage))  # create the cache study before the service and trials use it
    service = latency_service.start_service(opts.study, opts.storage, target, protocol, opts.timing_backend,
                                   opts.timing_timeout_s)
    return device.LatencySetup(study=opts.study, target=target, service=service, max_latency_ms=opts.max_latency_ms,
                               precision_param="precision" if "precision" in space.params else "")


def _rdb(url: str) -> Any:
    from tuner.storage import rdb_storage

    return rdb_storage(url)


def _rejector(opts: TuneOptions, base: dict[str, Any], space: Any, source: Any, latency: Any) -> Any:
    """For the searcher: rejects a sampled configuration whose architecture is already known to be slower than
    ``--max-latency-ms`` on the target (None without a constraint)."""
    if latency is None or opts.max_latency_ms <= 0:
        return None
    from tuner.device import LatencyRejector

    return LatencyRejector(base=base, space=space, num_classes=len(source.classes), storage=opts.storage,
                           setup=latency)


def _latency_outputs(opts: TuneOptions, study: Any, out: Path) -> dict[str, Any]:
    from tuner import device
    from tuner.latency_report import write_latency_outputs, write_storage_latency_table

    records = device.LatencyCache(_rdb(opts.storage)).records(device.cache_target(opts.target or None))
    res: dict[str, Any] = write_latency_outputs(study, records, out, opts.metric, opts.max_latency_ms)
    shared = write_storage_latency_table(opts.storage, records, opts.metric, device.CACHE_STUDY, out)
    if shared is not None:
        res["storage_latency_table"] = str(shared)
    return res


def _winner_latency(opts: TuneOptions, summary: dict[str, Any], precision: str) -> dict[str, Any] | None:
    """What the bundle records of the winner's latency: its architecture's timing at the precision the bundle
    deploys at (target, device, p50/p90); None where that architecture was not timed at that precision."""
    if not opts.latency_on or summary.get("best_trial") is None:
        return None
    from trainer.checkpoint import read_meta
    from trainer.config import TrainConfig
    from tuner import device

    meta = read_meta(Path(summary["best_checkpoint"]))
    cfg = TrainConfig.from_dict(meta["config"])
    sig = device.signature_for(cfg, len(meta["classes"]), precision)
    rec = device.LatencyCache(_rdb(opts.storage)).get(device.cache_target(opts.target or None), sig)
    if rec is None:
        return None
    return {"target": opts.target or None, "kind": rec.get("kind"), "architecture": sig.label,
            "p50_ms": rec["p50_ms"], "p90_ms": rec["p90_ms"], "precision": precision, "node_id": rec.get("node_id"),
            "device": rec.get("device", {}), "protocol": rec.get("protocol", {}), "backend": rec.get("backend")}


def _time_winner(opts: TuneOptions, bundle_dir: Path, precision: str) -> dict[str, Any]:
    """Time the exported bundle itself on the target, at the precision the search picked (with TensorRT this builds
    its engine there and keeps it in the device's engine cache, for ``make engine PRECISION=<it>`` to reuse)."""
    import ray

    from trainer.export import bundle_files
    from tuner import device

    ref = ray.remote(device.time_on_node).options(**device.task_options(opts.target)).remote(
        bundle_files(bundle_dir), precision, opts.timing_protocol.to_dict(), opts.timing_backend, True)
    try:
        rec: dict[str, Any] = ray.get(ref, timeout=opts.timing_timeout_s)
    except (ray.exceptions.GetTimeoutError, ray.exceptions.RayError) as e:
        ray.cancel(ref, force=True)
        return {"status": f"unavailable: {type(e).__name__}", "precision": precision}
    return {"status": "timed", "p50_ms": rec["p50_ms"], "p90_ms": rec["p90_ms"], "node_id": rec["node_id"],
            "onnx_sha256": rec["onnx_sha256"], "engine": rec.get("engine"), "precision": precision}


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
    from tuner.trial import TrialResources

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


def _fit(
    opts: TuneOptions, base: dict[str, Any], space: Any, source: Any, info: dict[str, Any], deadline: float | None,
    latency: Any = None,
) -> tuple[Any, Any]:
    """Build (or restore) the Tuner over the Optuna study and run it; returns (ResultGrid, study)."""
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from tuner.searcher import CheckpointAttrCallback, EdgetuneOptunaSearch, mark_stale_running_failed
    from tuner.storage import rdb_storage
    from tuner.trial import TrialContext, run_trial

    storage = rdb_storage(opts.storage)
    m = opts.metric_def
    metric: Any = [m.best_key, "latency_ms"] if opts.multi_objective else m.best_key
    mode: Any = ["max", "min"] if opts.multi_objective else m.mode
    if opts.resume:
        try:
            stale = mark_stale_running_failed(optuna.load_study(study_name=opts.study, storage=storage))
        except KeyError:
            raise EdgetuneError(f"cannot resume: study {opts.study!r} not found in {opts.storage}") from None
        if stale:
            log.info(f"resume: marked stale RUNNING trial(s) {stale} as FAIL")
    seeds = space.points_to_evaluate()
    n_trials = opts.trials or 100_000  # with no cap, the time budget ends the search
    searcher = EdgetuneOptunaSearch(
        space=space.define_by_run,
        metric=metric,
        mode=mode,
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
        reject=_rejector(opts, base, space, source, latency),
    )
    searcher.study.set_metric_names([opts.metric, "latency_ms"] if opts.multi_objective else [opts.metric])
    attrs = _study_attrs(opts, base, space, source)
    existing = searcher.study.user_attrs
    if existing.get("dataset_hash") not in (None, attrs["dataset_hash"]):
        log.warning(
            f"warning: study {opts.study!r} was run on a different dataset "
            f"(hash {existing['dataset_hash'][:12]} vs {attrs['dataset_hash'][:12]})"
        )
    for k, v in attrs.items():
        searcher.study.set_user_attr(k, v)
    scheduler = (
        FIFOScheduler()
        if opts.multi_objective
        else ASHAScheduler(
            time_attr="training_iteration",
            max_t=opts.epochs,
            grace_period=opts.grace_period,
            reduction_factor=opts.reduction_factor,
        )
    )
    res, resources = trial_resources(opts)
    ctx = TrialContext(
        base=base,
        space=space,
        res=res,
        source=source,
        deadline=deadline,
        latency=latency,
    )
    trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), resources)
    run_config = tune.RunConfig(
        name=opts.study,
        storage_path=opts.storage_path,
        # Ray keeps the best epoch's checkpoint (trainer.metric.CHECKPOINT_SCORE), plus the latest for restarts
        checkpoint_config=tune.CheckpointConfig(
            num_to_keep=1, checkpoint_score_attribute=CHECKPOINT_SCORE, checkpoint_score_order=CHECKPOINT_SCORE_MODE
        ),
        failure_config=tune.FailureConfig(max_failures=opts.max_failures),
        callbacks=[CheckpointAttrCallback(searcher)],
        progress_reporter=tune.CLIReporter(
            metric_columns=["epoch", m.best_key, "val_acc", "data_path", "train_seconds"],
            parameter_columns=[c for c in ("backbone", "freeze", "lr", "img") if c in space.params],
            max_report_frequency=30,
            # Ray's sort fails on a trial that ended without a result (one the search deadline overtook)
            sort_by_metric=False,
        ),
        verbose=1,
    )
    exp_path = f"{opts.storage_path.rstrip('/')}/{opts.study}"
    if opts.resume and tune.Tuner.can_restore(exp_path):
        log.info(f"resuming Ray experiment {exp_path}")
        tuner = tune.Tuner.restore(exp_path, trainable, resume_unfinished=True, restart_errored=True)
    else:
        if opts.resume:
            log.info(f"no Ray experiment to restore at {exp_path}; continuing the Optuna study with new trials")
        elif "://" not in exp_path and Path(exp_path).exists():
            shutil.rmtree(exp_path)
        backstop = (deadline - time.time() + 60.0) if deadline else None  # trials stop at epoch boundaries first
        tuner = tune.Tuner(
            trainable,
            param_space={},
            run_config=run_config,
            tune_config=tune.TuneConfig(
                search_alg=searcher,
                scheduler=scheduler,
                num_samples=n_trials,
                trial_dirname_creator=_trial_dirname,
                trial_name_creator=_trial_dirname,
                time_budget_s=max(1.0, backstop) if backstop else None,
                # a 1-worker trial's process (torch imported, the activation cache's LRU warm) serves the next trial
                reuse_actors=opts.workers_per_trial <= 1,
                max_concurrent_trials=_max_concurrent(opts, info["resources"]),
                metric=None if opts.multi_objective else m.best_key,
                mode=None if opts.multi_objective else mode,
            ),
        )
    # A trial overtaken by the search deadline returns without a result (run_trial); Ray's strict check would turn
    # that into an error of the whole study. Missing metrics are handled by the searcher (FAIL with the reason).
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    results = tuner.fit()
    if isinstance(searcher, EdgetuneOptunaSearch):
        searcher.close_unfinished()
    return results, optuna.load_study(study_name=opts.study, storage=storage)
