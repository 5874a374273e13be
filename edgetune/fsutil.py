"""Atomic file writes: the one place that writes through a temporary file and ``os.replace``.

A reader (or a crash) never sees a half-written file: the data goes to a temporary file in the
same folder, which replaces the target only once it is complete. On any failure the temporary
file is removed and the old content, if any, is left as it was.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a fresh temporary path next to ``path``; write it in the ``with`` block.

    On a normal exit it replaces ``path`` atomically; on an exception it is deleted and ``path`` is
    untouched. The parent folder is created if needed. ``suffix`` ends the temporary name (e.g. ``.npy``
    for writers that insist on an extension).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding=encoding)


def commit_file(tmp: str | Path, path: str | Path) -> None:
    """A file written in full under another name in the same folder tree (a resumable download's ``.part``, kept
    across attempts) replaces ``path`` atomically."""
    os.replace(tmp, path)
