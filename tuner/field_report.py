"""The warm study's report: the previous bundle and the new one on the same field test set and the same original
(home) test set, each difference with a paired bootstrap interval (the same images resampled for both models) and
the discordant counts; written to ``<out>/field_report.json`` and ``.md``. The new bundle records its parent."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgetune.bundle import load_bundle
from edgetune.fsutil import atomic_write_text
from edgetune.imagedecode import read_image
from edgetune.markdown import markdown_table

BOOTSTRAP_REPS = 2000


def correct(bundle_dir: Path, items: Sequence[tuple[str, str]]) -> np.ndarray:
    """Per image (path, label): whether the bundle's top-1 (ONNX Runtime, CPU) is the label."""
    from trainer.export import ort_probs, ort_session  # noqa: PLC0415 - lazy: torch, ONNX Runtime

    b = load_bundle(bundle_dir)
    if not items:
        return np.zeros(0, dtype=bool)
    x = b.spec.apply_batch([read_image(p) for p, _ in items])
    pred = ort_probs(ort_session(b.model_path), x).argmax(1)
    return np.array([b.labels[int(k)] == lab for k, (_, lab) in zip(pred, items, strict=True)])


def paired(old: np.ndarray, new: np.ndarray, seed: int = 0) -> dict[str, Any]:
    """Accuracies, their difference and its 95 % paired bootstrap interval, discordant counts."""
    n = len(old)
    if n == 0:
        return {"n": 0}
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(BOOTSTRAP_REPS, n))
    diffs = new[idx].mean(1) - old[idx].mean(1)
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return {
        "n": n,
        "acc_old": float(old.mean()),
        "acc_new": float(new.mean()),
        "diff": float(new.mean() - old.mean()),
        "ci95": [float(lo), float(hi)],
        "old_right_new_wrong": int((old & ~new).sum()),
        "old_wrong_new_right": int((~old & new).sum()),
    }


def compare(old_bundle: Path, new_bundle: Path, sets: Mapping[str, Sequence[tuple[str, str]]]) -> dict[str, Any]:
    out = {}
    for name, items in sets.items():
        out[name] = paired(correct(old_bundle, items), correct(new_bundle, items))
    return out


def record_parent(new_bundle: Path, old_bundle: Path, study: str) -> None:
    from trainer.export import record_parent as write_parent  # noqa: PLC0415 - lazy: torch

    old = load_bundle(old_bundle, verify_sha=False)
    write_parent(
        new_bundle,
        {"bundle_sha256": old.sha256, "model_version": old.version, "path": str(old_bundle.resolve()), "study": study},
    )


def markdown(report: dict[str, Any]) -> str:
    rows = []
    for name, r in report["sets"].items():
        if not r.get("n"):
            rows.append({"test set": name, "n": 0})
            continue
        rows.append(
            {
                "test set": name,
                "n": r["n"],
                "old": f"{r['acc_old']:.3f}",
                "new": f"{r['acc_new']:.3f}",
                "new - old": f"{r['diff']:+.3f}",
                "95% paired CI": f"[{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}]",
                "old right / new right only": f"{r['old_right_new_wrong']} / {r['old_wrong_new_right']}",
            }
        )
    cols = ["test set", "n", "old", "new", "new - old", "95% paired CI", "old right / new right only"]
    return (
        f"old bundle {report['old']['model_version']} vs new bundle {report['new']['model_version']} "
        f"(parent recorded)\n\n" + markdown_table(rows, cols, lambda v: "" if v is None else str(v))
    )


def compare_and_record(prev: Any, new_bundle: Path, data: Any, out: Path) -> dict[str, Any]:
    """Compare ``prev.bundle`` with ``new_bundle`` on the field and home test sets of ``data``; write the report,
    record the parent in the new bundle; returns the report (with its ``markdown``)."""
    sets = {
        "field test": [(r.path, r.label) for r in data.subset("field", "test")],
        "home test": [(r.path, r.label) for r in data.subset("home", "test")],
    }
    report: dict[str, Any] = {
        "old": {"bundle": str(prev.bundle), "model_version": load_bundle(prev.bundle, verify_sha=False).version},
        "new": {"bundle": str(new_bundle), "model_version": load_bundle(new_bundle, verify_sha=False).version},
        "data": {"manifest": str(data.manifest), "counts": data.counts(), "field_groups": len(data.groups)},
        "sets": compare(prev.bundle, new_bundle, sets),
        "bootstrap_reps": BOOTSTRAP_REPS,
    }
    record_parent(new_bundle, prev.bundle, prev.study)
    report["markdown"] = markdown(report)
    atomic_write_text(out / "field_report.json", json.dumps(report, indent=1))
    atomic_write_text(out / "field_report.md", report["markdown"] + "\n")
    return report
