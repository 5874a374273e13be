"""Fast checks of the benchmark helpers (tables, JSON results, best-so-far curves); no timings."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import common  # noqa: E402

from edgetune.errors import ConfigError  # noqa: E402


def test_md_table_formats_rows_and_missing_values() -> None:
    t = common.md_table([{"a": 1, "b": 0.123456}, {"a": "x"}], ["a", "b"])
    lines = t.splitlines()
    assert lines[0] == "| a | b |"
    assert lines[2] == "| 1 | 0.123 |"
    assert lines[3] == "| x | – |"


def test_write_results_has_payload_machine_and_tables(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = common.write_results("demo", {"ratio": 0.5, "raw": [1, 2]}, tmp_path, {"T": "| a |\n|---|\n| 1 |"})
    doc = json.loads(path.read_text())
    assert path == tmp_path / "demo.json"
    assert doc["benchmark"] == "demo" and doc["ratio"] == 0.5 and doc["raw"] == [1, 2]
    assert doc["machine"]["cpu_count"] >= 1 and doc["machine"]["python"] and doc["machine"]["date"]
    assert doc["tables_md"]["T"].startswith("| a |")
    assert "### T" in capsys.readouterr().out


def test_budget_flag_is_validated() -> None:
    assert common.parse_args("x", ["--budget", "large"]).budget == "large"
    with pytest.raises(ConfigError, match="small"):
        common.parse_args("x", ["--budget", "huge"])


def test_percentile() -> None:
    assert common.percentile([1.0, 2.0, 3.0], 50) == 2.0
    assert common.percentile([], 50) is None


def test_paired_comparison_on_the_shared_test_files(tmp_path: Path) -> None:
    """bench_search.paired: same files, same labels; differences and a paired bootstrap interval."""
    import bench_search

    files = [f"/data/img{i}.png" for i in range(40)]
    labels = [i % 2 for i in range(40)]
    edge_pred = list(labels)
    edge_pred[0] = 1 - edge_pred[0]  # edgetune: 39/40 right
    base_pred = list(labels)
    for i in range(4):
        base_pred[i] = 1 - base_pred[i]  # baseline: 36/40 right
    best = tmp_path / "best"
    best.mkdir()
    (best / "test_predictions.json").write_text(
        json.dumps(
            {
                "classes": ["a", "b"],
                "items": [
                    {"source": f, "label": "ab"[y], "prediction": "ab"[p], "probs": [0.5, 0.5]}
                    for f, y, p in zip(files, labels, edge_pred, strict=True)
                ],
            }
        )
    )
    base = {"classes": ["a", "b"], "test_files": files, "test_labels": labels, "test_predictions": base_pred}
    r = bench_search.paired(tmp_path, base)
    assert r["n_test"] == 40 and r["delta_test_accuracy"] == pytest.approx(3 / 40)
    lo, hi = r["ci95_delta_accuracy"]
    assert lo <= 3 / 40 <= hi and lo >= 0.0  # edgetune is never worse on a resample: it wins on items 1-3 only
    assert r["only_edgetune_right"] == 3 and r["only_baseline_right"] == 0
    with pytest.raises(SystemExit, match="test sets differ"):
        bench_search.paired(tmp_path, {**base, "test_files": [*files[:-1], "/other.png"]})


# -- bench_search: seeds, pooled bootstrap, equal time, headlines, levers (no tune, no baseline run) ----------
def _group(rng: np.random.Generator, n: int, k: int, acc_edge: float, acc_base: float) -> tuple:
    y = rng.integers(0, k, n)
    pe = np.where(rng.random(n) < acc_edge, y, (y + 1) % k)
    pb = np.where(rng.random(n) < acc_base, y, (y + 2) % k)
    return y, pe, pb


def test_parse_seeds() -> None:
    import bench_search

    assert bench_search.parse_seeds("0,1,2") == [0, 1, 2]
    assert bench_search.parse_seeds("0") == [0]
    for bad in ("", "a,1", "1,1", "-1"):
        with pytest.raises(ConfigError, match="--seeds"):
            bench_search.parse_seeds(bad)


def test_vectorised_macro_f1_matches_the_per_seed_definition() -> None:
    import bench_search

    rng = np.random.default_rng(1)
    y, p = rng.integers(0, 4, (20, 50)), rng.integers(0, 4, (20, 50))
    p[0] = y[0]
    p[1] = 0  # classes never predicted: F1 0 for them
    rows = bench_search._macro_f1_rows(y, p, 4)
    assert rows == pytest.approx([bench_search._macro_f1(y[i], p[i], 4) for i in range(20)])
    assert rows[0] == pytest.approx(1.0)


def test_pooled_bootstrap_is_stratified_by_seed() -> None:
    """Seed A (10 items): edgetune always right, baseline always wrong; seed B (90 items): identical predictions.
    Resampling within each seed keeps 10 A-items in every resample, so every resample's Δ accuracy is 0.1."""
    import bench_search

    ya = np.zeros(10, int)
    yb = np.arange(90) % 4
    groups = [(ya, ya.copy(), ya + 1), (yb, yb.copy(), yb.copy())]
    ci = bench_search.bootstrap_deltas(groups, 4, n_boot=500)
    assert ci["ci95_delta_accuracy"] == pytest.approx([0.1, 0.1])
    r = bench_search.compare(["a", "b", "c", "d"], groups, n_boot=500)
    assert r["n_test"] == 100 and r["delta_test_accuracy"] == pytest.approx(0.1)
    # pooled macro-F1: the per-seed definition on the concatenation
    y, pe, pb = (np.concatenate([g[i] for g in groups]) for i in range(3))
    assert r["edgetune"]["test_macro_f1"] == pytest.approx(bench_search._macro_f1(y, pe, 4))
    delta = bench_search._macro_f1(y, pe, 4) - bench_search._macro_f1(y, pb, 4)
    assert r["delta_test_macro_f1"] == pytest.approx(delta)


def test_pooled_bootstrap_better_predictor_and_identical_predictors() -> None:
    import bench_search

    rng = np.random.default_rng(0)
    groups = [_group(rng, n, 4, 0.9, 0.6) for n in (120, 130, 140)]
    r = bench_search.compare(["a", "b", "c", "d"], groups)  # the real 10,000 resamples
    assert r["n_test"] == 390
    assert r["delta_test_accuracy"] > 0.2 and r["ci95_delta_accuracy"][0] > 0
    assert r["delta_test_macro_f1"] > 0.1 and r["ci95_delta_macro_f1"][0] > 0
    lo, hi = r["ci95_delta_accuracy"]
    assert lo <= r["delta_test_accuracy"] <= hi
    same = [(y, pe, pe.copy()) for y, pe, _ in groups]
    r0 = bench_search.compare(["a", "b", "c", "d"], same, n_boot=300)
    assert r0["delta_test_accuracy"] == 0.0 and r0["delta_test_macro_f1"] == 0.0
    assert r0["ci95_delta_accuracy"] == [0.0, 0.0] and r0["ci95_delta_macro_f1"] == [0.0, 0.0]


def test_equal_time_epochs_from_the_baseline_history() -> None:
    import bench_search

    base = {"wall_s": 215.0, "history": [{"seconds": s} for s in (50.0, 40.0, 45.0, 60.0)]}  # overhead 20 s
    fit = bench_search.equal_time_epochs(base, 800.0)
    assert fit["overhead_s"] == pytest.approx(20.0) and fit["median_epoch_s"] == pytest.approx(47.5)
    assert fit["epochs"] == 16  # floor(780 / 47.5)
    assert bench_search.equal_time_epochs(base, 30.0)["epochs"] == 1  # at least one epoch
    with pytest.raises(SystemExit, match="history"):
        bench_search.equal_time_epochs({"wall_s": 1.0, "history": []}, 800.0)


def _cmp(delta: float) -> dict:
    return {
        "delta_test_accuracy": delta,
        "delta_test_macro_f1": 2 * delta,
        "ci95_delta_accuracy": [delta - 0.02, delta + 0.02],
        "ci95_delta_macro_f1": [2 * delta - 0.03, 2 * delta + 0.03],
        "n_test": 100,
        "edgetune": {"test_accuracy": 0.8 + delta, "test_macro_f1": 0.6 + 2 * delta},
        "baseline": {"test_accuracy": 0.8, "test_macro_f1": 0.6},
        "both_right": 70,
        "only_edgetune_right": 10,
        "only_baseline_right": 5,
        "per_class_recall": {},
    }


def test_headline_builder_keys_minimum_useful_fraction_and_targets() -> None:
    import bench_search

    base = {"wall_s": 300.0, "args": {"epochs": 8}}
    summaries = [
        {"useful_fraction": 0.9, "levers": [], "ledger": {"search_s": 400}},
        {"useful_fraction": 0.87},
        {},
    ]  # an older summary: no useful_fraction, no levers
    rows = [
        bench_search.seed_result(s, summ, 700.0 + 50 * s, {**base, "wall_s": 300.0 + s}, _cmp(0.05 - 0.01 * s))
        for s, summ in enumerate(summaries)
    ]
    assert rows[0]["ledger"] == {"search_s": 400} and "ledger" not in rows[1] and rows[2]["levers"] is None
    assert rows[2]["useful_fraction"] is None and rows[1]["baseline_epochs"] == 8
    fit = {"epochs": 14, "median_epoch_s": 47.0, "overhead_s": 20.0, "tune_wall_s": 700.0, "fitted_from_epochs": 8}
    et = bench_search.equal_time_result(0, fit, {"wall_s": 690.0, "args": {"epochs": 14}}, _cmp(0.01))
    head = bench_search.headline(rows, _cmp(0.04), et)
    for key in (
        "delta_test_accuracy",
        "delta_test_macro_f1",
        "ci95_delta_test_accuracy",
        "ci95_delta_test_macro_f1",
        "delta_equal_time_accuracy",
        "delta_equal_time_macro_f1",
        "useful_fraction",
        "tune_wall_s",
        "baseline_wall_s",
        "n_test_pooled",
        "seeds",
    ):
        assert key in head, key
    assert head["useful_fraction"] == 0.87  # the minimum over the seeds that report it
    assert head["tune_wall_s"] == 800.0 and head["baseline_wall_s"] == 302.0 and head["n_test_pooled"] == 100
    assert head["ci95_delta_test_accuracy"] == pytest.approx([0.02, 0.06])
    assert head["delta_equal_time_accuracy"] == 0.01 and head["delta_equal_time_macro_f1"] == 0.02
    for r in head["seeds"]:
        for key in (
            "seed",
            "delta_test_accuracy",
            "delta_test_macro_f1",
            "ci95_delta_test_accuracy",
            "ci95_delta_test_macro_f1",
            "n_test",
            "tune_wall_s",
            "baseline_wall_s",
            "useful_fraction",
            "edgetune_test_accuracy",
            "edgetune_test_macro_f1",
            "baseline_test_accuracy",
            "baseline_test_macro_f1",
            "levers",
        ):
            assert key in r, key
    met = bench_search.targets_met(head)
    assert met == {
        "pooled_delta_test_accuracy": True,
        "pooled_delta_test_macro_f1": True,
        "no_seed_below": True,
        "equal_time": True,
        "useful_fraction": True,
        "tune_wall_s": True,
        "all": True,
    }
    slow_seed = bench_search.seed_result(3, {"useful_fraction": 0.5}, 950.0, base, _cmp(-0.02))
    bad = bench_search.headline([*rows, slow_seed], _cmp(0.02), None)
    met = bench_search.targets_met(bad)
    assert bad["useful_fraction"] == 0.5 and bad["delta_equal_time_accuracy"] is None
    assert not any(v for k, v in met.items())  # every target missed
    assert bench_search.headline(rows[2:], _cmp(0.04), et)["useful_fraction"] is None


def test_lever_aggregation_over_seeds() -> None:
    import bench_search

    def lv(name: str, va: float, vf: float, ta: float | None, tf: float | None) -> dict:
        return {"name": name, "val_accuracy": va, "val_macro_f1": vf, "test_accuracy": ta, "test_macro_f1": tf}

    seed0 = [
        lv("final fit (raw weights)", 0.70, 0.50, 0.72, 0.52),
        lv("+ weight averaging", 0.74, 0.54, 0.74, 0.55),
        lv("+ decision rule", 0.75, 0.60, None, None),
    ]
    seed1 = [
        lv("final fit (raw weights)", 0.80, 0.60, 0.78, 0.58),
        lv("+ weight averaging", 0.82, 0.62, 0.80, 0.61),
        lv("+ test-time flips", 0.83, 0.63, 0.81, 0.62),
        lv("+ decision rule", 0.85, 0.70, 0.82, 0.68),
    ]
    rows = bench_search.aggregate_levers([seed0, None, seed1, []])
    assert [r["lever"] for r in rows] == [
        "final fit (raw weights)",
        "+ weight averaging",
        "+ test-time flips",
        "+ decision rule",
    ]
    first, avg, flips, rule = rows
    assert first["n_seeds"] == 2 and first["val_accuracy"] == pytest.approx(0.75)
    assert first["test_macro_f1"] == pytest.approx(0.55) and first["gain_val_accuracy"] is None
    assert avg["val_accuracy"] == pytest.approx(0.78) and avg["gain_val_accuracy"] == pytest.approx(0.03)
    assert avg["gain_test_accuracy"] == pytest.approx(0.02)
    assert flips["n_seeds"] == 1 and flips["val_macro_f1"] == pytest.approx(0.63)
    assert rule["test_accuracy"] == pytest.approx(0.82)  # the seed without test values is left out of the mean
    assert rule["gain_val_macro_f1"] == pytest.approx(0.65 - 0.63)
    assert bench_search.aggregate_levers([None, None]) == []


def test_bench_search_main_with_stubbed_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole driver on synthetic tune/baseline outputs: search.json after each seed (partial), the equal-time
    run on the first seed only with its fitted epochs, the final report's keys and tables."""
    import bench_search

    classes = ["p0", "p033", "p067", "p100"]
    calls: list[tuple[str, int | None]] = []

    def data(tag: str) -> tuple:
        rng = np.random.default_rng(sum(tag.encode()))
        return _group(rng, 60, 4, 0.85, 0.7)

    def fake_tune(work: Path, name: str, extra: list[str]) -> dict:
        if name == "elpv-seed2":
            raise SystemExit("stop at seed 2")
        y, pe, _ = data(name)
        out = work / name
        (out / "best").mkdir(parents=True, exist_ok=True)
        (out / "split.json").write_text("{}")
        (out / "best" / "test_predictions.json").write_text(
            json.dumps(
                {
                    "classes": classes,
                    "items": [
                        {"source": f"/{name}/{i}.png", "label": classes[a], "prediction": classes[b]}
                        for i, (a, b) in enumerate(zip(y, pe, strict=True))
                    ],
                }
            )
        )
        seed = int(extra[-1].split("=")[1]) if extra and extra[-1].startswith("data.split_seed=") else 0
        summary = {
            "useful_fraction": 0.9 - 0.01 * seed,
            "levers": [
                {
                    "name": "final fit (raw weights)",
                    "val_accuracy": 0.7,
                    "val_macro_f1": 0.5,
                    "test_accuracy": 0.7,
                    "test_macro_f1": 0.5,
                }
            ],
        }
        calls.append(("tune " + " ".join(extra), None))
        return {"out": out, "wall_s": 800.0, "summary": summary, "cache": work / f"cache-{name}"}

    def fake_base(work: Path, split: Path, name: str, cache: Path, epochs: int | None = None) -> dict:
        tname = split.parent.name
        y, _, pb = data(tname)
        calls.append((name, epochs))
        return {
            "classes": classes,
            "test_files": [f"/{tname}/{i}.png" for i in range(len(y))],
            "test_labels": y.tolist(),
            "test_predictions": pb.tolist(),
            "wall_s": 420.0,
            "args": {"epochs": epochs or 8},
            "history": [{"seconds": 50.0} for _ in range(epochs or 8)],
        }

    monkeypatch.setattr(bench_search, "run_tune", fake_tune)
    monkeypatch.setattr(bench_search, "run_baseline", fake_base)
    monkeypatch.setattr(bench_search, "study_overheads", lambda *a: {"launch_to_first_batch_s": {"median": 1.0}})
    out = tmp_path / "results"
    args = ["--out", str(out), "--work", str(tmp_path / "work")]
    with pytest.raises(SystemExit, match="stop at seed 2"):
        bench_search.main([*args, "--seeds", "0,1,2"])
    doc = json.loads((out / "search.json").read_text())
    assert "partial" in doc and [r["seed"] for r in doc["seeds"]] == [0, 1] and doc["seeds_planned"] == [0, 1, 2]
    # equal time: floor((800 - (420 - 8 * 50)) / 50) = 15 epochs, on the first seed only
    assert [c for c in calls if c[0].startswith("baseline")] == [
        ("baseline-elpv-seed0", None),
        ("baseline-elpv-seed0-equal-time", 15),
        ("baseline-elpv-seed1", None),
    ]
    assert "tune --set data.split_seed=0" in [c[0] for c in calls]
    assert doc["equal_time"]["epochs"] == 15 and doc["n_test_pooled"] == 120

    calls.clear()
    assert bench_search.main([*args, "--seeds", "1,0"]) == 0
    doc = json.loads((out / "search.json").read_text())
    assert "partial" not in doc and doc["textures"]["n_test"] == 60
    assert doc["equal_time"]["seed"] == 1 and doc["useful_fraction"] == pytest.approx(0.89)
    assert doc["levers"][0]["n_seeds"] == 2 and "cache_speedup" not in doc and "grid_comparison" not in doc
    assert set(doc["targets_met"]) >= {"pooled_delta_test_accuracy", "equal_time", "all"}
    assert any(t.startswith("Levers") for t in doc["tables_md"]) and any("Headlines" in t for t in doc["tables_md"])
    h2h = next(t for k, t in doc["tables_md"].items() if k.startswith("Head-to-head"))
    assert "elpv pooled" in h2h and "equal time (15 epochs)" in h2h and "textures" in h2h
