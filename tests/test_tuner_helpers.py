"""Shared helpers for the tuner tests: a tiny search space and a `python -m tuner` runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: Lite0 only (offline weights); seed 0 is a good linear probe, seed 1 a hopeless LR -> ASHA prunes it.
TINY_SPACE = """\
params:
  backbone: {type: categorical, key: model.backbone, choices: [efficientnet_lite0]}
  freeze: {type: float, key: model.freeze, low: 0.9, high: 1.0}
  lr: {type: float, key: optim.lr, low: 1.0e-6, high: 1.0e-2, log: true}
  head: {type: categorical, key: model.head, choices: [linear, mlp]}
  head_hidden: {type: categorical, key: model.head_hidden, choices: ["64x32"], when: {head: [mlp]}}
seeds:
  - name: good probe
    params: {backbone: efficientnet_lite0, freeze: 1.0, lr: 3.0e-3, head: linear}
  - name: hopeless lr
    params: {backbone: efficientnet_lite0, freeze: 1.0, lr: 1.0e-6, head: linear}
"""

TINY_ARGS = ["--data", "textures", "--img", "64", "--max-images", "60", "--set", "batch_size=16", "--no-export"]


def write_space(tmp: Path) -> Path:
    p = tmp / "space.yaml"
    p.write_text(TINY_SPACE)
    return p


def tuner_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.update({"PYTHONUNBUFFERED": "1", "RAY_AIR_NEW_OUTPUT": "0", "RAY_DEDUP_LOGS": "0"})
    env.update(extra)
    return env


def run_tuner(
    args: list[str], log: Path, timeout: float = 600, env: dict[str, str] | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    """``python -m tuner ARGS`` with output in ``log``; on failure the log tail is in the assertion."""
    with open(log, "w") as f:
        p = subprocess.run(
            [sys.executable, "-m", "tuner", *args],
            cwd=ROOT,
            stdout=f,
            stderr=subprocess.STDOUT,
            env=env or tuner_env(),
            timeout=timeout,
        )
    if check and p.returncode != 0:
        raise AssertionError(f"python -m tuner {' '.join(args)} failed ({p.returncode}):\n{log.read_text()[-4000:]}")
    return p
