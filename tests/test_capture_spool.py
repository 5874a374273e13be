"""Capture at the edge, without a server: the spool's bounds, eviction order, quotas, restart recovery, the
bounded queue that drops instead of waiting, a disk that refuses writes, and the sidecar schema."""

from __future__ import annotations

import errno
import hashlib
import threading
import types

import numpy as np
import pytest

from edge_server.capture import Capture, CaptureConfig, DriftMonitor, capture_reason
from edge_server.spool import Spool, SpoolFull
from edgetune.capture_record import CaptureRecord, CaptureRecordError, new_capture_id
from edgetune.errors import ConfigError
from testkit.edge_fixtures import encode_png, texture_tiles

LABELS = ("brick", "grass", "gravel")


@pytest.fixture(scope="module")
def frames() -> list[bytes]:
    imgs, _ = texture_tiles("test")
    return [encode_png(i) for i in imgs[:12]]


def _rec(data: bytes, reason: str, probs: tuple[float, ...] = (0.5, 0.3, 0.2), n: int = 0) -> CaptureRecord:
    cid = new_capture_id(10**18 + n)
    return CaptureRecord(
        id=cid,
        frame=cid + ".png",
        frame_sha256=hashlib.sha256(data).hexdigest(),
        frame_bytes=len(data),
        camera_id="cam-1",
        time_unix=1.0,
        capture_time_us=0,
        frame_id=n,
        model_version="abc",
        bundle_sha256="d" * 64,
        labels=LABELS,
        probs=probs,
        reason=reason,
    )


def test_eviction_order_random_first_then_oldest_low_confidence(tmp_path, frames):
    sp = Spool(tmp_path, max_bytes=10**9, max_files=4, class_quota_files=100)
    recs = [
        _rec(frames[0], "low_confidence", n=0),
        _rec(frames[1], "random", n=1),
        _rec(frames[2], "low_confidence", n=2),
        _rec(frames[3], "random", n=3),
    ]
    for r, f in zip(recs, frames, strict=False):
        sp.add(r, f)
    sp.add(_rec(frames[4], "low_confidence", n=4), frames[4])  # evicts the oldest random (n=1)
    sp.add(_rec(frames[5], "low_confidence", n=5), frames[5])  # then the other random (n=3)
    assert sp.counts() == {"low_confidence": 4, "random": 0}
    sp.add(_rec(frames[6], "low_confidence", n=6), frames[6])  # then the oldest low-confidence (n=0)
    kept = {i.id for i in sp.list("", 100)[0]}
    assert recs[0].id not in kept and recs[2].id in kept and sp.files == 4 and sp.evicted == 3
    assert len(list(tmp_path.glob("*.json"))) == 4 and len(list(tmp_path.glob("*.png"))) == 4


def test_byte_bound_and_class_quota(tmp_path, frames):
    size = len(frames[0]) + len(_rec(frames[0], "random").to_json())
    sp = Spool(tmp_path, max_bytes=int(size * 2.5), max_files=100, class_quota_files=2)
    for n in range(5):
        sp.add(_rec(frames[0], "random", n=n), frames[0])
        assert sp.bytes <= sp.max_bytes
    assert sp.files == 2
    sq = Spool(tmp_path / "q", max_bytes=10**9, max_files=100, class_quota_files=2)
    sq.add(_rec(frames[0], "low_confidence", n=0), frames[0])
    sq.add(_rec(frames[1], "low_confidence", n=1), frames[1])
    with pytest.raises(SpoolFull, match="quota"):  # a third unsure 'brick' frame: the class is at its quota
        sq.add(_rec(frames[2], "low_confidence", n=2), frames[2])
    sq.add(_rec(frames[2], "low_confidence", (0.2, 0.5, 0.3), n=3), frames[2])  # another class still fits
    sq.add(_rec(frames[3], "random", n=4), frames[3])  # the random sample is not limited per class
    assert sq.files == 4
    with pytest.raises(SpoolFull):
        Spool(tmp_path / "t", max_bytes=10, max_files=10, class_quota_files=1).add(_rec(frames[0], "random"), frames[0])


def test_restart_recovers_complete_items_and_deletes_half_written(tmp_path, frames):
    sp = Spool(tmp_path, max_bytes=10**9, max_files=100, class_quota_files=100)
    for n in range(3):
        sp.add(_rec(frames[n], "low_confidence", n=n), frames[n])
    orphan = _rec(frames[5], "random", n=9)
    (tmp_path / orphan.frame).write_bytes(frames[5])  # a crash between frame and sidecar
    half = tmp_path / f".{orphan.id}.png.abc123.tmp"  # a crash inside an atomic write (edgetune.fsutil)
    half.write_bytes(b"half")
    (tmp_path / ".mine.tmp").write_text("not ours either")
    (tmp_path / "notes.txt").write_text("not ours")
    again = Spool(tmp_path, max_bytes=10**9, max_files=100, class_quota_files=100)
    assert again.files == 3 and again.bytes == sp.bytes
    assert not (tmp_path / orphan.frame).exists() and not half.exists() and (tmp_path / ".mine.tmp").exists()
    assert (tmp_path / "notes.txt").exists()
    item = again.list("", 1)[0][0]
    assert again.ack(item.id, "0" * 64) is False  # wrong digest: nothing deleted
    assert again.ack(item.id, item.frame_sha256) is True and again.files == 2
    assert not (tmp_path / item.frame).exists()


def test_capture_reason_thresholds():
    cfg = CaptureConfig(dir="x", min_confidence=0.6, min_margin=0.2, random_rate=0.0)
    rng = __import__("random").Random(0)
    assert capture_reason(np.array([0.55, 0.4, 0.05]), cfg, rng) == "low_confidence"
    assert capture_reason(np.array([0.65, 0.5, 0.0]), cfg, rng) == "low_confidence"  # margin 0.15
    assert capture_reason(np.array([0.9, 0.05, 0.05]), cfg, rng) is None
    sure = CaptureConfig(dir="x", random_rate=1.0)
    assert capture_reason(np.array([0.9, 0.05, 0.05]), sure, rng) == "random"
    with pytest.raises(ConfigError, match="random_rate"):
        CaptureConfig(dir="x", random_rate=2)


def _model() -> types.SimpleNamespace:
    return types.SimpleNamespace(version="abc", bundle=types.SimpleNamespace(sha256="d" * 64, labels=list(LABELS)))


def test_full_queue_drops_and_counts_without_waiting(tmp_path, frames, monkeypatch):
    cap = Capture(CaptureConfig(dir=tmp_path, queue_frames=2, random_rate=1.0, max_writes_per_s=1000))
    release = threading.Event()
    real_add = cap.spool.add
    writing = threading.Event()

    def slow_add(rec, data):  # a disk that stalls until released
        writing.set()
        release.wait(30)
        real_add(rec, data)

    monkeypatch.setattr(cap.spool, "add", slow_add)
    unsure = np.array([0.4, 0.35, 0.25], dtype=np.float32)
    try:
        assert cap.offer(frames[0], unsure, _model(), "cam", 0) == "low_confidence"
        writing.wait(30)
        kept = [cap.offer(frames[i], unsure, _model(), "cam", 0) for i in range(1, 8)]  # returns at once
        # one frame is being written, one more fits the queue, the other six are dropped and counted
        assert kept.count("low_confidence") == 1 and cap.snapshot()["counters"]["dropped_queue"] == 6
        release.set()
        assert cap.flush(30)
        snap = cap.snapshot()
        assert snap["captured"]["low_confidence"] == 2 and snap["spool_files"] == 2
    finally:
        release.set()
        cap.close()


def test_disk_refusing_writes_pauses_capture_only(tmp_path, frames, monkeypatch):
    cap = Capture(CaptureConfig(dir=tmp_path, random_rate=1.0, pause_after_error_s=3600))

    def full(rec, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cap.spool, "add", full)
    unsure = np.array([0.4, 0.35, 0.25], dtype=np.float32)
    try:
        cap.offer(frames[0], unsure, _model(), "cam", 0)
        assert cap.flush(30)
        assert cap.offer(frames[1], unsure, _model(), "cam", 0) is None  # paused: not even queued
        s = cap.snapshot()
        assert s["counters"]["write_errors"] == 1 and s["counters"]["dropped_paused"] == 1 and s["paused"]
    finally:
        cap.close()


def test_write_rate_is_bounded(tmp_path, frames):
    cap = Capture(CaptureConfig(dir=tmp_path, random_rate=1.0, max_writes_per_s=0.01, queue_frames=100))
    unsure = np.array([0.4, 0.35, 0.25], dtype=np.float32)
    try:
        got = [cap.offer(frames[i % 12], unsure, _model(), "cam", 0) for i in range(50)]
        assert sum(g is not None for g in got) <= 2 and cap.snapshot()["counters"]["dropped_rate"] >= 48
    finally:
        cap.close()


def test_drift_monitor_window():
    d = DriftMonitor(window=4)
    for p in ([0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.7, 0.3], [0.5, 0.5]):
        d.observe(np.array(p))
    mean, n, counts = d.snapshot(2)
    assert n == 4 and mean == pytest.approx((0.8 + 0.6 + 0.7 + 0.5) / 4) and counts == [3, 1]


def test_capture_record_refuses_paths_and_bad_fields(frames):
    rec = _rec(frames[0], "random")
    good = rec.to_dict()
    assert CaptureRecord.from_dict(good) == rec
    for key, bad in (
        ("id", "../../etc/passwd"),
        ("frame", "../x.png"),
        ("reason", "whatever"),
        ("probs", [0.5]),
        ("frame_sha256", "zz"),
    ):
        with pytest.raises(CaptureRecordError):
            CaptureRecord.from_dict({**good, key: bad})
