"""The committed stubs equal a fresh ``make proto``; a client generated from proto/ alone works."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROTOS = sorted((REPO / "proto").rglob("*.proto"))
GENERATED = ("classifier_pb2.py", "classifier_pb2.pyi", "classifier_pb2_grpc.py")


def _protoc(out: Path) -> None:
    from grpc_tools import protoc

    args = [
        "grpc_tools.protoc",
        f"-I{REPO / 'proto'}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *map(str, PROTOS),
    ]
    assert protoc.main(args) == 0, "protoc failed"


def test_generated_stubs_are_fresh(tmp_path):
    _protoc(tmp_path)
    for name in GENERATED:
        fresh = (tmp_path / "edgetune" / "v1" / name).read_bytes()
        committed = (REPO / "edgetune" / "v1" / name).read_bytes()
        assert fresh == committed, f"edgetune/v1/{name} is stale: run `make proto` and commit the result"


@pytest.fixture(scope="module")
def server(bundle_dir):
    from edge_server.server import make_server

    srv = make_server(bundle=bundle_dir, port=0, backend="onnxruntime", intra_op_threads=1).start()
    yield srv
    srv.stop(grace=1)


def test_client_generated_only_from_proto(tmp_path, server):
    """Generate stubs into an empty directory and call Classify + StreamClassify from a separate process."""
    _protoc(tmp_path)
    for pkg in (tmp_path / "edgetune", tmp_path / "edgetune" / "v1"):
        (pkg / "__init__.py").write_text("")
    from testkit.edge_fixtures import encode_png, texture_tiles

    (tmp_path / "img.png").write_bytes(encode_png(texture_tiles("test")[0][0]))
    script = textwrap.dedent(f"""
        import sys, grpc
        sys.path.insert(0, {str(tmp_path)!r})
        from edgetune.v1 import classifier_pb2 as pb, classifier_pb2_grpc as pb_grpc
        assert pb.__file__.startswith({str(tmp_path)!r}), pb.__file__
        img = open("img.png", "rb").read()
        with grpc.insecure_channel({server.address!r}) as ch:
            stub = pb_grpc.ClassifierStub(ch)
            r = stub.Classify(pb.ClassifyRequest(image=img, request_id="gen", top_k=2), timeout=10)
            assert r.request_id == "gen" and len(r.predictions) == 2, r
            frames = [pb.Frame(camera_id="gen-cam", frame_id=7, image=img)]
            out = list(stub.StreamClassify(iter(frames), timeout=10))
            assert [f.frame_id for f in out] == [7] and out[0].predictions, out
        print("OK", r.predictions[0].label)
    """)
    r = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("OK ")
