"""Focal loss: equals cross-entropy at gamma=0, down-weights easy examples, alpha auto."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from edgetune.errors import ConfigError
from trainer.config import LossConfig
from trainer.losses import FocalLoss, build_loss


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(16, 4, generator=g) * 3, torch.randint(0, 4, (16,), generator=g)


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_gamma0_no_alpha_equals_cross_entropy(batch, eps):
    logits, y = batch
    ours = FocalLoss(gamma=0.0, label_smoothing=eps)(logits, y)
    ref = F.cross_entropy(logits, y, label_smoothing=eps)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_gamma0_with_alpha_equals_weighted_cross_entropy(batch, eps):
    logits, y = batch
    w = torch.tensor([0.5, 2.0, 1.0, 3.0])
    ours = FocalLoss(alpha=w, label_smoothing=eps)(logits, y)
    torch.testing.assert_close(ours, F.cross_entropy(logits, y, weight=w, label_smoothing=eps), rtol=1e-5, atol=1e-6)


def test_gamma_matches_formula_and_downweights_easy_examples():
    logits = torch.tensor([[6.0, 0.0, 0.0], [0.2, 0.0, 0.0]])  # first easy (p_t ~ 0.995), second hard
    y = torch.tensor([0, 0])
    ce = F.cross_entropy(logits, y, reduction="none")
    fl = FocalLoss(gamma=2.0, reduction="none")(logits, y)
    p_t = torch.exp(-ce)
    torch.testing.assert_close(fl, (1 - p_t) ** 2 * ce)
    ratio = fl / ce
    assert ratio[0] < 1e-4 and ratio[1] > 0.3
    assert (fl <= ce).all()


def test_small_gamma_keeps_gradients_finite_for_confident_predictions():
    logits = torch.tensor([[60.0, -60.0, 0.0], [0.0, 1.0, 2.0]], requires_grad=True)
    loss = FocalLoss(gamma=0.25, label_smoothing=0.1)(logits, torch.tensor([0, 2]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


def test_build_loss_alpha_auto_is_inverse_frequency():
    loss = build_loss(LossConfig(gamma=0.25, alpha="auto"), [10, 30, 60])
    a = loss.alpha
    torch.testing.assert_close(a / a[0], torch.tensor([1.0, 1 / 3, 1 / 6]))
    assert a.mean().item() == pytest.approx(1.0)
    assert loss.gamma == 0.25
    assert build_loss(LossConfig(), [5, 5]).alpha is None


def test_build_loss_alpha_list_and_errors():
    loss = build_loss(LossConfig(alpha=(1.0, 2.0)), [3, 4])
    torch.testing.assert_close(loss.alpha, torch.tensor([1.0, 2.0]))
    with pytest.raises(ConfigError, match="2 weights but the dataset has 3 classes"):
        build_loss(LossConfig(alpha=(1.0, 2.0)), [3, 4, 5])
    with pytest.raises(ConfigError, match="have none"):
        build_loss(LossConfig(alpha="auto"), [3, 0, 5])
    with pytest.raises(ConfigError, match="class_counts"):
        build_loss(LossConfig(), [3])
    with pytest.raises(ConfigError, match="3 weights but the logits have 4"):
        FocalLoss(alpha=torch.ones(3))(torch.zeros(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ConfigError, match="gamma"):
        FocalLoss(gamma=-1.0)
