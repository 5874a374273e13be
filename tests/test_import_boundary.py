"""The edge side (edge_server, edge_client, edgetune) never loads torch/ray/trainer/tuner and parses as Python 3.10."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EDGE_PACKAGES = [
    p for p in ("edgetune", "edge_server", "edge_client", "fieldloop") if (REPO / p / "__init__.py").is_file()
]
FORBIDDEN = ("torch", "torchvision", "ray", "trainer", "tuner")


def _python310() -> str | None:
    """A working Python 3.10 interpreter (pyenv shims may exist without being usable)."""
    candidates = [shutil.which("python3.10"), *map(str, Path("/root/.pyenv/versions").glob("3.10*/bin/python3.10"))]
    for c in candidates:
        if (
            c
            and subprocess.run(
                [c, "-c", "import sys; assert sys.version_info[:2] == (3, 10)"], capture_output=True, timeout=30
            ).returncode
            == 0
        ):
            return c
    return None


PY310 = _python310()


def _sources() -> list[Path]:
    return sorted(f for pkg in EDGE_PACKAGES for f in (REPO / pkg).rglob("*.py"))


def test_importing_edge_packages_loads_no_training_stack():
    script = f"""
import importlib, pkgutil, sys
for pkg in {EDGE_PACKAGES!r}:
    mod = importlib.import_module(pkg)
    for info in pkgutil.walk_packages(mod.__path__, pkg + "."):
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)
import edge_server.__main__  # the CLI module too
bad = sorted(m for m in sys.modules if m.split(".")[0] in {FORBIDDEN!r})
print(",".join(bad))
"""
    r = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "", f"edge import loaded: {r.stdout.strip()}"


def test_no_static_imports_of_training_stack():
    offenders = []
    for f in _sources():
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [f"{f.relative_to(REPO)}:{node.lineno} {n}" for n in names if n.split(".")[0] in FORBIDDEN]
    assert not offenders, offenders


def test_sources_parse_as_python_310():
    for f in _sources():
        ast.parse(f.read_text(), str(f), feature_version=(3, 10))


@pytest.mark.skipif(PY310 is None, reason="no working python3.10 interpreter on this machine")
def test_sources_compile_with_real_python_310():
    script = "import sys\nfor p in sys.argv[1:]:\n    compile(open(p, encoding='utf-8').read(), p, 'exec')\n"
    assert PY310 is not None
    r = subprocess.run([PY310, "-c", script, *map(str, _sources())], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
