"""Fixtures that the benchmarks use live in ``testkit/``, a package that both tests/ and bench/ import: bench/ never
imports from tests/, and testkit/ imports neither."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imported_roots(folder: str) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for f in sorted((ROOT / folder).rglob("*.py")):
        roots = set()
        for n in ast.walk(ast.parse(f.read_text())):
            if isinstance(n, ast.Import):
                roots |= {a.name.split(".")[0] for a in n.names}
            elif isinstance(n, ast.ImportFrom) and n.level == 0 and n.module:
                roots.add(n.module.split(".")[0])
        out[str(f.relative_to(ROOT))] = roots
    return out


def test_bench_imports_nothing_from_tests():
    bad = {f: "tests" for f, roots in _imported_roots("bench").items() if "tests" in roots}
    assert not bad, f"bench/ imports from tests/ (move the fixture to testkit/): {sorted(bad)}"


def test_testkit_imports_neither_tests_nor_bench():
    bad = {
        f: sorted(roots & {"tests", "bench"})
        for f, roots in _imported_roots("testkit").items()
        if roots & {"tests", "bench"}
    }
    assert not bad, bad


def test_bench_and_tests_share_the_fixture_package():
    users = {
        folder: sorted(f for f, roots in _imported_roots(folder).items() if "testkit" in roots)
        for folder in ("bench", "tests")
    }
    assert users["bench"] and users["tests"], users
