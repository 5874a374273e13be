"""The options of one study, ``TuneOptions`` (tuner/run.py runs it); ``python -m tuner``'s flags are derived from its
fields (tuner/__main__.py, edgetune/dataclass_cli.py)."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from edgetune.dataclass_cli import file_values, opt
from edgetune.device import PRECISIONS, TIMING_BACKENDS, TimingProtocol
from edgetune.errors import ConfigError
from trainer.metric import DEFAULT_METRIC, Metric, get_metric
from trainer.ray_trainer import PLACEMENT_STRATEGIES
from tuner.device import target_resource
from tuner.storage import normalise_url

STORAGE_PATH_ENV = "EDGETUNE_STORAGE_PATH"

#: Seconds kept at the end of a budget for the export (ONNX, checker, parity on the test split, bundle).
EXPORT_RESERVE_S = 40.0
#: The fixed costs of a study before and after its search, on 2 cores, the smallest built-in dataset (textures) and
#: the default space's first seed point (EfficientNet-Lite0 at 128 px), as the study's budget ledger counts them
#: (tuner/ledger.py). Measured: on a quiet machine `ray.init` ~5 s plus ~2 s per `tuner.fit` (bench/README.md "Ray
#: start-up") and one trial epoch 21-26 s (the contract runs' leaderboards); the ledger of a `make tune DATA=textures
#: TRIALS=2 EPOCHS=1` on a busy shared 2-core machine (issue 22): start-up (interpreter, imports) 8.1 s, data
#: preparation 0.5 s, Ray start 17.9 s, trial epochs ~54 s, export 22.9 s. The constants are the quiet-machine
#: figures rounded up, plus the export reserve the study keeps (:data:`EXPORT_RESERVE_S`): a budget below their sum
#: cannot train and export even one one-epoch trial, so it is refused before anything starts. It is a floor, not a
#: recommendation: a busy machine needs more (the default is 840 s).
STARTUP_S = 12.0
RAY_START_S = 8.0
DATA_PREPARATION_S = 5.0
ONE_TRIAL_EPOCH_S = 25.0
#: --ema-decay's default; another value given fixes the space's ema_decay parameter (tuner.run.fixed_params).
DEFAULT_EMA_DECAY = 0.99
MIN_TIME_BUDGET_S = STARTUP_S + RAY_START_S + DATA_PREPARATION_S + ONE_TRIAL_EPOCH_S + EXPORT_RESERVE_S  # 90 s


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
        840.0,
        f"seconds for search + refit + export, counted from the start (at least {MIN_TIME_BUDGET_S:g}; "
        "0 = none; "
        "then --trials is needed)",
    )
    storage: str = opt(
        "", "Optuna storage URL (default sqlite:///<out>/../optuna.db, i.e. runs/optuna.db; postgresql://… for shared)"
    )
    storage_path: str = opt(
        "",
        "Ray storage for trial checkpoints: a directory or s3://bucket/prefix "
        "(default $EDGETUNE_STORAGE_PATH, else <out>/ray); must be shared on a multi-node cluster",
    )
    space: str = opt("", "search space YAML (default tuner/default_space.yaml)")
    backbones: tuple[str, ...] = opt((), "restrict the backbone choices")
    train_config: str = opt("", "base TrainConfig YAML for every trial (--config is the tuner's own options file)")
    sets: tuple[str, ...] = opt((), "base config override (repeatable; wins over img/max_images)")
    img: int = opt(
        0, "fix the input size of every trial (0 = searched where the space has `img`, else backbone default)"
    )
    max_images: int = opt(0, "stratified subset of the dataset (0 = all)")
    gpus_per_trial: float = opt(0.0, "GPUs per worker of a trial")
    workers_per_trial: int = opt(1, ">1: each trial is a Ray Train DDP run")
    cpus_per_worker: float = opt(1.0, "CPUs per worker of a trial")
    resources_per_worker: dict[str, float] = opt(
        factory=dict, help="extra custom Ray resources per worker (e.g. slot=1)"
    )
    placement_strategy: str = opt("PACK", "placement of a DDP trial's workers (STRICT_SPREAD: each on its own node)")
    max_concurrent: int = opt(0, "trials at once (0 = as many as the cluster's resources allow)")
    # bench/README.md "ASHA grace period" measures it
    grace_period: int = opt(2, "ASHA's first rung in epochs (at most --epochs)")
    reduction_factor: int = opt(2, "ASHA's reduction factor")
    seed: int = opt(0, "seed of the sampler and of every trial's training")
    out: str = opt("", "output dir (default runs/<study>)")
    resume: bool = opt(False, "continue the same study and Ray experiment")
    multi_objective: bool = opt(
        False, "maximise the metric and minimise p50 latency (on --target, else an estimate on the driver's node)"
    )
    max_latency_ms: float = opt(
        0.0, "latency constraint (p50, ms): slower architectures are rejected before training (PRUNED, with reason)"
    )
    target: str = opt(
        "",
        "device in the loop: time every architecture on the Ray node carrying "
        "edge_target:<TARGET> (join it with `make edge-node HEAD=<host:port> TARGET=<name>`); "
        "implies --multi-objective",
    )
    int8_tolerance: float = opt(
        0.01,
        "the most validation accuracy the winner's INT8 variant may lose (when the search picked int8), else "
        "it deploys at fp32",
    )
    precisions: tuple[str, ...] = opt(
        (),
        "with --target: the deployed precisions the search may pick (comma list of fp32, fp16, int8; default: "
        "all the target supports)",
    )
    # the timing protocol: edgetune.device.TimingProtocol
    timing_warmup: int = opt(TimingProtocol.warmup, "untimed runs before each timing")
    timing_runs: int = opt(TimingProtocol.runs, "timed runs per architecture (p50/p90 over them)")
    timing_timeout_s: float = opt(
        600.0, "seconds a trial waits for its timing (edge node down) before it is marked with the reason"
    )
    timing_backend: str = opt(
        "auto", "runtime of the timing on the device (auto: TensorRT where present, else ONNX Runtime)"
    )
    max_failures: int = opt(1, "restarts of a crashed trial from its last checkpoint")
    address: str = opt(
        "",
        "Ray cluster address; 'local' forces a local instance "
        "(default: RAY_ADDRESS, a running node started by `ray start`/`ray up` on this machine, "
        "or local)",
    )
    export: bool = opt(True, "export the best trial (the refit, where there is one) as a bundle")
    metric: str = opt(
        DEFAULT_METRIC,
        "selects epochs, trials and the final model (default val_macro_f1: see README 'Tuner', its Metric paragraph)",
    )
    refit: bool = opt(True, "retrain the best configuration for longer after the search (the exported model)")
    refit_share: float = opt(0.55, "share of the time budget kept for the refit")
    refit_warm: bool = opt(
        False,
        "warm final fit: it continues the best trial's weights (a warm restart of its "
        "schedule) instead of starting from ImageNet's again (off by default: "
        "bench/README.md, 'Warm final fit')",
    )
    refit_max_epochs: int = opt(
        0,
        "cap on refit epochs (0 = as many as the time budget holds, at most "
        "60; with --trials or without a budget 3 x --epochs)",
    )
    probe_share: float = opt(
        0.1,
        "share of the time budget for the probe stage (tuner/probe.py: linear heads on "
        "frozen features rank backbone x size and join the ensemble; 0 = off; only "
        "without --trials)",
    )
    ema_decay: float = opt(
        DEFAULT_EMA_DECAY,
        "weight averaging in every fine-tune: EMA decay per step (0 = off); a "
        "space that searches it (the default space's ema_decay) samples it per trial unless a "
        "value other than the default is given here, which fixes it; the better of raw and "
        "averaged weights on validation is kept",
    )
    ensemble: str = opt(
        "auto",
        "post-hoc ensemble of the study's models (tuner/posthoc.py): auto (kept only when it "
        "beats the best single model on validation beyond noise), off, or a member cap N",
    )
    env_vars: dict[str, str] = opt(factory=dict, help="environment for every Ray worker")
    verbose: bool = opt(False, "list every place looked for each backbone left out for missing weights")

    def __post_init__(self) -> None:
        self._put("backbones", tuple(self.backbones))
        self._put("sets", tuple(self.sets))
        self._put("precisions", tuple(self.precisions))
        self._put("resources_per_worker", dict(self.resources_per_worker))  # a copy: the caller's dict is not shared
        self._put("env_vars", dict(self.env_vars))
        self._check_counts()
        self._check_shares()
        self._check_latency()
        if self.target:
            self._put("multi_objective", True)  # objectives: the metric and the target's p50 latency
        if self.multi_objective and get_metric(self.metric).mode != "max":
            raise ConfigError(f"multi-objective mode maximises a score metric, not {self.metric}")
        self._fill_places()

    def _put(self, name: str, value: Any) -> None:
        """Set a field of the frozen options: the derived defaults only, at construction."""
        object.__setattr__(self, name, value)

    def _check_counts(self) -> None:
        """The integer fields, the input size, resources and placement (ConfigError naming the field)."""
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
            self._put("grace_period", self.epochs)
        if self.gpus_per_trial < 0 or self.cpus_per_worker <= 0:
            raise ConfigError(
                f"gpus_per_trial must be >= 0 and cpus_per_worker > 0, got {self.gpus_per_trial}, "
                f"{self.cpus_per_worker}"
            )
        if self.placement_strategy not in PLACEMENT_STRATEGIES:
            raise ConfigError(
                f"placement_strategy must be one of {PLACEMENT_STRATEGIES}, got {self.placement_strategy!r}"
            )
        if any(not isinstance(v, (int, float)) or v < 0 for v in self.resources_per_worker.values()):
            raise ConfigError(f"resources_per_worker values must be numbers >= 0, got {self.resources_per_worker}")

    def _check_shares(self) -> None:
        """The budget, the shares of it and the other bounded numbers; the metric and the ensemble mode."""
        if self.time_budget_s < 0 or self.max_latency_ms < 0:
            raise ConfigError("time budget and max latency must be >= 0")
        self._check_budget()
        if not 0.0 <= self.probe_share < 0.5:
            raise ConfigError(f"probe_share must be in [0, 0.5), got {self.probe_share}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay must be in [0, 1) (0 = off), got {self.ema_decay}")
        self.ensemble_rounds  # noqa: B018 - validates ensemble
        if not 0.0 <= self.refit_share < 0.9:
            raise ConfigError(f"refit_share must be in [0, 0.9), got {self.refit_share}")
        get_metric(self.metric)

    def _fill_places(self) -> None:
        """The derived study name, output directory, storage (checked) and Ray storage path."""
        if not self.study:
            self._put("study", f"{Path(self.data).name}-default")
        if not self.out:
            self._put("out", str(Path("runs") / self.study))
        if not self.storage:
            db = Path(self.out).resolve().parent / "optuna.db"
            db.parent.mkdir(parents=True, exist_ok=True)
            self._put("storage", f"sqlite:///{db}")
        normalise_url(self.storage)  # validates the URL early
        if not self.storage_path:
            self._put("storage_path", os.environ.get(STORAGE_PATH_ENV, "") or str(Path(self.out).resolve() / "ray"))
        elif "://" not in self.storage_path:
            self._put("storage_path", str(Path(self.storage_path).resolve()))  # Ray needs an absolute path

    def _check_budget(self) -> None:
        """A time budget or a trial count; a budget no smaller than :data:`MIN_TIME_BUDGET_S` (ConfigError naming
        it)."""
        if not self.time_budget_s and not self.trials:
            raise ConfigError("give a time budget (--time-budget / TIME=, seconds) or a trial count (--trials)")
        if 0 < self.time_budget_s < MIN_TIME_BUDGET_S:
            raise ConfigError(
                f"time budget {self.time_budget_s:g} s is too small for one trial: the minimum is "
                f"{MIN_TIME_BUDGET_S:g} s (start-up {STARTUP_S:g} + Ray start {RAY_START_S:g} + data preparation "
                f"{DATA_PREPARATION_S:g} + one trial epoch {ONE_TRIAL_EPOCH_S:g} + export {EXPORT_RESERVE_S:g}); "
                "give --time-budget / TIME= of at least that, or 0 with --trials"
            )

    @property
    def ensemble_rounds(self) -> int:
        """Greedy selection rounds (0: ensemble off): auto = tuner.posthoc.ENSEMBLE_ROUNDS, N = a cap of N members."""
        from tuner.posthoc import ENSEMBLE_MODES, ENSEMBLE_ROUNDS  # noqa: PLC0415 - lazy: torch

        v = str(self.ensemble).strip().lower()
        if v in ENSEMBLE_MODES:
            return ENSEMBLE_ROUNDS if v == "auto" else 0
        if v.isdigit() and int(v) >= 1:
            return int(v)
        raise ConfigError(
            f"ensemble must be one of {list(ENSEMBLE_MODES)} or a member cap N >= 1, got {self.ensemble!r}"
        )

    @property
    def metric_def(self) -> Metric:
        return get_metric(self.metric)

    def _check_latency(self) -> None:
        """Target name, timing protocol, backend and timeout (ConfigError naming what is allowed)."""
        self.timing_protocol  # noqa: B018 - TimingProtocol validates timing_warmup / timing_runs
        if self.timing_backend not in TIMING_BACKENDS:
            raise ConfigError(f"timing_backend must be one of {TIMING_BACKENDS}, got {self.timing_backend!r}")

        if not 0 <= self.int8_tolerance <= 1:
            raise ConfigError(f"int8_tolerance must be in [0, 1] (validation accuracy), got {self.int8_tolerance}")
        bad = [p for p in self.precisions if p not in PRECISIONS]
        if bad:
            raise ConfigError(f"precisions: {bad} not allowed; choose from {list(PRECISIONS)}")
        if self.precisions and not self.target:
            raise ConfigError("precisions needs --target (the precisions are the target device's)")
        if self.target:
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


def options_yaml(opts: TuneOptions) -> str:
    """The effective options as YAML, every field (derived defaults resolved): what ``python -m tuner --print-config``
    prints and a study writes to ``<out>/tune_options.yaml``; ``--config`` reads it back to the same options."""
    return str(yaml.safe_dump(asdict(opts), sort_keys=False))


def load_options_file(path: str | Path) -> dict[str, Any]:
    """The TuneOptions fields a ``--config`` YAML sets (ConfigError: unreadable, not a mapping, an unknown key with
    the allowed ones, a value of the wrong type)."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except OSError as e:
        raise ConfigError(f"cannot read the tuner config {p}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"tuner config {p} is not valid YAML: {e}") from None
    try:
        return file_values(TuneOptions, data, f"tuner config {p}")
    except ValueError as e:
        raise ConfigError(str(e)) from None
