"""The camera client's side of issue 11, finding 7, against real servers on 127.0.0.1.

* After the server is killed (kill -9) the client's message must not suggest TLS, and a finite source
  (file, directory) re-sends the frames that were in flight, so none is lost across the restart.
* With a live source every captured frame is accounted for: ``captured == sent + skipped`` and
  ``sent == results + dropped + lost``, also across a reconnection (one frame per reconnect used to
  vanish from both counts).
* ``--token`` on the command line warns (it is visible in the process table); ``--token-file`` and
  ``EDGETUNE_TOKEN`` do not.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from edge_client.client import CameraStream
from edge_client.connection import ConnectionOptions
from edge_client.sources import VideoFileSource, open_source
from edge_client.stream_options import StreamOptions
from edge_server.server import make_server
from testkit.client_media import write_image_dir, write_video
from testkit.edge_fixtures import CliServer
from tests.server_helpers import wait_until

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("client_hostile")
    return {"short": write_video(d / "short.avi", n=24, size=96), "long": write_video(d / "long.avi", n=150, size=96)}


def _start(cs: CameraStream) -> tuple[threading.Thread, dict[str, Any]]:
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["stats"] = cs.run()
        except BaseException as e:  # surfaced by the test
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, box


def _wait_for(cond: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert cond()


def test_kill9_restart_message_and_no_lost_frames(
    bundle_dir: Path, videos: dict[str, Path], tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    # every frame waits 250 ms for a micro-batch that never fills: a frame is in flight when the server dies
    slow = ["--bundle", str(bundle_dir), "--threads", "1", "--max-wait-ms", "250", "--batch-wait", "fixed"]
    first = CliServer([*slow, "--port", "0"], tmp_path / "s1.log")
    port = first.port
    records: list[dict] = []
    opts = StreamOptions(backoff_initial=0.1, backoff_max=0.5, max_retry_time=60.0)
    cs = CameraStream(
        VideoFileSource(videos["short"], "line"),
        ConnectionOptions(first.address),
        opts,
        [lambda rec, _img: records.append(rec)],
    )
    thread, box = _start(cs)
    second = None
    try:
        # a state, not a sleep: the next frame has been sent and not answered (the server holds it 250 ms)
        _wait_for(lambda: len(records) >= 5 and cs.stats.sent > cs.stats.results, timeout=120)
        first.kill()
        time.sleep(0.3)
        second = CliServer([*slow, "--port", str(port)], tmp_path / "s2.log")
        thread.join(timeout=90)
        assert not thread.is_alive() and "error" not in box, box
    finally:
        first.stop()
        if second is not None:
            second.stop()
    stats = box["stats"]
    ids = [r["frame_id"] for r in records]
    assert stats.reconnects == 1
    assert sorted(ids) == list(range(24)) and len(ids) == len(set(ids))  # every frame answered, once
    assert stats.lost == 0 and stats.resent == 1 and stats.sent == stats.results + stats.dropped + stats.lost
    err = capfd.readouterr().err
    gap_lines = [line for line in err.splitlines() if "reconnecting" in line]
    assert gap_lines and "Traceback" not in err
    assert "--tls-ca" not in err and "TLS" not in gap_lines[0], gap_lines[0]
    assert "1 frame(s) in flight will be re-sent" in gap_lines[0] and "server closed it" in gap_lines[0], gap_lines


def test_live_source_accounts_for_every_captured_frame(bundle_dir: Path, videos: dict[str, Path]) -> None:
    srv = make_server(bundle=bundle_dir, port=0, backend="onnxruntime", intra_op_threads=1, grace_s=0.0).start()
    port = srv.port
    records: list[dict] = []
    src = open_source(str(videos["long"]), "live", live=True)  # 150 frames at 30 fps: 5 s
    opts = StreamOptions(backoff_initial=0.1, backoff_max=0.3, max_retry_time=30.0)
    cs = CameraStream(src, ConnectionOptions(srv.address), opts, [lambda rec, _img: records.append(rec)])
    thread, box = _start(cs)
    second = None
    try:
        _wait_for(lambda: len(records) >= 20)
        srv.stop(grace=0.0)
        time.sleep(0.4)
        second = make_server(
            bundle=bundle_dir, port=port, backend="onnxruntime", intra_op_threads=1, grace_s=0.0
        ).start()
        thread.join(timeout=60)
        assert not thread.is_alive() and "error" not in box, box
    finally:
        src.close()
        if second is not None:
            second.stop(grace=0.0)
    stats = box["stats"]
    assert stats.reconnects == 1 and src.captured == 150
    assert src.captured == stats.sent + stats.skipped, (src.captured, stats.summary())
    assert stats.sent == stats.results + stats.dropped + stats.lost, stats.summary()


def _client_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    import os

    base = {k: v for k, v in os.environ.items() if k != "EDGETUNE_TOKEN"}
    return subprocess.run(
        [sys.executable, "-m", "edge_client", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**base, **(env or {})},
    )


def test_client_token_on_command_line_warns(bundle_dir: Path, tmp_path: Path) -> None:
    token = "camera-token-123456"
    srv = make_server(
        bundle=bundle_dir, port=0, backend="onnxruntime", intra_op_threads=1, token=token, grace_s=0.0
    ).start()
    try:
        image = write_image_dir(tmp_path / "imgs", n=1, size=64) / "img_000.png"
        r = _client_cli("--once", str(image), "--server", srv.address, "--token", token)
        assert r.returncode == 0 and json.loads(r.stdout)["label"]
        assert "process table" in r.stderr and "--token-file" in r.stderr
        tf = tmp_path / "token"
        tf.write_text(token + "\n")
        tf.chmod(0o600)
        r = _client_cli("--once", str(image), "--server", srv.address, "--token-file", str(tf))
        assert r.returncode == 0 and json.loads(r.stdout)["label"] and "process table" not in r.stderr
        r = _client_cli("--once", str(image), "--server", srv.address, env={"EDGETUNE_TOKEN": token})
        assert r.returncode == 0 and "process table" not in r.stderr
        r = _client_cli("--once", str(image), "--server", srv.address, "--token-file", str(tmp_path / "nope"))
        assert r.returncode == 2 and "cannot read" in r.stderr
    finally:
        srv.stop(grace=0.0)


def test_client_retries_when_the_stream_limit_pushes_back(
    bundle_dir: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """An idle stream holds the only stream slot: the camera is refused (RESOURCE_EXHAUSTED with
    grpc-retry-pushback-ms), waits, retries, and gets in once the idle stream is closed by the server."""
    import grpc

    from edgetune.v1 import classifier_pb2_grpc as pb_grpc

    srv = make_server(
        bundle=bundle_dir,
        port=0,
        backend="onnxruntime",
        intra_op_threads=1,
        max_streams=1,
        stream_idle_s=1.5,
        grace_s=0.0,
    ).start()
    stop = threading.Event()

    def idle() -> Any:
        stop.wait()
        return
        yield

    try:
        d = write_image_dir(tmp_path / "imgs", n=3, size=64)
        with grpc.insecure_channel(srv.address) as ch:
            squatter = pb_grpc.ClassifierStub(ch).StreamClassify(idle())
            # a state, not a sleep: the squatter holds the only slot before the camera comes
            wait_until(lambda: srv.admission.active("stream") == 1, 120, "the idle stream admitted")
            records: list[dict] = []
            cs = CameraStream(
                open_source(str(d), "door"),
                ConnectionOptions(srv.address),
                StreamOptions(backoff_initial=0.1, backoff_max=0.5, max_retry_time=20.0),
                [lambda rec, _img: records.append(rec)],
            )
            thread, box = _start(cs)
            thread.join(timeout=30)
            assert not thread.is_alive() and "error" not in box, box
            assert squatter.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        stop.set()
        srv.stop(grace=0.0)
    assert [r["frame_id"] for r in records] == [0, 1, 2]
    assert "RESOURCE_EXHAUSTED" in capfd.readouterr().err
