"""What `make lint` holds the code to: mypy for Python 3.10, strict in edgetune/ and tuner/ (checked by running mypy
with the project's configuration on small modules placed under those package names), ruff's rules."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+ (the dev venv); the edge's 3.10 skips
ROOT = Path(__file__).resolve().parents[1]
CONFIG = tomllib.loads((ROOT / "pyproject.toml").read_text())
STRICT_FLAGS = (
    "disallow_any_generics",
    "disallow_subclassing_any",
    "disallow_untyped_calls",
    "disallow_untyped_defs",
    "disallow_incomplete_defs",
    "check_untyped_defs",
    "disallow_untyped_decorators",
    "warn_return_any",
    "no_implicit_reexport",
    "strict_equality",
    "extra_checks",
)


def _overrides(module: str) -> list[dict[str, object]]:
    return [o for o in CONFIG["tool"]["mypy"].get("overrides", []) if module in o["module"]]


def test_mypy_targets_python_310():
    assert CONFIG["tool"]["mypy"]["python_version"] == "3.10"


@pytest.mark.parametrize("package", ["edgetune.*", "tuner.*"])
def test_mypy_strict_flags_on(package):
    flags = {k: v for o in _overrides(package) for k, v in o.items()}
    assert {f: flags.get(f) for f in STRICT_FLAGS} == dict.fromkeys(STRICT_FLAGS, True)


def test_no_strict_relaxation_in_the_tuner():
    """The tuner is strict in every module: no override turns a strict check off for a tuner module, disables an
    error code there or ignores its errors (the relaxations left while tuner/ was rewritten are gone, #22)."""
    found = set()
    for o in CONFIG["tool"]["mypy"]["overrides"]:
        mods = o["module"] if isinstance(o["module"], list) else [o["module"]]
        for m in mods:
            if m == "tuner" or m.startswith("tuner."):
                found |= {(m, k) for k, v in o.items() if k != "module" and v is False}
                found |= {(m, k) for k in ("ignore_errors", "disable_error_code") if o.get(k)}
    assert not found, sorted(found)


def test_no_ruff_relaxation_in_the_package_code():
    """ruff holds the package code to every selected rule: the only per-file exception there is the label page's
    HTML/JS string (long lines); tests, benchmarks and the test kit import where they use a module."""
    ignores = CONFIG["tool"]["ruff"]["lint"]["per-file-ignores"]
    packages = ("edgetune/", "trainer/", "tuner/", "edge_server/", "edge_client/", "fieldloop/")
    package_code = {k: v for k, v in ignores.items() if k.startswith(packages)}
    assert package_code == {"fieldloop/page.py": ["E501"]}, package_code


def _mypy(tmp_path: Path, files: dict[str, str]) -> str:
    for rel, text in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(text))
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--config-file",
            str(ROOT / "pyproject.toml"),
            "--no-incremental",
            "--follow-imports=silent",
            *files,
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return r.stdout + r.stderr


def test_mypy_runs_strict_in_edgetune_and_tuner_not_in_trainer(tmp_path):
    untyped = "def f(x):\n    return x\n"
    files = {f"{pkg}/__init__.py": "" for pkg in ("edgetune", "tuner", "trainer")}
    files |= {f"{pkg}/probe_mod.py": untyped for pkg in ("edgetune", "tuner", "trainer")}
    out = _mypy(tmp_path, files)
    assert "edgetune/probe_mod.py:1: error: Function is missing a type annotation" in out, out
    assert "tuner/probe_mod.py:1: error: Function is missing a type annotation" in out, out
    assert "trainer/probe_mod.py" not in out, out


def test_mypy_checks_against_python_310(tmp_path):
    """typing.Self is Python 3.11: the edge runs 3.10, so mypy must refuse it."""
    out = _mypy(tmp_path, {"edgetune/__init__.py": "", "edgetune/newer.py": "from typing import Self\n"})
    assert 'Module "typing" has no attribute "Self"' in out, out


def _ruff(tmp_path: Path, rel: str, text: str) -> str:
    p = tmp_path / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(textwrap.dedent(text))
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "ruff",
            "check",
            "--no-cache",
            "--output-format",
            "concise",
            "--config",
            str(ROOT / "pyproject.toml"),
            str(p),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return r.stdout + r.stderr


def test_ruff_line_length_is_on():
    lint = CONFIG["tool"]["ruff"]["lint"]
    assert CONFIG["tool"]["ruff"]["line-length"] == 120
    assert "E501" not in lint.get("ignore", []) and "E" in lint["select"]


def test_ruff_refuses_a_needless_local_import_and_allows_heavy_ones(tmp_path):
    """PLC0415 is on: a function-local import of a light module is refused; the documented heavy or optional
    libraries (ruff's banned-module-level-imports, e.g. ray, onnxruntime, cv2) may be imported where used."""
    heavy = CONFIG["tool"]["ruff"]["lint"]["flake8-tidy-imports"]["banned-module-level-imports"]
    assert {"ray", "optuna", "onnxruntime", "tensorrt", "cv2", "optuna_dashboard", "matplotlib"} <= set(heavy)
    out = _ruff(
        tmp_path,
        "edgetune/lazy.py",
        '''\
        def light():
            import json

            return json


        def heavy():
            import ray

            return ray


        def long_line():
            return "'''
        + "x" * 120
        + """"
        """,
    )
    assert "lazy.py:2:5: PLC0415" in out, out
    assert ":8:5:" not in out, out
    assert "E501" in out, out


def test_pre_commit_runs_ruff_ruff_format_and_mypy():
    import yaml

    cfg = yaml.safe_load((ROOT / ".pre-commit-config.yaml").read_text())
    hooks = {h["id"]: h for repo in cfg["repos"] for h in repo["hooks"]}
    assert {"ruff", "ruff-format", "mypy"} <= set(hooks)
    assert "ruff format" in hooks["ruff-format"]["entry"] and "mypy" in hooks["mypy"]["entry"]
    assert "format" in CONFIG["tool"]["ruff"]


def test_make_lint_checks_the_format_of_the_whole_tree(tmp_path):
    """`make lint` runs `ruff format --check` over the same paths as `ruff check`, and that check fails on a file
    ruff format would change (the tree is formatted in one go, so a diff means someone skipped `make format`)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}  # not a parent make's
    make = subprocess.run(["make", "-n", "lint"], cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout
    assert "ruff format --check" in make, make
    paths = next(line for line in make.splitlines() if "ruff check" in line).split("ruff check", 1)[1].split()
    fmt = next(line for line in make.splitlines() if "ruff format --check" in line)
    assert paths and all(p in fmt.split() for p in paths), (paths, fmt)
    ugly = tmp_path / "ugly.py"
    ugly.write_text("x = {  'a':1 }\n")
    cmd = [sys.executable, "-m", "ruff", "format", "--check", "--config", str(ROOT / "pyproject.toml"), str(ugly)]
    assert subprocess.run(cmd, capture_output=True, text=True).returncode == 1
