"""The Tune trial: one TrainConfig built from the base config + Optuna's suggestions, trained by the
trainer's one loop. A 1-worker trial runs the loop in the trial process (``tune.report``); a
multi-worker trial launches a Ray Train ``TorchTrainer`` inside the trial (``TuneReportCallback``).

Work that does not change between trials is not redone here: the dataset arrives scanned, hashed and split
(:class:`trainer.data.PreparedSource`, prepared once by the study), its resized pixels come from the
node's content-keyed disk cache, and the frozen prefix's activations from the activation cache. The test
split is not loaded at all.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from edgetune.errors import EdgetuneError
from trainer.config import TrainConfig
from trainer.loop_config import LoopConfig
from trainer.metric import CHECKPOINT_SCORE, CHECKPOINT_SCORE_MODE
from trainer.ray_trainer import make_torch_trainer
from tuner import _ray_compat, device
from tuner.device import LATENCY_MS
from tuner.space import build_trial_config as build_trial_config  # re-exported: tuner/refit.py imports it here
from tuner.space import flatten_params

if TYPE_CHECKING:
    from tuner.space import SearchSpace


@dataclass(frozen=True)
class TrialResources:
    """How one trial runs: workers (>1 = DDP via Ray Train), GPUs, CPUs and custom resources per worker."""

    workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    resources_per_worker: dict[str, float] = field(default_factory=dict)  #: extra custom resources, e.g. {"slot": 1}
    placement_strategy: str = "PACK"  #: Ray placement group strategy for a DDP trial's workers
    max_failures: int = 1  #: restarts of a crashed DDP worker group from its latest checkpoint
    storage_path: str = ""  #: Ray storage path (local dir or s3://…) for the Train runs of DDP trials


@dataclass(frozen=True)
class TrialContext:
    """What every trial of a study shares (bound once with ``tune.with_parameters``)."""

    base: TrainConfig  #: the study's base config (each trial applies its sampled values to it)
    space: SearchSpace
    res: TrialResources
    source: Any = None  #: trainer.data.PreparedSource
    deadline: float | None = None  #: unix time: no epoch may end after it (the study's search budget)
    latency: Any = None  #: tuner.device.LatencySetup: time the architecture (on the target) before training


def run_trial(config: dict[str, Any], ctx: TrialContext) -> None:
    """Tune function trainable (bound with ``tune.with_parameters``)."""
    from ray import tune

    from trainer.loop import train_loop  # noqa: PLC0415 - lazy: torch

    if ctx.deadline is not None and time.time() >= ctx.deadline:
        # suggested while budget remained, but it waited for resources until the search deadline: end without
        # training (the searcher records it FAIL with the reason) so the refit gets the node at once
        return
    flat = flatten_params(config)
    cfg = build_trial_config(ctx.base, ctx.space.to_overrides(flat))
    static: dict[str, Any] = {}
    if ctx.latency is not None:
        static = _latency(ctx, cfg, flat)
        if static.get("rejected_reason"):  # too slow for the constraint: recorded PRUNED with the reason
            tune.report(static)
            return
        if ctx.latency.target and LATENCY_MS not in static:
            # no timing from the target (its node is down and did not return in time): the second objective is
            # missing, so training would be wasted; the searcher records FAIL with this reason
            tune.report(static)
            return
    # every run finishes what it starts: a 1-worker trial fits its epochs (and LR schedule) to the search deadline
    # after its first epoch, so the deadline never cuts it mid-schedule (it completes at that fidelity)
    lc = LoopConfig(
        train_config=cfg,
        static_metrics=static,
        deadline=ctx.deadline,
        source=ctx.source,
        with_test=False,
        fit_to_deadline=ctx.deadline is not None and ctx.res.workers <= 1,
    )
    if ctx.res.workers <= 1:
        train_loop(lc.replace(report_to="tune"))
        return
    trainer = ddp_trainer(
        lc.replace(report_to="ray_train").to_dict(),
        ctx.res,
        tune.get_context().get_trial_id(),
        callbacks=[_report_callback()],
    )
    trainer.fit()


def _latency(ctx: TrialContext, cfg: TrainConfig, flat: dict[str, Any]) -> dict[str, Any]:
    """The architecture's latency on the target (timed there first if no trial has), as result keys; with
    ``rejected_reason`` when the constraint rejects it."""
    setup = ctx.latency
    precision = str(flat.get(setup.precision_param, "fp32")) if setup.precision_param else "fp32"
    if ctx.source is None:
        raise EdgetuneError("a latency-timed trial needs the study's prepared data source (its class count)")
    num_classes = len(ctx.source.classes)
    t0 = time.perf_counter()
    metrics = device.latency_metrics(device.get_latency(setup, cfg, num_classes, precision), setup)
    metrics["latency_wait_s"] = round(time.perf_counter() - t0, 3)
    reason = device.rejection(metrics, setup.max_latency_ms)
    if reason:
        metrics["rejected_reason"] = reason
    return metrics


def ddp_trainer(loop_cfg: dict[str, Any], res: TrialResources, trial_id: str, callbacks: Sequence[Any] = ()) -> Any:
    """A multi-worker trial's ``TorchTrainer`` from the trainer's one factory (the best epoch's checkpoint is
    kept, as in ``make train``) with the trial's resources; ``callbacks``: the report callback in a Tune trial."""
    per_worker = dict(res.resources_per_worker)
    if not res.use_gpu:
        per_worker.setdefault("CPU", res.cpus_per_worker)
    return make_torch_trainer(
        loop_cfg,
        workers=res.workers,
        use_gpu=res.use_gpu,
        name=f"train-trial_id={trial_id}",
        storage_path=res.storage_path,
        max_failures=res.max_failures,
        resources_per_worker=per_worker,
        placement_strategy=res.placement_strategy,
        callbacks=callbacks,
    )


def _report_callback() -> Any:
    """``TuneReportCallback`` that also forwards every rank's node id and the best epoch's checkpoint URI."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class _Callback(TuneReportCallback):
        def __init__(self) -> None:
            super().__init__()  # type: ignore[no-untyped-call]  # Ray's __init__ is unannotated
            self.best: dict[str, Any] = {}

        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            first = metrics[0].copy()
            first["worker_node_ids"] = [m.get("node_id") for m in metrics]
            self.best = best_checkpoint(self.best, first, checkpoint)
            first.update({k: v for k, v in self.best.items() if k != "score"})
            _ray_compat.forward_report(self, first)

    return _Callback()


def best_checkpoint(best: dict[str, Any], metrics: dict[str, Any], checkpoint: Any) -> dict[str, Any]:
    """``{"score", "checkpoint_path", "checkpoint_uri"}`` of the run's best checkpoint after this report: the
    one ``trainer.metric.CHECKPOINT_SCORE`` ranks highest (the one the Train run keeps; ties keep the earlier)."""
    if checkpoint is None:
        return best
    score = float(metrics.get(CHECKPOINT_SCORE, -1))
    if best and not (score > best["score"] if CHECKPOINT_SCORE_MODE == "max" else score < best["score"]):
        return best
    return {"score": score, "checkpoint_path": checkpoint.path, "checkpoint_uri": checkpoint_uri(checkpoint)}


def checkpoint_uri(checkpoint: Any) -> str:
    """``path`` for a local checkpoint, ``<scheme>://path`` for one on S3/GCS/…"""
    path = str(getattr(checkpoint, "path", ""))
    fs = getattr(checkpoint, "filesystem", None)
    scheme = getattr(fs, "type_name", "local") if fs is not None else "local"
    return path if scheme == "local" else f"{scheme}://{path}"
