"""Hot model swap: LoadModel RPC and --watch, without dropping open streams."""

from __future__ import annotations

import json
import os
import shutil
import time

import grpc
import pytest

from edge_server.server import make_server
from edgetune.bundle import load_bundle
from edgetune.v1 import classifier_pb2 as pb
from edgetune.v1 import classifier_pb2_grpc as pb_grpc
from testkit.edge_fixtures import RequestFeeder, copy_bundle, encode_png, texture_tiles
from tests.server_helpers import wait_until

ADMIN = "admin-token-of-the-swap-tests"
ADMIN_MD = [("x-edgetune-admin-token", ADMIN)]


def test_load_model_mid_stream(bundle_dir, bundle_dir_b):
    a, b = bundle_dir, bundle_dir_b
    assert a.parent == b.parent  # the model root
    va, vb = load_bundle(a).version, load_bundle(b).version
    imgs = texture_tiles("test")[0]
    srv = make_server(
        bundle=a,
        port=0,
        backend="onnxruntime",
        intra_op_threads=1,
        load_model=True,
        admin_token=ADMIN,
        model_root=a.parent,
    ).start()
    try:
        with grpc.insecure_channel(srv.address) as ch:
            stub = pb_grpc.ClassifierStub(ch)
            feeder = RequestFeeder()
            stream = stub.StreamClassify(feeder, timeout=60)
            versions = []
            for i in range(10):
                if i == 5:
                    info = stub.LoadModel(pb.LoadModelRequest(bundle_path=str(b)), timeout=30, metadata=ADMIN_MD)
                    assert info.model_version == vb
                feeder.send(pb.Frame(camera_id="cam", frame_id=i, image=encode_png(imgs[i])))
                res = next(stream)
                assert res.frame_id == i and not res.error and res.predictions
                versions.append(res.model_version)
            assert versions == [va] * 5 + [vb] * 5
            # a broken bundle is refused and the current model keeps serving the same stream
            with pytest.raises(grpc.RpcError) as e:
                stub.LoadModel(pb.LoadModelRequest(bundle_path=str(a / "missing")), timeout=30, metadata=ADMIN_MD)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "bundle.json not found" in e.value.details()
            feeder.send(pb.Frame(camera_id="cam", frame_id=99, image=encode_png(imgs[0])))
            assert next(stream).model_version == vb
            feeder.end()
            assert list(stream) == []
            assert stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5).model_version == vb
    finally:
        srv.stop(grace=1)


def test_watch_directory_swaps_and_survives_bad_bundle(bundle_dir, bundle_dir_b, tmp_path):
    a, b = bundle_dir, bundle_dir_b
    live = copy_bundle(a, tmp_path / "live")
    vb = load_bundle(b).version
    srv = make_server(
        bundle=live, port=0, backend="onnxruntime", intra_op_threads=1, watch=True, watch_interval_s=0.1
    ).start()
    try:
        with grpc.insecure_channel(srv.address) as ch:
            stub = pb_grpc.ClassifierStub(ch)
            data = encode_png(texture_tiles("test")[0][0])
            feeder = RequestFeeder()
            stream = stub.StreamClassify(feeder, timeout=600)
            feeder.send(pb.Frame(camera_id="w", frame_id=0, image=data))
            assert next(stream).model_version == load_bundle(a).version
            # a half-deployed bundle (manifest updated, model not yet) must not replace the good one
            meta = json.loads((b / "bundle.json").read_text())
            (live / "bundle.json").write_text(json.dumps(meta))
            assert srv.watcher is not None
            wait_until(srv.watcher.refused_current, 120, "the watcher refused the half-deployed bundle")  # a state
            feeder.send(pb.Frame(camera_id="w", frame_id=1, image=data))
            assert next(stream).model_version == load_bundle(a).version
            shutil.copy(b / "model.onnx", live / "model.onnx")
            st = (live / "bundle.json").stat()  # touched: a later mtime than the refused one, however soon this runs
            os.utime(live / "bundle.json", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
            deadline = time.monotonic() + 120  # loading the new model is slow on a loaded machine
            version, i = "", 2
            while version != vb and time.monotonic() < deadline:
                feeder.send(pb.Frame(camera_id="w", frame_id=i, image=data))
                res = next(stream)
                assert not res.error
                version, i = res.model_version, i + 1
                time.sleep(0.05)
            assert version == vb
            feeder.end()
            list(stream)
    finally:
        srv.stop(grace=1)
