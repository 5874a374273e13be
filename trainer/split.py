"""Deterministic stratified subset and train/val/test split of source files, and the split manifest.

Membership is decided per SOURCE FILE, before slicing and offline expansion, so that every tile
and every expanded copy of an image lives in the split of the file it came from.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgetune.errors import EdgetuneError
from edgetune.fsutil import atomic_write_text
from trainer.scan import SPLITS, SourceFile

MIN_PER_CLASS = 3  #: one image each for train, val and test


def check_classes(files: Sequence[SourceFile], what: str) -> list[str]:
    """Sorted class names; a clear error for an empty or single-class dataset."""
    if not files:
        raise EdgetuneError(
            f"{what}: no readable images found (expected root/<class>/*.jpg|png|bmp|tif "
            f"or a CSV with path,label columns)"
        )
    classes = sorted({f.label for f in files})
    if len(classes) < 2:
        raise EdgetuneError(
            f"{what}: only one class ({classes[0]!r}, {len(files)} images); classification needs at least 2 classes"
        )
    return classes


def stratified_subset(files: Sequence[SourceFile], max_images: int, seed: int) -> list[SourceFile]:
    """At most ``max_images`` files (more only if needed to keep every class splittable), groups keep their share."""
    if max_images <= 0 or max_images >= len(files):
        return list(files)
    groups: dict[tuple[str, str], list[SourceFile]] = defaultdict(list)
    for f in sorted(files, key=lambda f: f.rel):
        groups[(f.label, f.split)].append(f)
    keys = sorted(groups)
    total = len(files)
    # Floor per group: enough to split a class 3 ways (seeded split), or 1 per predefined split group.
    floor = {k: min(len(groups[k]), 1 if k[1] else MIN_PER_CLASS) for k in keys}
    quota = {k: max(floor[k], int(round(max_images * len(groups[k]) / total))) for k in keys}
    # Trim the largest quotas until the budget fits (never below the floor, so a class never vanishes).
    while sum(quota.values()) > max_images and any(quota[k] > floor[k] for k in keys):
        k = max((k for k in keys if quota[k] > floor[k]), key=lambda k: (quota[k], k))
        quota[k] -= 1
    out: list[SourceFile] = []
    for i, k in enumerate(keys):
        rng = np.random.default_rng([seed, 7919, i])
        idx = rng.permutation(len(groups[k]))[: quota[k]]
        out.extend(groups[k][j] for j in sorted(idx))
    return sorted(out, key=lambda f: f.rel)


def stratified_split(
    files: Sequence[SourceFile], classes: Sequence[str], ratios: Sequence[float], seed: int
) -> dict[str, list[SourceFile]]:
    """Split per class with ratios (train, val, test); every class gets >= 1 image in each split.

    A predefined split (every file has ``split`` set) is returned as is after checking that each
    class is present in each split. Same files + same seed -> same split, whatever the listing order.
    """
    predefined = [f.split for f in files]
    if any(predefined):
        if not all(predefined):
            raise EdgetuneError("a predefined split must give every file a split; some files have none")
        out = {s: sorted((f for f in files if f.split == s), key=lambda f: f.rel) for s in SPLITS}
        for s in SPLITS:
            missing = sorted(set(classes) - {f.label for f in out[s]})
            if missing:
                raise EdgetuneError(f"the predefined split has no {s} images of class(es) {missing}")
        return out
    by_class: dict[str, list[SourceFile]] = defaultdict(list)
    for f in sorted(files, key=lambda f: f.rel):
        by_class[f.label].append(f)
    small = {c: len(by_class[c]) for c in classes if len(by_class[c]) < MIN_PER_CLASS}
    if small:
        raise EdgetuneError(
            f"class(es) with too few images to split into train/val/test: {small}; "
            f"each class needs at least {MIN_PER_CLASS} readable images"
        )
    out = {s: [] for s in SPLITS}
    for ci, c in enumerate(classes):
        items = by_class[c]
        n = len(items)
        n_val = max(1, int(round(n * ratios[1])))
        n_test = max(1, int(round(n * ratios[2])))
        while n - n_val - n_test < 1:  # keep at least one training image
            if n_val >= n_test:
                n_val -= 1
            else:
                n_test -= 1
        perm = np.random.default_rng([seed, ci]).permutation(n)
        chosen = [items[j] for j in perm]
        out["test"].extend(chosen[:n_test])
        out["val"].extend(chosen[n_test : n_test + n_val])
        out["train"].extend(chosen[n_test + n_val :])
    return {s: sorted(v, key=lambda f: f.rel) for s, v in out.items()}


def write_manifest(
    path: Path, splits: dict[str, list[SourceFile]], skipped: Sequence[tuple[str, str]], info: dict[str, Any]
) -> Path:
    """JSON with every source file, its label and split (plus what produced the split)."""
    files = [
        {"path": f.rel, "abs_path": f.path, "label": f.label, "split": s, "sha256": f.sha256}
        for s in SPLITS
        for f in splits[s]
    ]
    doc = dict(info)
    doc["counts"] = {s: len(splits[s]) for s in SPLITS}
    doc["files"] = sorted(files, key=lambda d: d["path"])
    doc["skipped"] = [{"path": p, "reason": r} for p, r in skipped]
    atomic_write_text(path, json.dumps(doc, indent=1))
    return path
