"""Post-hoc selection (tuner/posthoc.py): the decisions on validation predictions, and the final model as one graph
(ONNX parity with PyTorch). Pure arithmetic on synthetic probabilities plus one small real model export."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tuner import posthoc


def _probs(y: np.ndarray, k: int, right: float, rng: np.random.Generator) -> np.ndarray:
    """Probabilities that put ``right`` mass on the true class for a random 70 % of items, noise elsewhere."""
    p = rng.dirichlet(np.ones(k), size=len(y))
    hit = rng.random(len(y)) < 0.7
    p[hit] *= 1 - right
    p[hit, y[hit]] += right
    return p / p.sum(1, keepdims=True)


def test_greedy_ensemble_averages_complementary_members_and_starts_from_the_best() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 400)
    a, b = _probs(y, 3, 0.8, rng), _probs(y, 3, 0.8, rng)
    junk = rng.dirichlet(np.ones(3), size=len(y))
    counts, loss = posthoc.greedy_ensemble([a, b, junk], y)
    assert counts[2] == 0 and counts[0] > 0 and counts[1] > 0  # independent errors: both kept, noise never
    single = min(posthoc.nll_items(p, y).mean() for p in (a, b))
    assert loss < single
    counts, _ = posthoc.greedy_ensemble([junk, a], y, rounds=1)
    assert counts == [0, 1]  # one round: the best single candidate


def test_beats_needs_more_than_the_noise() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 300)
    a = _probs(y, 3, 0.6, rng)
    assert posthoc.beats(a, a, y)[0] is False  # no gain
    better = 0.5 * a + 0.5 * np.eye(3)[y]
    kept, gain, se = posthoc.beats(better, a, y)
    assert kept and gain > 2 * se


def test_tau_is_kept_only_when_cross_validation_says_so() -> None:
    rng = np.random.default_rng(2)
    k, n = 3, 600
    y = rng.choice(k, size=n, p=[0.8, 0.15, 0.05])
    prior = np.log(np.bincount(y, minlength=k) / n)
    # a model biased towards the majority: the rare classes' true mass is scaled down by the prior
    logits = np.log(np.clip(_probs(y, k, 0.5, rng), 1e-6, 1)) + 1.5 * prior
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    rule = posthoc.choose_tau(p, y, prior, "val_macro_f1")
    assert rule["kept"] and rule["tau"] > 0 and rule["cv_gain"] > rule["cv_se"]
    calibrated = _probs(y, k, 0.9, rng)  # already balanced decisions: no adjustment is kept
    assert posthoc.choose_tau(calibrated, y, prior, "val_acc")["tau"] == 0.0


def test_ensemble_graph_matches_its_parts_and_exports_with_parity(tmp_path) -> None:
    torch.manual_seed(0)
    m1 = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3)
    ).eval()
    m2 = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 3)).eval()
    prior = [-0.2, -1.0, -2.5]
    net = posthoc.Ensemble([m1, m2], [posthoc.TTA_VIEWS, ("id",)], [3.0, 1.0], prior, tau=0.5).eval()
    x = torch.rand(5, 3, 16, 16)
    with torch.no_grad():
        tta = sum(torch.softmax(m1(posthoc.view(x, v)), 1) for v in posthoc.TTA_VIEWS) / 4
        want = torch.log(0.75 * tta + 0.25 * torch.softmax(m2(x), 1)) - 0.5 * torch.tensor(prior)
        got = net(x)
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.equal(posthoc.view(x, "rot180"), x.flip(2).flip(3))
    from edgetune.preprocess import PreprocessSpec
    from trainer.export import export_onnx, ort_probs, ort_session

    spec = PreprocessSpec(input_size=(16, 16), resize=16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    path = export_onnx(net, spec, tmp_path / "ens.onnx")
    p_ort = ort_probs(ort_session(path), x.numpy())
    assert np.abs(p_ort - torch.softmax(got, 1).numpy()).max() < 1e-5


def test_ensemble_rejects_mismatched_members() -> None:
    with pytest.raises(ValueError, match="as many"):
        posthoc.Ensemble([torch.nn.Identity()], [("id",), ("id",)], [1.0])


def test_select_on_real_checkpoints_exports_one_graph_with_parity(tmp_path) -> None:
    """Two real tiny fine-tunes (textures, 64 px) -> post-hoc selection on their validation predictions -> the
    final model exported through export_model: parity gate passed, members and latency in bundle.json."""
    import json

    from edgetune.bundle import load_bundle
    from tests.trainer_fixtures import tiny_config
    from trainer.checkpoint import read_meta
    from trainer.data import build_data
    from trainer.export import eval_arrays, export_model
    from trainer.loop import train_loop
    from trainer.model import preprocess_spec_for

    runs = []
    for seed in (0, 1):
        cfg = tiny_config(**{"seed": seed, "model.freeze": 0.5})
        train_loop({"train_config": cfg.to_dict(), "run_dir": str(tmp_path / f"r{seed}"), "report_to": "local"})
        runs.append(tmp_path / f"r{seed}" / "best")
    spec = preprocess_spec_for(cfg.model)
    data = build_data(cfg.data, spec, seed=0)
    x_val, y_val = eval_arrays(data.val, spec)
    x_test, y_test = eval_arrays(data.test, spec)
    counts = np.asarray(data.class_counts, dtype=float)
    inputs = posthoc.Inputs(x_val, y_val, x_test, y_test, np.log(counts / counts.sum()), list(data.classes))
    post = posthoc.select(str(runs[0]), [("trial 1", str(runs[1]))], inputs, "val_macro_f1")
    assert post.members and post.test_probs is not None and post.test_probs.shape == (len(y_test), 3)
    assert [lv["name"] for lv in post.levers] == ["final model", "+ test-time flips", "+ ensemble", "+ decision rule"]
    single = posthoc.select(str(runs[0]), [("trial 1", str(runs[1]))], inputs, "val_macro_f1", views=False)
    assert not single.tta and not single.ensemble and len(single.members) == 1  # a latency budget: one model
    forced = posthoc.Ensemble(
        [posthoc.select(str(r), [], inputs, "val_macro_f1", views=False).model for r in runs],
        [posthoc.TTA_VIEWS, ("id",)],
        [0.5, 0.5],
    ).eval()
    b = export_model(
        forced,
        read_meta(runs[0]),
        tmp_path / "bundle",
        data=data,
        extra={"final_model": {"members": ["r0 (flips)", "r1"]}},
    )
    meta = json.loads((b / "bundle.json").read_text())
    assert meta["parity"]["top1_agreement"] == 1.0
    assert meta["final_model"]["latency_here"]["p50_ms"] > 0  # bundle.json carries extra at its top level
    assert load_bundle(b).meta["final_model"]["members"] == ["r0 (flips)", "r1"]


def test_an_ensemble_that_lowers_the_studys_metric_is_not_kept() -> None:
    """Log-loss picks members, but an ensemble whose validation macro-F1 is below the single model's is refused:
    a calibrated majority-leaning member lowers log-loss while the rare class's recall falls."""
    rng = np.random.default_rng(3)
    n = 600
    y = rng.choice(3, size=n, p=[0.8, 0.15, 0.05])
    sharp = np.full((n, 3), 0.05)
    sharp[np.arange(n), y] = 0.9  # right on every class, overconfident when wrong
    wrong = rng.random(n) < 0.25
    sharp[wrong] = np.roll(sharp[wrong], 1, axis=1)
    prior = np.bincount(y, minlength=3) / n
    calm = np.tile(prior, (n, 1)) * 0.7 + 0.3 * np.eye(3)[y] * (y == 0)[:, None]  # majority-leaning, calibrated
    calm /= calm.sum(1, keepdims=True)
    views = {v: sharp for v in posthoc.TTA_VIEWS}
    cands = [posthoc.Candidate("final", "final", "", views), posthoc.Candidate("probe", "probe", "", {"id": calm})]
    inputs = posthoc.Inputs(np.zeros((n, 3, 2, 2), np.float32), y, None, None, np.log(prior), ["a", "b", "c"])
    d = posthoc._decide(cands, inputs, "val_macro_f1", "auto", 0, posthoc.ENSEMBLE_ROUNDS)
    rec = d.record["ensemble"]
    assert rec["val_macro_f1_ensemble"] < rec["val_macro_f1_single"] and not d.use_ens, rec
