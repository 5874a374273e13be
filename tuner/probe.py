"""Probe stage: the cheapest fidelity. A linear head on frozen, pooled ImageNet features of a backbone, fitted in
seconds, ranks (backbone, input size) on validation for the price of one forward pass over the data, and is a model
in its own right (an ensemble candidate of tuner/posthoc.py: different features from a fine-tuned model, so
averaging them gains).

Per (backbone, size): pooled features of the training split under the flip views (identity, h, v, hv: four
training views for the price of four forward passes, no augmentation noise), of the validation split; features
standardised on the training split; softmax regression by L-BFGS with the L2 strength chosen on validation
log-loss. Runs as one Ray task holding the node's CPUs (or a GPU); probes are taken in the space's order while the
next one's estimated cost fits the probe budget (the first probe's measured seconds per image, scaled by the next
backbone's parameter count and pixels).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from edgetune.numeric import confusion_matrix
from trainer.backbones import get_backbone_info
from trainer.config import DataConfig, ModelConfig, TrainConfig
from trainer.data import build_data
from trainer.evaluate import metrics_from_confusion
from trainer.export import eval_arrays
from trainer.model import create_model, preprocess_spec_for
from tuner.posthoc import TTA_VIEWS, view
from tuner.refit import THREAD_EFFICIENCY, _refit_resources

if TYPE_CHECKING:
    from trainer.data import PreparedSource
    from tuner.ledger import Ledger
    from tuner.options import TuneOptions
    from tuner.space import SearchSpace


log = logging.getLogger(__name__)

#: L2 strengths tried for each head (chosen on validation log-loss).
L2_GRID = (1e-4, 1e-3, 1e-2, 3e-2)
#: The least probe budget that runs a first probe (its cost is unknown until one ran).
PROBE_MIN_S = 20.0
#: Views of the training split the head is fitted on.
TRAIN_VIEWS = ("id", "hflip", "vflip", "rot180")


class ProbeModel(nn.Module):
    """Frozen backbone -> pooled features -> standardise -> linear: image batch -> logits."""

    def __init__(
        self, backbone: nn.Module, mean: torch.Tensor, std: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
    ) -> None:
        super().__init__()
        self.backbone = backbone.eval()
        self.register_buffer("mean", mean.float())
        self.register_buffer("std", std.float())
        self.head = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.head.weight.copy_(weight)
            self.head.bias.copy_(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.head((self.backbone(x) - self.mean) / self.std)
        return logits


@dataclass(frozen=True)
class ProbeResult:
    """One probe: its place in the ranking and the head (arrays, so it crosses the Ray boundary as data)."""

    backbone: str
    img: int
    val_accuracy: float
    val_macro_f1: float
    val_logloss: float
    l2: float
    seconds: float
    images: int
    feature_seconds: float  #: of ``seconds``, the forward passes over ``images`` (the node's speed, no set-up)
    mean: np.ndarray
    std: np.ndarray
    weight: np.ndarray
    bias: np.ndarray

    @property
    def name(self) -> str:
        return f"probe {self.backbone}@{self.img}"

    def row(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if not isinstance(v, np.ndarray)}

    def model(self, num_classes: int) -> nn.Module:
        """The probe as an image -> logits module (the backbone's ImageNet weights, rebuilt locally)."""
        base = create_model(ModelConfig(backbone=self.backbone, img_size=self.img), num_classes=num_classes)
        return ProbeModel(
            base.backbone,
            torch.tensor(self.mean),
            torch.tensor(self.std),
            torch.tensor(self.weight),
            torch.tensor(self.bias),
        ).eval()


@torch.no_grad()
def features(backbone: nn.Module, x: np.ndarray, views: tuple[str, ...], batch: int = 64) -> np.ndarray:
    """Pooled features ``[len(views) * N, D]`` (view-major)."""
    backbone.eval()
    out = []
    for v in views:
        for i in range(0, len(x), batch):
            out.append(backbone(view(torch.from_numpy(x[i : i + batch]), v)).float().numpy())
    return np.concatenate(out)


def fit_head(
    f_tr: np.ndarray, y_tr: np.ndarray, f_val: np.ndarray, y_val: np.ndarray, k: int, grid: tuple[float, ...] = L2_GRID
) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Softmax regression on standardised features, L2 chosen on validation log-loss:
    (weight [K, D], bias [K], l2, val log-loss). The path runs from the strongest L2 down, each fit warm-started
    from the previous one (a few L-BFGS iterations each)."""
    xt, yt = torch.from_numpy(np.ascontiguousarray(f_tr, dtype=np.float32)), torch.from_numpy(y_tr).long()
    xv, yv = torch.from_numpy(np.ascontiguousarray(f_val, dtype=np.float32)), torch.from_numpy(y_val).long()
    best: tuple[float, Any, Any, float] | None = None
    lin = nn.Linear(xt.shape[1], k)
    nn.init.zeros_(lin.weight)
    nn.init.zeros_(lin.bias)
    for l2 in sorted(grid, reverse=True):
        _fit_multinomial(lin, xt, yt, l2)
        with torch.no_grad():
            nll = float(nn.functional.cross_entropy(lin(xv), yv))
        if math.isfinite(nll) and (best is None or nll < best[0]):
            best = (nll, lin.weight.detach().clone().numpy(), lin.bias.detach().clone().numpy(), l2)
    if best is None:
        raise RuntimeError("probe head: every L2 strength diverged")
    return best[1], best[2], best[3], best[0]


def _fit_multinomial(lin: nn.Linear, x: torch.Tensor, y: torch.Tensor, l2: float, max_iter: int = 100) -> None:
    """Multinomial logistic regression with an L2 penalty on the weights, by L-BFGS from ``lin``'s weights."""
    opt = torch.optim.LBFGS(
        lin.parameters(),
        lr=1.0,
        max_iter=max_iter,
        history_size=10,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-5,
        tolerance_change=1e-7,
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(lin(x), y) + 0.5 * l2 * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)


def run_probe(backbone: str, img: int, data_cfg: DataConfig, source: PreparedSource, threads: int) -> ProbeResult:
    """One probe, start to end (on a worker): data at the backbone's spec, features, head."""
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    mcfg = ModelConfig(backbone=backbone, img_size=img)
    spec = preprocess_spec_for(mcfg)
    data = build_data(data_cfg, spec, source=source, with_test=False)
    k = len(data.classes)
    model = create_model(mcfg, num_classes=k)
    x_tr, y_tr = eval_arrays(data.train_eval, spec)
    x_val, y_val = eval_arrays(data.val, spec)
    t_feat = time.perf_counter()
    f_tr = features(model.backbone, x_tr, TRAIN_VIEWS)
    f_val = features(model.backbone, x_val, ("id",))
    feature_seconds = time.perf_counter() - t_feat
    mean, std = f_tr.mean(0), f_tr.std(0) + 1e-6
    w, b, l2, nll = fit_head((f_tr - mean) / std, np.tile(y_tr, len(TRAIN_VIEWS)), (f_val - mean) / std, y_val, k)
    pred = ((f_val - mean) / std @ w.T + b).argmax(1)
    m = metrics_from_confusion(confusion_matrix(y_val, pred, k))
    return ProbeResult(
        backbone=backbone,
        img=img,
        val_accuracy=float(m["accuracy"]),
        val_macro_f1=float(m["macro_f1"]),
        val_logloss=nll,
        l2=l2,
        seconds=time.perf_counter() - t0,
        images=len(x_tr) * len(TRAIN_VIEWS) + len(x_val),
        feature_seconds=feature_seconds,
        mean=mean.astype(np.float32),
        std=std.astype(np.float32),
        weight=w,
        bias=b,
    )


def _relative_cost(backbone: str, img: int) -> float:
    """Parameter count x pixels: a proxy of a forward pass's cost (only ratios are used)."""
    params = sum(p.numel() for p in get_backbone_info(backbone).build(False, 64).parameters())
    return float(params) * img * img


def plan(space: SearchSpace, base: TrainConfig, fixed_img: int = 0) -> list[tuple[str, int]]:
    """(backbone, size) pairs to probe, in the space's order: each backbone with weights at the sizes its seed
    points use (else the base size; ``fixed_img``: that size only)."""
    pairs: list[tuple[str, int]] = []
    default = int(fixed_img or base.model.img_size)
    for b in space.backbones or [base.model.backbone]:
        sizes = (
            []
            if fixed_img
            else sorted({int(p["img"]) for p in space.points_to_evaluate() if p.get("backbone") == b and "img" in p})
        )
        for s in sizes or [default]:
            if (b, s) not in pairs:
                pairs.append((b, s))
    return pairs


def probe_stage(
    opts: TuneOptions,
    base: TrainConfig,
    space: SearchSpace,
    source: PreparedSource,
    budget_s: float,
    ledger: Ledger | None = None,
) -> list[ProbeResult]:
    """Probes in plan order while the next one's estimated cost fits ``budget_s``; each a Ray task with the node's
    CPUs (or one GPU). Returns the probes, best validation log-loss first."""
    import ray

    cpus, gpus = _refit_resources(opts)
    task = ray.remote(run_probe).options(num_cpus=cpus, num_gpus=gpus, max_retries=0)
    left, per_cost = budget_s, None
    done: list[ProbeResult] = []
    if budget_s < PROBE_MIN_S:
        log.info(f"probe stage skipped: its {budget_s:.0f} s share of the budget is under {PROBE_MIN_S:.0f} s")
        return done
    for backbone, img in plan(space, base, opts.img):
        cost = _relative_cost(backbone, img)
        if per_cost is not None and per_cost * cost > left:
            log.info(
                f"probe {backbone}@{img}: ~{per_cost * cost:.0f} s would not fit the {left:.0f} s left "
                "of the probe budget; the probe stage ends"
            )
            break
        if left <= 0:
            break
        t0 = time.time()
        ref = task.remote(backbone, img, base.data, source, int(cpus) if not gpus else 0)
        try:
            # the first probe's cost is unknown: it may overrun what is left of its share by half, no more
            res = ray.get(ref, timeout=max(PROBE_MIN_S, 1.5 * left))
        except Exception as e:  # noqa: BLE001 - a probe that fails or overruns is left out with the reason
            ray.cancel(ref, force=True)
            log.warning(
                f"probe {backbone}@{img} failed or overran ({type(e).__name__}: {e}); left out, and the probe "
                "stage ends"
            )
            if ledger is not None:
                ledger.add(f"probe {backbone}@{img}", "waste", t0, time.time(), gpus or cpus, "failed")
            break
        spent = time.time() - t0
        left -= spent
        per_cost = spent / cost if per_cost is None else max(per_cost, spent / cost)
        if ledger is not None:
            ledger.add(f"probe {backbone}@{img}", "compute", t0, time.time(), gpus or cpus)
        done.append(res)
        log.info(
            f"{res.name}: val acc {res.val_accuracy:.4f}, macro-F1 {res.val_macro_f1:.4f}, log-loss "
            f"{res.val_logloss:.4f} (L2 {res.l2:g}) in {spent:.0f} s"
        )
    done.sort(key=lambda r: r.val_logloss)
    return done


def trial_epoch_seconds(
    probes: list[ProbeResult], source: PreparedSource, base: TrainConfig, probe_threads: float, trial_threads: float
) -> float:
    """A fine-tuning trial's epoch, estimated from the fastest probe's measured seconds per forward image: a
    training step costs ~3 forward passes (forward + backward), then validation and BatchNorm recompute for the
    raw and the averaged weights; scaled from the probe's threads to the trial's (at 0.7 parallel efficiency)."""
    per_image = min(p.feature_seconds / max(1, p.images) for p in probes)
    n_train, n_val = len(source.parts.get("train", [])), len(source.parts.get("val", []))
    bn = min(n_train, int(base.model.bn_images or n_train))
    forwards = 3 * n_train + 2 * (n_val + bn)
    scale = max(1.0, probe_threads / max(trial_threads, 1e-9) * THREAD_EFFICIENCY)
    return per_image * forwards * scale


#: Other candidates the post-hoc stage is expected to score beside the final model (two trials, a probe).
FINISH_OTHERS = 3
#: Fixed seconds of the finish (ONNX export and checker, files, plots).
FINISH_FIXED_S = 25.0


def finish_reserve(probes: list[ProbeResult], source: PreparedSource, ensemble: bool) -> float:
    """Seconds to keep after the final fit: the post-hoc forward passes (the final model under 4 views, each other
    candidate under 1, over validation and then test) and the export's parity passes (PyTorch and ONNX Runtime
    over test) at the fastest probe's measured seconds per image, with a 1.5 x margin."""
    per_image = min(p.feature_seconds / max(1, p.images) for p in probes)
    n_val, n_test = len(source.parts.get("val", [])), len(source.parts.get("test", []))
    per_item = len(TTA_VIEWS) + (FINISH_OTHERS if ensemble else 0)
    passes = per_item * (n_val + n_test) + 2 * per_item * n_test
    return FINISH_FIXED_S + 1.5 * per_image * passes
