"""The soak's client-side load (``bench/soak.py``): each worker is one kind of traffic, run in its own thread
by ``SoakWorkers._loop`` on a fresh channel after each server restart; the server's RSS sampler."""

from __future__ import annotations

import threading
import time
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from soak_inputs import fuzz_cases
from soak_state import ADMIN_MD, CAM_MD, CAMERA_TOKEN, SC, SoakState, call

from edgetune.v1 import classifier_pb2 as pb
from edgetune.v1 import classifier_pb2_grpc as pb_grpc


class SoakWorkers(SoakState):
    """The workers: ``fn(stub, channel)`` methods, each run every few tenths of a second by ``_loop``."""

    @staticmethod
    def _channel_options() -> list[tuple[str, int]]:
        """Reconnect within 0.5 s once the restarted server listens (gRPC's default backoff reaches 120 s), and
        give one connection attempt 10 s: gRPC reads its minimum connect timeout from min_reconnect_backoff_ms,
        and at 100 ms a loaded machine's handshakes were cut off (edge_client.connection.make_channel)."""
        return [
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 10_000),
            ("grpc.max_reconnect_backoff_ms", 500),
        ]

    def _loop(self, fn: Any, period: float, hostile: bool = True) -> None:
        """Run ``fn(stub, channel)`` every ``period`` s on a fresh channel after each restart."""
        while not self.stop.is_set():
            address = self.address
            with grpc.insecure_channel(address, options=self._channel_options()) as ch:
                stub = pb_grpc.ClassifierStub(ch)
                while not self.stop.is_set() and address == self.address:
                    if hostile and not self._hostile_call(fn, stub, ch):
                        time.sleep(0.05)  # paused around the planned kill
                        continue
                    if not hostile:
                        self._guarded(fn, stub, ch)
                    self.stop.wait(period)

    def _hostile_call(self, fn: Any, stub: Any, ch: grpc.Channel) -> bool:
        """``fn`` unless the hostile workers are paused (False); counted busy from before the pause is read, so
        once the pause is set and ``hostile_busy`` is 0, no hostile call is in flight or about to start."""
        with self.busy_lock:
            self.hostile_busy += 1
        try:
            if self.pause.is_set():
                return False
            self._guarded(fn, stub, ch)
            return True
        finally:
            with self.busy_lock:
                self.hostile_busy -= 1

    def _guarded(self, fn: Any, stub: Any, ch: grpc.Channel) -> None:
        try:
            fn(stub, ch)
        except Exception as e:  # noqa: BLE001 - a bug in the soak itself: report, keep going
            self.tally.fail(f"worker {fn.__name__} crashed: {type(e).__name__}: {e}")

    def valid_unary(self, stub: Any, _ch: grpc.Channel) -> None:
        data = self.good[int(time.monotonic() * 1000) % len(self.good)]
        t0 = time.monotonic()
        # a deadline for a loaded machine: the latency is the figure (p99), the invariant is the answer
        r = call(
            self.tally, "valid", stub.Classify, pb.ClassifyRequest(image=data, top_k=2), timeout=60, metadata=CAM_MD
        )
        t1 = time.monotonic()
        if not isinstance(r, grpc.RpcError):
            self.tally.valid_ms.append((t0, (t1 - t0) * 1000))
        elif r.code() != SC.RESOURCE_EXHAUSTED:  # judged at the end, against the restart window
            self.timed_failures.append(
                (
                    "valid",
                    t0,
                    t1,
                    f"valid Classify failed outside the restart (t={t0 - self.t0:.2f}"
                    f"..{t1 - self.t0:.2f} s): {r.code().name} {r.details()}",
                )
            )

    def hostile_unary(self, stub: Any, _ch: grpc.Channel) -> None:
        if not hasattr(self, "_payloads"):
            self._payloads = self.good_payloads
            self._next = 0
        name, data, top_k = self._payloads[self._next % len(self._payloads)]
        self._next += 1
        r = call(
            self.tally,
            "hostile",
            stub.Classify,
            pb.ClassifyRequest(image=data, top_k=top_k),
            timeout=60,
            metadata=CAM_MD,
            hostile=True,
        )
        allowed = {SC.INVALID_ARGUMENT, SC.RESOURCE_EXHAUSTED}
        if name == "png-rgba16-1400":  # within the limits: an honest, large decode
            allowed |= {SC.OK}
        code = SC.OK if not isinstance(r, grpc.RpcError) else r.code()
        if code not in allowed and code not in (SC.UNAVAILABLE, SC.CANCELLED):
            self.tally.fail(f"hostile {name}: {code.name}")

    def fuzz(self, stub: Any, ch: grpc.Channel) -> None:
        """One Hypothesis run (generate phase only) of images and protobuf bytes against the server."""
        from hypothesis import HealthCheck, Phase, given, settings

        raw = {
            m: ch.unary_unary(f"/edgetune.v1.Classifier/{m}")
            for m in ("Classify", "GetStats", "GetModelInfo", "LoadModel")
        }
        raw_stream = ch.stream_stream("/edgetune.v1.Classifier/StreamClassify")
        case = fuzz_cases(self.good, list(raw))

        @settings(
            max_examples=25,
            deadline=None,
            database=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(case)
        def run(c: tuple[Any, ...]) -> None:
            if self.stop.is_set() or self.pause.is_set():
                return
            kind, payload, extra, with_token = c
            md = CAM_MD if with_token else ()
            if kind == "image":
                r = call(
                    self.tally,
                    "fuzz-image",
                    stub.Classify,
                    pb.ClassifyRequest(image=payload, top_k=extra),
                    timeout=15,
                    metadata=md,
                    hostile=True,
                )
            elif extra == "StreamClassify":
                r = call(
                    self.tally,
                    "fuzz-proto",
                    lambda: list(raw_stream(iter([payload]), timeout=15, metadata=md)),
                    hostile=True,
                )
            else:
                r = call(self.tally, "fuzz-proto", raw[extra], payload, timeout=15, metadata=md, hostile=True)
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
        from testkit.edge_fixtures import RequestFeeder
        from testkit.hostile_media import oversized, wide_png

        frames = [
            pb.Frame(camera_id="x" * (1 << 20), frame_id=0, image=self.good[0]),
            pb.Frame(camera_id="cam\x00\x07", frame_id=1, image=self.good[0]),
            pb.Frame(camera_id="h", frame_id=2, image=wide_png(60000)),
            pb.Frame(camera_id="h", frame_id=3, image=oversized("WebP-lossless", 8192, 8192)),
            pb.Frame(camera_id="h", frame_id=4, image=b"\x89PNG\r\n\x1a\ngarbage"),
            pb.Frame(camera_id="h", frame_id=5, image=self.good[1], top_k=99),
            pb.Frame(camera_id="h", frame_id=6, image=self.good[1]),
        ]
        feed = RequestFeeder(timeout=60)
        call = stub.StreamClassify(feed, timeout=30, metadata=CAM_MD)
        try:
            for f in frames:  # one at a time: every frame is answered (no latest-frame-wins drop)
                feed.send(f)
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
        plan = [
            ("b", ADMIN_MD, SC.OK),
            ("broken-labels", ADMIN_MD, SC.INVALID_ARGUMENT),
            ("tampered", ADMIN_MD, SC.INVALID_ARGUMENT),
            ("escape", ADMIN_MD, SC.INVALID_ARGUMENT),
            ("../../../../etc", ADMIN_MD, SC.INVALID_ARGUMENT),
            ("a", CAM_MD, SC.UNAUTHENTICATED),
            ("a", (*CAM_MD, ("x-edgetune-admin-token", CAMERA_TOKEN)), SC.UNAUTHENTICATED),
            ("a", ADMIN_MD, SC.OK),
        ]
        if not hasattr(self, "_lm"):
            self._lm = 0
        path, md, want = plan[self._lm % len(plan)]
        self._lm += 1
        t0 = time.monotonic()
        r = call(
            self.tally,
            "load-model",
            stub.LoadModel,
            pb.LoadModelRequest(bundle_path=path),
            timeout=60,
            metadata=md,
            hostile=want != SC.OK,
        )
        got = SC.OK if not isinstance(r, grpc.RpcError) else r.code()
        details = "" if not isinstance(r, grpc.RpcError) else r.details() or ""
        self.loadmodel_results.append((path, want.name, got.name))
        if got != want and got != SC.UNAVAILABLE:
            self.timed_failures.append(
                ("load-model", t0, time.monotonic(), f"LoadModel {path}: {got.name} (want {want.name}) {details[:200]}")
            )
        if "passwd" in details and "root:" in details:
            self.tally.fail("LoadModel error revealed /etc/passwd content")

    def health(self, _stub: Any, ch: grpc.Channel) -> None:
        t0 = time.monotonic()
        try:
            # a deadline for a loaded machine: a slow answer is still SERVING (the restart fails fast: refused)
            st = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=30.0).status
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(st)
        except grpc.RpcError as e:
            status = e.code().name
        with self.tally.lock:
            self.tally.health.append((t0, time.monotonic(), status))

    def get_stats(self, stub: Any, _ch: grpc.Channel) -> None:
        r = call(self.tally, "stats", stub.GetStats, pb.GetStatsRequest(), timeout=5, metadata=CAM_MD)
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
