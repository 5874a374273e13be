"""Camera client against the real edge server on 127.0.0.1 (real ONNX Runtime, real gRPC)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from edge_client.__main__ import main
from edge_client.client import CameraStream
from edge_client.connection import ConnectionOptions
from edge_client.frames import EncodeOptions, encode_frame
from edge_client.sources import VideoFileSource, open_source
from edge_client.stream_options import StreamOptions
from edge_server.server import make_server
from edgetune.v1 import classifier_pb2 as pb
from edgetune.v1 import classifier_pb2_grpc as pb_grpc
from testkit.client_media import write_image_dir, write_video
from testkit.edge_fixtures import LABELS

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def media(bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("client_e2e")
    return {"bundle": bundle_dir, "video": write_video(d / "clip.avi", n=45, size=256)}


@pytest.fixture()
def server(media: dict[str, Path]) -> Any:
    srv = make_server(bundle=media["bundle"], port=0, grace_s=0.0).start()
    yield srv
    srv.stop(grace=0.0)


def _run_stream(source: Any, address: str, opts: StreamOptions, records: list[dict]) -> tuple[CameraStream, Any]:
    cs = CameraStream(source, ConnectionOptions(address), opts, [lambda rec, _img: records.append(rec)])
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["stats"] = cs.run()
        except BaseException as e:  # surfaced by the test
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return cs, (t, box)


def _unary(address: str, data: bytes) -> pb.ClassifyResponse:
    with grpc.insecure_channel(address) as ch:
        return pb_grpc.ClassifierStub(ch).Classify(pb.ClassifyRequest(image=data), timeout=10)


def _unary_ready(address: str, token: str, timeout: float = 120.0) -> None:
    """Until the server answers a call (waits for the channel to be ready, however long a loaded machine takes)."""
    with grpc.insecure_channel(address) as ch:
        grpc.channel_ready_future(ch).result(timeout=timeout)
        pb_grpc.ClassifierStub(ch).GetModelInfo(
            pb.GetModelInfoRequest(), timeout=timeout, metadata=[("authorization", f"Bearer {token}")]
        )


def test_make_client_streams_whole_file_and_matches_unary(media: dict[str, Path], server: Any, tmp_path: Path) -> None:
    log = tmp_path / "out.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE")}
    proc = subprocess.run(
        [
            "make",
            "-s",
            "client",
            f"SOURCE={media['video']}",
            f"SERVER={server.address}",
            f"LOG={log}",
            "ARGS=--max-size 128 --jpeg-quality 80",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["frame_id"] for r in records] == list(range(45))  # whole file, every frame processed
    for r in records:
        assert r["label"] in LABELS and 0 < r["score"] <= 1 and r["latency_ms"] > 0
        assert r["camera_id"] == "clip" and r["dropped_before"] == 0 and r["error"] is None
        assert r["model_version"] == server.holder.current.version
    # The server's unary answers for the same client-resized, JPEG-encoded frames.
    src = VideoFileSource(media["video"], "clip")
    enc = EncodeOptions(max_size=128, jpeg_quality=80)
    labels_seen = set()
    for r in records:
        frame = src.read()
        assert frame is not None and frame.seq == r["frame_id"]
        data, small = encode_frame(frame.image, enc)
        assert small.shape == (128, 128, 3)
        ref = _unary(server.address, data)
        assert ref.predictions[0].label == r["label"]
        assert ref.predictions[0].score == pytest.approx(r["score"], abs=1e-4)
        labels_seen.add(r["label"])
    src.close()
    assert len(labels_seen) >= 2  # the frames differ and so do the answers


def test_server_restart_mid_stream_reconnects_and_reports_gap(
    media: dict[str, Path], server: Any, capfd: pytest.CaptureFixture[str]
) -> None:
    port = server.port
    records: list[dict] = []
    opts = StreamOptions(fps=20.0, backoff_initial=0.1, backoff_max=0.5, max_retry_time=30.0)
    cs, (thread, box) = _run_stream(VideoFileSource(media["video"], "line"), server.address, opts, records)
    deadline = time.monotonic() + 20
    while len(records) < 8 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(records) >= 8, box
    server.stop(grace=0.0)  # the fixture's stop is idempotent
    time.sleep(0.5)  # the client now retries against a closed port
    second = make_server(bundle=media["bundle"], port=port, grace_s=0.0).start()
    try:
        thread.join(timeout=60)
        assert not thread.is_alive() and "error" not in box, box
    finally:
        second.stop(grace=0.0)
    stats = box["stats"]
    ids = [r["frame_id"] for r in records]
    assert stats.reconnects == 1 and ids[-1] == 44 and ids == sorted(ids)
    assert stats.results == len(records) and stats.sent == stats.results + stats.lost + stats.dropped
    gap = sorted(set(range(45)) - set(ids))
    assert len(gap) == stats.lost  # frames without a result are exactly the ones lost in the outage
    assert sum(r["lost_before"] for r in records) == stats.lost
    err = capfd.readouterr().err
    assert "reconnecting" in err and "reconnected to" in err and "Traceback" not in err


def test_fast_live_source_vs_slow_model_drops_and_bounds_latency(media: dict[str, Path]) -> None:
    # Each frame waits 250 ms for a micro-batch that never fills: ~4 frames/s against a 30 fps camera.
    slow = make_server(bundle=media["bundle"], port=0, max_wait_ms=250.0, batch_wait="fixed", grace_s=0.0).start()
    try:
        records: list[dict] = []
        src = open_source(str(media["video"]), "cam", live=True)
        cs, (thread, box) = _run_stream(src, slow.address, StreamOptions(max_retry_time=5.0), records)
        thread.join(timeout=60)
        src.close()
        assert not thread.is_alive() and "error" not in box, box
    finally:
        slow.stop(grace=0.0)
    stats = box["stats"]
    assert 2 <= stats.results < 20 and stats.dropped > 10
    assert stats.dropped == sum(r["dropped_before"] for r in records)
    assert stats.sent + stats.skipped == 45 and stats.sent == stats.results + stats.dropped + stats.lost
    # A queue would make the last frames wait ~10 s (45 frames at ~4/s); dropping keeps every latency near 2 service
    # times (0.5 s): 3 s tells them apart with room for a loaded machine.
    assert max(r["latency_ms"] for r in records) < 3000.0


def test_directory_source_and_csv_log(media: dict[str, Path], server: Any, tmp_path: Path) -> None:
    d = write_image_dir(tmp_path / "imgs", n=5, size=64)
    log = tmp_path / "r.csv"
    rc = main(["--source", f"dir={d}", "--server", server.address, "--log", str(log), "--quiet"])
    assert rc == 0
    lines = log.read_text().splitlines()
    assert lines[0].startswith("camera_id,frame_id") and len(lines) == 6
    assert [line.split(",")[1] for line in lines[1:]] == ["0", "1", "2", "3", "4"]


def test_several_cameras_in_one_client_each_get_a_stream(media: dict[str, Path], tmp_path: Path) -> None:
    """One client process with 4 cameras against a server that lets one connection hold 2 streams: every camera
    has its own connection, so none is refused (before: grpcio shared one connection among the client's equal
    channels, and the cameras beyond the connection's share were refused and had to wait their turn)."""
    srv = make_server(
        bundle=media["bundle"], port=0, backend="onnxruntime", intra_op_threads=1, max_streams=4, stream_idle_s=30.0
    ).start()
    try:
        assert srv.config.streams_per_connection() == 2
        args = ["--server", srv.address, "--fps", "20", "--quiet"]
        for i in range(4):
            d = write_image_dir(tmp_path / f"imgs{i}", n=20, size=64)  # 1 s of frames at 20 fps: streams overlap
            args += ["--source", f"cam{i}={d}"]
        assert main([*args, "--log", str(tmp_path / "r.csv")]) == 0
        rows = [line.split(",") for line in (tmp_path / "r.csv").read_text().splitlines()[1:]]
        assert sorted({r[0] for r in rows}) == ["cam0", "cam1", "cam2", "cam3"]
        assert {r[0] for r in rows if r[1] == "19"} == {"cam0", "cam1", "cam2", "cam3"}  # (latest frame wins)
        assert srv.stats.rejected_total == 0, "a camera was refused: its client shares a connection"
    finally:
        srv.stop(grace=1)


def test_once_prints_json(
    media: dict[str, Path], server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = write_image_dir(tmp_path / "imgs", n=3, size=96)
    image = d / "img_001.png"
    assert main(["--once", str(image), "--server", server.address, "--top-k", "3"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["label"] in LABELS and len(out["predictions"]) == 3
    assert out["model_version"] == server.holder.current.version
    # --raw sends the file's bytes as they are: the same answer as a direct Classify of those bytes (the default
    # path re-encodes to JPEG, whose pixels differ slightly: a near-tied top-1 of the test model may flip)
    assert main(["--once", str(image), "--raw", "--server", server.address]) == 0
    raw = json.loads(capsys.readouterr().out)
    assert raw["sent_bytes"] == image.stat().st_size
    assert raw["label"] == _unary(server.address, image.read_bytes()).predictions[0].label


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edge_client", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def test_bad_server_address_gives_one_clear_line_and_nonzero_exit(media: dict[str, Path]) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = _cli("--source", str(media["video"]), "--server", f"127.0.0.1:{port}", "--max-retry-time", "1")
    assert proc.returncode == 1
    assert "cannot reach server" in proc.stderr and "gave up" in proc.stderr and "Traceback" not in proc.stderr
    proc = _cli("--source", str(media["video"]), "--server", "localhost")
    assert proc.returncode == 2 and "host:port" in proc.stderr and "Traceback" not in proc.stderr


def test_bearer_token_rejected_and_accepted(media: dict[str, Path], tmp_path: Path) -> None:
    srv = make_server(bundle=media["bundle"], port=0, token="right-token-123", grace_s=0.0).start()
    try:
        _unary_ready(srv.address, token="right-token-123")  # the server answers before the client connects
        # a generous connect timeout: on a loaded machine the handshake is slow, and the test is about the token
        proc = _cli(
            "--source",
            str(media["video"]),
            "--server",
            srv.address,
            "--token",
            "wrong-token-123",
            "--connect-timeout",
            "60",
            timeout=300,
        )
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        last = proc.stderr.strip().splitlines()[-1]
        assert "authentication failed" in last and "the token was rejected" in last, proc.stderr
        log = tmp_path / "t.jsonl"
        rc = main(
            [
                "--source",
                str(media["video"]),
                "--server",
                srv.address,
                "--token",
                "right-token-123",
                "--log",
                str(log),
                "--quiet",
                "--connect-timeout",
                "60",
            ]
        )
        assert rc == 0 and len(log.read_text().splitlines()) == 45
    finally:
        srv.stop(grace=0.0)


def test_deadline_reached_while_connecting_says_so(media: dict[str, Path]) -> None:
    import socket

    # a real listener that never answers gRPC's handshake: the client's deadline is always reached there
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        address = f"127.0.0.1:{s.getsockname()[1]}"
        proc = _cli(
            "--source",
            str(media["video"]),
            "--server",
            address,
            "--connect-timeout",
            "1",
            "--max-retry-time",
            "2",
            timeout=300,
        )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert f"deadline reached while connecting to server {address}" in last and "gave up after retrying" in last
    assert "TLS" not in last and "refused" not in last and "authentication" not in last


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def _make_ca(d: Path, name: str) -> None:
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-days",
        "2",
        "-subj",
        f"/CN={name}",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.pem",
        cwd=d,
    )


def _make_leaf(d: Path, name: str, ca: str, san: str) -> None:
    _openssl(
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-subj",
        f"/CN={name}",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.csr",
        cwd=d,
    )
    (d / f"{name}.ext").write_text(f"subjectAltName={san}\n")
    _openssl(
        "x509",
        "-req",
        "-in",
        f"{name}.csr",
        "-CA",
        f"{ca}.pem",
        "-CAkey",
        f"{ca}.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        f"{name}.ext",
        "-out",
        f"{name}.pem",
        cwd=d,
    )


def test_mutual_tls_works_and_wrong_ca_is_one_clear_line(media: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    if shutil.which("openssl") is None:
        pytest.skip("openssl command not available to make test certificates")
    _make_ca(tmp_path, "ca")
    _make_ca(tmp_path, "other_ca")
    _make_leaf(tmp_path, "server", "ca", "IP:127.0.0.1,DNS:localhost")
    _make_leaf(tmp_path, "client", "ca", "DNS:camera-client")
    srv = make_server(
        bundle=media["bundle"],
        port=0,
        tls_cert=tmp_path / "server.pem",
        tls_key=tmp_path / "server.key",
        tls_client_ca=tmp_path / "ca.pem",
        grace_s=0.0,
    ).start()
    try:
        image = write_image_dir(tmp_path / "imgs", n=1, size=64) / "img_000.png"
        tls = ["--server", srv.address, "--tls-ca", str(tmp_path / "ca.pem")]
        mtls = [*tls, "--tls-cert", str(tmp_path / "client.pem"), "--tls-key", str(tmp_path / "client.key")]
        proc = _cli("--once", str(image), *mtls)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["label"] in LABELS
        proc = _cli(
            "--once",
            str(image),
            "--server",
            srv.address,
            "--tls-ca",
            str(tmp_path / "other_ca.pem"),
            "--tls-cert",
            str(tmp_path / "client.pem"),
            "--tls-key",
            str(tmp_path / "client.key"),
        )
        assert proc.returncode == 1 and "TLS handshake" in proc.stderr and "Traceback" not in proc.stderr
        proc = _cli("--source", str(media["video"]), *tls, "--max-retry-time", "3")  # no client certificate
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        assert "--tls-cert and --tls-key" in proc.stderr.strip().splitlines()[-1]
    finally:
        srv.stop(grace=0.0)
