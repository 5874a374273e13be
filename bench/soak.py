"""Soak and fuzz of the edge server under hostile load (issue 11).

``make soak`` runs it for 120 s (``SOAK_ARGS="--duration 600"`` for longer); ``tests/test_soak.py`` runs a
20 s version inside ``make test``. One real server (``python -m edge_server``, camera token, LoadModel
enabled with an admin token and a model root) on 127.0.0.1, and at once, each in its own thread:

* valid unary Classify calls (their latency under attack is the p99 reported);
* hostile unary calls: the 1x60000 PNG, header bombs of every accepted format, other formats, garbage,
  truncations, absurd top_k;
* Hypothesis-generated images (random sizes, channels, depths, formats, byte flips, truncations) and
  Hypothesis-generated protobuf bytes sent raw to every method, with and without the token;
* idle streams beyond ``--max-streams`` (refused, or closed by the idle timeout), a fast stream (latest
  frame wins), hostile streams (1 MiB camera ids, bad frames);
* LoadModel swaps between two valid bundles and attempts with broken ones (labels/outputs mismatch,
  tampered model, manifest escaping the bundle, paths outside the model root, no or a wrong admin token);
* health checks every 100 ms, GetStats every 500 ms;
* the real camera client (``edge_client.client.CameraStream``, a video file at 10 fps) attached throughout,
  while the server is killed with SIGKILL half-way and restarted on the same port.

It asserts: the server's peak RSS stays under ``--rss-limit-mb``; health is SERVING throughout except during
the planned restart; every frame the client sent is accounted for (answered, dropped by latest-frame-wins
or reported lost); no call ever ends with UNKNOWN; every error the server replied is in its log (per status
code, logged >= observed); the broken LoadModel attempts are refused and the valid ones succeed. It prints
requests served, hostile inputs tried, peak RSS, p99 latency of valid requests under attack and frames lost,
and writes them as JSON (``--json``). Exit status 0 = every check passed.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import cv2  # noqa: E402
import grpc  # noqa: E402
import numpy as np  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

from edgetune.v1 import classifier_pb2 as pb  # noqa: E402
from edgetune.v1 import classifier_pb2_grpc as pb_grpc  # noqa: E402

CAMERA_TOKEN = "soak-camera-token-0001"
ADMIN_TOKEN = "soak-admin-token-0123456789abcdef"
SC = grpc.StatusCode


# -- bookkeeping ---------------------------------------------------------------------------------

@dataclass
class Tally:
    """Everything the workers observed (thread-safe)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    codes: collections.Counter = field(default_factory=collections.Counter)  # (worker, code) -> n
    server_errors: list[tuple[float, str]] = field(default_factory=list)  # (time, code) the server replied
    frame_errors: list[float] = field(default_factory=list)  # times of FrameResults with an error
    unknown: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    valid_ms: list[tuple[float, float]] = field(default_factory=list)  # (time, latency) of valid unary calls
    served: int = 0
    hostile: int = 0
    health: list[tuple[float, str]] = field(default_factory=list)
    stats_bytes_max: int = 0

    def rpc(self, worker: str, code: SC, details: str = "", hostile: bool = False) -> None:
        now = time.monotonic()
        with self.lock:
            self.codes[(worker, code.name)] += 1
            if hostile:
                self.hostile += 1
            if code == SC.OK:
                self.served += 1
            elif code == SC.UNKNOWN:
                self.unknown.append(f"{worker}: {details[:200]}")
            elif _server_generated(code, details):
                self.server_errors.append((now, code.name))

    def frame(self, result: Any, hostile: bool = False) -> None:
        with self.lock:
            if hostile:
                self.hostile += 1
            if result.error:
                self.frame_errors.append(time.monotonic())
            else:
                self.served += 1

    def fail(self, msg: str) -> None:
        with self.lock:
            if len(self.failures) < 50:
                self.failures.append(msg)


def _server_generated(code: SC, details: str) -> bool:
    """Whether an error status came from the server (not from this client's deadline, cancel or connection)."""
    if code in (SC.CANCELLED, SC.UNAVAILABLE):
        return False
    if code == SC.DEADLINE_EXCEEDED:
        return "no frame received" in details  # the server's idle-stream timeout
    if code == SC.INTERNAL:
        return "deserializ" in details.lower() or "internal server error" in details
    return True


def _call(tally: Tally, worker: str, fn: Any, *args: Any, hostile: bool = False, **kw: Any) -> Any:
    try:
        out = fn(*args, **kw)
        tally.rpc(worker, SC.OK, hostile=hostile)
        return out
    except grpc.RpcError as e:
        tally.rpc(worker, e.code(), e.details() or "", hostile=hostile)
        return e


CAM_MD = (("authorization", f"Bearer {CAMERA_TOKEN}"),)
ADMIN_MD = (*CAM_MD, ("x-edgetune-admin-token", ADMIN_TOKEN))


# -- inputs --------------------------------------------------------------------------------------

def good_images() -> list[bytes]:
    from tests.edge_fixtures import texture_tiles

    tiles = texture_tiles("test")[0][::6]
    out = [cv2.imencode(".jpg", t[..., ::-1])[1].tobytes() for t in tiles]
    out.append(cv2.imencode(".jpg", cv2.resize(tiles[0], (640, 480)))[1].tobytes())
    return out


def hostile_payloads(good: bytes) -> list[tuple[str, bytes, int]]:
    from tests.hostile_media import CRAFTED, oversized, wide_png

    out: list[tuple[str, bytes, int]] = [("wide-png-1x60000", wide_png(60000), 0), ("wide-png-1x3000", wide_png(3000), 0)]
    out += [(f"bomb-{fmt}", oversized(fmt, 8192, 8192), 0) for fmt in CRAFTED]
    out += [(f"bomb-{fmt}-16k", oversized(fmt, 16383, 16383), 0) for fmt in ("WebP-lossless", "PNG", "JPEG")]
    tile = np.full((64, 64, 3), 90, np.uint8)
    for ext in (".gif", ".ppm", ".hdr", ".ras"):
        ok, buf = cv2.imencode(ext, tile.astype(np.float32) / 255 if ext == ".hdr" else tile)
        if ok:
            out.append((f"format{ext}", buf.tobytes(), 0))
    out += [("empty", b"", 0), ("garbage", os.urandom(512), 0), ("truncated-jpeg", good[: len(good) // 3], 0),
            ("top_k-huge", good, 4_000_000_000), ("jpeg-header-only", good[:200], 0)]
    big = np.random.default_rng(0).integers(0, 65535, (1400, 1400, 4), dtype=np.uint16)
    out.append(("png-rgba16-1400", cv2.imencode(".png", big)[1].tobytes(), 0))  # allowed: a big honest decode
    out.append(("jpeg-2048x2049", cv2.imencode(".jpg", np.zeros((2049, 2048, 3), np.uint8))[1].tobytes(), 0))
    return out


# -- workers -------------------------------------------------------------------------------------

class Soak:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.tally = Tally()
        self.stop = threading.Event()
        self.pause = threading.Event()  # hostile workers hold still around the planned kill
        self.address = ""
        self.window: tuple[float, float] | None = None  # the planned restart (monotonic seconds)
        self.timed_failures: list[tuple[float, str]] = []  # failures unless they fall into the restart
        self.peak_rss_mb = 0
        self.servers: list[Any] = []
        self._server_lock = threading.Lock()
        self.good = good_images()
        self.loadmodel_results: list[tuple[str, str, str]] = []
        self.fast_streams = 0
        self.t0 = time.monotonic()

    # -- server ---------------------------------------------------------------------------------
    def start_server(self, port: int = 0) -> Any:
        from tests.edge_fixtures import CliServer

        n = len(self.servers) + 1
        srv = CliServer(["--bundle", str(self.models / "a"), "--port", str(port), "--threads", "1",
                         "--max-streams", "8", "--max-concurrent", "16", "--stream-idle-timeout", "2",
                         "--max-pixels", str(4 * 1024 * 1024), "--max-decode-mb", "128", "--grace", "2",
                         "--token-file", str(self.work / "camera.token"), "--enable-load-model",
                         "--model-root", str(self.models), "--admin-token-file", str(self.work / "admin.token")],
                        self.work / f"server-{n}.log")
        with self._server_lock:
            self.servers.append(srv)
        self.address = srv.address
        return srv

    def prepare(self) -> None:
        from tests.edge_fixtures import cached_test_bundle, copy_bundle

        a = Path(self.args.bundle) if self.args.bundle else cached_test_bundle(seed=0)
        b = Path(self.args.bundle_b) if self.args.bundle_b else cached_test_bundle(seed=1)
        self.models = self.work / "models"
        copy_bundle(a, self.models / "a")
        copy_bundle(b, self.models / "b")
        bad = copy_bundle(a, self.models / "broken-labels")
        meta = json.loads((bad / "bundle.json").read_text())
        meta["labels"] = meta["labels"][:2]
        (bad / "bundle.json").write_text(json.dumps(meta))
        tampered = copy_bundle(a, self.models / "tampered")
        data = bytearray((tampered / "model.onnx").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (tampered / "model.onnx").write_bytes(bytes(data))
        escape = copy_bundle(a, self.models / "escape")
        meta = json.loads((escape / "bundle.json").read_text())
        meta["model_file"] = "../../../../../../etc/passwd"
        (escape / "bundle.json").write_text(json.dumps(meta))
        for name, token in (("camera.token", CAMERA_TOKEN), ("admin.token", ADMIN_TOKEN)):
            (self.work / name).write_text(token + "\n")
            (self.work / name).chmod(0o600)
        from tests.client_media import write_video

        n = max(30, int(self.args.client_fps * (self.args.duration - 8)))  # ends before the soak does
        self.video = write_video(self.work / "camera.avi", n=n, size=96)
        self.video_frames = n

    def in_window(self, t: float) -> bool:
        return self.window is not None and self.window[0] <= t <= self.window[1]

    @staticmethod
    def _channel_options() -> list[tuple[str, int]]:
        """Reconnect within 0.5 s once the restarted server listens (gRPC's default backoff reaches 120 s)."""
        return [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 500)]

    def _loop(self, fn: Any, period: float, hostile: bool = True) -> None:
        """Run ``fn(stub, channel)`` every ``period`` s on a fresh channel after each restart."""
        while not self.stop.is_set():
            address = self.address
            with grpc.insecure_channel(address, options=self._channel_options()) as ch:
                stub = pb_grpc.ClassifierStub(ch)
                while not self.stop.is_set() and address == self.address:
                    if hostile and self.pause.is_set():
                        time.sleep(0.05)
                        continue
                    try:
                        fn(stub, ch)
                    except Exception as e:  # noqa: BLE001 - a bug in the soak itself: report, keep going
                        self.tally.fail(f"worker {fn.__name__} crashed: {type(e).__name__}: {e}")
                    self.stop.wait(period)

    def valid_unary(self, stub: Any, _ch: grpc.Channel) -> None:
        data = self.good[int(time.monotonic() * 1000) % len(self.good)]
        t0 = time.monotonic()
        r = _call(self.tally, "valid", stub.Classify, pb.ClassifyRequest(image=data, top_k=2), timeout=10,
                  metadata=CAM_MD)
        if not isinstance(r, grpc.RpcError):
            self.tally.valid_ms.append((t0, (time.monotonic() - t0) * 1000))
        elif r.code() != SC.RESOURCE_EXHAUSTED:  # judged at the end, against the restart window
            self.timed_failures.append((t0, f"valid Classify failed outside the restart at t={t0 - self.t0:.2f} s: "
                                            f"{r.code().name} {r.details()}"))

    def hostile_unary(self, stub: Any, _ch: grpc.Channel) -> None:
        if not hasattr(self, "_payloads"):
            self._payloads = self.good_payloads
            self._next = 0
        name, data, top_k = self._payloads[self._next % len(self._payloads)]
        self._next += 1
        r = _call(self.tally, "hostile", stub.Classify, pb.ClassifyRequest(image=data, top_k=top_k), timeout=15,
                  metadata=CAM_MD, hostile=True)
        allowed = {SC.INVALID_ARGUMENT, SC.RESOURCE_EXHAUSTED}
        if name == "png-rgba16-1400":  # within the limits: an honest, large decode
            allowed |= {SC.OK}
        code = SC.OK if not isinstance(r, grpc.RpcError) else r.code()
        if code not in allowed and code not in (SC.UNAVAILABLE, SC.CANCELLED):
            self.tally.fail(f"hostile {name}: {code.name}")

    def fuzz(self, stub: Any, ch: grpc.Channel) -> None:
        """One Hypothesis run (generate phase only) of images and protobuf bytes against the server."""
        from hypothesis import HealthCheck, Phase, given, settings
        from hypothesis import strategies as st

        raw = {m: ch.unary_unary(f"/edgetune.v1.Classifier/{m}") for m in
               ("Classify", "GetStats", "GetModelInfo", "LoadModel")}
        raw_stream = ch.stream_stream("/edgetune.v1.Classifier/StreamClassify")
        formats = [".png", ".jpg", ".webp", ".tiff", ".bmp", ".gif", ".ppm"]

        def encode(spec: tuple[int, int, int, bool, str, int]) -> bytes:
            h, w, c, deep, ext, seed = spec
            rng = np.random.default_rng(seed)
            img = rng.integers(0, 65535 if deep else 255, (h, w, c) if c > 1 else (h, w),
                               dtype=np.uint16 if deep else np.uint8)
            ok, buf = cv2.imencode(ext, img)
            if not ok:
                ok, buf = cv2.imencode(ext, (img // 257).astype(np.uint8) if deep else img[..., :3] if c > 1 else img)
            return buf.tobytes() if ok else b""

        images = st.tuples(st.integers(1, 700), st.integers(1, 700), st.sampled_from([1, 3, 4]), st.booleans(),
                           st.sampled_from(formats), st.integers(0, 2**16)).map(encode)
        flips = st.tuples(st.sampled_from(self.good), st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)),
                                                               max_size=8), st.integers(0, 10**6))

        def mutate(t: tuple[bytes, list[tuple[int, int]], int]) -> bytes:
            data, changes, cut = t
            buf = bytearray(data)
            for pos, val in changes:
                buf[pos % len(buf)] = val
            return bytes(buf[: max(1, cut % (len(buf) + 1))]) if cut % 3 == 0 else bytes(buf)

        case = st.one_of(
            st.tuples(st.just("image"), st.one_of(images, flips.map(mutate)), st.integers(0, 5), st.booleans()),
            st.tuples(st.just("proto"), st.binary(max_size=4096), st.sampled_from(sorted(raw) + ["StreamClassify"]),
                      st.booleans()),
        )

        @settings(max_examples=25, deadline=None, database=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(case)
        def run(c: tuple[Any, ...]) -> None:
            if self.stop.is_set() or self.pause.is_set():
                return
            kind, payload, extra, with_token = c
            md = CAM_MD if with_token else ()
            if kind == "image":
                r = _call(self.tally, "fuzz-image", stub.Classify, pb.ClassifyRequest(image=payload, top_k=extra),
                          timeout=15, metadata=md, hostile=True)
            elif extra == "StreamClassify":
                r = _call(self.tally, "fuzz-proto", lambda: list(raw_stream(iter([payload]), timeout=15,
                                                                             metadata=md)), hostile=True)
            else:
                r = _call(self.tally, "fuzz-proto", raw[extra], payload, timeout=15, metadata=md, hostile=True)
            if isinstance(r, grpc.RpcError) and r.code() == SC.UNKNOWN:
                self.tally.fail(f"fuzz {kind} {extra}: UNKNOWN {r.details()}")

        run()

    def idle_flood(self, stub: Any, _ch: grpc.Channel) -> None:
        release = threading.Event()

        def idle() -> Any:
            release.wait()
            return
            yield

        calls = [stub.StreamClassify(idle(), metadata=CAM_MD) for _ in range(12)]
        with self.tally.lock:
            self.tally.hostile += len(calls)
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and not all(c.done() for c in calls) and not self.stop.is_set():
            time.sleep(0.1)
        release.set()
        for c in calls:
            if c.done():
                code = c.code()
                self.tally.rpc("idle-stream", code, c.details() or "")
                if code not in (SC.RESOURCE_EXHAUSTED, SC.DEADLINE_EXCEEDED, SC.UNAVAILABLE, SC.CANCELLED):
                    self.tally.fail(f"idle stream ended with {code.name}: {c.details()}")
            c.cancel()

    def fast_stream(self, stub: Any, _ch: grpc.Channel) -> None:
        n = 60
        frames = [pb.Frame(camera_id="fast", frame_id=i, image=self.good[i % len(self.good)]) for i in range(n)]
        try:
            results = list(stub.StreamClassify(iter(frames), timeout=30, metadata=CAM_MD))
        except grpc.RpcError as e:
            self.tally.rpc("fast-stream", e.code(), e.details() or "")
            return
        self.tally.rpc("fast-stream", SC.OK)
        for r in results:
            self.tally.frame(r)
        dropped = sum(r.dropped_before for r in results)
        self.fast_streams += 1
        if len(results) + dropped != n or not results or results[-1].frame_id != n - 1:
            self.tally.fail(f"fast stream: {len(results)} results + {dropped} dropped != {n} sent")

    def hostile_stream(self, stub: Any, _ch: grpc.Channel) -> None:
        from tests.hostile_media import oversized, wide_png

        frames = [pb.Frame(camera_id="x" * (1 << 20), frame_id=0, image=self.good[0]),
                  pb.Frame(camera_id="cam\x00\x07", frame_id=1, image=self.good[0]),
                  pb.Frame(camera_id="h", frame_id=2, image=wide_png(60000)),
                  pb.Frame(camera_id="h", frame_id=3, image=oversized("WebP-lossless", 8192, 8192)),
                  pb.Frame(camera_id="h", frame_id=4, image=b"\x89PNG\r\n\x1a\ngarbage"),
                  pb.Frame(camera_id="h", frame_id=5, image=self.good[1], top_k=99),
                  pb.Frame(camera_id="h", frame_id=6, image=self.good[1])]
        feed = _Feeder()
        call = stub.StreamClassify(feed, timeout=30, metadata=CAM_MD)
        try:
            for f in frames:  # one at a time: every frame is answered (no latest-frame-wins drop)
                feed.put(f)
                r = next(call)
                self.tally.frame(r, hostile=f.frame_id < 6)
                if (r.frame_id < 6) != bool(r.error):
                    self.tally.fail(f"hostile stream frame {r.frame_id}: error={r.error!r}")
                if len(r.camera_id) > 128:
                    self.tally.fail("hostile stream: a 1 MiB camera id was echoed")
            feed.end()
            for _ in call:
                pass
            self.tally.rpc("hostile-stream", SC.OK)
        except grpc.RpcError as e:
            self.tally.rpc("hostile-stream", e.code(), e.details() or "")
            feed.end()
        except StopIteration:
            self.tally.fail("hostile stream ended early")

    def load_model(self, stub: Any, _ch: grpc.Channel) -> None:
        plan = [("b", ADMIN_MD, SC.OK), ("broken-labels", ADMIN_MD, SC.INVALID_ARGUMENT),
                ("tampered", ADMIN_MD, SC.INVALID_ARGUMENT), ("escape", ADMIN_MD, SC.INVALID_ARGUMENT),
                ("../../../../etc", ADMIN_MD, SC.INVALID_ARGUMENT), ("a", CAM_MD, SC.UNAUTHENTICATED),
                ("a", (*CAM_MD, ("x-edgetune-admin-token", CAMERA_TOKEN)), SC.UNAUTHENTICATED),
                ("a", ADMIN_MD, SC.OK)]
        if not hasattr(self, "_lm"):
            self._lm = 0
        path, md, want = plan[self._lm % len(plan)]
        self._lm += 1
        t0 = time.monotonic()
        r = _call(self.tally, "load-model", stub.LoadModel, pb.LoadModelRequest(bundle_path=path), timeout=60,
                  metadata=md, hostile=want != SC.OK)
        got = SC.OK if not isinstance(r, grpc.RpcError) else r.code()
        details = "" if not isinstance(r, grpc.RpcError) else r.details() or ""
        self.loadmodel_results.append((path, want.name, got.name))
        if got != want and got != SC.UNAVAILABLE:
            self.timed_failures.append((t0, f"LoadModel {path}: {got.name} (want {want.name}) {details[:200]}"))
        if "passwd" in details and "root:" in details:
            self.tally.fail("LoadModel error revealed /etc/passwd content")

    def health(self, _stub: Any, ch: grpc.Channel) -> None:
        t0 = time.monotonic()
        try:
            st = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1.0).status
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(st)
        except grpc.RpcError as e:
            status = e.code().name
        with self.tally.lock:
            self.tally.health.append((t0, status))

    def get_stats(self, stub: Any, _ch: grpc.Channel) -> None:
        r = _call(self.tally, "stats", stub.GetStats, pb.GetStatsRequest(), timeout=5, metadata=CAM_MD)
        if not isinstance(r, grpc.RpcError):
            self.tally.stats_bytes_max = max(self.tally.stats_bytes_max, r.ByteSize())

    def sample_rss(self) -> None:
        while not self.stop.is_set():
            with self._server_lock:
                srv = self.servers[-1] if self.servers else None
            if srv is not None and srv.proc.poll() is None:
                try:
                    self.peak_rss_mb = max(self.peak_rss_mb, srv.hwm_mb())
                except (OSError, AssertionError):
                    pass
            self.stop.wait(0.2)

    # -- the run --------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        from edge_client.client import CameraStream
        from edge_client.connection import ConnectionOptions
        from edge_client.sources import VideoFileSource
        from edge_client.stream_options import StreamOptions

        args = self.args
        t_prep = time.monotonic()
        self.prepare()
        self.good_payloads = hostile_payloads(self.good[0])
        srv = self.start_server()
        self.phases = {"prepare_s": round(time.monotonic() - t_prep, 1)}
        port = srv.port
        self.rss_at_start_mb = srv.hwm_mb()
        t_start = self.t0 = time.monotonic()
        workers = [(self.valid_unary, 0.05, False), (self.hostile_unary, 0.05, True), (self.fuzz, 0.0, True),
                   (self.idle_flood, 0.5, True), (self.fast_stream, 0.5, False), (self.hostile_stream, 0.5, True),
                   (self.load_model, 1.5, True), (self.health, 0.1, False), (self.get_stats, 0.5, False)]
        if args.workers:
            keep = set(args.workers.split(","))
            workers = [w for w in workers if w[0].__name__ in keep or w[0].__name__ in ("health", "valid_unary")]
        threads = [threading.Thread(target=self._loop, args=w, name=f"soak-{w[0].__name__}", daemon=True)
                   for w in workers]
        threads.append(threading.Thread(target=self.sample_rss, name="soak-rss", daemon=True))
        client_records: list[dict] = []
        cs = CameraStream(VideoFileSource(self.video, "soak-cam"),
                          ConnectionOptions(f"127.0.0.1:{port}", token=CAMERA_TOKEN),
                          StreamOptions(fps=args.client_fps, max_retry_time=60.0, backoff_initial=0.1, backoff_max=1.0),
                          [lambda rec, _img: client_records.append(rec)])
        box: dict[str, Any] = {}

        def run_client() -> None:
            try:
                box["stats"] = cs.run()
            except BaseException as e:  # reported below
                box["error"] = e

        client = threading.Thread(target=run_client, name="soak-client", daemon=True)
        for t in [*threads, client]:
            t.start()
        # planned kill -9 half-way, restart on the same port
        self.stop.wait(max(1.0, args.duration * 0.5))
        self.pause.set()
        time.sleep(1.6)  # the server's per-second aggregated refusal log is flushed
        t_kill = time.monotonic()
        self.window = (t_kill, t_kill + 120.0)
        srv.kill()
        second = self.start_server(port)
        t_serving = time.monotonic()
        self.window = (t_kill, t_kill + 120.0)  # until the first SERVING health check after the kill (below)
        self.pause.clear()
        restart_s = t_serving - t_kill
        self.stop.wait(max(0.0, t_start + args.duration - time.monotonic()))
        self.stop.set()
        t_join = time.monotonic()
        for t in threads:
            t.join(timeout=30)
        client.join(timeout=60)
        self.phases["join_s"] = round(time.monotonic() - t_join, 1)
        with grpc.insecure_channel(second.address) as ch:
            final = pb_grpc.ClassifierStub(ch).GetStats(pb.GetStatsRequest(), timeout=10, metadata=CAM_MD)
        second.stop()
        wall = time.monotonic() - t_start
        return self.report(box, client_records, final, restart_s, wall, client.is_alive())

    # -- checks ---------------------------------------------------------------------------------
    def report(self, box: dict[str, Any], records: list[dict], final: Any, restart_s: float, wall: float,
               client_hung: bool) -> dict[str, Any]:
        t = self.tally
        # The planned restart lasts from the kill until this process's channels reach the new server again:
        # the first SERVING health check after the kill (they reconnect within 0.5 s: see _channel_options).
        t_kill = self.window[0] if self.window else 0.0
        back = [ts for ts, st in t.health if ts > t_kill and st == "SERVING"]
        self.window = (t_kill, back[0] if back else float("inf"))
        fails = list(t.failures)
        if not back or back[0] - t_kill > 15.0:
            fails.append(f"health not SERVING again within 15 s of the kill -9 (back after "
                         f"{(back[0] - t_kill) if back else float('inf'):.1f} s)")
        fails += [msg for ts, msg in self.timed_failures if not self.in_window(ts)][:20]
        if t.unknown:
            fails.append(f"{len(t.unknown)} call(s) ended with UNKNOWN: {t.unknown[:3]}")
        if self.peak_rss_mb >= self.args.rss_limit_mb:
            fails.append(f"server peak RSS {self.peak_rss_mb} MB >= limit {self.args.rss_limit_mb} MB")
        bad_health = [(round(ts - self.t0, 2), s) for ts, s in t.health if s != "SERVING" and not self.in_window(ts)]
        if bad_health:
            fails.append(f"health not SERVING outside the restart: {bad_health[:5]} ({len(bad_health)})")
        csum = self.client_checks(box, records, client_hung, fails)
        logged, logged_frames = self.logged_errors()
        observed = collections.Counter(code for ts, code in t.server_errors if not self.in_window(ts))
        observed_frames = sum(1 for ts in t.frame_errors if not self.in_window(ts))
        unlogged = {c: (n, logged[c]) for c, n in observed.items() if logged[c] < n}
        if unlogged:
            fails.append(f"errors replied but not logged (observed, logged): {unlogged}")
        if logged_frames < observed_frames:
            fails.append(f"frame errors: {observed_frames} replied, {logged_frames} logged")
        if t.stats_bytes_max > 100_000:
            fails.append(f"GetStats grew to {t.stats_bytes_max} bytes")
        lm_ok = sum(1 for _, want, got in self.loadmodel_results if want == got)
        lm_other = [r for r in self.loadmodel_results if r[1] != r[2]]
        lat = [ms for ts, ms in t.valid_ms if not self.in_window(ts)]
        p99 = float(np.percentile(lat, 99)) if lat else None
        if not lat:
            fails.append("no valid request was answered")
        try:
            load = list(os.getloadavg())
        except OSError:
            load = []
        return {
            "duration_s": self.args.duration, "wall_s": round(wall, 1), "cpus": os.cpu_count(),
            "restart_window_s": [round(v - self.t0, 2) for v in self.window] if self.window else None,
            "health_back_after_kill_s": round(self.window[1] - self.window[0], 2) if self.window else None,
            **self.phases,
            "load_average_end": [round(v, 2) for v in load],
            "requests_served": t.served, "hostile_inputs": t.hostile,
            "peak_rss_mb": self.peak_rss_mb, "rss_limit_mb": self.args.rss_limit_mb,
            "rss_at_start_mb": self.rss_at_start_mb,
            "valid_p99_ms": round(p99, 1) if p99 is not None else None,
            "valid_p50_ms": round(float(np.percentile(lat, 50)), 1) if lat else None, "valid_requests": len(lat),
            "frames_lost": csum.get("lost"), "client": csum, "restart_s": round(restart_s, 2),
            "health_checks": len(t.health), "health_not_serving_outside_restart": len(bad_health),
            "unknown": len(t.unknown), "errors_observed": dict(observed), "errors_logged": dict(logged),
            "frame_errors_observed": observed_frames, "frame_errors_logged": logged_frames,
            "final_errors_total": final.errors_total, "stats_bytes_max": t.stats_bytes_max,
            "loadmodel_as_expected": f"{lm_ok}/{len(self.loadmodel_results)}", "fast_streams": self.fast_streams,
            "loadmodel_other": lm_other,
            "codes": {f"{w}:{c}": n for (w, c), n in sorted(t.codes.items())},
            "failures": fails,
        }

    def client_checks(self, box: dict[str, Any], records: list[dict], client_hung: bool,
                      fails: list[str]) -> dict[str, Any]:
        """The client: every frame accounted for (failures appended to ``fails``); its summary."""
        cstats = box.get("stats")
        if client_hung or "error" in box or cstats is None:
            fails.append(f"camera client failed: {box.get('error')!r} (hung: {client_hung})")
            return {}
        csum = cstats.summary()
        ids = sorted(r["frame_id"] for r in records)
        if cstats.sent != cstats.results + cstats.dropped + cstats.lost:
            fails.append(f"client frames unaccounted: {csum}")
        if cstats.sent != self.video_frames or len(set(ids)) + cstats.dropped + cstats.lost != cstats.sent:
            fails.append(f"client sent {cstats.sent} of {self.video_frames} frames; answered {len(set(ids))}")
        if cstats.reconnects < 1:
            fails.append("the camera client did not reconnect after the kill -9")
        return csum

    def logged_errors(self) -> tuple[collections.Counter, int]:
        """What the servers logged: errors replied, by code, and frame errors (every one replied must be here)."""
        logged: collections.Counter = collections.Counter()
        logged_frames = 0
        for srv in self.servers:
            for rec in srv.records():
                msg, code = rec.get("msg", ""), rec.get("code")
                if msg == "rpc error" and code:
                    logged[code] += 1
                elif msg == "rpc rejected" and code:
                    logged[code] += int(rec.get("count", 1))
                elif msg == "unexpected error in handler; answered INTERNAL":
                    logged["INTERNAL"] += 1
                elif rec.get("logger", "").startswith("grpc") and "deserializ" in msg.lower():
                    logged["INTERNAL"] += 1
                elif msg in ("frame refused", "frame error", "unexpected error processing a frame; the stream goes on"):
                    logged_frames += 1
        return logged, logged_frames


class _Feeder:
    """A request iterator fed one frame at a time."""

    _END = object()

    def __init__(self) -> None:
        import queue

        self._q: Any = queue.Queue()

    def put(self, item: Any) -> None:
        self._q.put(item)

    def end(self) -> None:
        self._q.put(self._END)

    def __iter__(self) -> _Feeder:
        return self

    def __next__(self) -> Any:
        item = self._q.get(timeout=60)
        if item is self._END:
            raise StopIteration
        return item


def main(argv: list[str] | None = None) -> int:
    import cv2.utils.logging as cv_log

    cv_log.setLogLevel(cv_log.LOG_LEVEL_SILENT)  # the fuzzer's own encoder attempts with odd modes are not news
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=120.0, help="seconds of load (the kill -9 is half-way)")
    p.add_argument("--bundle", help="bundle A (default: a small trained test bundle, built once)")
    p.add_argument("--bundle-b", help="bundle B for the LoadModel swaps (default: another test bundle)")
    p.add_argument("--rss-limit-mb", type=int, default=512, help="the server's peak RSS must stay below this")
    p.add_argument("--client-fps", type=float, default=10.0, help="frame rate of the attached camera client")
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.add_argument("--work", help="scratch folder (default: a temporary one, removed)")
    p.add_argument("--workers", help=argparse.SUPPRESS)  # debugging: a comma list of worker names to run
    args = p.parse_args(argv)
    if args.duration < 10:
        p.error("--duration must be at least 10 s")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="edgetune-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    soak = Soak(args, work)
    try:
        res = soak.run()
    finally:
        for srv in soak.servers:
            srv.stop()
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print(f"soak: {res['duration_s']:g} s of hostile load on 127.0.0.1 ({res['cpus']} CPUs, load average "
          f"{res['load_average_end']}), kill -9 + restart half-way ({res['restart_s']} s to serve again, health "
          f"SERVING again {res['health_back_after_kill_s']} s after the kill)")
    print(f"  requests served       {res['requests_served']}")
    print(f"  hostile inputs tried  {res['hostile_inputs']}")
    print(f"  peak RSS (server)     {res['peak_rss_mb']} MB (limit {res['rss_limit_mb']} MB; "
          f"{res['rss_at_start_mb']} MB after start)")
    print(f"  p99 latency of valid requests under attack  {res['valid_p99_ms']} ms "
          f"(p50 {res['valid_p50_ms']} ms, {res['valid_requests']} requests)")
    print(f"  frames lost           {res['frames_lost']} (camera client: {res['client']})")
    print(f"  health not SERVING outside the restart: {res['health_not_serving_outside_restart']} of "
          f"{res['health_checks']}; UNKNOWN statuses: {res['unknown']}; LoadModel as expected: "
          f"{res['loadmodel_as_expected']}")
    print(f"  errors replied by the server {res['errors_observed']} + {res['frame_errors_observed']} frame errors; "
          f"logged {res['errors_logged']} + {res['frame_errors_logged']} frame errors")
    print("SOAK " + json.dumps({k: res[k] for k in ("requests_served", "hostile_inputs", "peak_rss_mb",
                                                     "valid_p99_ms", "frames_lost", "failures")}))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    for f in res["failures"]:
        print(f"FAIL: {f}")
    return 1 if res["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
