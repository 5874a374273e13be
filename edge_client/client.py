"""The streaming client: one bidirectional ``StreamClassify`` call per camera, results matched to
frames by ``frame_id``, end-to-end latency (capture → result) per frame, and reconnection with
exponential backoff and jitter.

Flow per camera (:class:`CameraStream`)::

    source.read() --(fps limit, in-flight window)--> encode_frame --> Frame ----> server
    log/overlay <-- record (latency = receipt - capture) <-- match frame_id <-- FrameResult

When the connection breaks (server restarted, killed, network gone):

* finite sources (files, directories) re-send the frames that were sent but not answered, first
  thing after reconnecting, then go on with the next frame: nothing is lost, the gap only delays;
* live sources count those frames as **lost** (re-sending stale camera frames is useless) and
  continue from the newest frame; the frames captured during the outage were never sent and are
  counted as **skipped**, like frames the fps limit or the in-flight window passed over.

Every frame is accounted for: ``captured == sent + skipped`` for live sources and
``sent == results + dropped + lost`` for all (``dropped``: replaced on the server by a newer frame,
latest frame wins). Lost frames are reported on stderr and in the ``lost_before`` field of the next
result.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from edge_client.connection import (
    ClientError,
    ConnectionOptions,
    describe_rpc_error,
    make_channel,
    retry_pushback_ms,
    watch_connected,
)
from edge_client.frames import encode_frame
from edge_client.frames import result_record as make_record
from edge_client.once import classify_once
from edge_client.sources import CapturedFrame, Source, now_us
from edge_client.stream_options import CameraStats, StreamOptions
from edgetune.backoff import Backoff
from edgetune.v1 import classifier_pb2 as pb
from edgetune.v1 import classifier_pb2_grpc as pb_grpc

# The documented API (edge_client/README.md): ``from edge_client.client import CameraStream, StreamOptions,
# classify_once``; the options and the one-shot call live in their own modules.
__all__ = ["CameraStats", "CameraStream", "Sink", "StreamOptions", "classify_once"]

Sink = Callable[[dict[str, Any], Any], None]  # (record, resized BGR image or None)


@dataclass
class _Pending:
    """A frame sent and not answered yet."""

    seq: int
    capture_us: int
    image: Any  # resized BGR image for the sinks, or None
    data: bytes | None  # the encoded frame, kept for finite sources (re-sent after a reconnection)


def _log(camera_id: str, msg: str) -> None:
    print(f"edge_client: [{camera_id}] {msg}", file=sys.stderr, flush=True)


class CameraStream:
    """Streams one source to the server until the source ends or ``stop`` is set."""

    def __init__(
        self,
        source: Source,
        conn: ConnectionOptions,
        opts: StreamOptions,
        sinks: list[Sink],
        stop: threading.Event | None = None,
    ) -> None:
        self.source, self.conn, self.opts, self.sinks = source, conn, opts, sinks
        self.stop = stop or threading.Event()
        self.stats = CameraStats(source.camera_id)
        default_window = 0 if source.live else 1
        self.window = default_window if opts.max_inflight is None else opts.max_inflight
        self._cond = threading.Condition()
        self._pending: dict[int, _Pending] = {}  # frame_id -> frame sent, not answered yet
        self._resend: list[_Pending] = []  # finite sources: in flight when the connection broke
        self._carry: CapturedFrame | None = None  # read by a stream that died before sending it
        self._finished = False  # ... and the outstanding results were waited for
        self._connected_once = False
        self._lost_since_result = 0
        self._next_send = 0.0
        self.model_version = ""

    # -- requests ----------------------------------------------------------------------
    def _next_frame(self, alive: threading.Event) -> CapturedFrame | None:
        """Wait for the window and the fps slot, then read; ``None`` at the end of the source."""
        with self._cond:
            while self.window and len(self._pending) >= self.window and alive.is_set():
                self._cond.wait(0.1)
        while alive.is_set() and (delay := self._next_send - time.monotonic()) > 0:
            self.stop.wait(min(delay, 0.1))
        if not alive.is_set():
            return None
        if self._carry is not None:
            frame, self._carry = self._carry, None
            return frame
        while alive.is_set():
            try:
                return self.source.read(timeout=0.5)
            except TimeoutError:
                continue
        return None

    @staticmethod
    def _tracked(gen: Iterator[Any], idle: threading.Event) -> Iterator[Any]:
        """``gen`` with ``idle`` cleared while it computes the next request (gRPC's consumer thread
        runs it); the connection loop waits for ``idle`` before closing the channel."""
        try:
            while True:
                idle.clear()
                try:
                    item = next(gen)
                except StopIteration:
                    return
                finally:
                    idle.set()
                yield item
        finally:
            idle.set()

    def _requests(self, alive: threading.Event, call_box: list[Any]) -> Iterator[Any]:  # noqa: C901
        cam = self.source.camera_id
        while alive.is_set():
            if self._resend:  # finite source after a reconnection: the frames that were in flight first
                again = self._resend_one(alive)
                if again is None:
                    return
                yield again
                continue
            frame = self._next_frame(alive)
            if frame is not None:
                self.stats.skipped += frame.skipped_before
            if not alive.is_set():
                if frame is not None:
                    if self.source.live:
                        self.stats.skipped += 1  # read while the connection broke: never sent
                    else:
                        self._carry = frame
                return
            if frame is None:
                break
            if self.opts.fps:
                self._next_send = max(self._next_send + 1.0 / self.opts.fps, time.monotonic())
            data, small = encode_frame(frame.image, self.opts.encode)
            with self._cond:
                self._pending[frame.seq] = _Pending(
                    frame.seq,
                    frame.capture_time_us,
                    small if self.opts.keep_images else None,
                    None if self.source.live else data,
                )
            self.stats.sent += 1
            yield pb.Frame(
                camera_id=cam,
                frame_id=frame.seq,
                capture_time_us=frame.capture_time_us,
                image=data,
                top_k=self.opts.top_k,
            )
        self._finish_source(alive, call_box)

    def _resend_one(self, alive: threading.Event) -> pb.Frame | None:
        """The next frame kept from a broken stream, once the window has room (None: the stream broke again)."""
        with self._cond:
            while self.window and len(self._pending) >= self.window and alive.is_set():
                self._cond.wait(0.1)
        if not alive.is_set():
            return None
        p = self._resend.pop(0)
        with self._cond:
            self._pending[p.seq] = p
        self.stats.resent += 1
        return pb.Frame(
            camera_id=self.source.camera_id,
            frame_id=p.seq,
            capture_time_us=p.capture_us,
            image=p.data,
            top_k=self.opts.top_k,
        )

    def _finish_source(self, alive: threading.Event, call_box: list[Any]) -> None:
        """End of the source: wait for the outstanding results, then half-close the stream."""
        cam = self.source.camera_id
        deadline = time.monotonic() + self.opts.result_timeout
        with self._cond:
            while self._pending and alive.is_set() and time.monotonic() < deadline:
                self._cond.wait(0.1)
            if self._pending and alive.is_set():
                _log(
                    cam,
                    f"{len(self._pending)} frame(s) still unanswered after {self.opts.result_timeout} s; "
                    "counted as lost",
                )
            self._finished = alive.is_set()
        # A server that does not end the stream after the half-close is cancelled shortly after.
        timer = threading.Timer(2.0, lambda: call_box and call_box[0].cancel())
        timer.daemon = True
        timer.start()

    # -- responses ---------------------------------------------------------------------
    def _on_result(self, res: Any) -> None:
        received = now_us()
        fid = int(res.frame_id)
        with self._cond:
            entry = self._pending.pop(fid, None)
            # Results of one camera come in frame order: older frames still pending were dropped.
            older = [k for k in self._pending if k < fid]
            for k in older:
                del self._pending[k]
            self._cond.notify_all()
        capture_us, image = (entry.capture_us, entry.image) if entry is not None else (int(res.capture_time_us), None)
        latency_ms = (received - capture_us) / 1000.0
        self.stats.dropped += int(res.dropped_before)
        self.stats.results += 1
        if res.error:
            self.stats.errors += 1
        else:
            self.stats.latencies_ms.append(latency_ms)
        self.model_version = res.model_version or self.model_version
        record = make_record(res, latency_ms, self._lost_since_result)
        self._lost_since_result = 0
        for sink in self.sinks:
            sink(record, image)

    def _drop_pending_as_lost(self) -> list[int]:
        with self._cond:
            lost = sorted(self._pending)
            lost += [p.seq for p in self._resend]
            self._pending.clear()
            self._resend.clear()
            self._cond.notify_all()
        self.stats.lost += len(lost)
        self._lost_since_result += len(lost)
        return sorted(lost)

    def _keep_pending_for_resend(self) -> list[int]:
        """Finite sources: frames in flight are sent again after reconnecting (in frame order)."""
        with self._cond:
            kept = sorted(self._pending.values(), key=lambda p: p.seq)
            self._pending.clear()
            self._resend = sorted([*self._resend, *kept], key=lambda p: p.seq)
            self._cond.notify_all()
        return [p.seq for p in self._resend]

    # -- connection loop ---------------------------------------------------------------
    def _probe(self, stub: Any) -> Any:
        return stub.GetModelInfo(
            pb.GetModelInfoRequest(), timeout=self.opts.connect_timeout, metadata=self.conn.metadata()
        )

    def run(self) -> CameraStats:
        """Stream until the source ends (returns) or ``stop`` is set; raises :class:`ClientError`
        for failures that retrying cannot fix or when the retry time is used up."""
        backoff = Backoff(self.opts.backoff_initial, self.opts.backoff_max, max_total=self.opts.max_retry_time)
        outage_started: float | None = None
        while not self.stop.is_set():
            channel = make_channel(self.conn, connect_timeout=self.opts.connect_timeout)
            connected = watch_connected(channel)
            alive = threading.Event()
            alive.set()
            call_box: list[Any] = []
            idle = threading.Event()
            idle.set()
            watcher = threading.Thread(target=self._watch_stop, args=(alive, call_box), daemon=True)
            established = False
            pushback: int | None = None
            try:
                info = self._probe(pb_grpc.ClassifierStub(channel))
                established = True
                if outage_started is not None:
                    self._on_reconnected(outage_started, info.model_version)
                    outage_started = None
                backoff.reset()
                call = pb_grpc.ClassifierStub(channel).StreamClassify(
                    self._tracked(self._requests(alive, call_box), idle), metadata=self.conn.metadata()
                )
                call_box.append(call)
                watcher.start()
                self._connected_once = True
                for res in call:
                    self._on_result(res)
                if self._finished:
                    return self._end()
                raise_msg = "server ended the stream"
            except grpc.RpcError as e:
                if self.stop.is_set() or self._finished:
                    return self._end()
                retryable, raise_msg = describe_rpc_error(
                    e,
                    self.conn,
                    established=established or self._connected_once,
                    deadline_s=None if established else self.opts.connect_timeout,
                    connected=connected.is_set(),
                )
                if not retryable:
                    raise ClientError(raise_msg) from None
                pushback = retry_pushback_ms(e)
            finally:
                self._close_attempt(alive, idle, watcher, channel)
            # Connection failed or broke: count the gap (or keep the frames to re-send), back off, try again.
            outage_started = self._on_outage(outage_started, raise_msg)
            self.stop.wait(self._retry_delay(backoff, pushback, raise_msg))
        return self._end()

    def _on_reconnected(self, outage_started: float, model_version: str) -> None:
        gap = time.monotonic() - outage_started
        _log(self.source.camera_id, f"reconnected to {self.conn.server} after {gap:.1f} s (model {model_version})")
        self.stats.reconnects += 1

    def _close_attempt(
        self, alive: threading.Event, idle: threading.Event, watcher: threading.Thread, channel: grpc.Channel
    ) -> None:
        """End one connection attempt: stop its request generator and stop-watcher, close its channel."""
        alive.clear()
        with self._cond:
            self._cond.notify_all()
        idle.wait(2.0)  # the request generator notices within a read timeout
        if watcher.is_alive():
            watcher.join(1.0)
        channel.close()

    def _on_outage(self, outage_started: float | None, raise_msg: str) -> float:
        """The frames in flight are lost (live source) or kept to re-send; the first failure of an outage is
        logged. Returns when the outage started."""
        cam = self.source.camera_id
        if self.source.live:
            in_flight, fate = self._drop_pending_as_lost(), "lost"
        else:
            in_flight, fate = self._keep_pending_for_resend(), "will be re-sent"
        if outage_started is not None:
            return outage_started
        if self._connected_once:
            ids = f" (frame ids {in_flight[0]}..{in_flight[-1]})" if in_flight else ""
            _log(cam, f"{raise_msg}; {len(in_flight)} frame(s) in flight {fate}{ids}; reconnecting")
        else:
            limit = f"{self.opts.max_retry_time:g} s" if self.opts.max_retry_time else "ever"
            _log(cam, f"{raise_msg}; retrying for {limit}")
        return time.monotonic()

    def _retry_delay(self, backoff: Backoff, pushback: int | None, raise_msg: str) -> float:
        """Seconds until the next attempt (at least the server's pushback); :class:`ClientError` once the retry
        time is used up."""
        delay = backoff.next_delay()
        if delay is not None and pushback is not None:
            delay = max(delay, pushback / 1000.0)  # the server said when to come back
        if delay is None:
            raise ClientError(
                f"{raise_msg}; gave up after retrying for {self.opts.max_retry_time:g} s (--max-retry-time)"
            )
        if backoff.attempts > 1:
            _log(self.source.camera_id, f"retry {backoff.attempts} in {delay:.1f} s (down for {backoff.elapsed:.1f} s)")
        return delay

    def _end(self) -> CameraStats:
        self._drop_pending_as_lost()
        return self.stats

    def _watch_stop(self, alive: threading.Event, call_box: list[Any]) -> None:
        """Cancel the open call when ``stop`` is set (Ctrl-C, another camera failed)."""
        while alive.is_set():
            if self.stop.wait(0.2):
                if call_box:
                    call_box[0].cancel()
                return
