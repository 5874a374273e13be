"""Fast checks of the benchmark helpers (tables, JSON results, best-so-far curves); no timings."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import common  # noqa: E402
import search_eval  # noqa: E402

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


def test_best_so_far_curve_selects_by_val_and_reports_test() -> None:
    events = [
        {"cum_epochs": 1, "id": 0},  # an epoch that is not a trial's kept checkpoint: no candidate yet
        {"cum_epochs": 2, "id": 0, "val_acc": 0.6, "val_macro_f1": 0.5, "test_acc": 0.7, "test_macro_f1": 0.6},
        {"cum_epochs": 3, "id": 1, "val_acc": 0.8, "val_macro_f1": 0.5, "test_acc": 0.65, "test_macro_f1": 0.6},
        {"cum_epochs": 4, "id": 2, "val_acc": 0.8, "val_macro_f1": 0.4, "test_acc": 0.9, "test_macro_f1": 0.9},
        {"cum_epochs": 5, "id": 3, "val_acc": 0.9, "val_macro_f1": 0.7, "test_acc": 0.75, "test_macro_f1": 0.7},
    ]
    curve = search_eval.curve_from_events(events)
    assert [c["cum_epochs"] for c in curve] == [2, 3, 4, 5]
    assert [c["selected"] for c in curve] == [0, 1, 1, 3]  # tie on val acc: higher val macro-F1 wins, test unseen
    assert [c["test_acc"] for c in curve] == [0.7, 0.65, 0.65, 0.75]
    assert search_eval.first_reach(curve, 0.75) == 5
    assert search_eval.first_reach(curve, 0.7) == 2
    assert search_eval.first_reach(curve, 0.95) is None
