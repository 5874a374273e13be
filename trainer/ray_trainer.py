"""The one Ray Train ``TorchTrainer`` factory: ``make train``'s DDP run (:mod:`trainer.run`) and the tuner's
multi-worker trials (:mod:`tuner.trial`) build their trainer here, so both keep the same checkpoints.

Checkpoint retention follows :mod:`trainer.metric`'s best-epoch rule: every epoch reports
``CHECKPOINT_SCORE`` (its epoch number when it is the run's best so far, else -1) and Ray keeps the
checkpoint that scores highest by ``CHECKPOINT_SCORE_MODE``, i.e. the best epoch's (ties keep the earlier
epoch). Ray also keeps the latest checkpoint, which a restarted worker group resumes from.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from trainer.metric import CHECKPOINT_SCORE, CHECKPOINT_SCORE_MODE

#: Ray placement-group strategies for a DDP run's workers (``ScalingConfig.placement_strategy``).
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


def checkpoint_config() -> Any:
    """Ray's ``CheckpointConfig`` of every edgetune Train run: the best epoch's checkpoint (plus the latest)."""
    from ray.train import CheckpointConfig

    return CheckpointConfig(
        num_to_keep=1, checkpoint_score_attribute=CHECKPOINT_SCORE, checkpoint_score_order=CHECKPOINT_SCORE_MODE
    )


def make_torch_trainer(
    loop_config: dict[str, Any],
    *,
    workers: int,
    use_gpu: bool,
    name: str,
    storage_path: str,
    max_failures: int,
    resources_per_worker: Mapping[str, float] | None = None,
    placement_strategy: str = "PACK",
    callbacks: Sequence[Any] = (),
    loop_fn: Callable[[dict[str, Any]], Any] | None = None,
) -> Any:
    """A ``TorchTrainer`` running ``loop_fn`` (default :func:`trainer.loop.train_worker`) on ``workers`` DDP
    workers (nccl on GPU, gloo on CPU); ``max_failures`` restarts of a crashed worker group from its latest
    checkpoint; checkpoints kept per :func:`checkpoint_config`. Nothing runs until ``fit()``."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if loop_fn is None:
        from trainer.loop import train_worker  # noqa: PLC0415 - lazy: torch

        loop_fn = train_worker
    return TorchTrainer(
        loop_fn,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=workers,
            use_gpu=use_gpu,
            resources_per_worker=dict(resources_per_worker or {}) or None,
            placement_strategy=placement_strategy,
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            callbacks=list(callbacks) or None,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=checkpoint_config(),
        ),
    )
