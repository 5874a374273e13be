"""Fast checks of the benchmark helpers (tables, JSON results, best-so-far curves); no timings."""

from __future__ import annotations

import json
import sys
from pathlib import Path

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
    (best / "test_predictions.json").write_text(json.dumps({"classes": ["a", "b"], "items": [
        {"source": f, "label": "ab"[y], "prediction": "ab"[p], "probs": [0.5, 0.5]}
        for f, y, p in zip(files, labels, edge_pred, strict=True)]}))
    base = {"classes": ["a", "b"], "test_files": files, "test_labels": labels, "test_predictions": base_pred}
    r = bench_search.paired(tmp_path, base)
    assert r["n_test"] == 40 and r["delta_test_accuracy"] == pytest.approx(3 / 40)
    lo, hi = r["ci95_delta_accuracy"]
    assert lo <= 3 / 40 <= hi and lo >= 0.0  # edgetune is never worse on a resample: it wins on items 1-3 only
    assert r["only_edgetune_right"] == 3 and r["only_baseline_right"] == 0
    with pytest.raises(SystemExit, match="test sets differ"):
        bench_search.paired(tmp_path, {**base, "test_files": [*files[:-1], "/other.png"]})
