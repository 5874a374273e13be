"""The field loop end to end (slow, ~5 min on 2 cores): `bench/bench_field.py` with a smaller label budget — a home
study, the real server with --capture, the real camera client on shifted cameras, the harvest, labelling through the
page (headless Chromium when present), the warm study and its report. Checks what was written, not how fast."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_field_loop_end_to_end(tmp_path):
    env = {**os.environ, "RAY_ADDRESS": "local"}
    r = subprocess.run(
        [
            sys.executable,
            "bench/bench_field.py",
            "--work",
            str(tmp_path / "work"),
            "--out",
            str(tmp_path / "results"),
            "--label-budget",
            "120",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=3500,
    )
    res = tmp_path / "results" / "field.json"
    assert res.is_file(), r.stdout[-3000:] + r.stderr[-3000:]
    doc = json.loads(res.read_text())
    for k in (
        "field_acc_before",
        "field_acc_after",
        "home_acc_before",
        "home_acc_after",
        "captured",
        "labelled",
        "loop_wall_s",
    ):
        assert isinstance(doc[k], (int, float)), k
    assert doc["labelled"] == 120 and doc["captured"] >= 120
    assert doc["capture"]["spool_files_after_harvest"] == 0  # harvested and acknowledged
    assert doc["capture"]["harvest"]["acknowledged"] == doc["captured"]
    assert doc["field_acc_after"] > doc["field_acc_before"]  # labelled field frames help on held-out cameras
    assert doc["new_bundle_parent"]["model_version"]
    work = tmp_path / "work"
    rows = (work / "harvest" / "labels.csv").read_text().splitlines()
    assert len(rows) == 121 and rows[0].startswith("path,label,capture_id,camera_id,frame_id")
    report = json.loads((work / "warm" / "field_report.json").read_text())
    assert report["sets"]["home test"]["n"] == 42 and report["sets"]["field test"]["n"] > 0
    seeds = (work / "warm" / "field_data" / "warm_space.yaml").read_text()
    assert "warm start: field-home-" in seeds  # the previous best configuration is tried first
