"""The capture spool on disk: ``<id>.<ext>`` frames beside ``<id>.json`` sidecars in one flat folder.

Bounded in bytes and files: before a frame is added, room is made by deleting the oldest random-sample
frames first, then the oldest low-confidence ones (:data:`~edgetune.capture_record.EVICTION_ORDER`); a
frame that would not fit even in an empty spool is refused. Low-confidence frames of one predicted class
may hold at most ``class_quota_files`` places (random-sample frames are not limited per class: they must
stay a uniform sample). Every path is ``folder / <id><ext>`` with a server-made id
(:data:`~edgetune.capture_record.CAPTURE_ID_RE`); nothing a client sends becomes part of a file name.

Restarts: the index is rebuilt from the sidecars (a sidecar is written last, so a frame without one, or a
temporary file, is what a crash left half-done: deleted at start). Files that are not the spool's own are
left alone and not counted.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from edgetune.capture_record import (
    CAPTURE_ID_RE,
    CAPTURE_REASONS,
    EVICTION_ORDER,
    FRAME_EXTS,
    SIDECAR_SUFFIX,
    CaptureRecord,
    CaptureRecordError,
    is_capture_id,
)
from edgetune.fsutil import atomic_write_bytes, atomic_write_text

log = logging.getLogger("edge_server.capture")


@dataclass(frozen=True)
class SpoolItem:
    id: str
    frame: str
    reason: str
    predicted: int
    nbytes: int  # frame + sidecar
    frame_sha256: str
    frame_bytes: int


class SpoolFull(Exception):
    """The frame cannot be kept (its class is at its quota, or it is larger than the whole spool)."""


class Spool:
    """The spool folder and its in-memory index (thread-safe)."""

    def __init__(self, folder: Path, max_bytes: int, max_files: int, class_quota_files: int) -> None:
        self.folder = folder
        self.max_bytes, self.max_files, self.class_quota_files = max_bytes, max_files, class_quota_files
        self._lock = threading.Lock()
        self._items: dict[str, collections.OrderedDict[str, SpoolItem]] = {
            r: collections.OrderedDict() for r in CAPTURE_REASONS
        }
        self._by_id: dict[str, SpoolItem] = {}
        self._per_class: collections.Counter[int] = collections.Counter()
        self.bytes = 0
        self.evicted = 0
        folder.mkdir(parents=True, exist_ok=True)
        self._recover()

    # -- start-up -------------------------------------------------------------------------------------
    def _recover(self) -> None:
        """Index the complete items left by an earlier run; delete what a crash left half-written."""
        found: list[tuple[CaptureRecord, int]] = []
        frames: set[str] = set()
        for p in self.folder.iterdir():
            name = p.name
            if name.startswith(".") and CAPTURE_ID_RE.match(name[1:]) and name.endswith(".tmp"):  # interrupted write
                _unlink(p)
            elif name.endswith(SIDECAR_SUFFIX) and is_capture_id(name[: -len(SIDECAR_SUFFIX)]):
                try:
                    rec = CaptureRecord.read(p)
                    size = (self.folder / rec.frame).stat().st_size + p.stat().st_size
                except (CaptureRecordError, OSError) as e:
                    log.warning(
                        "capture spool: unreadable item deleted", extra={"fields": {"file": name, "error": str(e)}}
                    )
                    _unlink(p)
                    continue
                found.append((rec, size))
            elif CAPTURE_ID_RE.fullmatch(Path(name).stem) and Path(name).suffix in FRAME_EXTS.values():
                frames.add(name)
        for rec, size in sorted(found, key=lambda t: t[0].id):
            frames.discard(rec.frame)
            self._index(_item(rec, size))
        for name in frames:  # frames whose sidecar was never written
            _unlink(self.folder / name)
        if found or frames:
            log.info(
                "capture spool recovered",
                extra={"fields": {"items": len(found), "bytes": self.bytes, "incomplete_deleted": len(frames)}},
            )

    def _index(self, item: SpoolItem) -> None:
        self._items[item.reason][item.id] = item
        self._by_id[item.id] = item
        if item.reason == "low_confidence":
            self._per_class[item.predicted] += 1
        self.bytes += item.nbytes

    def _forget(self, item: SpoolItem) -> None:
        self._items[item.reason].pop(item.id, None)
        self._by_id.pop(item.id, None)
        if item.reason == "low_confidence":
            self._per_class[item.predicted] -= 1
        self.bytes -= item.nbytes

    # -- adding -------------------------------------------------------------------------------------
    @property
    def files(self) -> int:
        return len(self._by_id)

    def add(self, rec: CaptureRecord, frame: bytes) -> None:
        """Write ``frame`` and its sidecar atomically (frame first), making room first. Raises
        :class:`SpoolFull` when the frame is not kept, ``OSError`` when the disk refuses (nothing is left)."""
        sidecar = rec.to_json()
        size = len(frame) + len(sidecar.encode())
        predicted = _argmax(rec.probs)
        if size > self.max_bytes:
            raise SpoolFull("frame larger than the whole spool")
        with self._lock:
            if rec.reason == "low_confidence" and self._per_class[predicted] >= self.class_quota_files:
                raise SpoolFull("class quota")
            victims = self._make_room(size)
        for v in victims:
            self._delete_files(v)
        path = self.folder / rec.frame
        try:
            atomic_write_bytes(path, frame)
            atomic_write_text(self.folder / (rec.id + SIDECAR_SUFFIX), sidecar)
        except BaseException:
            _unlink(path)
            raise
        with self._lock:
            self._index(_item(rec, size))

    def _make_room(self, size: int) -> list[SpoolItem]:
        """Under the lock: pick (and unindex) the items to evict so one more item of ``size`` bytes fits (one
        writer thread adds, so the room stays free until it is used)."""
        victims: list[SpoolItem] = []
        while self.files + 1 > self.max_files or self.bytes + size > self.max_bytes:
            order = next((self._items[r] for r in EVICTION_ORDER if self._items[r]), None)
            if order is None:
                break
            victim = next(iter(order.values()))
            self._forget(victim)
            victims.append(victim)
        self.evicted += len(victims)
        return victims

    # -- harvest --------------------------------------------------------------------------------------
    def list(self, after: str, limit: int) -> tuple[list[SpoolItem], bool]:
        """Items with an id greater than ``after``, in id (= time) order, at most ``limit``; and whether more."""
        with self._lock:
            ids = sorted(i for i in self._by_id if i > after)
            return [self._by_id[i] for i in ids[:limit]], len(ids) > limit

    def get(self, item_id: str) -> SpoolItem | None:
        with self._lock:
            return self._by_id.get(item_id)

    def read_sidecar(self, item: SpoolItem) -> str:
        return (self.folder / (item.id + SIDECAR_SUFFIX)).read_text(encoding="utf-8")

    def read_frame(self, item: SpoolItem, offset: int, length: int) -> bytes:
        with open(self.folder / item.frame, "rb") as f:
            f.seek(offset)
            return f.read(length)

    def ack(self, item_id: str, frame_sha256: str) -> bool:
        """Delete an item the harvest has stored (only when its id and frame digest both match)."""
        with self._lock:
            item = self._by_id.get(item_id)
            if item is None or item.frame_sha256 != frame_sha256:
                return False
            self._forget(item)
        self._delete_files(item)
        return True

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {r: len(self._items[r]) for r in CAPTURE_REASONS}

    def _delete_files(self, item: SpoolItem) -> None:
        _unlink(self.folder / (item.id + SIDECAR_SUFFIX))  # the sidecar first: a crash leaves an orphan frame
        _unlink(self.folder / item.frame)


def _item(rec: CaptureRecord, size: int) -> SpoolItem:
    return SpoolItem(
        id=rec.id,
        frame=rec.frame,
        reason=rec.reason,
        predicted=_argmax(rec.probs),
        nbytes=size,
        frame_sha256=rec.frame_sha256,
        frame_bytes=rec.frame_bytes,
    )


def _argmax(probs: tuple[float, ...]) -> int:
    return max(range(len(probs)), key=lambda i: probs[i])


def _unlink(p: Path) -> None:
    try:
        os.unlink(p)
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("capture spool: cannot delete a file", extra={"fields": {"file": p.name, "error": str(e)}})
