"""The edge server under hostile clients (issue 11), model loading, credentials and error handling: real bundle,
real ONNX Runtime, real gRPC on 127.0.0.1. Resource bounds are in ``tests/test_server_limits.py``.

One test (or group) per finding; each failed against the server before the fix:

4. ``LoadModel`` was open (``test_load_model_*``);
5. labels that do not match the model were accepted; handler exceptions became UNKNOWN; gRPC's own errors
   were not in the log (``test_labels_*``, ``test_unexpected_*``, ``test_grpc_own_errors_*``);
7. the server side of the smaller ones: ``--token`` in the process table (``test_cli_token_*``).
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
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2

from edge_server.server import make_server
from edgetune.bundle import load_bundle
from edgetune.errors import BundleError, ConfigError
from edgetune.v1 import classifier_pb2 as pb
from edgetune.v1 import classifier_pb2_grpc as pb_grpc
from testkit.edge_fixtures import (
    CliServer,
    RequestFeeder,
    copy_bundle,
    encode_jpeg,
    encode_png,
    texture_tiles,
)
from tests.server_helpers import call_code, call_error, health_status, start_server, wait_until

REPO = Path(__file__).resolve().parents[1]
ADMIN = "admin-token-for-tests-0123456789"
CAMERA = "camera-token-for-tests"
ADMIN_MD = [("x-edgetune-admin-token", ADMIN)]


def _labels_mismatch(src: Path, dst: Path, n: int = 2) -> Path:
    copy_bundle(src, dst)
    meta = json.loads((dst / "bundle.json").read_text())
    meta["labels"] = meta["labels"][:n]
    (dst / "bundle.json").write_text(json.dumps(meta))
    return dst


# -- finding 4 ---------------------------------------------------------------------------------


def test_load_model_is_off_unless_enabled(bundle_dir: Path, bundle_dir_b: Path) -> None:
    srv = start_server(bundle_dir)  # loopback, no token: LoadModel used to be open here
    try:
        with grpc.insecure_channel(srv.address) as ch:
            stub = pb_grpc.ClassifierStub(ch)
            e = call_error(stub.LoadModel, pb.LoadModelRequest(bundle_path=str(bundle_dir_b)), timeout=30)
            assert e.code() == grpc.StatusCode.FAILED_PRECONDITION and "--enable-load-model" in e.details()
            info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5)
            assert info.model_version == load_bundle(bundle_dir).version
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
    return start_server(bundle, load_model=True, admin_token=ADMIN, model_root=root, **kw)


def test_load_model_admin_credential_and_model_root(
    bundle_dir: Path, bundle_dir_b: Path, tmp_path: Path, good_png: bytes
) -> None:
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

            assert call_error(load, "b", cam).code() == grpc.StatusCode.UNAUTHENTICATED  # camera token is not admin
            assert (
                call_error(load, "b", cam + [("x-edgetune-admin-token", CAMERA)]).code()
                == grpc.StatusCode.UNAUTHENTICATED
            )
            assert (
                call_error(load, "b", cam + [("x-edgetune-admin-token", ADMIN + "x")]).code()
                == grpc.StatusCode.UNAUTHENTICATED
            )
            # the camera token is still needed
            assert call_error(load, "b", ADMIN_MD).code() == grpc.StatusCode.UNAUTHENTICATED
            assert load("b", cam + ADMIN_MD).model_version == vb  # relative to the model root, not the cwd
            assert load(str(root / "a"), cam + ADMIN_MD).model_version == va
            refused = {}
            for path in [
                "../outside-bundle",
                str(outside),
                "link",
                "link/../b",
                "/etc",
                "/nonexistent/x",
                "../../../../../../etc",
                str(root / "does-not-exist"),
            ]:
                e = call_error(load, path, cam + ADMIN_MD)
                assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (path, e)
                refused[path] = e.details().replace(repr(path), "<path>")
            outside_msgs = {v for k, v in refused.items() if k != str(root / "does-not-exist")}
            # the same words whether the target exists or not
            assert len(outside_msgs) == 1, "\n".join(f"{k}: {v}" for k, v in refused.items())
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
    srv = CliServer(
        [
            "--bundle",
            str(root / "a"),
            "--port",
            "0",
            "--threads",
            "1",
            "--enable-load-model",
            "--model-root",
            str(root),
            "--admin-token-file",
            str(token_file),
        ],
        tmp_path / "s1.log",
    )
    try:
        with grpc.insecure_channel(srv.address) as ch:
            stub = pb_grpc.ClassifierStub(ch)
            assert (
                call_code(stub.LoadModel, pb.LoadModelRequest(bundle_path="b"), timeout=30)
                == grpc.StatusCode.UNAUTHENTICATED
            )
            info = stub.LoadModel(pb.LoadModelRequest(bundle_path="b"), timeout=30, metadata=ADMIN_MD)
            assert info.model_version == load_bundle(bundle_dir_b).version
    finally:
        srv.stop()
    swapped = [r for r in srv.records() if r["msg"] == "model swapped"]
    assert swapped and ADMIN not in srv.log_path.read_text()
    srv = CliServer(
        [
            "--bundle",
            str(root / "a"),
            "--port",
            "0",
            "--threads",
            "1",
            "--enable-load-model",
            "--model-root",
            str(root),
        ],
        tmp_path / "s2.log",
        env={"EDGETUNE_ADMIN_TOKEN": ADMIN},
    )
    try:
        with grpc.insecure_channel(srv.address) as ch:
            info = pb_grpc.ClassifierStub(ch).LoadModel(
                pb.LoadModelRequest(bundle_path="b"), timeout=30, metadata=ADMIN_MD
            )
            assert info.model_version == load_bundle(bundle_dir_b).version
    finally:
        srv.stop()
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "edge_server",
            "--bundle",
            str(root / "a"),
            "--enable-load-model",
            "--model-root",
            str(root),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if k != "EDGETUNE_ADMIN_TOKEN"},
    )
    assert r.returncode == 2 and "admin token" in r.stderr


# -- finding 5 ---------------------------------------------------------------------------------


def test_labels_mismatch_is_refused_at_startup(bundle_dir: Path, tmp_path: Path) -> None:
    bad = _labels_mismatch(bundle_dir, tmp_path / "two-labels")
    with pytest.raises(BundleError) as e:
        make_server(bundle=bad, port=0, backend="onnxruntime", intra_op_threads=1)
    assert re.search(r"2 labels.*3 outputs", str(e.value)), str(e.value)
    r = subprocess.run(
        [sys.executable, "-m", "edge_server", "--bundle", str(bad), "--port", "0", "--threads", "1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert "labels" in last and "2" in last and "3" in last, r.stderr


def test_labels_mismatch_is_refused_by_load_model_and_watch(
    bundle_dir: Path, bundle_dir_b: Path, tmp_path: Path, good_png: bytes
) -> None:
    root = tmp_path / "models"
    root.mkdir()
    live = copy_bundle(bundle_dir, root / "live")
    _labels_mismatch(bundle_dir_b, root / "two-labels")
    srv = _admin_server(live, root, watch=True, watch_interval_s=0.1)
    try:
        with grpc.insecure_channel(srv.address) as ch:
            stub = pb_grpc.ClassifierStub(ch)
            e = call_error(stub.LoadModel, pb.LoadModelRequest(bundle_path="two-labels"), timeout=30, metadata=ADMIN_MD)
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and re.search("2 labels.*3 outputs", e.details())
            # --watch: another model with too few labels is deployed into the watched directory
            shutil.copy(bundle_dir_b / "model.onnx", live / "model.onnx")
            shutil.copy(root / "two-labels" / "bundle.json", live / "bundle.json")
            # a state, not a sleep: the watcher has tried the new bundle and refused it
            assert srv.watcher is not None
            wait_until(srv.watcher.refused_current, 120, "the watcher refused the mismatched bundle")
            r = stub.Classify(pb.ClassifyRequest(image=good_png, top_k=3), timeout=10)
            assert len(r.predictions) == 3 and r.model_version == load_bundle(bundle_dir).version
    finally:
        srv.stop(grace=1)


def test_unexpected_handler_exception_is_internal_and_logged(
    bundle_dir: Path, good_png: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """What a labels/outputs mismatch used to do at request time (IndexError -> UNKNOWN, stream ended)."""
    srv = start_server(bundle_dir)
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
                e = call_error(stub.Classify, pb.ClassifyRequest(image=good_png), timeout=10)
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
    srv = start_server(bundle_dir)
    try:
        with grpc.insecure_channel(srv.address) as ch:
            raw = ch.unary_unary("/edgetune.v1.Classifier/Classify")  # bytes in, bytes out
            raw_stream = ch.stream_stream("/edgetune.v1.Classifier/StreamClassify")
            garbage = b"\xff\xff\xff\xff not a protobuf"
            codes = collections.Counter()
            for _ in range(250):
                codes[call_code(raw, garbage, timeout=10)] += 1
            for _ in range(50):
                codes[call_code(lambda: list(raw_stream(iter([garbage]), timeout=10)))] += 1
            assert codes == {grpc.StatusCode.INVALID_ARGUMENT: 300}, codes
            e = call_error(raw, garbage, timeout=10)
            assert "not a valid edgetune.v1.ClassifyRequest" in e.details()
            stub = pb_grpc.ClassifierStub(ch)
            assert stub.Classify(pb.ClassifyRequest(image=good_png), timeout=5).predictions  # same connection
            assert health_status(ch) == health_pb2.HealthCheckResponse.SERVING
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
        call_code(pb_grpc.ClassifierStub(ch).Classify, pb.ClassifyRequest(image=bytes(corrupt)), timeout=10)

    def native() -> list[dict]:
        return [r for r in cli.records() if r["logger"] == "edge_server.native"]

    # libjpeg's warning, as a JSON record (waited for: a loaded server writes it a little later)
    wait_until(lambda: any("JPEG" in r["text"] for r in native()), timeout=60, what="libjpeg's warning in the log")


# -- finding 7 (server side) -------------------------------------------------------------------


def test_cli_token_on_command_line_warns_and_file_or_env_is_preferred(
    bundle_dir: Path, tmp_path: Path, good_png: bytes
) -> None:
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
            assert (
                call_code(stub.Classify, pb.ClassifyRequest(image=good_png), timeout=10)
                == grpc.StatusCode.UNAUTHENTICATED
            )
            assert stub.Classify(
                pb.ClassifyRequest(image=good_png), timeout=10, metadata=[("authorization", f"Bearer {CAMERA}")]
            ).predictions
    finally:
        srv.stop()
    recs = srv.records()
    assert not [r for r in recs if "process table" in r["msg"]]
    assert [r for r in recs if r["level"] == "warning" and "readable by other users" in r["msg"]]  # 0644
    assert CAMERA not in srv.log_path.read_text()
    srv = CliServer(base, tmp_path / "t3.log", env={"EDGETUNE_TOKEN": CAMERA})
    try:
        with grpc.insecure_channel(srv.address) as ch:
            assert (
                call_code(pb_grpc.ClassifierStub(ch).Classify, pb.ClassifyRequest(image=good_png), timeout=10)
                == grpc.StatusCode.UNAUTHENTICATED
            )
    finally:
        srv.stop()
