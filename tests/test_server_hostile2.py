"""The edge server under hostile clients, round two (issue 21): real bundle, real ONNX Runtime, real gRPC on
127.0.0.1, raw HTTP/2 clients (``testkit/raw_h2.py``) for what grpcio clients cannot do. One test per finding,
each a short version of the attack ``make soak`` runs (``bench/soak_attacks.py``); each failed before its fix.
"""

from __future__ import annotations

import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2

from edgetune.v1 import classifier_pb2 as pb
from edgetune.v1 import classifier_pb2_grpc as pb_grpc
from testkit.edge_fixtures import CliServer, RequestFeeder
from testkit.raw_h2 import RawH2
from tests.server_helpers import health_status, start_server

HEALTH_CHECK = "/grpc.health.v1.Health/Check"
STREAM = "/edgetune.v1.Classifier/StreamClassify"


def _wait(pred: object, timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():  # type: ignore[operator]
            return True
        time.sleep(step)
    return bool(pred())  # type: ignore[operator]


# -- finding 1: stalled health checks ------------------------------------------------------------


def test_stalled_health_checks_starve_nothing(bundle_dir: Path, good_png: bytes) -> None:
    """Hundreds of health Checks that send headers but never their request message: Classify and health
    still answer (before: each held a server thread for --stream-idle-timeout, 30 s, the pool starved and every
    call waited for it: the 20 s deadlines below tell the two apart on a loaded machine, no clock bound)."""
    from edge_server.admission import MAX_HEALTH_PENDING

    srv = start_server(bundle_dir, max_concurrent=4, max_streams=2)  # a small pool: 4 + 2 + watch + reserve
    conns = [RawH2(srv.address) for _ in range(4)]
    try:
        for c in conns:
            for _ in range(60):
                c.open(HEALTH_CHECK)  # headers only: no message, no half-close
        watches = [conns[0].open("/grpc.health.v1.Health/Watch") for _ in range(8)]  # stalled Watch calls too
        # a state, not a sleep: the flood has reached the server (all but the pending ones answered at once)
        assert _wait(lambda: sum(len(c.ended) for c in conns) >= 4 * 60 - MAX_HEALTH_PENDING, 60), [
            len(c.ended) for c in conns
        ]
        with grpc.insecure_channel(srv.address) as ch:
            stub = pb_grpc.ClassifierStub(ch)
            for _ in range(5):
                assert stub.Classify(pb.ClassifyRequest(image=good_png), timeout=20).predictions
                assert health_status(ch, timeout=20) == health_pb2.HealthCheckResponse.SERVING
        # every stalled check is answered (with the server's status) or ended, none left holding a thread
        assert _wait(lambda: all(len(c.ended) >= 60 for c in conns), 60), [len(c.ended) for c in conns]
        assert _wait(lambda: all(conns[0].status(w) for w in watches), 60)  # cancelled: no request within 1 s
    finally:
        for c in conns:
            c.close()
        srv.stop(grace=1)


# -- finding 2: a stream whose peer never reads --------------------------------------------------


def test_stream_with_closed_receive_window_is_closed_and_frees_its_slot(bundle_dir: Path, good_png: bytes) -> None:
    """Camera streams on an HTTP/2 connection whose receive window is 0 (the peer answers pings, never reads):
    each blocks the server sending its first result; they are closed within the idle timeout and their slots
    freed, so a real camera is served (before: the slots stayed held for good)."""
    # every slot on one connection (the per-connection cap is the test below): the idle timeout must free them
    srv = start_server(bundle_dir, max_streams=3, max_streams_per_connection=3, stream_idle_s=1.0)
    frame = pb.Frame(camera_id="stuck", frame_id=1, image=good_png).SerializeToString()
    raw = RawH2(srv.address, window=0, read=False)
    try:
        sids = [raw.open(STREAM, message=frame) for _ in range(3)]
        assert _wait(lambda: srv.admission.active("stream") == 3, 60)
        t0 = time.monotonic()
        # before: held for good; the bound only tells "closed by the 1 s idle timeout" from that (the soak measures)
        assert _wait(lambda: srv.admission.active("stream") == 0, 60), "window-0 streams still hold their slots"
        freed_after = time.monotonic() - t0
        assert freed_after < 30, freed_after
        assert _wait(lambda: all(raw.status(s) for s in sids), 60), raw.ended
        with grpc.insecure_channel(srv.address) as ch:
            feed = RequestFeeder(timeout=30)
            call = pb_grpc.ClassifierStub(ch).StreamClassify(feed, timeout=30)
            feed.send(pb.Frame(camera_id="real", frame_id=7, image=good_png))
            assert next(call).frame_id == 7
            feed.end()
            assert list(call) == []
    finally:
        raw.close()
        srv.stop(grace=1)


def test_one_connection_cannot_hold_every_stream_slot(bundle_dir: Path, good_png: bytes) -> None:
    """One connection opens --max-streams camera streams with receive window 0 (each blocks the server sending
    its first result, until the idle timeout, here far away): it gets at most --max-streams-per-connection of the
    slots (half by default), the rest are refused at once, and a camera on another connection is admitted and
    served while the attack still holds its streams (before: that connection held every slot until the idle
    timeout, and every new camera was refused meanwhile)."""
    srv = start_server(bundle_dir, max_streams=4, stream_idle_s=60.0)
    frame = pb.Frame(camera_id="stuck", frame_id=1, image=good_png).SerializeToString()
    raw = RawH2(srv.address, window=0, read=False)
    try:
        sids = [raw.open(STREAM, message=frame) for _ in range(4)]
        # states: the server has taken all 4 calls (admitted, or refused and answered), the admitted ones are
        # blocked sending their result to the window-0 peer
        refused = lambda: [s for s in sids if raw.status(s)]  # noqa: E731
        assert _wait(lambda: srv.admission.active("stream") + len(refused()) == 4, 60), (
            srv.admission.active("stream"),
            raw.ended,
        )
        assert _wait(lambda: len(srv.servicer._sending) == srv.admission.active("stream"), 60)
        held = srv.admission.active("stream")
        with grpc.insecure_channel(srv.address) as ch:  # a real camera, on its own connection
            feed = RequestFeeder(timeout=60)
            call = pb_grpc.ClassifierStub(ch).StreamClassify(feed, timeout=60)
            feed.send(pb.Frame(camera_id="real", frame_id=7, image=good_png))
            try:
                got = next(call).frame_id
            except grpc.RpcError as e:
                raise AssertionError(
                    f"a camera on another connection was refused: {e.code().name} {e.details()}"
                ) from None
            assert got == 7
            still_held = [s for s in sids if not raw.status(s)]
            assert len(still_held) == held, raw.ended  # served while the attack held its slots
            feed.end()
            assert list(call) == []
        assert held == srv.config.streams_per_connection() == 2
        assert {raw.status(s) for s in refused()} == {"grpc-status 8"}  # RESOURCE_EXHAUSTED
    finally:
        raw.close()
        srv.stop(grace=1)


def test_streams_per_connection_is_validated(bundle_dir: Path) -> None:
    from edge_server.server import ServerConfig
    from edgetune.errors import ConfigError

    assert ServerConfig(bundle=bundle_dir, max_streams=8).streams_per_connection() == 4
    assert ServerConfig(bundle=bundle_dir, max_streams=3).streams_per_connection() == 2
    assert ServerConfig(bundle=bundle_dir, max_streams=1).streams_per_connection() == 1
    assert ServerConfig(bundle=bundle_dir, max_streams=8, max_streams_per_connection=8).streams_per_connection() == 8
    for bad in (0, 9, 2.5, True):
        try:
            ServerConfig(bundle=bundle_dir, max_streams=8, max_streams_per_connection=bad)
        except ConfigError as e:
            assert "1..max_streams (8)" in str(e), e
        else:
            raise AssertionError(f"max_streams_per_connection={bad!r} accepted")


def test_drain_cancels_streams_whose_peer_stopped_reading(bundle_dir: Path, good_png: bytes) -> None:
    """With the idle timeout far away, a stop does not wait its whole grace period for streams that cannot
    finish their frame (receive window 0): they are cancelled after 1 s (before: the full grace, here 60 s; the
    20 s bound leaves a loaded machine room)."""
    srv = start_server(bundle_dir, max_streams=2, max_streams_per_connection=2, stream_idle_s=120.0, grace_s=60.0)
    frame = pb.Frame(camera_id="stuck", frame_id=1, image=good_png).SerializeToString()
    raw = RawH2(srv.address, window=0, read=False)
    try:
        for _ in range(2):
            raw.open(STREAM, message=frame)
        assert _wait(lambda: len(srv.servicer._sending) == 2, 60)  # both blocked sending their result
        t0 = time.monotonic()
        srv.stop()
        assert time.monotonic() - t0 < 20, time.monotonic() - t0
    finally:
        raw.close()
        srv.stop(grace=0)


# -- findings 4 and 5: what reaches the log, and how much ----------------------------------------


def test_log_lines_are_escaped_clipped_redacted_and_bounded() -> None:
    """The JSON formatter and handler on their own: ASCII only, strings clipped, tokens redacted, lines at most
    MAX_LINE_BYTES; repeated errors grouped with a count; ungrouped lines capped per second."""
    import io
    import json
    import logging

    from edge_server import logs

    logs.add_secret("unit-secret-token-42")
    buf = io.StringIO()
    handler = logs.BoundedJsonHandler(buf)
    rec = logging.LogRecord("edge_server.x", logging.WARNING, __file__, 1, "m\x1b[31m", None, None)
    rec.fields = {"value": "unit-secret-token-42 \u202e\x00" + "z" * 5000, "n": 3}
    line = handler.format(rec)
    assert line.isascii() and "unit-secret-token-42" not in line and "[redacted]" in line
    assert len(line) <= logs.MAX_LINE_BYTES and "chars]" in json.loads(line)["value"]
    grpc_rec = logging.LogRecord(
        "grpc._cython.cygrpc", logging.ERROR, __file__, 1, "Invalid encoding on %s", (b"Bearer abc\xff",), None
    )
    assert "abc" not in handler.format(grpc_rec) and "<withheld>" in handler.format(grpc_rec)
    err = logging.getLogger("edge_server.unit")
    err.addHandler(handler)
    err.propagate = False
    err.setLevel(logging.INFO)
    try:
        for _ in range(500):
            err.warning("rpc error", extra={"fields": {"method": "/m", "code": "X"}, "group": True})
        for i in range(100):
            err.info(f"plain line {i}")
        handler.flush_groups(force=True)
    finally:
        err.removeHandler(handler)
        handler.close()
    out = [json.loads(x) for x in buf.getvalue().splitlines()]
    assert sum(r["count"] for r in out if r["msg"] == "rpc error") == 500
    assert len([r for r in out if r["msg"] == "rpc error"]) <= 2
    assert len([r for r in out if r["msg"].startswith("plain line")]) == logs.MAX_LINES_PER_PERIOD
    assert sum(r["count"] for r in out if r["msg"] == "log lines suppressed") == 100 - logs.MAX_LINES_PER_PERIOD


TOKEN = "hostile2-camera-token-4711"


def _cli_with_token(bundle_dir: Path, tmp_path: Path, name: str) -> CliServer:
    token_file = tmp_path / "camera.token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    return CliServer(
        ["--bundle", str(bundle_dir), "--port", "0", "--threads", "1", "--token-file", str(token_file)], tmp_path / name
    )


def test_non_utf8_metadata_never_puts_the_token_in_the_log(bundle_dir: Path, tmp_path: Path, good_png: bytes) -> None:
    """A valid token plus one stray byte: answered UNAUTHENTICATED, and neither the token nor the raw header
    value reaches the log (before: gRPC's own logger printed the value verbatim with a traceback, 36 KB/call)."""
    srv = _cli_with_token(bundle_dir, tmp_path, "server.log")
    try:
        msg = pb.ClassifyRequest(image=good_png).SerializeToString()
        size0 = srv.log_path.stat().st_size
        with RawH2(srv.address) as raw:
            sids = [
                raw.open(
                    "/edgetune.v1.Classifier/Classify",
                    message=msg,
                    end=True,
                    metadata=(
                        ("authorization", f"Bearer {TOKEN}".encode() + b"\xff" + b"A" * 2000),
                        ("x-junk", b"\xfe\xff" * 1000),
                    ),
                )
                for _ in range(20)
            ]
            assert _wait(lambda: all(raw.status(s) for s in sids), 20), raw.ended
            assert {raw.status(s) for s in sids} == {"grpc-status 16"}  # UNAUTHENTICATED
        with grpc.insecure_channel(srv.address) as ch:  # the server still serves the real token
            assert (
                pb_grpc.ClassifierStub(ch)
                .Classify(
                    pb.ClassifyRequest(image=good_png), timeout=10, metadata=(("authorization", f"Bearer {TOKEN}"),)
                )
                .predictions
            )
    finally:  # (grouped lines are flushed every second, and all of them when the server exits)
        srv.stop()
    text = srv.log_path.read_text()
    assert TOKEN not in text
    assert "AAAAAAAAAAAAAAAA" not in text and "\\xfe\\xff\\xfe" not in text
    grown = len(text.encode()) - size0
    assert grown < 20 * 1024, grown  # 20 calls; before: 36 KB each
    srv.records()  # every line is still JSON


def test_log_volume_under_error_floods_is_grouped(bundle_dir: Path, tmp_path: Path, good_png: bytes) -> None:
    """300 unauthenticated calls and a stream of 200 bad frames: repeated errors are grouped per second with a
    count, so the log grows by a few KB, and every error is still counted (before: one line each)."""
    srv = _cli_with_token(bundle_dir, tmp_path, "server.log")
    try:
        size0 = srv.log_path.stat().st_size
        t0 = time.monotonic()
        with grpc.insecure_channel(srv.address) as ch:
            stub = pb_grpc.ClassifierStub(ch)
            for _ in range(3):
                futs = [stub.Classify.future(pb.ClassifyRequest(image=good_png), timeout=20) for _ in range(100)]
                assert {f.code() for f in futs} == {grpc.StatusCode.UNAUTHENTICATED}, {f.details() for f in futs}
            md = (("authorization", f"Bearer {TOKEN}"),)
            frames = (pb.Frame(camera_id="bad", frame_id=i, image=b"\x89PNG\r\n\x1a\nnot a png") for i in range(200))
            results = list(stub.StreamClassify(frames, timeout=60, metadata=md))
            assert results and all(r.error for r in results)
        time.sleep(1.5)
        took = time.monotonic() - t0
    finally:
        srv.stop()
    recs = srv.records()
    grown = srv.log_path.stat().st_size - size0
    assert grown < 3000 * took + 4000, (grown, took)  # a few lines per second, not one per error
    unauth = sum(int(r.get("count", 1)) for r in recs if r.get("code") == "UNAUTHENTICATED")
    assert unauth == 300, unauth
    frame_errors = sum(int(r.get("count", 1)) for r in recs if r.get("msg") == "frame error")
    assert frame_errors == len(results), (frame_errors, len(results))


# -- finding 6: the WebP chunk walk --------------------------------------------------------------


def webp_of_empty_chunks(size: int) -> bytes:
    """A RIFF/WEBP file of ``size`` bytes made only of empty unknown chunks (no image chunk at all)."""
    body = b"WEBP" + b"JUNK\x00\x00\x00\x00" * ((size - 12) // 8)
    return b"RIFF" + len(body).to_bytes(4, "little") + body


def test_webp_of_empty_chunks_is_refused_in_constant_time() -> None:
    """15.5 MB of empty chunks: refused in milliseconds (before: 4.2 s of Python walking the chunks)."""
    import cv2
    import numpy as np

    from edgetune.errors import ImageDecodeError
    from edgetune.imageheader import read_image_header

    data = webp_of_empty_chunks(int(15.5 * 1024 * 1024))
    t0 = time.thread_time()  # CPU time: what the walk costs, whatever else the machine runs
    try:
        read_image_header(data, "image")
        raise AssertionError("a WebP without an image chunk was accepted")
    except ImageDecodeError as e:
        assert "WebP" in str(e)
    assert time.thread_time() - t0 < 0.05
    for lossless in (True, False):  # real files still read
        img = np.zeros((37, 53, 3), np.uint8)
        buf = cv2.imencode(".webp", img, [cv2.IMWRITE_WEBP_QUALITY, 101 if lossless else 80])[1].tobytes()
        head = read_image_header(buf, "image")
        assert (head.width, head.height) == (53, 37)


# -- finding 7: EXIF orientation, SIGHUP, GetStats at the camera cap -----------------------------


def jpeg_with_orientation(img_rgb: object, orientation: int, big_endian: bool = True) -> bytes:
    """``img_rgb`` as a JPEG whose APP1 EXIF segment says ``orientation`` (what a phone camera writes)."""
    import struct

    from testkit.edge_fixtures import encode_jpeg

    o = ">" if big_endian else "<"
    tiff = (b"MM" if big_endian else b"II") + struct.pack(o + "HI", 42, 8) + struct.pack(o + "H", 1)
    tiff += struct.pack(o + "HHI", 0x0112, 3, 1) + struct.pack(o + "HH", orientation, 0) + struct.pack(o + "I", 0)
    payload = b"Exif\x00\x00" + tiff
    jpeg = encode_jpeg(img_rgb, quality=100)  # type: ignore[arg-type]
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


def test_exif_orientation_is_applied_as_a_phone_shows_it() -> None:
    import cv2
    import numpy as np

    from edgetune.imagedecode import decode_image

    img = np.zeros((40, 64, 3), np.uint8)
    img[:10, :20] = (255, 0, 0)  # a red block top-left of a landscape picture
    plain = decode_image(jpeg_with_orientation(img, 1), "x")
    expect = {
        1: plain,
        3: cv2.rotate(plain, cv2.ROTATE_180),
        6: cv2.rotate(plain, cv2.ROTATE_90_CLOCKWISE),
        8: cv2.rotate(plain, cv2.ROTATE_90_COUNTERCLOCKWISE),
        2: cv2.flip(plain, 1),
    }
    for orientation, want in expect.items():
        for big_endian in (True, False):
            got = decode_image(jpeg_with_orientation(img, orientation, big_endian), "x")
            assert got.shape == want.shape and np.abs(got.astype(int) - want.astype(int)).max() <= 2, orientation
    assert decode_image(jpeg_with_orientation(img, 6), "x").shape == (64, 40, 3)  # portrait, as the phone showed it


def test_sighup_drains_like_sigterm(bundle_dir: Path, tmp_path: Path, good_png: bytes) -> None:
    """SIGHUP: the server logs it, drains (an open stream ends with UNAVAILABLE after its frame) and exits 0
    (before: killed at once, no drain, no log line)."""
    import signal

    srv = CliServer(
        ["--bundle", str(bundle_dir), "--port", "0", "--threads", "1", "--grace", "5"], tmp_path / "server.log"
    )
    try:
        with grpc.insecure_channel(srv.address) as ch:
            feed = RequestFeeder(timeout=30)
            call = pb_grpc.ClassifierStub(ch).StreamClassify(feed, timeout=30)
            feed.send(pb.Frame(camera_id="c", frame_id=1, image=good_png))
            assert next(call).frame_id == 1
            srv.proc.send_signal(signal.SIGHUP)
            assert srv.proc.wait(20) == 0
            try:
                list(call)
                code = grpc.StatusCode.OK
            except grpc.RpcError as e:
                code = e.code()
            feed.end()
            assert code == grpc.StatusCode.UNAVAILABLE, code
    finally:
        srv.stop()
    recs = srv.records()
    assert any(r["msg"] == "signal received" and r.get("signal") == "SIGHUP" for r in recs)
    assert any(r["msg"] == "stopped" and r.get("drained") is True for r in recs)


def test_get_stats_is_cheap_with_every_camera_tracked(bundle_dir: Path) -> None:
    """256 cameras with full latency windows: a GetStats reply costs a few ms of CPU (before: ~35 ms of work per
    call). Measured as the handler's thread CPU time (building and serialising the reply), which a loaded machine
    does not inflate as it does a round trip's wall-clock time; the soak's getstats attack times the calls."""
    srv = start_server(bundle_dir)
    try:
        for i in range(srv.config.max_cameras):
            cid = f"camera-{i:03d}"
            srv.stats.frame_received(cid)
            for k in range(2048):
                srv.stats.frame_done(cid, float(k % 50), ok=True)
        with grpc.insecure_channel(srv.address) as ch:
            stub = pb_grpc.ClassifierStub(ch)
            first = stub.GetStats(pb.GetStatsRequest(), timeout=30)
            assert len(first.cameras) == srv.config.max_cameras and first.cameras[0].latency_p99_ms > 40
        took = []
        for _ in range(40):
            t0 = time.thread_time()
            reply = srv.servicer.GetStats(pb.GetStatsRequest(), None)  # type: ignore[arg-type]  # (no context used)
            reply.SerializeToString()
            took.append(time.thread_time() - t0)
        assert len(reply.cameras) == srv.config.max_cameras
        took.sort()
        assert took[len(took) // 2] < 0.010, took  # median CPU seconds per reply
    finally:
        srv.stop(grace=1)


# -- finding 3: memory of big (compressed) messages ----------------------------------------------


def test_big_messages_take_bounded_memory_that_goes_back(bundle_dir: Path, tmp_path: Path) -> None:
    """15.5 MB messages gzip-compressed to 16 KB on the wire are refused before they are inflated (UNIMPLEMENTED:
    requests must not be compressed); uncompressed ones, as unary calls and on streams, keep the server's peak
    within its stated request-memory bound and its RSS comes back within 20 % in 30 s (before: compressed ones
    were inflated, and 70-100 MB stayed held in the threads' malloc arenas)."""
    from edge_server.budget import request_memory_bound_mb
    from testkit.raw_h2 import grpc_frame, gzip_frame

    srv = CliServer(
        [
            "--bundle",
            str(bundle_dir),
            "--port",
            "0",
            "--threads",
            "1",
            "--max-concurrent",
            "8",
            "--max-streams",
            "4",
            "--max-inflight-mb",
            "64",
            "--max-decode-mb",
            "64",
        ],
        tmp_path / "s.log",
    )
    big = int(15.5 * 1024 * 1024)
    try:
        time.sleep(1.0)
        before = _rss_mb(srv.proc.pid)
        with RawH2(srv.address) as raw:
            gz = gzip_frame(pb.ClassifyRequest(image=b"\x00" * big).SerializeToString())
            sids = [
                raw.open(
                    "/edgetune.v1.Classifier/Classify", metadata=(("grpc-encoding", "gzip"),), raw_message=gz, end=True
                )
                for _ in range(8)
            ]
            assert _wait(lambda: all(raw.status(s) for s in sids), 60), raw.ended
            assert {raw.status(s) for s in sids} == {"grpc-status 12"}  # UNIMPLEMENTED: compression is off
        assert _rss_mb(srv.proc.pid) - before < 40
        unary = grpc_frame(pb.ClassifyRequest(image=b"\x00" * big).SerializeToString())
        frame = grpc_frame(pb.Frame(camera_id="big", frame_id=1, image=b"\x00" * big).SerializeToString())
        with RawH2(srv.address) as raw:
            sids = [raw.open("/edgetune.v1.Classifier/Classify", raw_message=unary, end=True) for _ in range(8)]
            assert _wait(lambda: all(raw.status(s) for s in sids), 120), raw.ended
            assert {raw.status(s) for s in sids} <= {"grpc-status 3", "grpc-status 8"}  # not an image / busy
        with RawH2(srv.address) as raw:
            sids = [raw.open(STREAM, raw_message=frame) for _ in range(4)]
            for s in sids:
                raw.send_raw(s, frame, end=True)
            assert _wait(lambda: all(raw.status(s) for s in sids), 120), raw.ended
        peak = srv.hwm_mb()
        bound = request_memory_bound_mb(16.0, 8, 4, 64.0, 64.0)
        assert peak - before <= bound, (peak, before, bound)
        assert _wait(lambda: _rss_mb(srv.proc.pid) <= before * 1.2 + 16, 30, step=0.5), (before, _rss_mb(srv.proc.pid))
    finally:
        srv.stop()


def _rss_mb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) // 1024
    return 0


def test_jetson_profile_states_a_512_mb_request_memory_bound(bundle_dir: Path, tmp_path: Path) -> None:
    from edge_server.profiles import profile_bound_mb

    assert profile_bound_mb("jetson") == 512
    srv = CliServer(
        ["--bundle", str(bundle_dir), "--port", "0", "--threads", "1", "--profile", "jetson", "--max-streams", "8"],
        tmp_path / "s.log",
    )
    srv.stop()
    serving = next(r for r in srv.records() if r["msg"] == "serving")
    assert (serving["max_message_mb"], serving["max_concurrent"], serving["max_streams"]) == (4.0, 16, 8)
    assert serving["request_memory_bound_mb"] == 128 + (16 + 8) * 2 * 4 + 128  # an explicit flag overrides
