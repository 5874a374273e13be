"""Weight averaging of a run (``optim.ema_decay``): an exponential moving average of the trainable weights, updated
after every optimiser step, evaluated beside the raw weights at every validation (its BatchNorm statistics
recomputed on training images first, since averaged weights need their own); the better of the two on the run's
metric is the epoch's result and its checkpoint (``weights: ema | raw`` in the metrics).

The decay warms up (``min(decay, (1 + t) / (10 + t))`` at update ``t``, as timm's ModelEmaV3), so a short run is not
dominated by its initial weights."""

from __future__ import annotations

import copy

import torch

from trainer.checkpoint import unwrap


class Ema:
    """The averaged copy of ``model`` (same class, same ``input_cut``; eval mode, no gradients)."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay must be in (0, 1), got {decay}")
        src = unwrap(model)
        self.decay = float(decay)
        self.updates = 0
        self.module = copy.deepcopy(src).eval()  # requires_grad as the source's: tells BatchNorm layers to recompute
        self._pairs = [
            (e, p) for e, p in zip(self.module.parameters(), src.parameters(), strict=True) if p.requires_grad
        ]

    def decay_now(self) -> float:
        return min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        """After an optimiser step: ema <- d * ema + (1 - d) * weights (trainable ones; frozen ones never move)."""
        self.updates += 1
        if self._pairs:
            ema, cur = zip(*self._pairs, strict=True)
            torch._foreach_lerp_(list(ema), [p.detach() for p in cur], 1.0 - self.decay_now())

    def sync_input_cut(self, model: torch.nn.Module) -> None:
        from trainer.model import edge_model  # noqa: PLC0415 - lazy: efficientnet_lite_pytorch, torchvision

        edge_model(self.module).input_cut = edge_model(model).input_cut
