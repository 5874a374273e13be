"""The edge server under hostile clients (issue 11), resource bounds: real bundle, real ONNX Runtime, real gRPC
on 127.0.0.1. Model loading, credentials and error handling are in ``tests/test_server_admin_errors.py``.

One test (or group) per finding; each failed against the server before the fix:

1. a 254-byte 1x60000 PNG blew up the server's memory (``test_tiny_wide_png_*``);
2. header bombs of other formats were decoded before the pixel check (``test_header_bombs_*``);
3. idle streams filled ``--max-concurrent`` and starved unary calls and health (``test_idle_streams_*``,
   ``test_stream_limit_*``, ``test_health_is_never_refused_*``);
6. client-controlled stats cardinality, GetStats under the hot lock, RESOURCE_EXHAUSTED not counted
   (``test_camera_id_*``, ``test_tracked_cameras_*``, ``test_get_stats_*``, ``test_stream_limit_*``);
7. (part) health during drain (``test_health_not_serving_during_drain``).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import cv2
import grpc
import numpy as np
from grpc_health.v1 import health_pb2

from edge_server.server import make_server
from edge_server.stats import ServerStats
from edgetune.v1 import classifier_pb2 as pb
from edgetune.v1 import classifier_pb2_grpc as pb_grpc
from testkit.edge_fixtures import (
    CliServer,
    RequestFeeder,
)
from testkit.hostile_media import oversized, wide_png
from tests.server_helpers import call_error, health_status, start_server, wait_until

# -- finding 1 ---------------------------------------------------------------------------------


def test_tiny_wide_png_is_refused_fast_with_bounded_memory(cli: CliServer) -> None:
    png = wide_png(60000)
    assert len(png) < 400
    with grpc.insecure_channel(cli.address) as ch:
        stub = pb_grpc.ClassifierStub(ch)
        stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
        before = cli.hwm_mb()
        t0 = time.monotonic()
        e = call_error(stub.Classify, pb.ClassifyRequest(image=png), timeout=30)
        took = time.monotonic() - t0
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "aspect ratio" in e.details(), e.details()
        assert took < 2.0
        assert cli.hwm_mb() - before < 50, (before, cli.hwm_mb())
        frames = iter([pb.Frame(camera_id="wide", frame_id=1, image=png)])
        (res,) = list(stub.StreamClassify(frames, timeout=10))
        assert "aspect ratio" in res.error
        assert cli.hwm_mb() - before < 50


# -- finding 2 ---------------------------------------------------------------------------------


def test_header_bombs_are_refused_with_bounded_memory(cli: CliServer) -> None:
    with grpc.insecure_channel(cli.address) as ch:
        stub = pb_grpc.ClassifierStub(ch)
        stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
        before = cli.hwm_mb()
        for fmt in ("WebP-lossless", "WebP-lossy", "JPEG", "TIFF", "BMP", "PNG"):
            data = oversized(fmt, 8192, 8192)  # 67 M pixels declared by a few hundred bytes
            e = call_error(stub.Classify, pb.ClassifyRequest(image=data), timeout=30)
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "8192x8192 exceeds" in e.details(), (fmt, e)
        gif = cv2.imencode(".gif", np.zeros((8, 8, 3), np.uint8))[1].tobytes()
        e = call_error(stub.Classify, pb.ClassifyRequest(image=gif), timeout=10)
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "JPEG, PNG, WebP, TIFF, BMP" in e.details()
        assert cli.hwm_mb() - before < 50, (before, cli.hwm_mb())


# -- finding 3 ---------------------------------------------------------------------------------


def _idle(stop: threading.Event) -> Any:
    stop.wait()
    return
    yield  # a generator that never sends a frame


def test_idle_streams_do_not_starve_unary_calls_or_health(bundle_dir: Path, good_png: bytes) -> None:
    srv = start_server(bundle_dir)  # the defaults: what `make serve` runs
    stop = threading.Event()
    try:
        with grpc.insecure_channel(srv.address) as ch:
            stub = pb_grpc.ClassifierStub(ch)
            calls = [stub.StreamClassify(_idle(stop)) for _ in range(64)]
            # a state, not a sleep: every stream beyond the limit has been refused, the rest hold their slots (one
            # channel is one connection: it gets at most its share of the stream slots)
            held = srv.config.streams_per_connection()
            assert held < srv.config.max_streams
            wait_until(lambda: sum(c.done() for c in calls) >= 64 - held)
            t0 = time.monotonic()
            # starved calls would wait for a stream slot forever: generous deadlines still tell them apart
            assert stub.Classify(pb.ClassifyRequest(image=good_png), timeout=30).predictions
            assert stub.GetStats(pb.GetStatsRequest(), timeout=30).uptime_s > 0
            assert stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30).labels
            assert health_status(ch) == health_pb2.HealthCheckResponse.SERVING
            assert time.monotonic() - t0 < 30
            rejected = [c for c in calls if c.done()]
            assert len(rejected) == 64 - held  # streams have their own limit, and one connection its share
            assert {c.code() for c in rejected} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
            assert "--max-streams" in rejected[0].details()
            for c in calls:
                c.cancel()
    finally:
        stop.set()
        srv.stop(grace=1)


def test_stream_limit_idle_timeout_and_rejections_counted(bundle_dir: Path, good_png: bytes) -> None:
    srv = start_server(bundle_dir, max_streams=2, max_streams_per_connection=2, stream_idle_s=1.0)  # one channel
    stop = threading.Event()
    try:
        with grpc.insecure_channel(srv.address) as ch:
            stub = pb_grpc.ClassifierStub(ch)
            # a camera sending every 0.4 s is never idle; it holds one of the two stream slots
            feeder = RequestFeeder()
            active = stub.StreamClassify(feeder, timeout=60)
            feeder.send(pb.Frame(camera_id="busy", frame_id=0, image=good_png))
            assert next(active).predictions
            t0 = time.monotonic()
            idle = [stub.StreamClassify(_idle(stop)) for _ in range(3)]  # one admitted, two rejected
            for i in range(1, 8):
                time.sleep(0.4)
                feeder.send(pb.Frame(camera_id="busy", frame_id=i, image=good_png))
                assert next(active).frame_id == i
            codes = sorted(c.code().name for c in idle)
            assert codes == ["DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "RESOURCE_EXHAUSTED"], codes
            timed_out = next(c for c in idle if c.code() == grpc.StatusCode.DEADLINE_EXCEEDED)
            # ended by the 1 s idle timeout (without it the stream would stay open): a loaded machine only adds time
            assert "no frame" in timed_out.details() and time.monotonic() - t0 < 30
            feeder.end()
            assert list(active) == []
            # the slot is free again: a new stream is served
            again = list(stub.StreamClassify(iter([pb.Frame(camera_id="c2", frame_id=9, image=good_png)]), timeout=10))
            assert [r.frame_id for r in again] == [9]
            stats = stub.GetStats(pb.GetStatsRequest(), timeout=5)
            assert stats.errors_total >= 3  # 2 RESOURCE_EXHAUSTED + 1 idle stream ended
    finally:
        stop.set()
        srv.stop(grace=1)


def test_headers_only_unary_calls_are_bounded_and_cancelled(bundle_dir: Path, good_png: bytes) -> None:
    """Unary calls that send headers but never their request message (slow loris): refusals are immediate,
    admitted ones are cancelled after the idle timeout, health is answered throughout."""
    srv = start_server(bundle_dir, max_concurrent=4, stream_idle_s=1.0)
    never = threading.Event()

    def no_message() -> Any:
        never.wait()
        return
        yield

    try:
        with grpc.insecure_channel(srv.address) as ch:
            raw = ch.stream_unary("/edgetune.v1.Classifier/GetStats")  # a unary method, its message withheld
            t0 = time.monotonic()
            calls = [raw.future(no_message(), timeout=60) for _ in range(12)]
            # the refusals are immediate; a loaded machine is slow
            wait_until(lambda: sum(c.done() for c in calls) >= 8)
            refused = [c for c in calls if c.done()]
            assert len(refused) == 8 and {c.code() for c in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
            assert health_status(ch) == health_pb2.HealthCheckResponse.SERVING
            for c in calls:
                assert c.exception(timeout=30) is not None
            # cancelled by the 1 s idle timeout, well before their own 60 s deadline
            assert {c.code() for c in calls if c not in refused} == {grpc.StatusCode.CANCELLED}
            assert time.monotonic() - t0 < 30
            stub = pb_grpc.ClassifierStub(ch)
            assert stub.Classify(pb.ClassifyRequest(image=good_png), timeout=5).predictions  # slots released
            assert stub.GetStats(pb.GetStatsRequest(), timeout=5).errors_total >= 12
    finally:
        never.set()
        srv.stop(grace=1)


def test_health_is_never_refused_by_the_concurrency_limit(bundle_dir: Path, good_png: bytes) -> None:
    srv = start_server(bundle_dir, max_concurrent=1, max_batch=8, max_wait_ms=10_000, batch_wait="fixed")
    try:
        with grpc.insecure_channel(srv.address) as ch:
            stub = pb_grpc.ClassifierStub(ch)
            busy = stub.Classify.future(pb.ClassifyRequest(image=good_png), timeout=60)  # waits 10 s for a batch
            wait_until(lambda: srv.admission.active("unary") == 1)  # it holds the one slot (a state, not a sleep)
            e = call_error(stub.Classify, pb.ClassifyRequest(image=good_png), timeout=5)
            assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-concurrent" in e.details()
            for _ in range(5):
                assert health_status(ch) == health_pb2.HealthCheckResponse.SERVING
            assert busy.result().predictions
            assert stub.GetStats(pb.GetStatsRequest(), timeout=5).errors_total >= 1  # the rejection counts
    finally:
        srv.stop(grace=1)


def test_server_sets_keepalive_and_connection_age(bundle_dir: Path) -> None:
    srv = make_server(
        bundle=bundle_dir, port=0, backend="onnxruntime", intra_op_threads=1, keepalive_s=20, max_connection_age_s=600
    )
    try:
        opts = dict(srv.grpc_options)
        assert opts["grpc.keepalive_time_ms"] == 20_000 and opts["grpc.keepalive_timeout_ms"] > 0
        assert opts["grpc.keepalive_permit_without_calls"] == 1  # the camera client pings every 10 s
        assert opts["grpc.http2.min_recv_ping_interval_without_data_ms"] <= 10_000
        assert opts["grpc.max_connection_age_ms"] == 600_000 and opts["grpc.max_connection_idle_ms"] > 0
        assert opts["grpc.max_concurrent_streams"] > srv.config.max_streams + srv.config.max_concurrent
    finally:
        srv.holder.close()
        srv.admission.close()


# -- finding 6 ---------------------------------------------------------------------------------


def test_camera_id_is_bounded_and_stats_stay_small(bundle_dir: Path, good_png: bytes) -> None:
    srv = start_server(bundle_dir, max_message_mb=2)
    try:
        with grpc.insecure_channel(srv.address) as ch:
            stub = pb_grpc.ClassifierStub(ch)
            frames = [pb.Frame(camera_id=f"{i}" + "x" * (1 << 20), frame_id=i, image=good_png) for i in range(3)]
            frames.append(pb.Frame(camera_id="ok-cam", frame_id=3, image=good_png))
            feeder = RequestFeeder()
            stream = stub.StreamClassify(feeder, timeout=30)
            results = []
            for f in frames:  # one at a time: none is replaced by the next (latest frame wins)
                feeder.send(f)
                results.append(next(stream))
            feeder.end()
            assert list(stream) == []
            assert [r.frame_id for r in results] == [0, 1, 2, 3]
            for r in results[:-1]:
                assert "camera_id" in r.error and len(r.camera_id) <= 128 and not r.predictions
            assert results[-1].predictions and results[-1].camera_id == "ok-cam"
            stats = stub.GetStats(pb.GetStatsRequest(), timeout=5)
            assert stats.ByteSize() < 10_000
            assert {c.camera_id for c in stats.cameras} == {"ok-cam"}
            assert stats.errors_total >= 3
    finally:
        srv.stop(grace=1)


def test_tracked_cameras_are_bounded_and_expire() -> None:
    stats = ServerStats()  # the server's defaults
    for i in range(50_000):
        cid = f"cam-{i}"
        stats.frame_received(cid)
        stats.frame_done(cid, 1.0, ok=True)
    assert len(stats.cameras) <= stats.max_cameras + 1
    snap = stats.snapshot()
    assert len(snap["cameras"]) <= stats.max_cameras + 1
    total = sum(c["frames_received"] for c in snap["cameras"].values())
    assert total == 50_000  # untracked cameras are summed, not lost
    now = [1000.0]
    small = ServerStats(max_cameras=3, camera_idle_s=10.0, clock=lambda: now[0])
    for cid in ("a", "b", "c"):
        small.frame_received(cid)
    small.frame_received("d")  # full: goes to the overflow bucket
    assert set(small.snapshot()["cameras"]) == {"a", "b", "c", ServerStats.OVERFLOW}
    now[0] += 5
    small.frame_received("a")
    now[0] += 6  # b and c idle for 11 s, a for 6 s
    small.frame_received("e")
    assert {"a", "e"} <= set(small.snapshot()["cameras"]) and "b" not in small.snapshot()["cameras"]


class _TimedLock:
    """Wraps the stats lock and records the work each holder did while holding it: its thread's CPU time (a
    loaded machine adds waiting for a core to wall-clock time, not to CPU time)."""

    def __init__(self, lock: Any) -> None:
        self._lock, self.held, self._t = lock, [], 0.0

    def __enter__(self) -> None:
        self._lock.acquire()
        self._t = time.thread_time()

    def __exit__(self, *exc: Any) -> None:
        self.held.append(time.thread_time() - self._t)
        self._lock.release()


def test_get_stats_does_not_hold_the_hot_lock() -> None:
    stats = ServerStats()
    for i in range(50_000):
        stats.frame_done(f"cam-{i % 2000}", float(i % 97), ok=True)
    for _ in range(3000):
        stats.unary_done(3.0, ok=True)
    timed = _TimedLock(stats._lock)
    stats._lock = timed  # type: ignore[assignment]
    took = []
    for _ in range(5):
        t0 = time.thread_time()
        snap = stats.snapshot()
        took.append(time.thread_time() - t0)
    assert snap["cameras"] and min(took) < 0.25  # CPU seconds
    held = sorted(timed.held)
    assert held[len(held) // 2] < 0.002, f"GetStats worked {held[-1] * 1e3:.1f} ms under the frame-counting lock"


def test_health_not_serving_during_drain(bundle_dir: Path, good_png: bytes) -> None:
    srv = start_server(bundle_dir, max_batch=8, max_wait_ms=1500, batch_wait="fixed")
    with grpc.insecure_channel(srv.address) as ch:
        stub = pb_grpc.ClassifierStub(ch)
        stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5)
        feeder = RequestFeeder()
        stream = stub.StreamClassify(feeder, timeout=30)
        inflight = stub.Classify.future(pb.ClassifyRequest(image=good_png, request_id="inflight"), timeout=30)
        # in flight (or already answered) when the drain begins: a state, not a sleep
        wait_until(lambda: srv.admission.active("unary") == 1 or inflight.done())
        stopper = threading.Thread(target=srv.stop, kwargs={"grace": 8})
        stopper.start()
        wait_until(lambda: health_status(ch) != health_pb2.HealthCheckResponse.SERVING)  # the drain has begun
        assert health_status(ch) == health_pb2.HealthCheckResponse.NOT_SERVING  # an answer, not CANCELLED/UNAVAILABLE
        e = call_error(stub.Classify, pb.ClassifyRequest(image=good_png), timeout=5)
        assert e.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in e.details()
        assert inflight.result(timeout=10).request_id == "inflight"
        e = call_error(lambda: list(stream))
        assert e.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in e.details()
        feeder.end()
        stopper.join(15)
        assert not stopper.is_alive()
