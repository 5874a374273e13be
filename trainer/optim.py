"""Optimiser and learning-rate schedule of the training loop (:mod:`trainer.loop`)."""

from __future__ import annotations

import math

import torch

from trainer.checkpoint import unwrap
from trainer.config import TrainConfig


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    from trainer.model import param_groups  # noqa: PLC0415 - lazy: efficientnet_lite_pytorch, torchvision

    module = unwrap(model)
    groups = param_groups(module, cfg.optim.lr, cfg.optim.backbone_lr_mult, cfg.optim.weight_decay)  # type: ignore[arg-type]
    o = cfg.optim
    if o.optimizer == "adam":
        return torch.optim.Adam(groups, lr=o.lr)
    if o.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=o.lr)
    return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.momentum > 0)


class Schedule:
    """LR factor per step: warm-up, then cosine (or constant) down to 0 at ``total`` steps. A callable object
    (not a closure) so ``LambdaLR.state_dict`` keeps ``total`` and a resumed run continues the same curve."""

    def __init__(self, total: int, warm: int, kind: str) -> None:
        self.total, self.warm, self.kind = max(1, total), warm, kind

    def __call__(self, step: int) -> float:
        if self.warm and step < self.warm:
            return (step + 1) / self.warm
        if self.kind == "constant":
            return 1.0
        progress = (step - self.warm) / max(1, self.total - self.warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_scheduler(
    cfg: TrainConfig, opt: torch.optim.Optimizer, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Warm-up then cosine (or constant) over ``cfg.epochs`` epochs: the schedule of the full run, whatever
    epoch a scheduler (ASHA) or the deadline stops it at, so early epochs compare configurations fairly."""
    sched = Schedule(cfg.epochs * steps_per_epoch, int(cfg.optim.warmup_epochs * steps_per_epoch), cfg.optim.schedule)
    return torch.optim.lr_scheduler.LambdaLR(opt, sched)
