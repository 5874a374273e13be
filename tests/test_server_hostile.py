"""The edge server under hostile clients (issue 11): real bundle, real ONNX Runtime, real gRPC on 127.0.0.1.

One test (or group) per finding; each failed against the server before the fix:

1. a 254-byte 1x60000 PNG blew up the server's memory (``test_tiny_wide_png_*``);
2. header bombs of other formats were decoded before the pixel check (``test_header_bombs_*``);
3. idle streams filled ``--max-concurrent`` and starved unary calls and health (``test_idle_streams_*``,
   ``test_stream_limit_*``, ``test_health_is_never_refused_*``);
4. ``LoadModel`` was open (``test_load_model_*``);
5. labels that do not match the model were accepted; handler exceptions became UNKNOWN; gRPC's own errors
   were not in the log (``test_labels_*``, ``test_unexpected_*``, ``test_grpc_own_errors_*``);
6. client-controlled stats cardinality, GetStats under the hot lock, RESOURCE_EXHAUSTED not counted
   (``test_camera_id_*``, ``test_tracked_cameras_*``, ``test_get_stats_*``, ``test_stream_limit_*``);
7. the server side of the smaller ones: ``--token`` in the process table, health during drain
   (``test_cli_token_*``, ``test_health_not_serving_during_drain``).
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edge_server.server import make_server
from edge_server.stats import ServerStats
from edgetune.bundle import load_bundle
from edgetune.errors import BundleError, ConfigError
from edgetune.v1 import classifier_pb2 as pb
from edgetune.v1 import classifier_pb2_grpc as pb_grpc
from tests.edge_fixtures import (
    CliServer,
    RequestFeeder,
    copy_bundle,
    encode_jpeg,
    encode_png,
    texture_tiles,
)
from tests.hostile_media import oversized, wide_png

REPO = Path(__file__).resolve().parents[1]
ADMIN = "admin-token-for-tests-0123456789"
CAMERA = "camera-token-for-tests"
ADMIN_MD = [("x-edgetune-admin-token", ADMIN)]


@pytest.fixture(scope="module")
def good_png() -> bytes:
    return encode_png(texture_tiles("test")[0][0])


def _code(fn: Any, *args: Any, **kw: Any) -> grpc.StatusCode:
    try:
        fn(*args, **kw)
        return grpc.StatusCode.OK
    except grpc.RpcError as e:
        return e.code()


def _err(fn: Any, *args: Any, **kw: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        fn(*args, **kw)
    return e.value


def _health(ch: grpc.Channel, timeout: float = 5) -> int:
    return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=timeout).status


def _serve(bundle: Path, **kw: Any) -> Any:
    kw.setdefault("backend", "onnxruntime")
    kw.setdefault("intra_op_threads", 1)
    return make_server(bundle=bundle, port=0, **kw).start()


def _labels_mismatch(src: Path, dst: Path, n: int = 2) -> Path:
    copy_bundle(src, dst)
    meta = json.loads((dst / "bundle.json").read_text())
    meta["labels"] = meta["labels"][:n]
    (dst / "bundle.json").write_text(json.dumps(meta))
    return dst


@pytest.fixture(scope="module")
def cli(bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    srv = CliServer(["--bundle", str(bundle_dir), "--port", "0", "--threads", "1"],
                    tmp_path_factory.mktemp("cli") / "server.log")
    yield srv
    srv.stop()


# -- finding 1 ---------------------------------------------------------------------------------

def test_tiny_wide_png_is_refused_fast_with_bounded_memory(cli: CliServer) -> None:
    png = wide_png(60000)
    assert len(png) < 400
    with grpc.insecure_channel(cli.address) as ch:
        stub = pb_grpc.ClassifierStub(ch)
        stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
        before = cli.hwm_mb()
        t0 = time.monotonic()
        e = _err(stub.Classify, pb.ClassifyRequest(image=png), timeout=30)
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
            e = _err(stub.Classify, pb.ClassifyRequest(image=data), timeout=30)
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "8192x8192 exceeds" in e.details(), (fmt, e)
        gif = cv2.imencode(".gif", np.zeros((8, 8, 3), np.uint8))[1].tobytes()
        e = _err(stub.Classify, pb.ClassifyRequest(image=gif), timeout=10)
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "JPEG, PNG, WebP, TIFF, BMP" in e.details()
        assert cli.hwm_mb() - before < 50, (before, cli.hwm_mb())


# -- finding 3 ---------------------------------------------------------------------------------

def _idle(stop: threading.Event) -> Any:
    stop.wait()
    return
    yield  # a generator that never sends a frame


def test_idle_streams_do_not_starve_unary_calls_or_health(bundle_dir: Path, good_png: bytes) -> None:
    srv = _serve(bundle_dir)  # the defaults: what `make serve` runs
    stop = threading.Event()
    try:
        with grpc.insecure_channel(srv.address) as ch:
            stub = pb_grpc.ClassifierStub(ch)
            calls = [stub.StreamClassify(_idle(stop)) for _ in range(64)]
            time.sleep(2.0)
            t0 = time.monotonic()
            assert stub.Classify(pb.ClassifyRequest(image=good_png), timeout=5).predictions
            assert stub.GetStats(pb.GetStatsRequest(), timeout=5).uptime_s > 0
            assert stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5).labels
            assert _health(ch) == health_pb2.HealthCheckResponse.SERVING
            assert time.monotonic() - t0 < 3
            rejected = [c for c in calls if c.done()]
            assert len(rejected) == 64 - srv.config.max_streams  # streams have their own limit
            assert {c.code() for c in rejected} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
            assert "--max-streams" in rejected[0].details()
            for c in calls:
                c.cancel()
    finally:
        stop.set()
        srv.stop(grace=1)


def test_stream_limit_idle_timeout_and_rejections_counted(bundle_dir: Path, good_png: bytes) -> None:
    srv = _serve(bundle_dir, max_streams=2, stream_idle_s=1.0)
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
            assert "no frame" in timed_out.details() and time.monotonic() - t0 < 6
            feeder.end()
            assert list(active) == []
            # the slot is free again: a new stream is served
            again = list(stub.StreamClassify(iter([pb.Frame(camera_id="c2", frame_id=9, image=good_png)]),
                                             timeout=10))
            assert [r.frame_id for r in again] == [9]
            stats = stub.GetStats(pb.GetStatsRequest(), timeout=5)
            assert stats.errors_total >= 3  # 2 RESOURCE_EXHAUSTED + 1 idle stream ended
    finally:
        stop.set()
        srv.stop(grace=1)


def test_headers_only_unary_calls_are_bounded_and_cancelled(bundle_dir: Path, good_png: bytes) -> None:
    """Unary calls that send headers but never their request message (slow loris): refusals are immediate,
    admitted ones are cancelled after the idle timeout, health is answered throughout."""
    srv = _serve(bundle_dir, max_concurrent=4, stream_idle_s=1.0)
    never = threading.Event()

    def no_message() -> Any:
        never.wait()
        return
        yield

    try:
        with grpc.insecure_channel(srv.address) as ch:
            raw = ch.stream_unary("/edgetune.v1.Classifier/GetStats")  # a unary method, its message withheld
            t0 = time.monotonic()
            calls = [raw.future(no_message(), timeout=30) for _ in range(12)]
            time.sleep(0.5)
            refused = [c for c in calls if c.done()]
            assert len(refused) == 8 and {c.code() for c in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
            assert _health(ch) == health_pb2.HealthCheckResponse.SERVING
            for c in calls:
                assert c.exception(timeout=5) is not None
            assert {c.code() for c in calls if c not in refused} == {grpc.StatusCode.CANCELLED}
            assert time.monotonic() - t0 < 4
            stub = pb_grpc.ClassifierStub(ch)
            assert stub.Classify(pb.ClassifyRequest(image=good_png), timeout=5).predictions  # slots released
            assert stub.GetStats(pb.GetStatsRequest(), timeout=5).errors_total >= 12
    finally:
        never.set()
        srv.stop(grace=1)


def test_health_is_never_refused_by_the_concurrency_limit(bundle_dir: Path, good_png: bytes) -> None:
    srv = _serve(bundle_dir, max_concurrent=1, max_batch=8, max_wait_ms=1500, batch_wait="fixed")
    try:
        with grpc.insecure_channel(srv.address) as ch:
            stub = pb_grpc.ClassifierStub(ch)
            busy = stub.Classify.future(pb.ClassifyRequest(image=good_png), timeout=10)  # waits 1.5 s for a batch
            time.sleep(0.3)
            e = _err(stub.Classify, pb.ClassifyRequest(image=good_png), timeout=5)
            assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-concurrent" in e.details()
            for _ in range(5):
                assert _health(ch) == health_pb2.HealthCheckResponse.SERVING
            assert busy.result().predictions
            assert stub.GetStats(pb.GetStatsRequest(), timeout=5).errors_total >= 1  # the rejection counts
    finally:
        srv.stop(grace=1)


def test_server_sets_keepalive_and_connection_age(bundle_dir: Path) -> None:
    srv = make_server(bundle=bundle_dir, port=0, backend="onnxruntime", intra_op_threads=1, keepalive_s=20,
                      max_connection_age_s=600)
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


# -- finding 4 ---------------------------------------------------------------------------------

def test_load_model_is_off_unless_enabled(bundle_dir: Path, bundle_dir_b: Path) -> None:
    srv = _serve(bundle_dir)  # loopback, no token: LoadModel used to be open here
    try:
        with grpc.insecure_channel(srv.address) as ch:
            stub = pb_grpc.ClassifierStub(ch)
            e = _err(stub.LoadModel, pb.LoadModelRequest(bundle_path=str(bundle_dir_b)), timeout=30)
            assert e.code() == grpc.StatusCode.FAILED_PRECONDITION and "--enable-load-model" in e.details()
            assert stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5).model_version == load_bundle(bundle_dir).version
    finally:
        srv.stop(grace=1)


def test_manifest_paths_stay_inside_the_bundle(bundle_dir: Path, tmp_path: Path) -> None:
    """A manifest whose model_file is ../../../../etc/passwd used to be hashed (hash prefix in the error)."""
    secret = tmp_path / "outside" / "secret.bin"
    secret.parent.mkdir()
    secret.write_bytes(b"not yours" * 100)
    evil = copy_bundle(bundle_dir, tmp_path / "root" / "evil")
    meta = json.loads((evil / "bundle.json").read_text())
    messages = []
    for target in [str(secret), "../../outside/secret.bin", "../../outside/does-not-exist.bin", "/etc/passwd"]:
        meta["model_file"] = target
        (evil / "bundle.json").write_text(json.dumps(meta))
        with pytest.raises(BundleError) as e:
            load_bundle(evil)
        msg = str(e.value)
        assert hashlib.sha256(secret.read_bytes()).hexdigest()[:12] not in msg
        assert not re.search(r"[0-9a-f]{12}", msg.replace(meta["onnx_sha256"][:12], "")), msg
        messages.append(msg.replace(target, "<path>"))
    assert len(set(messages)) == 1, messages  # no existence oracle
    assert "inside the bundle directory" in messages[0]
    meta["model_file"] = "model.onnx"
    (evil / "bundle.json").write_text(json.dumps(meta))
    (evil / "model.onnx").unlink()
    (evil / "model.onnx").symlink_to(bundle_dir / "model.onnx")  # a symlink out of the bundle
    with pytest.raises(BundleError, match="inside the bundle directory"):
        load_bundle(evil)
    b = load_bundle(bundle_dir)
    with pytest.raises(BundleError, match="inside the bundle directory"):
        b.member("../../etc/passwd", "calibration image")
    assert b.member("calib/000.png", "calibration image").is_file()


def _admin_server(bundle: Path, root: Path, **kw: Any) -> Any:
    return _serve(bundle, load_model=True, admin_token=ADMIN, model_root=root, **kw)


def test_load_model_admin_credential_and_model_root(bundle_dir: Path, bundle_dir_b: Path, tmp_path: Path,
                                                    good_png: bytes) -> None:
    root = tmp_path / "models"
    root.mkdir()
    copy_bundle(bundle_dir, root / "a")
    copy_bundle(bundle_dir_b, root / "b")
    outside = copy_bundle(bundle_dir_b, tmp_path / "outside-bundle")
    (root / "link").symlink_to(outside, target_is_directory=True)
    va, vb = load_bundle(bundle_dir).version, load_bundle(bundle_dir_b).version
    srv = _admin_server(root / "a", root, token=CAMERA)
    cam = [("authorization", f"Bearer {CAMERA}")]
    try:
        with grpc.insecure_channel(srv.address) as ch:
            stub = pb_grpc.ClassifierStub(ch)

            def load(path: str, md: list[tuple[str, str]]) -> Any:
                return stub.LoadModel(pb.LoadModelRequest(bundle_path=path), timeout=30, metadata=md)

            assert _err(load, "b", cam).code() == grpc.StatusCode.UNAUTHENTICATED  # camera token is not admin
            assert _err(load, "b", cam + [("x-edgetune-admin-token", CAMERA)]).code() == \
                grpc.StatusCode.UNAUTHENTICATED
            assert _err(load, "b", cam + [("x-edgetune-admin-token", ADMIN + "x")]).code() == \
                grpc.StatusCode.UNAUTHENTICATED
            assert _err(load, "b", ADMIN_MD).code() == grpc.StatusCode.UNAUTHENTICATED  # camera token still needed
            assert load("b", cam + ADMIN_MD).model_version == vb  # relative to the model root, not the cwd
            assert load(str(root / "a"), cam + ADMIN_MD).model_version == va
            refused = {}
            for path in ["../outside-bundle", str(outside), "link", "link/../b", "/etc", "/nonexistent/x",
                         "../../../../../../etc", str(root / "does-not-exist")]:
                e = _err(load, path, cam + ADMIN_MD)
                assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (path, e)
                refused[path] = e.details().replace(repr(path), "<path>")
            outside_msgs = {v for k, v in refused.items() if k != str(root / "does-not-exist")}
            assert len(outside_msgs) == 1, "\n".join(f"{k}: {v}" for k, v in refused.items())  # the same words whether the target exists or not
            assert "inside the model root" in next(iter(outside_msgs))
            assert str(outside) not in " ".join(refused.values()) and "outside-bundle" not in next(iter(outside_msgs))
            # still serving the last good model, streams and unary alike
            r = stub.Classify(pb.ClassifyRequest(image=good_png), timeout=10, metadata=cam)
            assert r.model_version == va
    finally:
        srv.stop(grace=1)


def test_load_model_config_is_validated(bundle_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="admin token"):
        make_server(bundle=bundle_dir, port=0, load_model=True, model_root=tmp_path)
    with pytest.raises(ConfigError, match="model root"):
        make_server(bundle=bundle_dir, port=0, load_model=True, admin_token=ADMIN)
    with pytest.raises(ConfigError, match="model root"):
        make_server(bundle=bundle_dir, port=0, load_model=True, admin_token=ADMIN, model_root=tmp_path / "nope")
    with pytest.raises(ConfigError, match="differ"):
        make_server(bundle=bundle_dir, port=0, load_model=True, admin_token=ADMIN, token=ADMIN, model_root=tmp_path)
    with pytest.raises(ConfigError, match="at least 16"):
        make_server(bundle=bundle_dir, port=0, load_model=True, admin_token="short-admin", model_root=tmp_path)


def test_cli_admin_token_from_file_or_environment(bundle_dir: Path, bundle_dir_b: Path, tmp_path: Path) -> None:
    root = tmp_path / "models"
    copy_bundle(bundle_dir, root / "a")
    copy_bundle(bundle_dir_b, root / "b")
    token_file = tmp_path / "admin.token"
    token_file.write_text(ADMIN + "\n")
    token_file.chmod(0o600)
    srv = CliServer(["--bundle", str(root / "a"), "--port", "0", "--threads", "1", "--enable-load-model",
                     "--model-root", str(root), "--admin-token-file", str(token_file)], tmp_path / "s1.log")
    try:
        with grpc.insecure_channel(srv.address) as ch:
            stub = pb_grpc.ClassifierStub(ch)
            assert _code(stub.LoadModel, pb.LoadModelRequest(bundle_path="b"), timeout=30) == \
                grpc.StatusCode.UNAUTHENTICATED
            info = stub.LoadModel(pb.LoadModelRequest(bundle_path="b"), timeout=30, metadata=ADMIN_MD)
            assert info.model_version == load_bundle(bundle_dir_b).version
    finally:
        srv.stop()
    swapped = [r for r in srv.records() if r["msg"] == "model swapped"]
    assert swapped and ADMIN not in srv.log_path.read_text()
    srv = CliServer(["--bundle", str(root / "a"), "--port", "0", "--threads", "1", "--enable-load-model",
                     "--model-root", str(root)], tmp_path / "s2.log", env={"EDGETUNE_ADMIN_TOKEN": ADMIN})
    try:
        with grpc.insecure_channel(srv.address) as ch:
            info = pb_grpc.ClassifierStub(ch).LoadModel(pb.LoadModelRequest(bundle_path="b"), timeout=30,
                                                        metadata=ADMIN_MD)
            assert info.model_version == load_bundle(bundle_dir_b).version
    finally:
        srv.stop()
    r = subprocess.run([sys.executable, "-m", "edge_server", "--bundle", str(root / "a"), "--enable-load-model",
                        "--model-root", str(root)], cwd=REPO, capture_output=True, text=True, timeout=60,
                       env={k: v for k, v in os.environ.items() if k != "EDGETUNE_ADMIN_TOKEN"})
    assert r.returncode == 2 and "admin token" in r.stderr


# -- finding 5 ---------------------------------------------------------------------------------

def test_labels_mismatch_is_refused_at_startup(bundle_dir: Path, tmp_path: Path) -> None:
    bad = _labels_mismatch(bundle_dir, tmp_path / "two-labels")
    with pytest.raises(BundleError) as e:
        make_server(bundle=bad, port=0, backend="onnxruntime", intra_op_threads=1)
    assert re.search(r"2 labels.*3 outputs", str(e.value)), str(e.value)
    r = subprocess.run([sys.executable, "-m", "edge_server", "--bundle", str(bad), "--port", "0", "--threads", "1"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert "labels" in last and "2" in last and "3" in last, r.stderr


def test_labels_mismatch_is_refused_by_load_model_and_watch(bundle_dir: Path, bundle_dir_b: Path, tmp_path: Path,
                                                           good_png: bytes) -> None:
    root = tmp_path / "models"
    root.mkdir()
    live = copy_bundle(bundle_dir, root / "live")
    _labels_mismatch(bundle_dir_b, root / "two-labels")
    srv = _admin_server(live, root, watch=True, watch_interval_s=0.1)
    try:
        with grpc.insecure_channel(srv.address) as ch:
            stub = pb_grpc.ClassifierStub(ch)
            e = _err(stub.LoadModel, pb.LoadModelRequest(bundle_path="two-labels"), timeout=30, metadata=ADMIN_MD)
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and re.search("2 labels.*3 outputs", e.details())
            # --watch: another model with too few labels is deployed into the watched directory
            shutil.copy(bundle_dir_b / "model.onnx", live / "model.onnx")
            shutil.copy(root / "two-labels" / "bundle.json", live / "bundle.json")
            time.sleep(1.0)
            r = stub.Classify(pb.ClassifyRequest(image=good_png, top_k=3), timeout=10)
            assert len(r.predictions) == 3 and r.model_version == load_bundle(bundle_dir).version
    finally:
        srv.stop(grace=1)


def test_unexpected_handler_exception_is_internal_and_logged(bundle_dir: Path, good_png: bytes,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    """What a labels/outputs mismatch used to do at request time (IndexError -> UNKNOWN, stream ended)."""
    srv = _serve(bundle_dir)
    try:
        with grpc.insecure_channel(srv.address) as ch:
            stub = pb_grpc.ClassifierStub(ch)
            tops = {}
            for tile in texture_tiles("test")[0][::4]:
                data = encode_png(tile)
                tops[stub.Classify(pb.ClassifyRequest(image=data), timeout=10).predictions[0].index] = data
            top = max(tops)
            assert top >= 1
            good_png = tops[top]  # an image whose top class is not the first
            model = srv.holder.current
            saved = list(model.bundle.labels)
            feeder = RequestFeeder()
            stream = stub.StreamClassify(feeder, timeout=30)
            feeder.send(pb.Frame(camera_id="c", frame_id=1, image=good_png))
            assert next(stream).predictions
            caplog.clear()
            model.bundle.labels[:] = ["only"] * top  # fewer labels than the model's top class: IndexError
            with caplog.at_level("ERROR", logger="edge_server"):
                e = _err(stub.Classify, pb.ClassifyRequest(image=good_png), timeout=10)
                assert e.code() == grpc.StatusCode.INTERNAL, e
                assert "IndexError" not in e.details() and "logged" in e.details()
                feeder.send(pb.Frame(camera_id="c", frame_id=2, image=good_png))
                res = next(stream)
                assert res.frame_id == 2 and "internal error" in res.error  # the stream goes on
            model.bundle.labels[:] = saved
            feeder.send(pb.Frame(camera_id="c", frame_id=3, image=good_png))
            assert next(stream).predictions
            feeder.end()
            assert list(stream) == []
            recs = [r for r in caplog.records if r.levelname == "ERROR" and r.exc_info]
            assert len(recs) >= 2 and all(r.exc_info[0] is IndexError for r in recs)
            assert stub.GetStats(pb.GetStatsRequest(), timeout=5).errors_total >= 2
    finally:
        srv.stop(grace=1)


def test_undecodable_protobuf_is_invalid_argument_and_leaks_nothing(bundle_dir: Path, good_png: bytes) -> None:
    """grpcio leaks the HTTP/2 stream of a call whose request fails to deserialize: ~100 such calls made the
    connection refuse everything after (REFUSED_STREAM), health included. The guard parses requests itself."""
    srv = _serve(bundle_dir)
    try:
        with grpc.insecure_channel(srv.address) as ch:
            raw = ch.unary_unary("/edgetune.v1.Classifier/Classify")  # bytes in, bytes out
            raw_stream = ch.stream_stream("/edgetune.v1.Classifier/StreamClassify")
            garbage = b"\xff\xff\xff\xff not a protobuf"
            codes = collections.Counter()
            for _ in range(250):
                codes[_code(raw, garbage, timeout=10)] += 1
            for _ in range(50):
                codes[_code(lambda: list(raw_stream(iter([garbage]), timeout=10)))] += 1
            assert codes == {grpc.StatusCode.INVALID_ARGUMENT: 300}, codes
            e = _err(raw, garbage, timeout=10)
            assert "not a valid edgetune.v1.ClassifyRequest" in e.details()
            stub = pb_grpc.ClassifierStub(ch)
            assert stub.Classify(pb.ClassifyRequest(image=good_png), timeout=5).predictions  # same connection
            assert _health(ch) == health_pb2.HealthCheckResponse.SERVING
            assert stub.GetStats(pb.GetStatsRequest(), timeout=5).errors_total >= 300
    finally:
        srv.stop(grace=1)


def test_grpc_and_native_errors_reach_the_json_log(cli: CliServer, good_png: bytes) -> None:
    """gRPC's own loggers and what C libraries print on stderr (libjpeg on a corrupt JPEG) become JSON lines."""
    import io

    from edge_server.logs import configure_logging

    buf = io.StringIO()
    configure_logging("info", buf)
    try:
        logging.getLogger("grpc._server").error("Exception calling application: boom")
        logging.getLogger("grpc._common").info("not shown: gRPC's loggers report warnings and up")
    finally:
        configure_logging("info", sys.stderr)
    lines = [json.loads(line) for line in buf.getvalue().splitlines()]
    assert [(r["logger"], r["level"]) for r in lines] == [("grpc._server", "error")]
    corrupt = bytearray(encode_jpeg(texture_tiles("test")[0][0]))
    corrupt[len(corrupt) // 2 : len(corrupt) // 2 + 40] = b"\x00" * 40
    with grpc.insecure_channel(cli.address) as ch:
        _code(pb_grpc.ClassifierStub(ch).Classify, pb.ClassifyRequest(image=bytes(corrupt)), timeout=10)
    time.sleep(0.5)
    native = [r for r in cli.records() if r["logger"] == "edge_server.native"]
    assert any("JPEG" in r["text"] for r in native), native  # libjpeg's warning, as a JSON record


# -- finding 6 ---------------------------------------------------------------------------------

def test_camera_id_is_bounded_and_stats_stay_small(bundle_dir: Path, good_png: bytes) -> None:
    srv = _serve(bundle_dir, max_message_mb=2)
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
    """Wraps the stats lock and records how long each holder kept it."""

    def __init__(self, lock: Any) -> None:
        self._lock, self.held, self._t = lock, [], 0.0

    def __enter__(self) -> None:
        self._lock.acquire()
        self._t = time.perf_counter()

    def __exit__(self, *exc: Any) -> None:
        self.held.append(time.perf_counter() - self._t)
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
        t0 = time.perf_counter()
        snap = stats.snapshot()
        took.append(time.perf_counter() - t0)
    assert snap["cameras"] and min(took) < 0.25
    held = sorted(timed.held)
    # (the median: a thread switch may land inside one short hold on a loaded machine)
    assert held[len(held) // 2] < 0.002, f"GetStats held the frame-counting lock for {held[-1] * 1e3:.1f} ms"


# -- finding 7 (server side) -------------------------------------------------------------------

def test_cli_token_on_command_line_warns_and_file_or_env_is_preferred(bundle_dir: Path, tmp_path: Path,
                                                                      good_png: bytes) -> None:
    base = ["--bundle", str(bundle_dir), "--port", "0", "--threads", "1"]
    srv = CliServer([*base, "--token", CAMERA], tmp_path / "t1.log")
    srv.stop()
    warn = [r for r in srv.records() if r["level"] == "warning" and "process table" in r["msg"]]
    assert warn and "--token-file" in warn[0]["msg"]
    token_file = tmp_path / "camera.token"
    token_file.write_text(CAMERA + "\n")
    token_file.chmod(0o644)
    srv = CliServer([*base, "--token-file", str(token_file)], tmp_path / "t2.log")
    try:
        with grpc.insecure_channel(srv.address) as ch:
            stub = pb_grpc.ClassifierStub(ch)
            assert _code(stub.Classify, pb.ClassifyRequest(image=good_png), timeout=10) == \
                grpc.StatusCode.UNAUTHENTICATED
            assert stub.Classify(pb.ClassifyRequest(image=good_png), timeout=10,
                                 metadata=[("authorization", f"Bearer {CAMERA}")]).predictions
    finally:
        srv.stop()
    recs = srv.records()
    assert not [r for r in recs if "process table" in r["msg"]]
    assert [r for r in recs if r["level"] == "warning" and "readable by other users" in r["msg"]]  # 0644
    assert CAMERA not in srv.log_path.read_text()
    srv = CliServer(base, tmp_path / "t3.log", env={"EDGETUNE_TOKEN": CAMERA})
    try:
        with grpc.insecure_channel(srv.address) as ch:
            assert _code(pb_grpc.ClassifierStub(ch).Classify, pb.ClassifyRequest(image=good_png), timeout=10) == \
                grpc.StatusCode.UNAUTHENTICATED
    finally:
        srv.stop()


def test_health_not_serving_during_drain(bundle_dir: Path, good_png: bytes) -> None:
    srv = _serve(bundle_dir, max_batch=8, max_wait_ms=1500, batch_wait="fixed")
    with grpc.insecure_channel(srv.address) as ch:
        stub = pb_grpc.ClassifierStub(ch)
        stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5)
        feeder = RequestFeeder()
        stream = stub.StreamClassify(feeder, timeout=30)
        inflight = stub.Classify.future(pb.ClassifyRequest(image=good_png, request_id="inflight"), timeout=10)
        time.sleep(0.3)
        stopper = threading.Thread(target=srv.stop, kwargs={"grace": 8})
        stopper.start()
        time.sleep(0.2)
        assert _health(ch) == health_pb2.HealthCheckResponse.NOT_SERVING  # an answer, not CANCELLED/UNAVAILABLE
        e = _err(stub.Classify, pb.ClassifyRequest(image=good_png), timeout=5)
        assert e.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in e.details()
        assert inflight.result(timeout=10).request_id == "inflight"
        e = _err(lambda: list(stream))
        assert e.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in e.details()
        feeder.end()
        stopper.join(15)
        assert not stopper.is_alive()
