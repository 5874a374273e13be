"""``edgetune.v1.Classifier`` implementation: header check → decode → spec.apply → micro-batch → softmax → top-k.

Bounded work per call: the image header is read first (format, size and aspect ratio checked before
decoding), decoding takes a share of a server-wide memory budget (``--max-decode-mb``), camera ids are
bounded (:data:`~edge_server.stats.MAX_CAMERA_ID_CHARS`), a stream that sends no frame for
``--stream-idle-timeout`` seconds is closed, so is a stream whose peer does not take a result within it (a
closed HTTP/2 receive window blocks the send: the call is cancelled and its slot freed), and while the server
drains each stream finishes the frame it holds and ends with UNAVAILABLE. Errors that escape a handler are turned
into INTERNAL (and logged) by the RPC guard in :mod:`edge_server.admission`; in a stream, an unexpected error fails
only its frame.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np

from edge_server.auth import ADMIN_METADATA_KEY, LoadModelPolicy
from edge_server.batcher import BatcherClosed, BatchResult, DeadlineExpired, LatestSlot
from edge_server.budget import INFLIGHT_FACTOR, ByteBudget
from edge_server.capture import Capture
from edge_server.harvest_rpc import HarvestRpcs
from edge_server.model import ModelHolder, ServedModel
from edge_server.stats import MAX_CAMERA_ID_CHARS, ServerStats
from edge_server.versions import server_versions
from edge_server.watchdog import Watchdog
from edgetune.errors import EdgetuneError, ImageDecodeError
from edgetune.imagedecode import DEFAULT_MAX_PIXELS, check_aspect_ratio, decode_image
from edgetune.imageheader import read_image_header
from edgetune.numeric import softmax
from edgetune.preprocess import MAX_ASPECT_RATIO
from edgetune.v1 import classifier_pb2 as pb
from edgetune.v1 import classifier_pb2_grpc as pb_grpc

log = logging.getLogger("edge_server.servicer")


class InvalidRequest(EdgetuneError, ValueError):
    """A request field is out of range (reported as INVALID_ARGUMENT)."""


class _Deadline(Exception):
    pass


class _Unavailable(Exception):
    pass


class _Busy(Exception):
    pass


def camera_id_problem(camera_id: str) -> str | None:
    """Why a frame's ``camera_id`` is refused, or None when it is acceptable."""
    if len(camera_id) > MAX_CAMERA_ID_CHARS:
        return f"camera_id is {len(camera_id)} characters long; at most {MAX_CAMERA_ID_CHARS} are allowed"
    if not camera_id.isprintable():
        return "camera_id contains control characters"
    return None


def _us(t0: float, t1: float) -> int:
    return max(0, int((t1 - t0) * 1e6))


class ClassifierServicer(HarvestRpcs, pb_grpc.ClassifierServicer):
    """Serves the model held by ``holder``.

    Args:
        holder: current model (hot-swappable).
        stats: shared statistics.
        max_pixels: decoded-image size limit (decompression bombs → INVALID_ARGUMENT).
        load_model: the admin policy of LoadModel; None = LoadModel disabled (FAILED_PRECONDITION).
        stream_idle_s: a stream with no frame for this long is closed (DEADLINE_EXCEEDED); 0 = never.
        draining: set when the server drains: streams end after the frame they hold.
        decode_budget: shared memory budget of concurrent decodes (None = unbounded).
        inflight: shared budget of admitted request messages (camera frames here; unary requests in the guard).
        capture: the capture queue (``--capture``), or None; admin_token: the harvest RPCs' token.
    """

    def __init__(
        self,
        holder: ModelHolder,
        stats: ServerStats,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        load_model: LoadModelPolicy | None = None,
        stream_idle_s: float = 30.0,
        draining: threading.Event | None = None,
        decode_budget: ByteBudget | None = None,
        inflight: ByteBudget | None = None,
        capture: Capture | None = None,
        admin_token: str | None = None,
    ) -> None:
        self.init_field(capture, admin_token)
        self.holder = holder
        self.stats = stats
        self.max_pixels = max_pixels
        self.load_model = load_model
        self.stream_idle_s = stream_idle_s
        self.draining = draining or threading.Event()
        self.decode_budget = decode_budget
        self.inflight = inflight
        self._send_watchdog = Watchdog()
        self._sending_lock = threading.Lock()
        self._sending: dict[int, tuple[float, grpc.ServicerContext]] = {}  # results being sent: start, call

    def _send_stuck(self, key: int, context: grpc.ServicerContext, idle_s: float) -> None:
        """A stream's result has not been taken by its peer within ``idle_s``: cancel the call (RST_STREAM), which
        ends the blocked send, the handler and so the stream's slot."""
        with self._sending_lock:
            if self._sending.pop(key, None) is None:
                return
        self.stats.error()
        log.warning(
            "rpc error",
            extra={
                "fields": {
                    "method": "/edgetune.v1.Classifier/StreamClassify",
                    "code": "CANCELLED",
                    "details": f"the peer took no result for {idle_s:g} s "
                    "(--stream-idle-timeout; its receive window stays closed); stream cancelled",
                },
                "group": True,
            },
        )
        context.cancel()

    def cancel_stuck_sends(self, older_than_s: float) -> int:
        """Cancel the streams whose result has waited for the peer longer than ``older_than_s`` (the drain does:
        such a stream cannot finish its frame); how many."""
        now = time.monotonic()
        with self._sending_lock:
            stuck = [(k, c) for k, (t, c) in self._sending.items() if now - t > older_than_s]
            for k, _ in stuck:
                del self._sending[k]
        for _, c in stuck:
            c.cancel()
        return len(stuck)

    def _send(self, result: pb.FrameResult, context: grpc.ServicerContext) -> Iterator[pb.FrameResult]:
        """Yield ``result`` to gRPC, which sends it before asking for the next one; a send the peer does not take
        within the idle timeout (its receive window closed) cancels the call."""
        idle_s = self.stream_idle_s
        if not idle_s:
            yield result
            return
        key = id(context)
        with self._sending_lock:
            self._sending[key] = (time.monotonic(), context)
        timer = self._send_watchdog.arm(idle_s, lambda: self._send_stuck(key, context, idle_s))
        try:
            yield result
        finally:
            Watchdog.disarm(timer)
            with self._sending_lock:
                self._sending.pop(key, None)

    # -- core ------------------------------------------------------------------------------
    def _decode(self, data: bytes, deadline: float | None) -> np.ndarray:
        head = read_image_header(data, "image")
        if head.pixels > self.max_pixels:
            raise ImageDecodeError(f"image: image {head.width}x{head.height} exceeds {self.max_pixels} pixels")
        check_aspect_ratio(head.width, head.height, MAX_ASPECT_RATIO, "image")
        budget = self.decode_budget
        if budget is None:
            return decode_image(data, source="image", max_pixels=self.max_pixels, max_aspect_ratio=MAX_ASPECT_RATIO)
        wait = 10.0 if deadline is None else max(0.0, min(10.0, deadline - time.monotonic()))
        share = budget.acquire(head.decoded_bytes + 3 * head.pixels, wait)  # decoder output + RGB copy
        if share is None:
            raise _Busy("server busy decoding other large images (--max-decode-mb); retry later")
        try:
            return decode_image(data, source="image", max_pixels=self.max_pixels, max_aspect_ratio=MAX_ASPECT_RATIO)
        finally:
            budget.release(share)

    def _infer_one(
        self, data: bytes, top_k: int, deadline: float | None, frame: pb.Frame | None = None
    ) -> tuple[list[pb.Prediction], ServedModel, pb.Timing]:
        with self.holder.current.batcher.incoming() as ticket:  # lets a forming batch wait for this image
            t0 = time.monotonic()
            img = self._decode(data, deadline)
            t1 = time.monotonic()
            res: BatchResult | None = None
            model: ServedModel | None = None
            fut: concurrent.futures.Future | None = None
            pre_us = 0
            for _ in range(3):  # a hot swap may close the batcher between lookup and submit: retry on the new model
                model = self.holder.current
                labels = model.bundle.labels
                if top_k > len(labels):
                    raise InvalidRequest(
                        f"top_k {top_k} exceeds the model's {len(labels)} classes; allowed 0..{len(labels)}"
                    )
                tp = time.monotonic()
                x = model.bundle.spec.apply(img)
                pre_us = _us(tp, time.monotonic())
                try:
                    fut = model.batcher.submit(x, deadline, ticket=ticket)
                except BatcherClosed:
                    continue
                break
            del img
        if model is not None and fut is not None:
            try:
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                res = fut.result(timeout=timeout)
            except BatcherClosed:
                res = None
            except (DeadlineExpired, concurrent.futures.TimeoutError):
                fut.cancel()
                raise _Deadline("deadline exceeded while waiting for inference") from None
        if res is None or model is None:
            raise _Unavailable("model is being replaced or the server is shutting down; retry")
        probs = softmax(res.logits).astype(np.float32)
        if frame is None:  # drift + capture: never waits
            self.observe(data, probs, model, "", 0)
        else:
            self.observe(data, probs, model, frame.camera_id, frame.capture_time_us, frame.frame_id)
        k = top_k or 1
        order = np.argsort(-probs, kind="stable")[:k]
        preds = [pb.Prediction(label=model.bundle.labels[i], index=int(i), score=float(probs[i])) for i in order]
        timing = pb.Timing(
            decode_us=_us(t0, t1),
            preprocess_us=pre_us,
            queue_us=res.queue_us,
            infer_us=res.infer_us,
            batch_size=res.batch_size,
        )
        return preds, model, timing

    @staticmethod
    def _deadline(context: grpc.ServicerContext) -> float | None:
        remaining = context.time_remaining()  # a huge number (not None) when the client set no deadline
        return None if remaining is None or remaining > 86_400 * 365 else time.monotonic() + remaining

    # -- RPCs -------------------------------------------------------------------------------
    def Classify(self, request: pb.ClassifyRequest, context: grpc.ServicerContext) -> pb.ClassifyResponse:
        t0 = time.monotonic()
        ok = False
        try:
            preds, model, timing = self._infer_one(request.image, request.top_k, self._deadline(context))
            timing.total_us = _us(t0, time.monotonic())
            ok = True
            return pb.ClassifyResponse(
                request_id=request.request_id, predictions=preds, model_version=model.version, timing=timing
            )
        except (ImageDecodeError, InvalidRequest) as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except _Busy as e:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except _Deadline as e:
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(e))
        except _Unavailable as e:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        finally:
            self.stats.unary_done((time.monotonic() - t0) * 1e3, ok)
        raise AssertionError("unreachable")  # context.abort always raises

    def _admit_frame(self, frame: pb.Frame) -> tuple[pb.Frame, int, str | None]:
        """A received frame's share of the in-flight budget: (frame, share, None), or, when the budget stays
        full for 0.5 s, the frame without its image and the error it gets (its bytes are let go at once)."""
        budget = self.inflight
        if budget is None:
            return frame, 0, None
        share = budget.acquire(INFLIGHT_FACTOR * frame.ByteSize(), 0.5)
        if share is not None:
            return frame, share, None
        bare = pb.Frame(camera_id=frame.camera_id, frame_id=frame.frame_id, capture_time_us=frame.capture_time_us)
        return (
            bare,
            0,
            (
                "server busy: too many large frames and requests in flight (--max-inflight-mb); "
                "frame dropped, send the next one"
            ),
        )

    def _release(self, share: int) -> None:
        if share and self.inflight is not None:
            self.inflight.release(share)

    def _read_frames(
        self,
        request_iterator: Iterator[pb.Frame],
        slot: LatestSlot[tuple[pb.Frame, float, str | None, int]],
        activity: list[float],
    ) -> None:
        """A stream's reader thread: each frame into the slot (latest frame wins) with its budget share."""
        stats = self.stats
        try:
            for received in request_iterator:
                activity[0] = time.monotonic()
                problem = camera_id_problem(received.camera_id)
                if problem is None:
                    stats.frame_received(received.camera_id)
                    frame, share, problem = self._admit_frame(received)
                else:
                    frame, share = received, 0
                del received
                replaced = slot.put((frame, activity[0], problem, share))
                if replaced is not None:
                    self._release(replaced[3])
                    if replaced[2] is None:
                        stats.frame_dropped(replaced[0].camera_id)
                del frame, replaced  # no frame kept alive while the next one is awaited
        except Exception as e:  # client cancelled / connection lost: just end the stream
            log.debug("stream reader ended", extra={"fields": {"error": repr(e)}})
        finally:
            slot.close()

    def StreamClassify(
        self,
        request_iterator: Iterator[pb.Frame],
        context: grpc.ServicerContext,  # noqa: C901
    ) -> Iterator[pb.FrameResult]:
        slot: LatestSlot[tuple[pb.Frame, float, str | None, int]] = LatestSlot()
        activity = [time.monotonic()]  # last frame received or answered
        reader = threading.Thread(
            target=self._read_frames, args=(request_iterator, slot, activity), name="edge-stream-reader", daemon=True
        )
        reader.start()
        deadline = self._deadline(context)
        idle_s = self.stream_idle_s
        drained = False
        try:
            while True:
                if self.draining.is_set():
                    if drained:
                        context.abort(grpc.StatusCode.UNAVAILABLE, "server is shutting down; reconnect to continue")
                    drained = True  # finish the frame already received, then end the stream
                    got = slot.take(timeout=0)
                    if got is None:
                        continue
                else:
                    got = slot.take(timeout=0.25)
                if got is None:
                    if slot.closed or not context.is_active():
                        break
                    if idle_s and time.monotonic() - activity[0] > idle_s:
                        context.abort(
                            grpc.StatusCode.DEADLINE_EXCEEDED,
                            f"no frame received for {idle_s:g} s (--stream-idle-timeout); stream closed",
                        )
                    continue
                (frame, t_recv, problem, share), dropped = got
                try:
                    if not context.is_active():
                        break
                    result = self._frame_result(frame, t_recv, problem, dropped, deadline, context)
                finally:
                    del frame
                    self._release(share)
                yield from self._send(result, context)
                activity[0] = time.monotonic()
        finally:
            slot.close()
            left = slot.take(timeout=0)  # a frame received but never taken: its share goes back
            if left is not None:
                self._release(left[0][3])

    def _refused_frame(self, frame: pb.Frame, problem: str, dropped: int) -> pb.FrameResult:
        """The answer to a frame refused before inference: its camera id is not echoed nor tracked (a hostile id
        must not grow replies or stats)."""
        self.stats.frame_done(None, 0.0, ok=False)
        log.info("frame refused", extra={"fields": {"frame_id": frame.frame_id, "error": problem}, "group": True})
        return pb.FrameResult(
            frame_id=frame.frame_id,
            capture_time_us=frame.capture_time_us,
            dropped_before=dropped,
            error=problem,
            model_version=self.holder.current.version,
        )

    def _frame_result(
        self,
        frame: pb.Frame,
        t_recv: float,
        problem: str | None,
        dropped: int,
        deadline: float | None,
        context: grpc.ServicerContext,
    ) -> pb.FrameResult:
        stats = self.stats
        if problem is not None:
            return self._refused_frame(frame, problem, dropped)
        result = pb.FrameResult(
            camera_id=frame.camera_id,
            frame_id=frame.frame_id,
            capture_time_us=frame.capture_time_us,
            dropped_before=dropped,
        )
        try:
            preds, model, timing = self._infer_one(frame.image, frame.top_k, deadline, frame)
            timing.total_us = _us(t_recv, time.monotonic())
            result.predictions.extend(preds)
            result.model_version = model.version
            result.timing.CopyFrom(timing)
            stats.frame_done(frame.camera_id, timing.total_us / 1e3, ok=True)
            return result
        except (ImageDecodeError, InvalidRequest, _Unavailable, _Busy) as e:
            result.error = str(e)
            log.info(
                "frame error",
                extra={
                    "fields": {"camera_id": frame.camera_id, "frame_id": frame.frame_id, "error": str(e)},
                    "group": True,
                },
            )
        except _Deadline as e:
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(e))
        except Exception as e:  # a bug must fail this frame only, never the camera's stream; logged in full
            log.exception(
                "unexpected error processing a frame; the stream goes on",
                extra={
                    "fields": {
                        "camera_id": frame.camera_id,
                        "frame_id": frame.frame_id,
                        "error_type": type(e).__name__,
                    },
                    "group": True,
                },
            )
            result.error = "internal error processing this frame; it is logged on the server"
        result.model_version = self.holder.current.version
        stats.frame_done(frame.camera_id, 0.0, ok=False)
        return result

    def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.ServicerContext) -> pb.ModelInfo:
        return model_info(self.holder.current)

    def GetStats(self, request: pb.GetStatsRequest, context: grpc.ServicerContext) -> pb.Stats:
        snap = self.stats.snapshot()  # no lock held while this message is built
        cams = [pb.CameraStats(camera_id=cid, **c) for cid, c in snap.pop("cameras").items()]
        model = self.holder.current
        msg = pb.Stats(cameras=cams, model_version=model.version, **snap)
        self.fill_field_stats(msg, model.bundle.labels, model.bundle.meta.get("train_class_counts"))
        return msg

    def LoadModel(self, request: pb.LoadModelRequest, context: grpc.ServicerContext) -> pb.ModelInfo:
        policy = self.load_model
        if policy is None:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "LoadModel is disabled on this server; enable it with --enable-load-model, --model-root DIR "
                "and an admin token (--admin-token-file FILE or EDGETUNE_ADMIN_TOKEN)",
            )
            raise AssertionError("unreachable")
        if not policy.authorized(context):
            context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                f"LoadModel needs the admin token in metadata '{ADMIN_METADATA_KEY}' (missing or invalid)",
            )
        try:
            model = self.holder.load(policy.resolve(request.bundle_path))
        except EdgetuneError as e:
            log.warning(
                "LoadModel failed; previous model still serving",
                extra={"fields": {"bundle_path": request.bundle_path, "error": str(e)}, "group": True},
            )
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"cannot load {request.bundle_path!r}: {e}")
        return model_info(model)


def model_info(model: ServedModel) -> pb.ModelInfo:
    b = model.bundle
    spec = b.spec
    versions: dict[str, Any] = {f"export.{k}": str(v) for k, v in (b.meta.get("versions") or {}).items()}
    versions.update({f"server.{k}": v for k, v in server_versions().items()})
    return pb.ModelInfo(
        labels=b.labels,
        input=pb.InputSpec(
            input_size=list(spec.input_size),
            resize=spec.resize,
            resize_mode=spec.resize_mode,
            interpolation=spec.interpolation,
            mean=list(spec.mean),
            std=list(spec.std),
            channel_order=spec.channel_order,
            layout=spec.layout,
        ),
        backend=model.runner.name,
        precision=model.runner.precision,
        bundle_sha256=b.sha256,
        model_version=b.version,
        backbone=str(b.meta.get("backbone", "")),
        versions=versions,
        max_batch_size=model.batcher.max_batch,
    )
