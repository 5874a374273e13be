"""Refit: after the search, the best configuration (by the validation metric) is trained again for longer.

The number of epochs comes from the time budget that is left, after keeping ``FINISH_RESERVE_S`` for the test
evaluation and export: the refit measures its first epoch (it runs alone, with a whole node) and fits its
epochs, at most ``refit_max_epochs``, to the deadline, with the LR schedule stretched over exactly those
(``trainer.loop.fit_epochs_to_deadline``). It is skipped when not even the search's ``epochs`` would fit at the
best trial's measured speed. The best epoch is chosen on
validation, as in every trial; the test split is read once, afterwards, for this model only
(:func:`tuner.finish.finish_study`), and it is the model that is exported.

The refit runs as one Ray task with a whole node's CPUs (or the trial's GPU), on the cluster like the
trials; its best checkpoint comes back through the object store.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainer.checkpoint import read_meta
from trainer.config import TrainConfig
from trainer.epoch_result import EpochResult, read_history
from trainer.loop import train_loop
from trainer.loop_config import LoopConfig
from trainer.metric import CHECKPOINT_SCORE, CHECKPOINT_SCORE_MODE, get_metric
from tuner.budget import FINISH_RESERVE_S, Clock
from tuner.trial import build_trial_config
from tuner.trial_checkpoint import materialise_best_checkpoint, result_for
from tuner.trial_record import TrialRecord, records, seed_record

if TYPE_CHECKING:
    import optuna
    from ray.tune import ResultGrid

    from trainer.data import PreparedSource
    from tuner.ledger import Ledger
    from tuner.options import TuneOptions
    from tuner.space import SearchSpace


log = logging.getLogger(__name__)


#: Refit epochs when the study has no time budget: this many times the search's max epochs.
UNBUDGETED_FACTOR = 2


@dataclass(frozen=True)
class RefitRun:
    """What the refit produced (``dir`` holds its best checkpoint): written here (:func:`refit_best`), read by the
    study's finish (:func:`tuner.finish.finish_study`) and kept in ``summary.json`` as ``refit`` (:meth:`to_dict`)."""

    of_trial: int
    params: dict[str, Any]
    epochs: int
    dir: Path | None = None
    best_epoch: int = 0
    value: float | None = None
    val: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    stop_reason: str = ""
    skipped: str = ""  #: why no refit ran ("" when it did)
    warm_from: int | None = None  #: the trial whose weights it continued (``--refit-warm``), None: from ImageNet's
    history: list[EpochResult] = field(default_factory=list)  #: the final fit's epochs

    def to_dict(self) -> dict[str, Any]:
        d = asdict(replace(self, history=[]))
        d["dir"] = str(self.dir) if self.dir else None
        d["history"] = [h.to_dict() for h in self.history]
        return d


def best_trial(study: optuna.Study, metric: str, max_latency_ms: float = 0.0) -> TrialRecord | None:
    """The finished trial with the best best-epoch value (the value Optuna holds for it); with a latency bound,
    among the trials measured within it (the same rule as the export's selection, tuner.finish._candidates)."""
    m = get_metric(metric)
    done = [t for t in records(study) if t.finished and t.best(metric) is not None]
    if max_latency_ms > 0:
        done = [t for t in done if 0 < (t.latency_ms or 0) <= max_latency_ms]
    done.sort(key=lambda t: (m.sort_key(t.best(metric)), t.number))
    return done[0] if done else None


#: Parallel efficiency assumed when the refit gets more CPU threads than a trial had (measured on 2 cores:
#: Lite0 128 px, 1 -> 2 threads, 1.6-2.0x); the refit re-measures its own first epoch and refits to the deadline.
THREAD_EFFICIENCY = 0.7


#: A warm final fit (``--refit-warm``) restarts the best trial's schedule at this fraction of its peak LR, after this
#: many warm-up epochs: the trial's epochs are not thrown away (SGDR's warm restart, same peak). Off by default: on
#: elpv seed 0 (2 cores) the trials train ~1 epoch, and the one measured warm run (then at 0.5 x LR) scored below
#: the cold one; bench/README.md, "Warm final fit".
WARM_LR_FACTOR = 1.0
WARM_WARMUP_EPOCHS = 0.3


#: The most epochs a budgeted refit plans (it fills the time left: a budget is used to its end).
BUDGETED_REFIT_CAP = 60


def refit_cap(opts: TuneOptions) -> int:
    """``--refit-max-epochs``, else: a study bounded by its time budget alone (no ``--trials`` cap) fills the time
    left (at most BUDGETED_REFIT_CAP epochs); a trial-capped or unbudgeted one trains 3 x ``--epochs``."""
    return int(
        opts.refit_max_epochs or (BUDGETED_REFIT_CAP if opts.time_budget_s and not opts.trials else 3 * opts.epochs)
    )


def plan_epochs(
    opts: TuneOptions,
    trial: TrialRecord,
    left_s: float,
    refit_cpus: float = 0.0,
    reserve_s: float = FINISH_RESERVE_S,
    warm: bool = False,
) -> tuple[int, str]:
    """(epochs, reason) for the refit of ``trial`` with ``left_s`` seconds left (inf: no budget). ``refit_cpus``:
    the refit's threads (CPU runs), to scale the trial's measured epoch time from its ``cpus_per_worker``.
    ``warm``: the refit continues the trial's weights, so any whole epoch adds to what it trained."""
    cap = refit_cap(opts)
    if math.isinf(left_s):
        return min(cap, UNBUDGETED_FACTOR * opts.epochs), f"no time budget: {UNBUDGETED_FACTOR} x {opts.epochs} epochs"
    epoch_s = trial.epoch_seconds or 0.0
    trial_cpus = float(opts.cpus_per_worker or 1.0)
    if refit_cpus > trial_cpus and not opts.gpus_per_trial:
        epoch_s *= trial_cpus / (refit_cpus * THREAD_EFFICIENCY)
    setup_s = trial.setup_seconds or 0.0
    usable = left_s - reserve_s - setup_s
    if epoch_s <= 0:
        return 0, "the best trial recorded no epoch time"
    n = int(usable // epoch_s)
    # worth it when it trains longer than the best trial did (a trial the search deadline stopped early never
    # finished its LR schedule; the refit's schedule spans exactly its epochs)
    trained = trial.epochs_trained or opts.epochs
    need = 1 if warm else max(1, min(opts.epochs, trained)) + 1  # from scratch: longer than the trial, else it
    if n < need:  # would only repeat it
        return 0, (
            f"{usable:.0f} s left fit {max(0, n)} epoch(s) of {epoch_s:.1f} s"
            + ("" if warm else f", not more than the {need - 1} the best trial trained")
            + ": the best trial's own checkpoint is used"
        )
    n = min(n, cap)
    return n, f"{n} epochs of ~{epoch_s:.1f} s in the {usable:.0f} s left (cap {cap})"


def refit_best(
    opts: TuneOptions,
    study: optuna.Study,
    base: TrainConfig,
    space: SearchSpace,
    source: PreparedSource,
    clock: Clock,
    out: Path,
    ledger: Ledger | None = None,
    results: ResultGrid | None = None,
) -> RefitRun | None:
    """Train the best trial's configuration again for longer (from the trial's own weights with ``--refit-warm``:
    ``results`` is Ray Tune's result grid, where its checkpoint is); returns the run, or None without a best
    trial."""
    if opts.multi_objective:
        log.info("refit skipped: multi-objective study (the final model is picked from the Pareto front)")
        return None
    cpus, gpus = _refit_resources(opts)
    plan = _plan(opts, study, space, clock, cpus, results)
    if plan is None:
        return None
    trial = plan.trial
    run = RefitRun(of_trial=trial.number, params=dict(trial.params), epochs=plan.epochs)
    if not plan.epochs:
        log.info(f"refit skipped: {plan.why}")
        return replace(run, skipped=plan.why)
    cfg = _refit_config(opts, base, space, plan, cpus, gpus, bool(clock.end()))
    if plan.warm:
        run = replace(run, warm_from=trial.number)
    end = clock.end()
    deadline = end - clock.finish_reserve_s if end else None
    _log_plan(opts, plan, cfg, cpus, gpus)
    t0 = time.perf_counter()
    res = _run_refit_task(cfg, source, deadline, plan.warm, cpus, gpus, ledger)
    if not res.files:
        run = replace(run, skipped="the refit produced no checkpoint (its loss diverged in the first epoch)")
        log.info(f"refit failed: {run.skipped}; the best trial's own checkpoint is used")
        return run
    return _collect(run, res, out / "refit", opts.metric, time.perf_counter() - t0)


@dataclass(frozen=True)
class RefitPlan:
    """What the final fit trains: the trial it refits (the first seed point's record when none finished), its planned
    epochs (0: skipped) and why, and the trial's checkpoint files it continues from (``--refit-warm``; {}: cold)."""

    trial: TrialRecord
    epochs: int
    why: str
    warm: dict[str, bytes]


def _plan(
    opts: TuneOptions, study: optuna.Study, space: SearchSpace, clock: Clock, cpus: float, results: ResultGrid | None
) -> RefitPlan | None:
    """The best trial (else, with time left, the space's first seed point) and its epochs; None: nothing to refit."""
    trial = best_trial(study, opts.metric, opts.max_latency_ms)
    epochs, why = 0, ""
    if trial is None:
        seeds = space.points_to_evaluate()
        within = f" within {opts.max_latency_ms:g} ms" if opts.max_latency_ms > 0 else ""
        if not clock.end() or not seeds or opts.max_latency_ms > 0 or clock.left() <= clock.finish_reserve_s:
            log.info(f"refit skipped: no finished trial{within}" + (" and no time left" if clock.end() else ""))
            return None
        # the portfolio always holds the plain recipe: with no finished trial, the first seed point is the final fit,
        # its epochs fitted to the time left after its first
        trial = seed_record(seeds[0])
        epochs, why = refit_cap(opts), "no trial finished in the search window: the space's first seed point"
    warm = _warm_start_files(opts, trial, results)
    if trial.number >= 0:
        epochs, why = plan_epochs(
            opts, trial, clock.left(), refit_cpus=cpus, reserve_s=clock.finish_reserve_s, warm=bool(warm)
        )
    return RefitPlan(trial=trial, epochs=epochs, why=why, warm=warm)


def _refit_config(
    opts: TuneOptions, base: TrainConfig, space: SearchSpace, plan: RefitPlan, cpus: float, gpus: float, budgeted: bool
) -> TrainConfig:
    """The trial's config for the final fit: up to the cap on a budget (fitted to the deadline after its first
    epoch), else the planned epochs; a node's threads; a warm start's restarted schedule."""
    cap = refit_cap(opts)
    cfg = build_trial_config(base, space.to_overrides(dict(plan.trial.params)))
    cfg = cfg.replace({"epochs": cap if budgeted else plan.epochs})
    cfg = cfg.replace({"threads": int(cpus) if not gpus else cfg.threads})
    if plan.warm:
        cfg = cfg.replace(
            {
                "optim.lr": cfg.optim.lr * WARM_LR_FACTOR,
                "optim.warmup_epochs": WARM_WARMUP_EPOCHS,
                "model.init_head": True,
            }
        )
    return cfg


def _log_plan(opts: TuneOptions, plan: RefitPlan, cfg: TrainConfig, cpus: float, gpus: float) -> None:
    trial, best_key = plan.trial, get_metric(opts.metric).best_key
    score = trial.best(opts.metric)
    log.info(
        f"refit of {'trial #' + str(trial.number) if trial.number >= 0 else 'the first seed point'}"
        + (f" ({best_key} {score:.4f})" if score is not None else "")
        + f": up to {cfg.epochs} epochs, fitted to the budget after the first ({plan.why}); {cpus:g} CPU, {gpus:g} GPU"
        + (f"; continues the trial's weights at {WARM_LR_FACTOR:g} x its LR" if plan.warm else "")
    )


@dataclass(frozen=True)
class RefitOutcome:
    """What the refit's Ray task (:func:`_refit_task`) hands back: its best checkpoint's files ({}: no epoch was
    checkpointed, e.g. its loss diverged in the first), its per-epoch history and its set-up seconds."""

    files: dict[str, bytes]
    history: list[EpochResult]
    setup_seconds: float = 0.0


def _run_refit_task(
    cfg: TrainConfig,
    source: PreparedSource,
    deadline: float | None,
    warm: dict[str, bytes],
    cpus: float,
    gpus: float,
    ledger: Ledger | None,
) -> RefitOutcome:
    """The final fit as one Ray task with a node's resources (:func:`_refit_task`), entered in the ledger."""
    import ray

    started = time.time()
    task: Any = ray.remote(_refit_task).options(num_cpus=cpus, num_gpus=gpus, max_retries=1)
    res: RefitOutcome = ray.get(task.remote(cfg, source, deadline, warm))
    if ledger is not None:
        _ledger_entries(ledger, res, started, time.time(), gpus or cpus)
    return res


def _collect(run: RefitRun, res: RefitOutcome, dest: Path, metric: str, seconds: float) -> RefitRun:
    """The refit task's best checkpoint -> ``dest``; ``run`` with its figures."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for name, blob in res.files.items():
        (dest / name).write_bytes(blob)
    meta = read_meta(dest)
    m = get_metric(metric)
    run = replace(
        run,
        dir=dest,
        history=res.history,
        seconds=seconds,
        epochs=int(meta["config"]["epochs"]),  # as fitted to the deadline after its first epoch
        best_epoch=int(meta["epoch"]),
        value=meta["metrics"].get(m.name),
        val={k: v for k, v in meta["metrics"].items() if k.startswith("val_")},
        stop_reason=res.history[-1].stop_reason if res.history else "",
    )
    log.info(
        f"refit done in {run.seconds:.0f} s: best epoch {run.best_epoch}/{run.epochs}, "
        f"{m.name} {run.value:.4f}" + (f" (stopped: {run.stop_reason})" if run.stop_reason else "")
    )
    return run


def _ledger_entries(ledger: Ledger, res: RefitOutcome, start: float, end: float, cores: float) -> None:
    """The final fit in the budget ledger: its set-up as overhead, its epochs as compute when it ran its planned
    schedule to the end (waste when the deadline or a divergence cut it)."""
    hist = res.history
    setup = res.setup_seconds
    stop = hist[-1].stop_reason if hist else "no epoch"
    if setup and start + setup < end:
        ledger.add("final fit set-up", "overhead", start, start + setup, cores)
        start += setup
    ledger.add("final fit", "waste" if stop else "compute", start, end, cores, stop or "finished its schedule")


def _refit_resources(opts: TuneOptions) -> tuple[float, float]:
    """One node's worth: all CPUs of the largest alive node (at most 16), or the trial's GPUs."""
    import ray

    if opts.gpus_per_trial:
        return max(opts.cpus_per_worker, 1.0), float(opts.gpus_per_trial)
    cpus = [n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")]
    return float(max(1.0, min(16.0, max(cpus or [1.0])))), 0.0


def _warm_start_files(opts: TuneOptions, trial: TrialRecord, results: ResultGrid | None) -> dict[str, bytes]:
    """The best trial's best checkpoint as files (they travel to the refit's node through the object store), or
    {} when the final fit starts from ImageNet's weights: ``--refit-warm`` off, no trial (a seed point), or no
    checkpoint of it left."""
    ray_id = trial.ray_trial_id if trial.number >= 0 else None
    if not opts.refit_warm or not ray_id or results is None:
        return {}
    with tempfile.TemporaryDirectory(prefix="edgetune-warm-") as tmp:
        d = Path(tmp) / "ckpt"
        try:
            ok = materialise_best_checkpoint(
                result_for(results, ray_id),
                {"checkpoint_uri": trial.checkpoint_uri},
                CHECKPOINT_SCORE,
                CHECKPOINT_SCORE_MODE,
                d,
            )
        except Exception as e:  # noqa: BLE001 - a checkpoint that cannot be read: the final fit starts cold
            log.info(
                f"refit: trial #{trial.number}'s checkpoint is not readable ({type(e).__name__}: {e}); "
                "the final fit starts from the backbone's pretrained weights"
            )
            return {}
        if not ok or not (d / "model.pt").is_file():
            return {}
        return {p.name: p.read_bytes() for p in d.iterdir() if p.is_file() and p.name != "train_state.pt"}


def _refit_task(
    train_config: TrainConfig, source: PreparedSource, deadline: float | None, warm: dict[str, bytes] | None = None
) -> RefitOutcome:
    """Runs on a worker: the trainer's loop in-process into a scratch run dir (from ``warm``'s weights: checkpoint
    files); returns the best checkpoint."""
    with tempfile.TemporaryDirectory(prefix="edgetune-refit-") as tmp:
        if warm:
            init = Path(tmp) / "init"
            init.mkdir()
            for name, blob in warm.items():
                (init / name).write_bytes(blob)
            train_config = train_config.replace({"model.init": str(init)})
        train_loop(
            LoopConfig(
                train_config=train_config,
                run_dir=tmp,
                source=source,
                with_test=False,
                deadline=deadline,
                fit_to_deadline=deadline is not None,
            )
        )
        best = Path(tmp) / "best"
        history = read_history(tmp)
        files = {p.name: p.read_bytes() for p in best.iterdir() if p.name != "train_state.pt"} if best.is_dir() else {}
        setup = read_meta(best)["metrics"].get("setup_seconds", 0.0) if best.is_dir() else 0.0
        return RefitOutcome(files=files, history=history, setup_seconds=float(setup or 0.0))
