"""The labels of a harvested folder: every decision in ``labelling.json`` (ordered, so the last can be undone) and
the labels as ``labels.csv``, the CSV manifest edgetune reads (``path,label`` plus the capture's provenance).

A harvested folder holds ``<id>.<ext>`` frames beside ``<id>.json`` capture records (the spool's own layout).
Decisions: a class label, ``skip`` (left for later, not labelled) or ``none`` (none of these classes: kept out of
the manifest). Both files are rewritten atomically after every decision.
"""

from __future__ import annotations

import csv
import io
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgetune.capture_record import SIDECAR_SUFFIX, CaptureRecord, CaptureRecordError, is_capture_id
from edgetune.errors import ConfigError
from edgetune.fsutil import atomic_write_text

STATE_FILE = "labelling.json"
LABELS_CSV = "labels.csv"
STATE_SCHEMA = "edgetune.labels/1"
#: What a decision may be besides a class name.
SKIP, NONE = "skip", "none"
#: The manifest's columns: what the trainer reads (path, label) and the provenance kept from the sidecar.
CSV_COLUMNS = (
    "path",
    "label",
    "capture_id",
    "camera_id",
    "frame_id",
    "time_unix",
    "model_version",
    "bundle_sha256",
    "reason",
    "model_top1",
    "model_top1_prob",
    "labelled_at",
    "labelled_by",
)


@dataclass(frozen=True)
class Decision:
    id: str
    decision: str  # a class name, SKIP or NONE
    at: float
    by: str = "page"

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "decision": self.decision, "at": self.at, "by": self.by}


class LabelStore:
    """Frames of ``folder`` and the decisions taken on them (thread-safe)."""

    def __init__(self, folder: str | Path, classes: tuple[str, ...] | None = None) -> None:
        self.folder = Path(folder).resolve()
        if not self.folder.is_dir():
            raise ConfigError(f"{folder} is not a folder of harvested frames (make harvest OUT=...)")
        self.records: dict[str, CaptureRecord] = {}
        for side in sorted(self.folder.glob("*" + SIDECAR_SUFFIX)):
            if not is_capture_id(side.stem):
                continue
            try:
                rec = CaptureRecord.read(side)
            except CaptureRecordError:
                continue
            if (self.folder / rec.frame).is_file():
                self.records[rec.id] = rec
        self.order = sorted(self.records)
        self.classes = tuple(classes) if classes else self._classes_of_records()
        bad = [c for c in self.classes if c in (SKIP, NONE) or not c or "," in c or "\n" in c]
        if bad:
            raise ConfigError(f"class names {bad} are not allowed (reserved: {SKIP}, {NONE}; no commas)")
        self._lock = threading.Lock()
        self.decisions: list[Decision] = self._load()

    def _classes_of_records(self) -> tuple[str, ...]:
        seen: dict[str, None] = {}
        for i in self.order:
            for c in self.records[i].labels:
                seen.setdefault(c, None)
        return tuple(seen)

    def _load(self) -> list[Decision]:
        p = self.folder / STATE_FILE
        if not p.is_file():
            return []
        try:
            raw = json.loads(p.read_text(encoding="utf-8"))
            if raw.get("schema") != STATE_SCHEMA:
                raise ValueError(f"schema {raw.get('schema')!r}, expected {STATE_SCHEMA!r}")
            out = [Decision(d["id"], d["decision"], float(d["at"]), d.get("by", "page")) for d in raw["decisions"]]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ConfigError(f"{p} is not a labelling state file ({e}); move it away to start over") from None
        return [d for d in out if d.id in self.records]

    # -- queries ------------------------------------------------------------------------------------------
    def latest(self) -> dict[str, Decision]:
        with self._lock:
            return {d.id: d for d in self.decisions}

    def next_id(self) -> str | None:
        done = self.latest()
        return next((i for i in self.order if i not in done), None)

    def progress(self) -> dict[str, int]:
        done = self.latest().values()
        labelled = sum(d.decision in self.classes for d in done)
        none = sum(d.decision == NONE for d in done)
        skipped = sum(d.decision == SKIP for d in done)
        return {
            "total": len(self.order),
            "labelled": labelled,
            "none": none,
            "skipped": skipped,
            "remaining": len(self.order) - labelled - none - skipped,
        }

    # -- changes ------------------------------------------------------------------------------------------
    def decide(self, item_id: str, decision: str, by: str = "page") -> None:
        if item_id not in self.records:
            raise KeyError(item_id)
        if decision not in self.classes and decision not in (SKIP, NONE):
            raise ConfigError(
                f"decision {decision!r} is not one of the classes {list(self.classes)}, {SKIP!r} or {NONE!r}"
            )
        with self._lock:
            self.decisions.append(Decision(item_id, decision, round(time.time(), 3), by))
            self._save()

    def undo(self) -> Decision | None:
        with self._lock:
            if not self.decisions:
                return None
            last = self.decisions.pop()
            self._save()
            return last

    def _save(self) -> None:
        """Under the lock: the state file, then the manifest (both atomic)."""
        state = {
            "schema": STATE_SCHEMA,
            "classes": list(self.classes),
            "decisions": [d.to_dict() for d in self.decisions],
        }
        atomic_write_text(self.folder / STATE_FILE, json.dumps(state, indent=1))
        atomic_write_text(self.folder / LABELS_CSV, self._manifest())

    def _manifest(self) -> str:
        latest = {d.id: d for d in self.decisions}
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(CSV_COLUMNS)
        for i in self.order:
            d = latest.get(i)
            if d is None or d.decision not in self.classes:
                continue
            r = self.records[i]
            top_label, top_p = r.top[0]
            w.writerow(
                [
                    r.frame,
                    d.decision,
                    r.id,
                    r.camera_id,
                    r.frame_id,
                    r.time_unix,
                    r.model_version,
                    r.bundle_sha256,
                    r.reason,
                    top_label,
                    round(top_p, 6),
                    d.at,
                    d.by,
                ]
            )
        return buf.getvalue()


def read_labels_csv(path: str | Path) -> list[dict[str, str]]:
    """The rows of a ``labels.csv`` (checked for its columns)."""
    p = Path(path)
    try:
        rows = list(csv.DictReader(p.read_text(encoding="utf-8").splitlines()))
    except OSError as e:
        raise ConfigError(f"cannot read {p}: {e.strerror}") from None
    if rows and not set(CSV_COLUMNS) <= set(rows[0]):
        raise ConfigError(f"{p} lacks the columns {sorted(set(CSV_COLUMNS) - set(rows[0]))} (made by make label?)")
    return rows
