"""End-to-end: real bundle, real ONNX Runtime, real gRPC server on 127.0.0.1 (port 0)."""

from __future__ import annotations

import concurrent.futures

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from edge_server.server import make_server
from edgetune.bundle import load_bundle
from edgetune.imagedecode import decode_image
from edgetune.v1 import classifier_pb2 as pb
from edgetune.v1 import classifier_pb2_grpc as pb_grpc
from testkit.edge_fixtures import LABELS, RequestFeeder, encode_jpeg, encode_png, texture_tiles


@pytest.fixture(scope="module")
def server(bundle_dir):
    srv = make_server(bundle=bundle_dir, port=0, backend="onnxruntime", intra_op_threads=1, max_wait_ms=2).start()
    yield srv
    srv.stop(grace=1)


@pytest.fixture(scope="module")
def channel(server):
    ch = grpc.insecure_channel(server.address)
    yield ch
    ch.close()


@pytest.fixture(scope="module")
def stub(channel):
    return pb_grpc.ClassifierStub(channel)


def test_unary_matches_onnxruntime_and_torch_reference(stub, bundle_dir):
    import onnxruntime as ort

    b = load_bundle(bundle_dir)
    imgs, ys = texture_tiles("test")
    ref = np.load(bundle_dir / "reference_probs.npy")  # torch model's softmax at export time
    sess = ort.InferenceSession(str(b.model_path), providers=["CPUExecutionProvider"])
    correct = 0
    for i in range(0, len(imgs), 8):
        data = encode_png(imgs[i])
        r = stub.Classify(pb.ClassifyRequest(image=data, request_id=f"r{i}", top_k=3), timeout=10)
        assert r.request_id == f"r{i}"
        assert r.model_version == b.version
        got = np.zeros(len(LABELS), dtype=np.float32)
        for p in r.predictions:
            assert p.label == LABELS[p.index]
            got[p.index] = p.score
        logits = sess.run(["logits"], {"input": b.spec.apply(decode_image(data))[None]})[0][0]
        direct = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        np.testing.assert_allclose(got, direct, atol=1e-6)
        np.testing.assert_allclose(got, ref[i], atol=1e-4)
        correct += int(r.predictions[0].index == ys[i])
        assert r.timing.batch_size >= 1 and r.timing.total_us >= r.timing.infer_us > 0
    assert correct / len(range(0, len(imgs), 8)) >= 0.5  # trained model: far above chance (1/3)


def test_topk_sorted_and_defaults(stub):
    data = encode_jpeg(texture_tiles("test")[0][5])
    r = stub.Classify(pb.ClassifyRequest(image=data), timeout=10)
    assert len(r.predictions) == 1
    r3 = stub.Classify(pb.ClassifyRequest(image=data, top_k=3), timeout=10)
    scores = [p.score for p in r3.predictions]
    assert scores == sorted(scores, reverse=True) and abs(sum(scores) - 1) < 1e-5
    assert r3.predictions[0].index == r.predictions[0].index
    with pytest.raises(grpc.RpcError) as e:
        stub.Classify(pb.ClassifyRequest(image=data, top_k=4), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "top_k 4" in e.value.details()


def test_stream_one_result_per_frame(stub, bundle_dir):
    imgs, _ = texture_tiles("test")
    feeder = RequestFeeder()
    responses = stub.StreamClassify(feeder, timeout=30)
    for i in range(6):
        feeder.send(
            pb.Frame(
                camera_id="cam-a", frame_id=100 + i, capture_time_us=1_000 + i, image=encode_png(imgs[i * 7]), top_k=2
            )
        )
        res = next(responses)
        assert (res.camera_id, res.frame_id, res.capture_time_us) == ("cam-a", 100 + i, 1_000 + i)
        assert res.error == "" and len(res.predictions) == 2 and res.dropped_before == 0
        assert res.model_version == load_bundle(bundle_dir).version
    # a bad frame yields an error result and the stream goes on
    feeder.send(pb.Frame(camera_id="cam-a", frame_id=200, image=b"\x89PNG\r\n\x1a\nnot really"))
    bad = next(responses)
    assert bad.frame_id == 200 and bad.error and not bad.predictions
    feeder.send(pb.Frame(camera_id="cam-a", frame_id=201, image=encode_png(imgs[0])))
    assert next(responses).predictions
    feeder.end()
    assert list(responses) == []


def test_model_info(stub, bundle_dir):
    b = load_bundle(bundle_dir)
    info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    assert list(info.labels) == list(LABELS)
    assert list(info.input.input_size) == [32, 32] and info.input.layout == "NCHW"
    np.testing.assert_allclose(list(info.input.mean), b.spec.mean, rtol=1e-6)
    assert info.backend == "onnxruntime:CPUExecutionProvider" and info.precision == "fp32"
    assert info.bundle_sha256 == b.sha256 and info.model_version == b.sha256[:12]
    assert info.backbone == b.meta["backbone"] == "efficientnet_lite0" and info.max_batch_size == 8
    assert "export.torch" in info.versions and "server.grpcio" in info.versions


def test_health_serving(channel):
    h = health_pb2_grpc.HealthStub(channel)
    for svc in ("", "edgetune.v1.Classifier"):
        assert (
            h.Check(health_pb2.HealthCheckRequest(service=svc), timeout=5).status
            == health_pb2.HealthCheckResponse.SERVING
        )


def test_reflection_lists_service(channel):
    r = reflection_pb2_grpc.ServerReflectionStub(channel)
    resp = next(r.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
    names = {s.name for s in resp.list_services_response.service}
    assert {"edgetune.v1.Classifier", "grpc.health.v1.Health"} <= names
    req = reflection_pb2.ServerReflectionRequest(file_containing_symbol="edgetune.v1.Classifier")
    resp = next(r.ServerReflectionInfo(iter([req]), timeout=5))
    assert resp.file_descriptor_response.file_descriptor_proto  # clients can build the schema from it


def test_stats_after_traffic(stub):
    imgs, _ = texture_tiles("test")
    frames = [pb.Frame(camera_id="cam-stats", frame_id=i, image=encode_png(imgs[i])) for i in range(3)]
    feeder = RequestFeeder()
    responses = stub.StreamClassify(feeder, timeout=30)
    for f in frames:
        feeder.send(f)
        next(responses)
    feeder.end()
    list(responses)
    stats = stub.GetStats(pb.GetStatsRequest(), timeout=5)
    cam = {c.camera_id: c for c in stats.cameras}["cam-stats"]
    assert cam.frames_received == 3 and cam.frames_processed == 3 and cam.frames_dropped == 0
    assert 0 < cam.latency_p50_ms <= cam.latency_p95_ms <= cam.latency_p99_ms
    assert stats.requests_total >= 1 and stats.uptime_s > 0 and stats.mean_batch_size >= 1
    assert stats.model_version


def test_micro_batching_groups_concurrent_requests(bundle_dir):
    """8 concurrent callers, fixed 50 ms window: requests share batches (batch_size > 1).

    (The default adaptive wait groups only requests that overlap in time; tiny test images decode in
    microseconds, so the fixed window makes grouping deterministic here. Adaptive grouping is tested in
    test_server_runners.py.)"""
    srv = make_server(
        bundle=bundle_dir,
        port=0,
        backend="onnxruntime",
        intra_op_threads=1,
        max_batch=8,
        max_wait_ms=50,
        batch_wait="fixed",
    ).start()
    try:
        with grpc.insecure_channel(srv.address) as ch:
            stub = pb_grpc.ClassifierStub(ch)
            data = encode_png(texture_tiles("test")[0][3])
            stub.Classify(pb.ClassifyRequest(image=data), timeout=10)  # warm up the connection
            with concurrent.futures.ThreadPoolExecutor(8) as ex:
                results = list(ex.map(lambda _: stub.Classify(pb.ClassifyRequest(image=data), timeout=10), range(8)))
            assert max(r.timing.batch_size for r in results) > 1
            assert len({r.predictions[0].index for r in results}) == 1  # same image, same answer in any batch
            assert stub.GetStats(pb.GetStatsRequest(), timeout=5).mean_batch_size > 1
    finally:
        srv.stop(grace=1)
