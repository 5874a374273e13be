"""Nothing trained is thrown away: after the final fit, the study's models are combined on validation.

Candidates: the final model (refit, or the best trial), every other finished trial at the same preprocessing spec,
each alone and with flip test-time views (probabilities averaged over identity, h, v, hv). Decisions, all on the
validation split, in order:

1. **test-time views** for the final model: kept when they lower its validation log-loss by more than the noise of
   the validation set (the per-image paired difference's mean beats ``NOISE_SE`` standard errors);
2. **ensemble selection** (Caruana et al. 2004: greedy, with replacement, on validation log-loss) over every
   candidate; kept (``--ensemble auto``) when it beats the best single candidate by more than the same noise;
3. **decision rule**: a post-hoc logit adjustment by the training class prior (``log p - tau * log prior``), tau
   chosen by stratified cross-validation on the validation predictions for the study's metric; kept only when the
   cross-validated gain beats its standard error. Never fitted on test.

The final model is **one graph** (:class:`Ensemble`: members, their views, weights and the decision rule; one input
at the study's preprocessing spec, one output of logits), so the exported ONNX bundle, its parity gate, the edge
server and the TensorRT path need no change. The test split is read once, afterwards, for the chosen model and
for the lever table (each step's validation and test figures, for the record; nothing is chosen on them).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from edgetune.numeric import confusion_matrix, softmax
from trainer.evaluate import metrics_from_confusion

log = logging.getLogger(__name__)

#: Test-time views (dihedral flips that keep a square image square); their probabilities are averaged.
TTA_VIEWS = ("id", "hflip", "vflip", "rot180")
#: A post-hoc step is kept when its validation gain is more than this many standard errors of the paired difference.
NOISE_SE = 1.0
#: Rounds of greedy ensemble selection (each adds one member, with replacement).
ENSEMBLE_ROUNDS = 12
#: Decision rule: the tau grid and the cross-validation folds.
TAU_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)
TAU_FOLDS = 5
ENSEMBLE_MODES = ("auto", "off")
EPS = 1e-7


def view(x: torch.Tensor, name: str) -> torch.Tensor:
    """One test-time view of an NCHW batch."""
    if name == "id":
        return x
    if name == "hflip":
        return torch.flip(x, dims=(3,))
    if name == "vflip":
        return torch.flip(x, dims=(2,))
    if name == "rot180":
        return torch.flip(x, dims=(2, 3))
    raise ValueError(f"unknown view {name!r}; views: {list(TTA_VIEWS)}")


class Ensemble(nn.Module):
    """Weighted average of members' probabilities (each member averaged over its views), minus ``tau * log prior``
    on the log scale: image batch -> logits. One member with one view and tau 0 is the member itself (up to a
    monotone transform: same argmax)."""

    def __init__(
        self,
        members: list[nn.Module],
        views: list[tuple[str, ...]],
        weights: list[float],
        log_prior: list[float] | None = None,
        tau: float = 0.0,
    ) -> None:
        super().__init__()
        if not (len(members) == len(views) == len(weights)) or not members:
            raise ValueError("an ensemble needs as many views and weights as members (at least one)")
        self.members = nn.ModuleList(members)
        self.views = [tuple(v) for v in views]
        total = float(sum(weights))
        self.register_buffer("weights", torch.tensor([w / total for w in weights], dtype=torch.float32))
        shift = torch.zeros(1) if log_prior is None else tau * torch.tensor(log_prior, dtype=torch.float32)
        self.register_buffer("shift", shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = torch.zeros((), dtype=x.dtype)
        w: torch.Tensor = self.weights  # type: ignore[assignment]
        shift: torch.Tensor = self.shift  # type: ignore[assignment]
        for i, m in enumerate(self.members):
            vs = self.views[i]
            q = sum(torch.softmax(m(view(x, v)), dim=1) for v in vs) / len(vs)
            p = p + w[i] * q
        return torch.log(torch.clamp(p, min=EPS)) - shift


@dataclass(frozen=True)
class Candidate:
    """One model of the study, with its per-view validation probabilities (the final model under every test-time
    view, the others under the identity only: each added view costs a forward pass per image, in the study and on
    the device)."""

    name: str
    kind: str  #: final | trial | probe
    ckpt: str  #: checkpoint directory ("" for a probe)
    val_views: dict[str, np.ndarray]

    def val(self, tta: bool) -> np.ndarray:
        return np.mean([self.val_views[v] for v in TTA_VIEWS], axis=0) if tta else self.val_views["id"]

    @property
    def has_views(self) -> bool:
        return all(v in self.val_views for v in TTA_VIEWS)


@dataclass(frozen=True)
class PosthocResult:
    """What post-hoc selection decided (the validation figures behind each decision) and the final model."""

    model: nn.Module
    members: tuple[dict[str, Any], ...]  #: name, kind, checkpoint, views, weight
    tta: bool
    ensemble: bool
    tau: float
    decisions: dict[str, Any]
    levers: tuple[dict[str, Any], ...] = field(default_factory=tuple)
    val_probs: np.ndarray | None = None
    test_probs: np.ndarray | None = None

    def describe(self) -> dict[str, Any]:
        return {
            "members": list(self.members),
            "test_time_views": self.tta,
            "ensemble": self.ensemble,
            "decision_rule": {"kind": "logit adjustment by class prior", "tau": self.tau} if self.tau else None,
            "decisions": self.decisions,
            "levers": list(self.levers),
        }


# -- scores -----------------------------------------------------------------------------------------------------
def nll_items(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Each item's negative log-likelihood of its label under ``p`` (probabilities ``[N, K]``)."""
    nll: np.ndarray = -np.log(np.clip(p[np.arange(len(y)), y], EPS, 1.0))
    return nll


def beats(p_new: np.ndarray, p_old: np.ndarray, y: np.ndarray, se: float = NOISE_SE) -> tuple[bool, float, float]:
    """Whether ``p_new`` has a lower validation log-loss than ``p_old`` by more than ``se`` paired standard errors;
    (kept, mean gain, standard error)."""
    d = nll_items(p_old, y) - nll_items(p_new, y)
    sd = float(d.std(ddof=1)) / math.sqrt(len(d)) if len(d) > 1 else float("inf")
    gain = float(d.mean()) if len(d) else 0.0
    return gain > se * sd and gain > 0, gain, sd


def score(pred: np.ndarray, y: np.ndarray, k: int, metric: str) -> float:
    m = metrics_from_confusion(confusion_matrix(y, pred, k))
    if metric == "val_acc":
        return float(m["accuracy"])
    if metric == "val_balanced_acc":
        rec = [r for r, s in zip(m["recall"], m["support"], strict=True) if s > 0]
        return float(np.mean(rec)) if rec else 0.0
    return float(m["macro_f1"])


def figures(p: np.ndarray | None, y: np.ndarray | None, k: int) -> dict[str, float | None]:
    if p is None or y is None:
        return {"accuracy": None, "macro_f1": None}
    m = metrics_from_confusion(confusion_matrix(y, p.argmax(1), k))
    return {"accuracy": round(float(m["accuracy"]), 4), "macro_f1": round(float(m["macro_f1"]), 4)}


def greedy_ensemble(cands: list[np.ndarray], y: np.ndarray, rounds: int = ENSEMBLE_ROUNDS) -> tuple[list[int], float]:
    """Caruana's selection with replacement: start from the best single candidate, add the one that lowers the
    averaged probabilities' log-loss most, keep the best round. Returns (count per candidate, its log-loss)."""
    losses = [float(nll_items(p, y).mean()) for p in cands]
    counts = [0] * len(cands)
    first = int(np.argmin(losses))
    counts[first] = 1
    total = cands[first].copy()
    best_counts, best_loss = list(counts), losses[first]
    for r in range(2, rounds + 1):
        trial = [float(nll_items((total + p) / r, y).mean()) for p in cands]
        j = int(np.argmin(trial))
        counts[j] += 1
        total += cands[j]
        if trial[j] < best_loss - 1e-9:
            best_counts, best_loss = list(counts), trial[j]
    return best_counts, best_loss


def adjust(p: np.ndarray, log_prior: np.ndarray, tau: float) -> np.ndarray:
    """Logit adjustment: log-probabilities less ``tau`` x the log class prior."""
    adjusted: np.ndarray = np.log(np.clip(p, EPS, 1.0)) - tau * log_prior
    return adjusted


def weighted_mean(parts: list[tuple[float, np.ndarray]]) -> np.ndarray:
    """``sum(w * p) / sum(w)`` over (weight, probabilities) pairs (at least one), summed in order."""
    total = parts[0][0] * parts[0][1]
    for w, p in parts[1:]:
        total = total + w * p
    return np.asarray(total / sum(w for w, _ in parts))


def choose_tau(
    p: np.ndarray, y: np.ndarray, log_prior: np.ndarray, metric: str, seed: int = 0, folds: int = TAU_FOLDS
) -> dict[str, Any]:
    """Tau of the logit adjustment by cross-validation on the validation predictions: on each fold, the tau that
    scores best on the other folds is applied to it; kept when the mean per-fold gain over tau 0 beats its standard
    error. Returns ``{"tau", "cv_gain", "cv_se", "kept"}`` (tau refitted on the whole split when kept)."""
    k = p.shape[1]
    rng = np.random.default_rng(seed)
    fold = np.zeros(len(y), dtype=int)
    for c in range(k):  # stratified folds
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        fold[idx] = np.arange(len(idx)) % folds
    gains = []
    for f in range(folds):
        tr, te = fold != f, fold == f
        if not te.any() or not tr.any():
            continue
        best = max(TAU_GRID, key=lambda t: (score(adjust(p[tr], log_prior, t).argmax(1), y[tr], k, metric), -t))
        gains.append(
            score(adjust(p[te], log_prior, best).argmax(1), y[te], k, metric) - score(p[te].argmax(1), y[te], k, metric)
        )
    gain = float(np.mean(gains)) if gains else 0.0
    se = float(np.std(gains, ddof=1) / math.sqrt(len(gains))) if len(gains) > 1 else float("inf")
    tau = max(TAU_GRID, key=lambda t: (score(adjust(p, log_prior, t).argmax(1), y, k, metric), -t))
    kept = bool(gain > se and gain > 0 and tau > 0)
    return {
        "tau": float(tau) if kept else 0.0,
        "tau_fitted": float(tau),
        "cv_gain": round(gain, 4),
        "cv_se": round(se, 4),
        "kept": kept,
        "metric": metric,
        "folds": len(gains),
    }


# -- predictions ------------------------------------------------------------------------------------------------
@torch.no_grad()
def view_probs(
    model: nn.Module, x: np.ndarray, views: tuple[str, ...] = TTA_VIEWS, batch: int = 64
) -> dict[str, np.ndarray]:
    model.eval()
    out: dict[str, list[np.ndarray]] = {v: [] for v in views}
    for i in range(0, len(x), batch):
        xb = torch.from_numpy(x[i : i + batch])
        for v in views:
            out[v].append(torch.softmax(model(view(xb, v)), 1).double().numpy())
    return {v: np.concatenate(a) if a else np.zeros((0, 0)) for v, a in out.items()}


@dataclass
class Inputs:
    """The validation (and, after selection, test) arrays at the study's spec, the labels and the class prior."""

    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray | None
    y_test: np.ndarray | None
    log_prior: np.ndarray
    classes: list[str]


def select(
    final_ckpt: str,
    others: list[tuple[str, str]],
    inputs: Inputs,
    metric: str,
    mode: str = "auto",
    deadline: float | None = None,
    seed: int = 0,
    rounds: int = ENSEMBLE_ROUNDS,
    extra: tuple[tuple[str, nn.Module], ...] | list[tuple[str, nn.Module]] = (),
    views: bool = True,
) -> PosthocResult:
    """Post-hoc selection over the final model (``final_ckpt``), ``others`` ((name, checkpoint dir) of trials at the
    same spec) and ``extra`` ((name, module): the probes); see the module doc. ``deadline`` (unix time): candidates
    are scored only while time is left. ``views=False`` (a latency budget measured for single models): no test-time
    views and no ensemble, the decision rule only."""
    models, cands = _score_candidates(
        final_ckpt, others if views else [], extra if views else (), inputs.x_val, deadline, views
    )
    d = _decide(cands, inputs, metric, mode if views else "off", seed, rounds)
    net = Ensemble(
        [models[c.name] for c, _, _ in d.members],
        [TTA_VIEWS if t else ("id",) for _, t, _ in d.members],
        [w for _, _, w in d.members],
        inputs.log_prior.tolist(),
        d.rule["tau"],
    ).eval()
    desc = tuple(
        {
            "name": c.name,
            "kind": c.kind,
            "checkpoint": c.ckpt,
            "views": list(TTA_VIEWS if t else ("id",)),
            "weight": round(w, 4),
        }
        for c, t, w in d.members
    )
    levers, final_test = _test_and_levers(models, cands, d, inputs)
    return PosthocResult(
        model=net,
        members=desc,
        tta=d.tta,
        ensemble=d.use_ens,
        tau=d.rule["tau"],
        decisions=d.record,
        levers=tuple(levers),
        val_probs=softmax(adjust(d.p_sel, inputs.log_prior, d.rule["tau"]), axis=1),
        test_probs=final_test,
    )


def _score_candidates(
    final_ckpt: str,
    others: list[tuple[str, str]],
    extra: Any,
    x_val: np.ndarray,
    deadline: float | None,
    views: bool = True,
) -> tuple[dict[str, nn.Module], list[Candidate]]:
    """Every candidate's validation probabilities (the final model under every view, the others under one)."""
    # tuner.options validates TuneOptions against this module's constants (torch only, no torchvision)
    from trainer.model import model_from_checkpoint  # noqa: PLC0415 - lazy: torchvision

    models: dict[str, nn.Module] = {}
    cands: list[Candidate] = []
    listed: list[tuple[str, str, str, nn.Module | None]] = [
        ("final", "final", final_ckpt, None),
        *[(n, "trial", c, None) for n, c in others],
        *[(n, "probe", "", m) for n, m in extra],
    ]
    for name, kind, ckpt, module in listed:
        if kind != "final" and deadline is not None and time.time() > deadline:
            log.info(f"post-hoc: no time left for candidate {name}; skipped")
            continue
        model = module if module is not None else model_from_checkpoint(ckpt)[0]
        models[name] = model
        vs = TTA_VIEWS if kind == "final" and views else ("id",)
        cands.append(Candidate(name, kind, ckpt, view_probs(model, x_val, vs)))
    return models, cands


@dataclass(frozen=True)
class _Decisions:
    tta: bool
    use_ens: bool
    chosen: tuple[tuple[tuple[Candidate, bool], int], ...]  #: the greedy selection: ((candidate, views), count)
    p_ens: np.ndarray
    members: tuple[tuple[Candidate, bool, float], ...]  #: what the final model is: (candidate, views, weight)
    p_sel: np.ndarray
    rule: dict[str, Any]
    record: dict[str, Any]


def _decide(cands: list[Candidate], inputs: Inputs, metric: str, mode: str, seed: int, rounds: int) -> _Decisions:
    """Test-time views, ensemble, decision rule: each on validation, each kept only beyond noise."""
    y = inputs.y_val
    final = cands[0]
    tta, gain, sd = beats(final.val(True), final.val(False), y) if final.has_views else (False, 0.0, 0.0)
    record: dict[str, Any] = {"test_time_views": {"kept": tta, "val_logloss_gain": round(gain, 5), "se": round(sd, 5)}}
    # every candidate alone, the final model also under its test-time views
    pool = [(c, t) for c in cands for t in ((False, True) if c.has_views else (False,))]
    counts, ens_loss = greedy_ensemble([c.val(t) for c, t in pool], y, rounds)
    chosen = tuple((pool[i], n) for i, n in enumerate(counts) if n)
    p_ens: np.ndarray = np.sum([n * c.val(t) for (c, t), n in chosen], axis=0) / sum(counts)
    singles = [c.val(t) for c, t in pool]
    best_single = singles[int(np.argmin([nll_items(p, y).mean() for p in singles]))]
    use_ens, g2, sd2 = beats(p_ens, best_single, y)
    # log-loss picks the members; the study's metric must not lose to the single model it replaces (a calibrated
    # member can lower log-loss while the rare classes' recall, and so macro-F1, falls)
    k = len(inputs.classes)
    single_metric = score(final.val(tta).argmax(1), y, k, metric)
    ens_metric = score(p_ens.argmax(1), y, k, metric)
    use_ens = use_ens and mode == "auto" and len(chosen) > 1 and ens_metric >= single_metric
    record["ensemble"] = {
        "kept": use_ens,
        "mode": mode,
        "candidates": len(pool),
        "val_logloss": round(ens_loss, 5),
        "val_logloss_gain_over_best_single": round(g2, 5),
        "se": round(sd2, 5),
        f"{metric}_single": round(single_metric, 4),
        f"{metric}_ensemble": round(ens_metric, 4),
        "members": [{"name": c.name, "views": "flips" if t else "id", "count": n} for (c, t), n in chosen],
    }
    members = tuple((c, t, n / sum(counts)) for (c, t), n in chosen) if use_ens else ((final, tta, 1.0),)
    p_sel: np.ndarray = p_ens if use_ens else final.val(tta)
    rule = choose_tau(p_sel, y, inputs.log_prior, metric, seed=seed)
    record["decision_rule"] = rule
    return _Decisions(tta, use_ens, chosen, p_ens, members, p_sel, rule, record)


def _test_and_levers(
    models: dict[str, nn.Module], cands: list[Candidate], d: _Decisions, inputs: Inputs
) -> tuple[list[dict[str, Any]], np.ndarray | None]:
    """The test split, read once after every decision: the chosen model's probabilities and the lever table (each
    step on validation and test, for the record)."""
    k, y, yt, final = len(inputs.classes), inputs.y_val, inputs.y_test, cands[0]
    test_views: dict[str, dict[str, np.ndarray]] = {}
    if inputs.x_test is not None:
        need = {c.name for c, _, _ in d.members} | {final.name} | {c.name for (c, _), _ in d.chosen}
        for c in cands:
            if c.name in need:
                test_views[c.name] = view_probs(models[c.name], inputs.x_test, TTA_VIEWS if c.has_views else ("id",))

    def test_of(c: Candidate, t: bool) -> np.ndarray | None:
        tv = test_views.get(c.name)
        if tv is None:
            return None
        return np.mean([tv[v] for v in TTA_VIEWS], axis=0) if t else tv["id"]

    def mix(parts: Any) -> np.ndarray | None:
        got = [(w, test_of(c, t)) for c, t, w in parts]
        present = [(w, p) for w, p in got if p is not None]
        if not got or len(present) < len(got):
            return None
        return weighted_mean(present)

    p_test_sel = mix(d.members)
    ens_test = mix([(c, t, n) for (c, t), n in d.chosen])
    tau, tau_fit = d.rule["tau"], d.rule["tau_fitted"]
    lp = inputs.log_prior
    levers = [
        {
            "name": "final model",
            "used": True,
            "val": figures(final.val(False), y, k),
            "test": figures(test_of(final, False), yt, k),
        },
        {
            "name": "+ test-time flips",
            "used": d.tta,
            "val": figures(final.val(True) if final.has_views else None, y, k),
            "test": figures(test_of(final, True) if final.has_views else None, yt, k),
        },
        {"name": "+ ensemble", "used": d.use_ens, "val": figures(d.p_ens, y, k), "test": figures(ens_test, yt, k)},
        {
            "name": "+ decision rule",
            "used": bool(tau),
            "tau": tau_fit,
            "val": figures(adjust(d.p_sel, lp, tau_fit), y, k),
            "test": figures(adjust(p_test_sel, lp, tau_fit) if p_test_sel is not None else None, yt, k),
        },
    ]
    final_test = softmax(adjust(p_test_sel, lp, tau), axis=1) if p_test_sel is not None else None
    return levers, final_test
