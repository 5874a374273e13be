"""The short version of the soak and fuzz suite (``make soak`` runs the long one): ``bench/soak.py`` for 20 s
against a real server subprocess, with the real camera client attached through a kill -9 and restart."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_short_soak(bundle_dir: Path, bundle_dir_b: Path, tmp_path: Path) -> None:
    a, b = bundle_dir, bundle_dir_b
    out = tmp_path / "soak.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "soak.py"), "--duration", "20", "--bundle", str(a),
                        "--bundle-b", str(b), "--json", str(out), "--work", str(tmp_path / "work"),
                        "--attacks", "sighup"],  # one targeted attack (make soak runs all; each has a test)
                       cwd=ROOT, capture_output=True, text=True, timeout=240)
    print(r.stdout)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    res = json.loads(out.read_text())
    assert res["failures"] == [] and res["unknown"] == 0
    assert res["frames_lost"] == 0 and res["client"]["reconnects"] >= 1
    assert res["health_not_serving_outside_restart"] == 0
    assert res["peak_rss_mb"] < res["rss_limit_mb"]
    assert res["hostile_inputs"] > 500 and res["requests_served"] > 200 and res["valid_p99_ms"] is not None
    assert "attack sighup:" in r.stdout and res["attacks"]["sighup"]["failures"] == []
