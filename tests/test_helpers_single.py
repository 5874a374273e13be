"""The shared helpers of the core (softmax, confusion matrix, atomic write, backoff, Markdown tables), and a scan
of the source tree that keeps each one the only implementation."""

from __future__ import annotations

import random
import re
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgetune.backoff import Backoff
from edgetune.fsutil import atomic_path, atomic_write_bytes, atomic_write_text
from edgetune.markdown import escape_cell, markdown_table
from edgetune.numeric import confusion_matrix, softmax

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("edgetune", "edge_server", "edge_client", "trainer", "tuner", "bench")


# --- softmax -------------------------------------------------------------------------------------------------


def test_softmax_is_stable_for_large_logits_and_normalises_each_row() -> None:
    p = softmax(np.array([[1e4, 0.0, -1e4], [1000.0, 1000.0, 1000.0]], dtype=np.float32), axis=1)
    assert np.isfinite(p).all()
    np.testing.assert_allclose(p.sum(axis=1), 1.0)
    np.testing.assert_allclose(p[0], [1.0, 0.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(p[1], [1 / 3] * 3)
    assert p.dtype == np.float64


def test_softmax_matches_the_definition_and_defaults_to_the_last_axis() -> None:
    x = np.array([0.5, -1.0, 2.0])
    np.testing.assert_allclose(softmax(x), np.exp(x) / np.exp(x).sum())
    batch = np.stack([x, x[::-1]])
    np.testing.assert_allclose(softmax(batch), softmax(batch, axis=1))
    np.testing.assert_allclose(softmax(batch.T, axis=0), softmax(batch).T)


# --- confusion matrix ----------------------------------------------------------------------------------------


def test_confusion_matrix_counts_truth_by_prediction() -> None:
    cm = confusion_matrix(np.array([0, 0, 1, 2, 2, 2]), np.array([0, 1, 1, 2, 0, 2]), 3)
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]
    assert cm.dtype == np.int64
    assert confusion_matrix(np.array([], np.int64), np.array([], np.int64), 2).tolist() == [[0, 0], [0, 0]]


def test_confusion_matrix_refuses_out_of_range_or_mismatched_input() -> None:
    with pytest.raises(ValueError, match="prediction 3 is outside 0..2"):
        confusion_matrix(np.array([0, 1]), np.array([0, 3]), 3)
    with pytest.raises(ValueError, match="label -1"):
        confusion_matrix(np.array([-1]), np.array([0]), 3)
    with pytest.raises(ValueError, match="2 labels but 1 predictions"):
        confusion_matrix(np.array([0, 1]), np.array([0]), 3)


# --- atomic write --------------------------------------------------------------------------------------------


def test_atomic_write_replaces_content_and_leaves_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "a.json"  # the parent folder is created
    atomic_write_text(target, "old")
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    assert [p.name for p in tmp_path.rglob("*")] == ["sub", "a.json"]


def test_atomic_write_failure_keeps_old_content_and_removes_the_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(UnicodeEncodeError):
        atomic_write_text(target, "naïve", encoding="ascii")
    with pytest.raises(RuntimeError, match="writer failed"), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("writer failed")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_atomic_path_yields_a_sibling_with_the_suffix(tmp_path: Path) -> None:
    with atomic_path(tmp_path / "x.npy", suffix=".npy") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".x.npy.") and tmp.suffix == ".npy"
        np.save(tmp, np.arange(3))
    np.testing.assert_array_equal(np.load(tmp_path / "x.npy"), np.arange(3))
    assert not tmp.exists()


# --- backoff -------------------------------------------------------------------------------------------------


def test_backoff_without_jitter_doubles_up_to_the_cap_and_resets() -> None:
    b = Backoff(initial=0.5, maximum=10.0, jitter=False)
    assert [b.next_delay() for _ in range(7)] == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    b.reset()
    assert b.next_delay() == 0.5


def test_backoff_jitter_stays_within_half_to_full_delay() -> None:
    b = Backoff(initial=0.1, maximum=1.0, factor=3.0, rng=random.Random(7))
    ceilings = [min(1.0, 0.1 * 3.0**n) for n in range(12)]
    delays = [b.next_delay() for _ in ceilings]
    assert all(d is not None and c / 2 <= d <= c for d, c in zip(delays, ceilings, strict=True)), delays
    assert len(set(delays)) == len(delays)  # drawn, not fixed


def test_backoff_gives_up_after_max_total() -> None:
    now = [0.0]
    b = Backoff(initial=1.0, maximum=4.0, max_total=3.0, jitter=False, clock=lambda: now[0])
    assert b.next_delay() == 1.0
    now[0] = 2.5
    assert b.next_delay() == pytest.approx(0.5)  # cut to the time left
    now[0] = 3.0
    assert b.next_delay() is None


def test_live_source_reopens_with_the_shared_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    from edge_client import sources

    delays: list[float] = []
    done = threading.Event()

    class Recording(Backoff):
        def next_delay(self) -> float | None:
            d = super().next_delay()
            delays.append(d or 0.0)
            if len(delays) >= 6:
                done.set()
            return d

    script = iter([False] * 4 + [True] + [False] * 1000)

    class Cap:
        def read(self) -> tuple[bool, Any]:
            return (True, np.zeros((4, 4, 3), np.uint8)) if next(script, False) else (False, None)

        def release(self) -> None:
            pass

    monkeypatch.setattr(sources, "Backoff", Recording)
    monkeypatch.setattr(sources, "REOPEN_INITIAL_S", 0.01)
    monkeypatch.setattr(sources, "REOPEN_MAX_S", 0.04)
    src = sources.LiveSource(Cap, "cam", "fake camera")
    try:
        assert done.wait(10), delays
    finally:
        src.close()
    # four failures grow to the cap, a frame resets the sequence
    assert delays[:6] == pytest.approx([0.01, 0.02, 0.04, 0.04, 0.01, 0.02])


# --- Markdown tables -----------------------------------------------------------------------------------------


def test_markdown_table_layout_and_formatter() -> None:
    t = markdown_table([{"a": 1, "b": 0.5}, {"a": "x"}], ["a", "b"], lambda v: "-" if v is None else str(v))
    assert t.splitlines() == ["| a | b |", "|---|---|", "| 1 | 0.5 |", "| x | - |"]


def test_markdown_table_escapes_pipes_and_line_breaks() -> None:
    t = markdown_table([{"p|q": "a|b", "n": "two\nlines", "s": "c:\\d\\|"}], ["p|q", "n", "s"])
    assert t.splitlines() == ["| p\\|q | n | s |", "|---|---|---|", "| a\\|b | two lines | c:\\\\d\\\\\\| |"]
    assert escape_cell("plain") == "plain"
    # every row has as many unescaped separators as the header
    seps = [len(re.findall(r"(?<!\\)\|", line.replace("\\\\", ""))) for line in t.splitlines()]
    assert len(set(seps)) == 1, seps


def test_tuner_and_bench_tables_use_the_shared_renderer() -> None:
    import sys

    sys.path.insert(0, str(REPO / "bench"))
    try:
        import common
    finally:
        sys.path.remove(str(REPO / "bench"))
    from tuner.report import leaderboard_table

    assert common.md_table([{"a": "x|y"}], ["a"]).splitlines()[2] == "| x\\|y |"
    assert leaderboard_table([{"a": "x|y", "b": None}], ["a", "b"]) == "| a | b |\n|---|---|\n| x\\|y |  |\n"


# --- one implementation each ---------------------------------------------------------------------------------


def _sources() -> list[Path]:
    return sorted(f for pkg in PACKAGES for f in (REPO / pkg).rglob("*.py") if "/v1/" not in f.as_posix())


#: (what, regex over source lines, the one file allowed to contain it)
SINGLE = [
    ("softmax definition", r"\bdef \w*softmax\w*\(", "edgetune/numeric.py"),
    ("hand-written exp (softmax normalisation)", r"\b(np|numpy|math)\.exp\(", "edgetune/numeric.py"),
    ("confusion matrix by bincount of label*k+pred", r"bincount\([^)]*\*", "edgetune/numeric.py"),
    ("temp file + os.replace", r"\bos\.replace\(|\bmkstemp\(|\btmp\w*\.replace\(", "edgetune/fsutil.py"),
    ("backoff class", r"\bclass \w*Backoff\b", "edgetune/backoff.py"),
    ("Markdown table row join", r"\" \| \"\.join", "edgetune/markdown.py"),
]


@pytest.mark.parametrize(("what", "pattern", "home"), SINGLE, ids=[s[0] for s in SINGLE])
def test_each_helper_has_one_implementation(what: str, pattern: str, home: str) -> None:
    rx = re.compile(pattern)
    hits = sorted(
        {
            f.relative_to(REPO).as_posix()
            for f in _sources()
            for line in f.read_text().splitlines()
            if rx.search(line) and not line.lstrip().startswith("#")
        }
    )
    assert hits == [home], f"{what}: expected only in {home}, found in {hits}"


def test_no_hand_rolled_retry_doubling() -> None:
    rx = re.compile(r"\b\w*(retry|delay|backoff)\w*\s*(\*=|\*)\s*\d")
    hits = [
        f"{f.relative_to(REPO)}:{i}"
        for f in _sources()
        for i, line in enumerate(f.read_text().splitlines(), 1)
        if rx.search(line)
    ]
    assert not hits, f"retry delays are grown by edgetune.backoff.Backoff only: {hits}"
    assert rx.search("retry = min(retry * 2, 10.0)")  # the pattern does catch the old copy


def test_scan_covers_every_package() -> None:
    found = {f.relative_to(REPO).parts[0] for f in _sources()}
    assert found == set(PACKAGES)
