"""BatchNorm statistics after fine-tuning (``model.bn_stats``): recomputed on training images, or a momentum suited
to the number of steps. The EfficientNet-Lite package carries TensorFlow's momentum (PyTorch ``0.01``): after a few
dozen steps its running statistics are still mostly ImageNet's, so evaluation collapses while training looks fine.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn.modules.batchnorm import _BatchNorm


def trainable_bns(model: torch.nn.Module) -> list[_BatchNorm]:
    return [
        m
        for m in model.modules()
        if isinstance(m, _BatchNorm) and m.track_running_stats and any(p.requires_grad for p in m.parameters())
    ]


def suit_bn_momentum(model: torch.nn.Module, steps_per_epoch: int) -> float:
    """``bn_stats: momentum``: raise the momentum of trainable BatchNorm layers so that one epoch replaces 99 %
    of the statistics the weights came with (the EfficientNet-Lite package carries TensorFlow's 0.01)."""
    m = 1.0 - 0.01 ** (1.0 / max(1, steps_per_epoch))
    for bn in trainable_bns(model):
        bn.momentum = max(float(bn.momentum or 0.0), m)
    return m


@torch.no_grad()
def recompute_bn_stats(model: torch.nn.Module, batches: Any, device: torch.device) -> int:
    """``bn_stats: recompute``: exact running statistics of the trainable BatchNorm layers for the current
    weights, averaged over ``batches`` of training images in the evaluation transform ("precise BN"). Frozen
    BatchNorm layers keep theirs. Returns the number of images used."""
    bns = trainable_bns(model)
    if not bns:
        return 0
    was_training = model.training
    momenta = [bn.momentum for bn in bns]
    model.eval()
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the batches below
        bn.train()
    n = 0
    try:
        for x in batches:
            model(x.to(device, non_blocking=True))
            n += len(x)
    finally:
        for bn, mom in zip(bns, momenta, strict=True):
            bn.momentum = mom
        model.train(was_training)
        if not was_training:
            model.eval()
    return n
