"""The study summary is a typed, frozen object with one writer and one reader (tuner/summary.py): what a study
writes reads back equal, nothing edits it in place, a bad file is refused with the reason, and no other module
opens summary.json itself."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from tests.source_scan import files_spelling
from tuner.summary import (
    SUMMARY_FILE,
    SUMMARY_SCHEMA,
    FinalModel,
    StudySummary,
    SummaryError,
    read_summary,
    write_summary,
)

ROOT = Path(__file__).resolve().parents[1]


def _full(tmp_path: Path) -> StudySummary:
    final = FinalModel(
        trial="refit of #2",
        ray_trial_id=None,
        backbone="mobilenet_v2",
        value=0.61,
        val_acc=0.74,
        test_accuracy=0.72,
        test_macro_f1=0.55,
        checkpoint=str(tmp_path / "best"),
        test_images=393,
        params={"backbone": "mobilenet_v2", "optim.lr": 0.001, "precision": "fp32"},
    )
    return StudySummary(
        study="s",
        storage="sqlite:///o.db",
        metric="val_macro_f1",
        out=str(tmp_path),
        trials=4,
        states={"COMPLETE": 3, "PRUNED": 1, "FAIL": 0, "RUNNING": 0},
        final=final,
        refit={"of_trial": 2, "epochs": 8, "history": [{"epoch": 1, "val_acc": 0.5}]},
        posthoc={"tta": True, "members": ["final", "trial 1"]},
        levers=[{"name": "+ test-time flips", "used": True, "val_accuracy": 0.75}],
        plots=["learning_curves.png", "timeline.png"],
        leaderboard_md="| rank |\n|---|\n| 0 |",
        probes=[{"name": "probe mobilenet_v2@224", "val_acc": 0.7}],
        latency={"architectures_timed": 2, "rejected_by_constraint": [3], "winner": {"status": "timed"}},
        bundle=str(tmp_path / "bundle"),
        ray={"mode": "local", "address": "127.0.0.1:6379", "storage_path": None},
        ledger={"wall_s": 700.0, "stages": [{"name": "search", "seconds": 500.0}]},
        useful_fraction=0.81,
        ledger_lines=["budget ledger: ..."],
        wall_seconds=698.5,
        time_budget_s=720.0,
    )


def test_what_the_writer_writes_the_reader_reads_back_equal(tmp_path: Path) -> None:
    s = _full(tmp_path)
    path = write_summary(s, tmp_path)
    assert path == tmp_path / SUMMARY_FILE
    back = read_summary(tmp_path)
    assert back == s and read_summary(path) == s
    # every field of the object is in the file, none lost on the way
    d = json.loads(path.read_text())
    assert d["schema"] == SUMMARY_SCHEMA
    for f in dataclasses.fields(StudySummary):
        if f.name != "final":
            assert f.name in d, f.name


def test_the_file_keeps_its_flat_layout(tmp_path: Path) -> None:
    """The keys earlier runs wrote and their readers (the contracts, bench/) look for are where they were."""
    d = json.loads(write_summary(_full(tmp_path), tmp_path).read_text())
    for key in (
        "useful_fraction",
        "ledger",
        "best_test_accuracy",
        "best_test_macro_f1",
        "best_checkpoint",
        "best_trial",
        "best_params",
        "test_images",
        "refit",
        "levers",
        "ray",
        "wall_seconds",
    ):
        assert key in d, key
    assert d["best_params"]["optim.lr"] == 0.001 and d["latency"]["rejected_by_constraint"] == [3]


def test_an_earlier_runs_summary_without_schema_reads(tmp_path: Path) -> None:
    d = _full(tmp_path).to_dict()
    del d["schema"]
    (tmp_path / SUMMARY_FILE).write_text(json.dumps(d))
    assert read_summary(tmp_path) == _full(tmp_path)


def test_the_summary_is_frozen_through_and_through(tmp_path: Path) -> None:
    s = _full(tmp_path)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.bundle = "elsewhere"  # type: ignore[misc]
    with pytest.raises(TypeError):
        s.latency["winner"] = {}  # type: ignore[index]
    with pytest.raises(TypeError):
        s.refit["history"][0]["epoch"] = 9  # type: ignore[index]
    with pytest.raises(AttributeError):
        s.levers.append({})  # type: ignore[attr-defined]
    later = s.with_(bundle=None)
    assert later.bundle is None and s.bundle == str(tmp_path / "bundle")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no study summary at"),
        ("{not json", "cannot be read as a study summary"),
        ("[1, 2]", "must be a JSON object"),
        ('{"schema": 99, "study": "s"}', "layout 99 is not one this version reads"),
        ('{"study": "s", "storage": "x", "metric": "m"}', "lacks (or has a non-text) out"),
        ('{"study": "s", "storage": "x", "metric": "m", "out": "o", "best_checkpoint": "b"}', "missing or of the"),
        ('{"study": "s", "storage": "x", "metric": "m", "out": "o", "trials": "4"}', "trials (str, expected int)"),
    ],
)
def test_a_bad_summary_is_refused_with_the_reason(tmp_path: Path, content: str | None, message: str) -> None:
    if content is not None:
        (tmp_path / SUMMARY_FILE).write_text(content)
    with pytest.raises(SummaryError, match="^.*" + message.replace("(", r"\(").replace(")", r"\)")):
        read_summary(tmp_path)


def test_failure_says_why_a_study_produced_no_model(tmp_path: Path) -> None:
    s = _full(tmp_path)
    assert s.failure() is None
    none = s.with_(final=None, states={"COMPLETE": 0, "FAIL": 4}, refit={"skipped": "no trial to fit"})
    why = none.failure()
    assert why is not None and "produced no model" in why and "4 FAIL" in why and "no trial to fit" in why


def test_no_other_module_opens_summary_json_itself() -> None:
    """One writer and one reader: the file name is spelled as a path only in tuner/summary.py."""
    assert files_spelling(SUMMARY_FILE) == ["tuner/summary.py"]
