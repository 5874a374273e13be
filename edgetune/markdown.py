"""Markdown tables, one renderer for the tuner's leaderboard and the bench reports."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any


def escape_cell(text: str) -> str:
    """A cell's text made safe for a table row: ``|`` escaped, line breaks turned into spaces."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r\n", " ").replace("\n", " ").replace("\r", " ")


def markdown_table(rows: Sequence[Mapping[str, Any]], cols: Sequence[str], fmt: Callable[[Any], str] = str) -> str:
    """A GitHub-flavoured Markdown table of ``rows`` (dicts) with columns ``cols``, no trailing newline.

    ``fmt`` turns each value (``None`` for a missing key) into text; the result is escaped.
    """
    lines = ["| " + " | ".join(escape_cell(str(c)) for c in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(escape_cell(fmt(r.get(c))) for c in cols) + " |" for r in rows]
    return "\n".join(lines)
