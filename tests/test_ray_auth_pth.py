"""deploy/ray-auth.pth (installed into the venv by ``make install``): with RAY_AUTH_MODE unset and a Ray token at
hand, every Python of the venv uses token auth, as a head started there does (Ray 2.60); an explicit mode wins."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINE = (ROOT / "deploy" / "ray-auth.pth").read_text().strip()


def _mode(home: Path, **env: str) -> str:
    e = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    e.update(HOME=str(home), **env)
    code = LINE + "\nimport os; print(os.environ.get('RAY_AUTH_MODE', '<unset>'))"
    return subprocess.run(
        [sys.executable, "-S", "-c", code], env=e, capture_output=True, text=True, timeout=60, check=True
    ).stdout.strip()


def test_token_mode_follows_the_heads_rule(tmp_path):
    assert _mode(tmp_path) == "<unset>"  # no token anywhere: Ray's default
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("t")
    assert _mode(tmp_path) == "token"
    assert _mode(tmp_path, RAY_AUTH_MODE="disabled") == "disabled"  # explicit wins
    other = tmp_path / "elsewhere"
    assert _mode(other, RAY_AUTH_TOKEN_PATH=str(tmp_path / ".ray" / "auth_token")) == "token"
    assert _mode(other, RAY_AUTH_TOKEN="abc") == "token"


def test_make_install_put_it_into_this_venv():
    installed = Path(sysconfig.get_paths()["purelib"]) / "edgetune-ray-auth.pth"
    assert installed.is_file() and installed.read_text().strip() == LINE
