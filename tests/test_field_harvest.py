"""Capture + harvest end to end on a real server (127.0.0.1, real model, real images): frames streamed by a camera
fill the spool with sidecars, GetStats shows drift and capture counts, the spool survives a restart, the harvest
pulls it (resuming a partial transfer, over TLS too) and deletes on the device only what it stored; hostile
requests cannot reach outside the spool."""

from __future__ import annotations

import hashlib
import json

import grpc
import pytest

from edge_client.connection import ClientError, ConnectionOptions
from edge_client.harvest import PARTIAL, harvest
from edge_server.capture import CaptureConfig
from edgetune.capture_record import CaptureRecord
from edgetune.v1 import classifier_pb2 as pb
from edgetune.v1 import classifier_pb2_grpc as pb_grpc
from testkit.edge_fixtures import encode_jpeg, self_signed_cert, texture_tiles
from tests.server_helpers import call_code, start_server, wait_until

ADMIN = "admin-token-0123456789"


@pytest.fixture(scope="module")
def jpegs() -> list[bytes]:
    imgs, _ = texture_tiles("test")
    return [encode_jpeg(i) for i in imgs[:: max(1, len(imgs) // 6)][:6]]


def _stream(srv, jpegs, camera="cam-7", creds=None) -> list[pb.FrameResult]:
    frames = [
        pb.Frame(camera_id=camera, frame_id=i, capture_time_us=1_000 + i, image=j, top_k=3) for i, j in enumerate(jpegs)
    ]
    ch = grpc.secure_channel(srv.address, creds) if creds else grpc.insecure_channel(srv.address)
    with ch:
        stub = pb_grpc.ClassifierStub(ch)
        out = []
        for f in frames:  # one at a time: latest-frame-wins must not drop any of them
            out.extend(stub.StreamClassify(iter([f]), timeout=60))
        return out


def _capture_all(spool) -> CaptureConfig:
    return CaptureConfig(dir=spool, min_confidence=1.0, random_rate=0.0, max_writes_per_s=1000)


def test_capture_stats_restart_and_harvest(bundle_dir, jpegs, tmp_path):
    spool, out = tmp_path / "spool", tmp_path / "out"
    srv = start_server(bundle_dir, capture=_capture_all(spool), admin_token=ADMIN)
    try:
        results = _stream(srv, jpegs)
        assert all(not r.error for r in results) and len(results) == 6
        wait_until(lambda: srv.capture.snapshot()["spool_files"] == 6, 60, "6 frames in the spool")
        with grpc.insecure_channel(srv.address) as ch:
            st = pb_grpc.ClassifierStub(ch).GetStats(pb.GetStatsRequest(), timeout=10)
        assert st.capture.enabled and st.capture.captured["low_confidence"] == 6 and st.capture.spool_files == 6
        assert st.drift.window == 6 and 0 < st.drift.mean_confidence < 1 and len(st.drift.classes) == 3
        assert sum(c.predicted_share for c in st.drift.classes) == pytest.approx(1.0)
        assert sum(c.train_share for c in st.drift.classes) == pytest.approx(1.0)  # recorded by the exporter
    finally:
        srv.stop(grace=1)
    sidecars = sorted(spool.glob("*.json"))
    assert len(sidecars) == 6
    rec = CaptureRecord.read(sidecars[0])
    assert rec.camera_id == "cam-7" and rec.reason == "low_confidence" and rec.capture_time_us == 1000 + rec.frame_id
    assert rec.model_version and len(rec.probs) == 3 and (spool / rec.frame).read_bytes() in jpegs

    srv = start_server(bundle_dir, capture=_capture_all(spool), admin_token=ADMIN)  # the spool survives a restart
    try:
        assert srv.capture.spool.files == 6
        conn = ConnectionOptions(server=srv.address)
        with pytest.raises(ClientError, match="authentication"):
            harvest(conn, "wrong-admin-token-xxxx", out, max_retry_time=1)
        assert srv.capture.spool.files == 6
        (out / PARTIAL).mkdir(parents=True, exist_ok=True)  # a transfer broken after 100 bytes
        (out / PARTIAL / (rec.frame + ".part")).write_bytes((spool / rec.frame).read_bytes()[:100])
        r = harvest(conn, ADMIN, out)
        assert (r.listed, r.stored, r.acknowledged) == (6, 6, 6)
        assert r.bytes == sum(len(j) for j in jpegs) - 100  # the partial frame resumed, not fetched again
        for side in out.glob("*.json"):
            got = CaptureRecord.read(side)
            assert hashlib.sha256((out / got.frame).read_bytes()).hexdigest() == got.frame_sha256
        assert srv.capture.spool.files == 0 and not list(spool.glob("*.json"))
        assert harvest(conn, ADMIN, out).listed == 0
    finally:
        srv.stop(grace=1)


def test_harvest_rpcs_refuse_hostile_requests(bundle_dir, jpegs, tmp_path):
    outside = tmp_path / "secret.jpg"
    outside.write_bytes(jpegs[0])
    srv = start_server(bundle_dir, capture=_capture_all(tmp_path / "spool"), admin_token=ADMIN)
    plain = start_server(bundle_dir)
    try:
        _stream(srv, jpegs[:1])
        wait_until(lambda: srv.capture.spool.files == 1, 60, "1 frame in the spool")
        md = [("x-edgetune-admin-token", ADMIN)]
        with grpc.insecure_channel(srv.address) as ch:
            stub = pb_grpc.ClassifierStub(ch)
            assert call_code(stub.ListCaptures, pb.ListCapturesRequest(), timeout=10) == grpc.StatusCode.UNAUTHENTICATED
            for bad in ("../secret", str(outside), "../../etc/passwd", "00000000000000000001-0000000g"):
                assert (
                    call_code(stub.FetchCapture, pb.FetchCaptureRequest(id=bad), timeout=10, metadata=md)
                    == grpc.StatusCode.NOT_FOUND
                )
            assert (
                call_code(stub.ListCaptures, pb.ListCapturesRequest(after="../x"), timeout=10, metadata=md)
                == grpc.StatusCode.INVALID_ARGUMENT
            )
            assert (
                call_code(stub.FetchCapture, pb.FetchCaptureRequest(id="x", length=1 << 30), timeout=10, metadata=md)
                == grpc.StatusCode.INVALID_ARGUMENT
            )
            item = stub.ListCaptures(pb.ListCapturesRequest(), timeout=10, metadata=md).frames[0]
            assert (
                call_code(stub.FetchCapture, pb.FetchCaptureRequest(id=item.id, offset=10**9), timeout=10, metadata=md)
                == grpc.StatusCode.OUT_OF_RANGE
            )
            got = stub.AckCaptures(
                pb.AckCapturesRequest(
                    acks=[pb.CaptureAck(id=item.id, frame_sha256="0" * 64), pb.CaptureAck(id="../secret.jpg")]
                ),
                timeout=10,
                metadata=md,
            )
            assert got.deleted == 0 and len(got.not_found) == 2 and srv.capture.spool.files == 1
        with grpc.insecure_channel(plain.address) as ch:
            assert (
                call_code(pb_grpc.ClassifierStub(ch).ListCaptures, pb.ListCapturesRequest(), timeout=10, metadata=md)
                == grpc.StatusCode.FAILED_PRECONDITION
            )
        assert outside.read_bytes() == jpegs[0]
    finally:
        srv.stop(grace=1)
        plain.stop(grace=1)


def test_harvest_over_tls(bundle_dir, jpegs, tmp_path):
    cert, key, *_ = self_signed_cert(tmp_path, "localhost")
    srv = start_server(
        bundle_dir, capture=_capture_all(tmp_path / "spool"), admin_token=ADMIN, tls_cert=cert, tls_key=key
    )
    try:
        creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        _stream(srv, jpegs[:2], creds=creds)
        wait_until(lambda: srv.capture.spool.files == 2, 60, "2 frames in the spool")
        conn = ConnectionOptions(server=f"localhost:{srv.port}", tls_ca=str(cert))
        r = harvest(conn, ADMIN, tmp_path / "out")
        assert (r.stored, r.acknowledged) == (2, 2)
        assert len(list((tmp_path / "out").glob("*.json"))) == 2
        side = json.loads(next((tmp_path / "out").glob("*.json")).read_text())
        assert side["schema"] == "edgetune.capture/1"
    finally:
        srv.stop(grace=1)


def test_a_disk_that_refuses_writes_degrades_capture_never_serving(bundle_dir, jpegs, tmp_path, monkeypatch):
    import errno

    srv = start_server(bundle_dir, capture=_capture_all(tmp_path / "spool"), admin_token=ADMIN)
    try:

        def full(rec, data):  # ENOSPC from the spool's disk
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(srv.capture.spool, "add", full)
        results = _stream(srv, jpegs)
        assert len(results) == 6 and all(r.predictions and not r.error for r in results)  # every frame served
        wait_until(lambda: srv.capture.snapshot()["queued"] == 0, 60, "the capture queue written (or refused)")
        with grpc.insecure_channel(srv.address) as ch:
            stub = pb_grpc.ClassifierStub(ch)
            st = stub.GetStats(pb.GetStatsRequest(), timeout=10)
            c = st.capture.counters
            assert st.capture.paused and st.capture.spool_files == 0 and c["write_errors"] >= 1
            assert c["write_errors"] + c["dropped_paused"] == 6  # each frame: a refused write, or not queued
            assert stub.Classify(pb.ClassifyRequest(image=jpegs[0]), timeout=30).predictions
    finally:
        srv.stop(grace=1)
