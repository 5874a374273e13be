"""Find the source images of a dataset and check that every one of them decodes.

Two inputs are understood:

- an ImageFolder tree ``root/<class>/**/*.{jpg,jpeg,png,bmp,tif,tiff}``;
- a CSV manifest with ``path,label`` columns (optional ``split`` column: a predefined
  train/val/test split); relative paths are resolved against the CSV's directory.

An ImageFolder root may hold ``edgetune_split.json`` (written by the built-in preparers,
see :mod:`trainer.datasets`): ``{"files": {"<class>/<file>": "train"|"val"|"test"}}``, a
predefined split that replaces the seeded one.

:func:`scan_sources` decodes every file with :func:`edgetune.imagedecode.read_image`; the
verdicts are cached on disk by file content, so a repeated run does not decode again.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgetune.errors import ConfigError, EdgetuneError, ImageDecodeError
from edgetune.fsutil import atomic_write_text
from edgetune.imagedecode import read_image

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
SPLIT_FILE = "edgetune_split.json"
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class SourceFile:
    """One source image: where it is, its class and (for a predefined split) its split."""

    path: str  #: absolute path
    rel: str  #: path relative to the dataset root (POSIX), used in manifests and hashes
    label: str  #: class name
    split: str = ""  #: "train"/"val"/"test" for a predefined split, else ""
    sha256: str = ""  #: content hash of the file bytes ("" until hashed; "missing" when unreadable)


def list_image_folder(root: Path) -> tuple[list[SourceFile], list[tuple[str, str]]]:
    """Files of an ImageFolder tree, plus (path, reason) for files that are not images by extension."""
    if not root.is_dir():
        raise ConfigError(f"dataset folder {root} does not exist or is not a directory")
    predefined = _read_split_file(root)
    files: list[SourceFile] = []
    rejected: list[tuple[str, str]] = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for p in sorted(class_dir.rglob("*")):
            if not p.is_file() or any(part.startswith(".") for part in p.relative_to(root).parts):
                continue
            rel = p.relative_to(root).as_posix()
            if p.suffix.lower() not in IMAGE_EXTS:
                rejected.append((str(p), f"not an image file extension (allowed: {', '.join(IMAGE_EXTS)})"))
                continue
            split = ""
            if predefined is not None:
                if rel not in predefined:
                    raise EdgetuneError(f"{root / SPLIT_FILE} lists no split for {rel}; every image needs one")
                split = predefined[rel]
            files.append(SourceFile(path=str(p.resolve()), rel=rel, label=class_dir.name, split=split))
    return files, rejected


def _read_split_file(root: Path) -> dict[str, str] | None:
    f = root / SPLIT_FILE
    if not f.exists():
        return None
    try:
        d = json.loads(f.read_text())
        mapping = d["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise EdgetuneError(f'{f} is not a valid split file ({e}); expected {{"files": {{path: split}}}}') from None
    bad = {k: v for k, v in mapping.items() if v not in SPLITS}
    if bad:
        raise EdgetuneError(f"{f}: splits must be one of {list(SPLITS)}, got {dict(list(bad.items())[:3])}")
    return dict(mapping)


def list_csv(csv_path: Path) -> tuple[list[SourceFile], list[tuple[str, str]]]:
    """Files of a CSV manifest with ``path,label`` (and optionally ``split``) columns."""
    try:
        text = csv_path.read_text(encoding="utf-8-sig")
    except OSError as e:
        raise ConfigError(f"cannot read CSV manifest {csv_path}: {e.strerror}") from None
    reader = csv.DictReader(text.splitlines())
    cols = [c.strip() for c in (reader.fieldnames or [])]
    if "path" not in cols or "label" not in cols:
        raise ConfigError(
            f"CSV manifest {csv_path} needs a header with 'path' and 'label' columns (optional 'split'), got {cols}"
        )
    has_split = "split" in cols
    base = csv_path.parent
    files: list[SourceFile] = []
    rejected: list[tuple[str, str]] = []
    seen: set[str] = set()
    for lineno, row in enumerate(reader, start=2):
        row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
        if not row.get("path") or not row.get("label"):
            raise ConfigError(f"{csv_path}:{lineno}: empty path or label")
        p = Path(row["path"])
        p = p if p.is_absolute() else (base / p)
        rel = row["path"].replace(os.sep, "/")
        if rel in seen:
            raise ConfigError(f"{csv_path}:{lineno}: {rel} is listed twice")
        seen.add(rel)
        split = row.get("split", "") if has_split else ""
        if has_split and split not in SPLITS:
            raise ConfigError(f"{csv_path}:{lineno}: split must be one of {list(SPLITS)}, got {split!r}")
        if p.suffix.lower() not in IMAGE_EXTS:
            rejected.append((str(p), f"not an image file extension (allowed: {', '.join(IMAGE_EXTS)})"))
            continue
        files.append(SourceFile(path=str(p.resolve()), rel=rel, label=row["label"], split=split))
    return files, rejected


def hash_files(files: list[SourceFile]) -> list[SourceFile]:
    """The same files with ``sha256`` of their bytes ("missing" when the file cannot be read)."""
    out = []
    for f in files:
        try:
            digest = hashlib.sha256(Path(f.path).read_bytes()).hexdigest()
        except OSError:
            digest = "missing"
        out.append(SourceFile(f.path, f.rel, f.label, f.split, digest))
    return out


def dataset_hash(files: list[SourceFile]) -> str:
    """SHA-256 over (relative path, label, file bytes hash) of every source file, in path order."""
    h = hashlib.sha256()
    for f in sorted(files, key=lambda f: f.rel):
        h.update(f"{f.rel}\t{f.label}\t{f.sha256}\n".encode())
    return h.hexdigest()


@dataclass
class ScanResult:
    good: list[SourceFile]
    skipped: list[tuple[str, str]]  #: (path, reason)
    decoded: dict[str, np.ndarray]  #: rel -> decoded RGB image, for files decoded in this scan (within a budget)
    decode_seconds: float
    from_cache: bool


def scan_sources(
    files: list[SourceFile],
    cache_dir: Path | None,
    keep_bytes: int = 1 << 30,
    reader: Callable[[str], np.ndarray] = read_image,
) -> ScanResult:
    """Decode every file; return the good ones and (path, reason) for each bad one.

    Verdicts are cached in ``cache_dir/scan/<hash>.json`` keyed by the files' content hashes
    (``files`` must be hashed). Decoded images are kept in memory up to ``keep_bytes`` so the
    caller can resize them without decoding twice.
    """
    key = hashlib.sha256("\n".join(sorted(f"{f.rel}\t{f.sha256}" for f in files)).encode()).hexdigest()
    cache_file = cache_dir / "scan" / f"{key}.json" if cache_dir is not None else None
    if cache_file is not None and cache_file.exists():
        try:
            bad = json.loads(cache_file.read_text())["bad"]
            good = [f for f in files if f.rel not in bad]
            return ScanResult(good, [(f.path, bad[f.rel]) for f in files if f.rel in bad], {}, 0.0, True)
        except (OSError, ValueError, KeyError, TypeError):
            pass  # unreadable cache entry: decode again and rewrite it
    t0 = time.perf_counter()
    good, skipped, decoded, bad_rel = [], [], {}, {}
    kept = 0
    for f in files:
        try:
            img = reader(f.path)
        except ImageDecodeError as e:
            reason = str(e)
            prefix = f"{f.path}: "
            reason = reason[len(prefix) :] if reason.startswith(prefix) else reason
            skipped.append((f.path, reason))
            bad_rel[f.rel] = reason
            continue
        good.append(f)
        if kept + img.nbytes <= keep_bytes:
            decoded[f.rel] = img
            kept += img.nbytes
    seconds = time.perf_counter() - t0
    if cache_file is not None:
        atomic_write_text(cache_file, json.dumps({"bad": bad_rel}))
    return ScanResult(good, skipped, decoded, seconds, False)
