"""The sidecar of a frame captured at the edge (``--capture DIR``): one schema, one writer, one reader.

The edge server writes ``<id>.<ext>`` (the frame's own encoded bytes) and then ``<id>.json`` (this record)
atomically into its spool; the harvest copies both; the label page, the Label Studio export and the warm retrain
read the record back with :meth:`CaptureRecord.from_dict`. Ids are made by the server (never from client input)
and match :data:`CAPTURE_ID_RE`, so a path built from an id stays in its folder.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgetune.errors import EdgetuneError

CAPTURE_SCHEMA = "edgetune.capture/1"
#: Why a frame was kept: the model was unsure of it, or it is part of the uniform random sample.
CAPTURE_REASONS = ("low_confidence", "random")
#: The spool makes room in this order: oldest random-sample frames first, then the oldest low-confidence ones.
EVICTION_ORDER = ("random", "low_confidence")
#: Encoded frame formats (read from the frame's header) and the file extension each is stored under.
FRAME_EXTS = {"JPEG": ".jpg", "PNG": ".png", "WebP": ".webp", "TIFF": ".tif", "BMP": ".bmp"}
#: <20-digit nanosecond time>-<8 hex digits>: sortable by capture time, made only by the server.
CAPTURE_ID_RE = re.compile(r"[0-9]{20}-[0-9a-f]{8}")
SIDECAR_SUFFIX = ".json"


class CaptureRecordError(EdgetuneError, ValueError):
    """A sidecar that is not a valid capture record (the message says which field and what is allowed)."""


def new_capture_id(now_ns: int | None = None) -> str:
    """A fresh id: capture time in ns (sorts by time, also across restarts) and 32 random bits."""
    return f"{time.time_ns() if now_ns is None else now_ns:020d}-{secrets.token_hex(4)}"


def is_capture_id(text: object) -> bool:
    return isinstance(text, str) and CAPTURE_ID_RE.fullmatch(text) is not None


@dataclass(frozen=True)
class CaptureRecord:
    """What the edge knew about a kept frame.

    Attributes:
        id: the capture id (:func:`new_capture_id`).
        frame: the frame's file name, ``<id><ext>`` beside the sidecar.
        frame_sha256, frame_bytes: of the frame file.
        camera_id: the stream's camera id (``""`` for a unary Classify call).
        time_unix: server time the frame was classified (seconds since the epoch).
        capture_time_us: the camera's own clock (0 when not given); frame_id: the stream's frame number (0: unary).
        model_version, bundle_sha256: the bundle that classified it.
        labels: the bundle's class names; probs: its softmax, one per label.
        reason: one of :data:`CAPTURE_REASONS`.
    """

    id: str
    frame: str
    frame_sha256: str
    frame_bytes: int
    camera_id: str
    time_unix: float
    capture_time_us: int
    frame_id: int
    model_version: str
    bundle_sha256: str
    labels: tuple[str, ...]
    probs: tuple[float, ...]
    reason: str
    schema: str = CAPTURE_SCHEMA

    def __post_init__(self) -> None:
        _check(self)

    @property
    def top(self) -> list[tuple[str, float]]:
        """(label, probability) by descending probability."""
        return sorted(zip(self.labels, self.probs, strict=True), key=lambda t: -t[1])

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["labels"], d["probs"] = list(self.labels), [round(float(p), 6) for p in self.probs]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, raw: Any, where: str = "sidecar") -> CaptureRecord:
        if not isinstance(raw, dict):
            raise CaptureRecordError(f"{where}: a capture record is a JSON object, got {type(raw).__name__}")
        if raw.get("schema") != CAPTURE_SCHEMA:
            raise CaptureRecordError(
                f"{where}: schema is {raw.get('schema')!r}; this edgetune reads {CAPTURE_SCHEMA!r}"
            )
        names = {f for f in cls.__dataclass_fields__}
        missing = sorted(names - set(raw) - {"schema"})
        if missing:
            raise CaptureRecordError(f"{where}: missing field(s) {missing}")
        try:
            kw = {k: raw[k] for k in names}
            kw["labels"] = tuple(raw["labels"])
            kw["probs"] = tuple(float(p) for p in raw["probs"])
            return cls(**kw)
        except (TypeError, ValueError) as e:
            raise CaptureRecordError(f"{where}: {e}") from None

    @classmethod
    def read(cls, path: str | Path) -> CaptureRecord:
        p = Path(path)
        try:
            raw = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise CaptureRecordError(f"{p}: cannot read the capture record ({e})") from None
        rec = cls.from_dict(raw, str(p))
        if p.name != rec.id + SIDECAR_SUFFIX:
            raise CaptureRecordError(f"{p}: the file name does not match the record's id {rec.id!r}")
        return rec


def _check(r: CaptureRecord) -> None:  # noqa: C901
    if not is_capture_id(r.id):
        raise CaptureRecordError(f"id {r.id!r} is not a capture id (<20 digits>-<8 hex digits>)")
    if r.frame not in {r.id + ext for ext in FRAME_EXTS.values()}:
        raise CaptureRecordError(f"frame {r.frame!r} must be the id plus one of {sorted(FRAME_EXTS.values())}")
    if r.reason not in CAPTURE_REASONS:
        raise CaptureRecordError(f"reason {r.reason!r} is not one of {list(CAPTURE_REASONS)}")
    if len(r.labels) < 2 or not all(isinstance(x, str) for x in r.labels):
        raise CaptureRecordError("labels must be at least two class names")
    if len(r.probs) != len(r.labels):
        raise CaptureRecordError(f"{len(r.probs)} probabilities for {len(r.labels)} labels")
    if not isinstance(r.frame_bytes, int) or r.frame_bytes < 0:
        raise CaptureRecordError(f"frame_bytes must be a non-negative integer, got {r.frame_bytes!r}")
    if not isinstance(r.frame_sha256, str) or not re.fullmatch(r"[0-9a-f]{64}", r.frame_sha256):
        raise CaptureRecordError("frame_sha256 must be 64 hex digits")
    if not isinstance(r.camera_id, str) or len(r.camera_id) > 128:
        raise CaptureRecordError("camera_id must be a string of at most 128 characters")
