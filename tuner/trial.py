"""The Tune trial: one TrainConfig built from the base config + Optuna's suggestions, trained by the
trainer's one loop. A 1-worker trial runs the loop in the trial process (``tune.report``); a
multi-worker trial launches a Ray Train ``TorchTrainer`` inside the trial (``TuneReportCallback``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trainer.config import TrainConfig


def build_trial_config(base: dict[str, Any], overrides: dict[str, Any]) -> TrainConfig:
    cfg = TrainConfig.from_dict(base).replace(overrides)
    if cfg.model.freeze > 1:  # counts only come from seed points; the space samples fractions
        cfg = cfg.replace({"model.freeze": min(1.0, cfg.model.freeze)})
    return cfg


def run_trial(config: dict[str, Any], base: dict[str, Any], space: Any, storage_path: str,
              workers: int, use_gpu: bool, cpus_per_worker: float) -> None:
    """Tune function trainable (bound with ``tune.with_parameters``)."""
    from ray import tune

    from trainer.loop import train_loop

    cfg = build_trial_config(base, space.to_overrides(_flatten(config)))
    loop_cfg = {"train_config": cfg.to_dict(), "run_dir": None, "measure_latency": True}
    if workers <= 1:
        train_loop({**loop_cfg, "report_to": "tune"})
        return
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = tune.get_context().get_trial_id()
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={**loop_cfg, "report_to": "ray_train"},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                     resources_per_worker=None if use_gpu else {"CPU": cpus_per_worker}),
        run_config=RunConfig(name=f"train-trial_id={trial_id}", storage_path=storage_path,
                             callbacks=[TuneReportCallback()],
                             checkpoint_config=CheckpointConfig(num_to_keep=1),
                             failure_config=FailureConfig(max_failures=0)),
    )
    trainer.fit()


def _train_worker(loop_config: dict[str, Any]) -> None:
    from trainer.loop import train_loop

    train_loop(loop_config)


def _flatten(config: dict[str, Any]) -> dict[str, Any]:
    """Ray may nest keys containing '/'; our parameter names are flat."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        if isinstance(v, dict):
            for k2, v2 in _flatten(v).items():
                out[f"{k}/{k2}"] = v2
        else:
            out[k] = v
    return out


def checkpoint_dir_of(result_checkpoint: Any) -> Path | None:
    if result_checkpoint is None:
        return None
    return Path(result_checkpoint.path)
