"""TLS, mutual TLS, bearer token and the bind-address policy."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edge_server.auth import check_bind_policy, is_loopback
from edge_server.model import RunnerOptions
from edge_server.server import ServerConfig, make_server
from edgetune.errors import ConfigError
from edgetune.v1 import classifier_pb2 as pb
from edgetune.v1 import classifier_pb2_grpc as pb_grpc
from testkit.edge_fixtures import encode_png, self_signed_cert, texture_tiles

TOKEN = "s3cret-token-for-tests"


@pytest.fixture(scope="module")
def data():
    return encode_png(texture_tiles("test")[0][0])


def _code(fn, *args, **kw):
    try:
        fn(*args, **kw)
        return grpc.StatusCode.OK
    except grpc.RpcError as e:
        return e.code()


def test_tls_and_token(bundle_dir, data, tmp_path):
    cert, key, *_ = self_signed_cert(tmp_path, "localhost")
    srv = make_server(
        bundle=bundle_dir, port=0, backend="onnxruntime", intra_op_threads=1, token=TOKEN, tls_cert=cert, tls_key=key
    ).start()
    try:
        creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        with grpc.secure_channel(srv.address, creds) as ch:
            stub = pb_grpc.ClassifierStub(ch)
            req = pb.ClassifyRequest(image=data)
            assert _code(stub.Classify, req, timeout=10) == grpc.StatusCode.UNAUTHENTICATED
            assert (
                _code(stub.Classify, req, timeout=10, metadata=[("authorization", "Bearer wrong-token")])
                == grpc.StatusCode.UNAUTHENTICATED
            )
            assert (
                _code(stub.Classify, req, timeout=10, metadata=[("authorization", TOKEN)])
                == grpc.StatusCode.UNAUTHENTICATED
            )
            auth = [("authorization", f"Bearer {TOKEN}")]
            assert stub.Classify(req, timeout=10, metadata=auth).predictions
            frames = iter([pb.Frame(camera_id="c", frame_id=1, image=data)])
            assert _code(lambda: list(stub.StreamClassify(frames, timeout=10))) == grpc.StatusCode.UNAUTHENTICATED
            frames = iter([pb.Frame(camera_id="c", frame_id=1, image=data)])
            assert [r.frame_id for r in stub.StreamClassify(frames, timeout=10, metadata=auth)] == [1]
            assert (
                _code(stub.LoadModel, pb.LoadModelRequest(bundle_path=str(bundle_dir)), timeout=10)
                == grpc.StatusCode.UNAUTHENTICATED
            )
            # health stays open for probes
            health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
        # plaintext client against the TLS port fails
        with grpc.insecure_channel(srv.address) as ch:
            assert (
                _code(
                    pb_grpc.ClassifierStub(ch).Classify,
                    pb.ClassifyRequest(image=data),
                    timeout=5,
                    metadata=[("authorization", f"Bearer {TOKEN}")],
                )
                == grpc.StatusCode.UNAVAILABLE
            )
    finally:
        srv.stop(grace=1)


def test_mutual_tls(bundle_dir, data, tmp_path):
    ca_cert_path, _, ca_cert, ca_key = self_signed_cert(tmp_path, "edgetune-test-ca")
    server_cert, server_key, *_ = self_signed_cert(tmp_path, "localhost", ca=(ca_cert, ca_key))
    client_cert, client_key, *_ = self_signed_cert(tmp_path, "camera-1", ca=(ca_cert, ca_key))
    srv = make_server(
        bundle=bundle_dir,
        port=0,
        backend="onnxruntime",
        intra_op_threads=1,
        tls_cert=server_cert,
        tls_key=server_key,
        tls_client_ca=ca_cert_path,
    ).start()
    try:
        root = ca_cert_path.read_bytes()
        with grpc.secure_channel(srv.address, grpc.ssl_channel_credentials(root_certificates=root)) as ch:
            assert (
                _code(pb_grpc.ClassifierStub(ch).Classify, pb.ClassifyRequest(image=data), timeout=5)
                == grpc.StatusCode.UNAVAILABLE
            )  # no client certificate: handshake refused
        creds = grpc.ssl_channel_credentials(
            root_certificates=root, private_key=client_key.read_bytes(), certificate_chain=client_cert.read_bytes()
        )
        with grpc.secure_channel(srv.address, creds) as ch:
            assert pb_grpc.ClassifierStub(ch).Classify(pb.ClassifyRequest(image=data), timeout=10).predictions
    finally:
        srv.stop(grace=1)


def test_bind_policy_and_config_errors(bundle_dir, tmp_path):
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.20")
    check_bind_policy("127.0.0.1", tls=False, insecure=False)
    check_bind_policy("0.0.0.0", tls=True, insecure=False)
    check_bind_policy("0.0.0.0", tls=False, insecure=True)
    with pytest.raises(ConfigError, match="--insecure"):
        make_server(bundle=bundle_dir, host="0.0.0.0", port=0)
    with pytest.raises(ConfigError, match="both --tls-cert and --tls-key"):
        make_server(bundle=bundle_dir, port=0, tls_cert=tmp_path / "x.crt")
    (tmp_path / "bad.crt").write_text("not pem")
    (tmp_path / "bad.key").write_text("not pem")
    with pytest.raises(ConfigError, match="not PEM"):
        make_server(bundle=bundle_dir, port=0, tls_cert=tmp_path / "bad.crt", tls_key=tmp_path / "bad.key")
    with pytest.raises(ConfigError, match="at least 8 characters"):
        make_server(bundle=bundle_dir, port=0, token="short")
    with pytest.raises(ConfigError, match="port must be"):
        make_server(bundle=bundle_dir, port=70000)
    with pytest.raises(ConfigError, match="backend must be one of"):
        make_server(bundle=bundle_dir, port=0, backend="cuda-magic")


def test_server_config_declares_runner_options_once(bundle_dir):
    runner_fields = {f.name for f in dataclasses.fields(RunnerOptions)}
    assert runner_fields == {"backend", "max_batch", "max_wait_ms", "batch_wait", "intra_op_threads", "precision"}
    assert not runner_fields & set(vars(ServerConfig).get("__annotations__", {})), "re-declared in ServerConfig"
    config = ServerConfig(
        bundle=bundle_dir,
        port=0,
        backend="onnxruntime",
        max_batch=3,
        max_wait_ms=7.5,
        batch_wait="fixed",
        intra_op_threads=1,
        precision="fp32",
    )
    options = config.runner_options()
    assert type(options) is RunnerOptions and options == RunnerOptions(
        backend="onnxruntime", max_batch=3, max_wait_ms=7.5, batch_wait="fixed", intra_op_threads=1, precision="fp32"
    )
    srv = make_server(config)
    try:
        assert srv.holder.options == options  # what every (re)loaded bundle is served with
        assert srv.holder.current.batcher.max_batch == 3 and srv.holder.current.runner.precision == "fp32"
    finally:
        srv.stop(grace=0)
    # validated where declared, on ServerConfig construction, with RunnerOptions' messages
    cases: list[tuple[dict[str, Any], str]] = [
        ({"max_batch": 0}, "max_batch must be an integer in 1..1024, got 0"),
        ({"max_wait_ms": -1}, "max_wait_ms must be in [0, 10000] ms, got -1"),
        ({"batch_wait": "eager"}, "batch_wait must be 'adaptive' or 'fixed', got 'eager'"),
    ]
    for bad, fragment in cases:
        with pytest.raises(ConfigError, match=re.escape(fragment)):
            ServerConfig(bundle=bundle_dir, port=0, **bad)
        with pytest.raises(ConfigError, match=re.escape(fragment)):
            RunnerOptions(**bad)
