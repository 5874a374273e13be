"""Multi-class softmax focal loss (Lin et al. 2017) with per-class alpha and label smoothing.

Per sample ``i`` with smoothed target distribution ``q`` (``(1-eps)`` on the label, ``eps/K`` everywhere)::

    loss_i = -sum_c alpha_c * q_c * (1 - p_c)**gamma * log p_c

reduced by the alpha-weighted mean ``sum_i loss_i / sum_i alpha_{y_i}`` (plain mean without alpha). With
``gamma=0`` this is exactly ``F.cross_entropy(logits, y, weight=alpha, label_smoothing=eps)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from edgetune.errors import ConfigError
from trainer.config import ALPHA_RULES, LossConfig

_REDUCTIONS = ("mean", "sum", "none")


class FocalLoss(nn.Module):
    """Softmax focal loss; ``gamma > 0`` down-weights well-classified examples."""

    alpha: torch.Tensor | None

    def __init__(
        self,
        gamma: float = 0.0,
        alpha: torch.Tensor | None = None,
        label_smoothing: float = 0.0,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not math.isfinite(gamma) or gamma < 0:
            raise ConfigError(f"focal loss gamma must be a finite number >= 0, got {gamma!r}")
        if (
            isinstance(label_smoothing, bool)
            or not isinstance(label_smoothing, (int, float))
            or not 0.0 <= label_smoothing < 1.0
        ):
            raise ConfigError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
        if reduction not in _REDUCTIONS:
            raise ConfigError(f"reduction must be one of {list(_REDUCTIONS)}, got {reduction!r}")
        if alpha is not None:
            alpha = torch.as_tensor(alpha, dtype=torch.float32)
            if alpha.ndim != 1 or alpha.numel() < 2 or not torch.isfinite(alpha).all() or (alpha < 0).any():
                raise ConfigError(f"focal loss alpha must be one finite weight >= 0 per class, got {alpha.tolist()!r}")
            if float(alpha.sum()) <= 0:
                raise ConfigError("focal loss alpha must have at least one positive weight")
        self.gamma = float(gamma)
        self.label_smoothing = float(label_smoothing)
        self.reduction = reduction
        self.register_buffer("alpha", alpha)

    def extra_repr(self) -> str:
        a = None if self.alpha is None else [round(v, 4) for v in self.alpha.tolist()]
        return f"gamma={self.gamma}, alpha={a}, label_smoothing={self.label_smoothing}"

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.ndim != 2 or target.ndim != 1 or target.shape[0] != logits.shape[0]:
            raise ValueError(
                f"FocalLoss expects logits [N, K] and targets [N], got {tuple(logits.shape)} and {tuple(target.shape)}"
            )
        k = logits.shape[1]
        if self.alpha is not None and self.alpha.numel() != k:
            raise ConfigError(f"focal loss alpha has {self.alpha.numel()} weights but the logits have {k} classes")
        logp = F.log_softmax(logits.float(), dim=1)
        q = F.one_hot(target, k).to(logp.dtype)
        if self.label_smoothing:
            q = q * (1.0 - self.label_smoothing) + self.label_smoothing / k
        per_class = -q * logp
        if self.gamma:
            # 1 - p computed as -expm1(log p) (accurate near p=1); clamped so gamma < 1 keeps finite gradients.
            one_minus_p = (-torch.expm1(logp)).clamp(min=1e-6)
            per_class = per_class * one_minus_p.pow(self.gamma)
        if self.alpha is not None:
            per_class = per_class * self.alpha.to(per_class.device)[None, :]
        loss = per_class.sum(dim=1)
        if self.reduction == "none":
            return loss
        if self.reduction == "sum":
            return loss.sum()
        denom = self.alpha.to(loss.device)[target].sum() if self.alpha is not None else loss.new_tensor(len(loss))
        return loss.sum() / denom


def inverse_frequency(class_counts: Sequence[int], power: float = 1.0) -> torch.Tensor:
    """alpha 'auto' (power 1): weights proportional to 1 / count; 'sqrt' (power 0.5): 1 / sqrt(count), a milder
    rebalancing that costs the majority class less accuracy. Normalised to mean 1."""
    counts = torch.tensor([float(c) for c in class_counts])
    w = counts**-power
    return w * (len(w) / w.sum())


def build_loss(cfg: LossConfig, class_counts: list[int]) -> nn.Module:
    """FocalLoss per ``cfg``. ``alpha="auto"`` = inverse class frequency of ``class_counts`` (normalised to mean 1),
    ``"sqrt"`` = inverse square root of it; an explicit alpha list must have one weight per class."""
    if not isinstance(cfg, LossConfig):
        raise ConfigError(f"build_loss needs a LossConfig, got {type(cfg).__name__}")
    if (
        not isinstance(class_counts, (list, tuple))
        or len(class_counts) < 2
        or any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in class_counts)
    ):
        raise ConfigError(f"class_counts must be a list of >= 2 non-negative integers, got {class_counts!r}")
    alpha: torch.Tensor | None = None
    if cfg.alpha in ALPHA_RULES:
        empty = [i for i, c in enumerate(class_counts) if c == 0]
        if empty:
            raise ConfigError(
                f"loss.alpha={cfg.alpha!r} needs training images of every class; class index(es) "
                f"{empty} have none (use explicit weights or alpha=null)"
            )
        alpha = inverse_frequency(class_counts, 1.0 if cfg.alpha == "auto" else 0.5)
    elif cfg.alpha is not None:
        if len(cfg.alpha) != len(class_counts):
            raise ConfigError(
                f"loss.alpha has {len(cfg.alpha)} weights but the dataset has {len(class_counts)} "
                "classes; give one weight per class, 'auto' or null"
            )
        alpha = torch.tensor([float(a) for a in cfg.alpha])
    return FocalLoss(gamma=cfg.gamma, alpha=alpha, label_smoothing=cfg.label_smoothing)
