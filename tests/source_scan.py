"""Scans of the project's own source that several tests share."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("edgetune", "trainer", "tuner", "fieldloop", "bench", "tests", "testkit", "edge_server", "edge_client")


def files_spelling(value: str) -> list[str]:
    """The files (relative to the repository) that hold ``value`` as a string constant, in path order: where a
    file name that has one writer and one reader is spelled."""
    spelled = []
    for d in SOURCE_DIRS:
        for p in sorted((ROOT / d).rglob("*.py")) if (ROOT / d).is_dir() else ():
            if any(isinstance(n, ast.Constant) and n.value == value for n in ast.walk(ast.parse(p.read_text()))):
                spelled.append(p.relative_to(ROOT).as_posix())
    return spelled
