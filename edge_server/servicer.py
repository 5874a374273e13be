"""``edgetune.v1.Classifier`` implementation: decode → spec.apply → micro-batch → softmax → top-k."""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np

from edge_server.batcher import BatcherClosed, BatchResult, DeadlineExpired, LatestSlot
from edge_server.model import ModelHolder, ServedModel, softmax
from edge_server.stats import ServerStats
from edge_server.versions import server_versions
from edgetune.errors import EdgetuneError, ImageDecodeError
from edgetune.preprocess import DEFAULT_MAX_PIXELS, decode_image
from edgetune.v1 import classifier_pb2 as pb
from edgetune.v1 import classifier_pb2_grpc as pb_grpc

log = logging.getLogger("edge_server.servicer")


class InvalidRequest(EdgetuneError, ValueError):
    """A request field is out of range (reported as INVALID_ARGUMENT)."""


class _Deadline(Exception):
    pass


class _Unavailable(Exception):
    pass


def _us(t0: float, t1: float) -> int:
    return max(0, int((t1 - t0) * 1e6))


class ClassifierServicer(pb_grpc.ClassifierServicer):
    """Serves the model held by ``holder``.

    Args:
        holder: current model (hot-swappable).
        stats: shared statistics.
        max_pixels: decoded-image size limit (decompression bombs → INVALID_ARGUMENT).
        allow_load_model: whether the LoadModel admin RPC is enabled.
    """

    def __init__(self, holder: ModelHolder, stats: ServerStats, max_pixels: int = DEFAULT_MAX_PIXELS,
                 allow_load_model: bool = True) -> None:
        self.holder = holder
        self.stats = stats
        self.max_pixels = max_pixels
        self.allow_load_model = allow_load_model

    # -- core ------------------------------------------------------------------------------
    def _infer_one(self, data: bytes, top_k: int, deadline: float | None
                   ) -> tuple[list[pb.Prediction], ServedModel, pb.Timing]:
        with self.holder.current.batcher.incoming() as ticket:  # lets a forming batch wait for this image
            t0 = time.monotonic()
            img = decode_image(data, source="image", max_pixels=self.max_pixels)
            t1 = time.monotonic()
            res: BatchResult | None = None
            model: ServedModel | None = None
            fut: concurrent.futures.Future | None = None
            pre_us = 0
            for _ in range(3):  # a hot swap may close the batcher between lookup and submit: retry on the new model
                model = self.holder.current
                labels = model.bundle.labels
                if top_k > len(labels):
                    raise InvalidRequest(f"top_k {top_k} exceeds the model's {len(labels)} classes; "
                                         f"allowed 0..{len(labels)}")
                tp = time.monotonic()
                x = model.bundle.spec.apply(img)
                pre_us = _us(tp, time.monotonic())
                try:
                    fut = model.batcher.submit(x, deadline, ticket=ticket)
                except BatcherClosed:
                    continue
                break
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
        probs = softmax(res.logits)
        k = top_k or 1
        order = np.argsort(-probs, kind="stable")[:k]
        preds = [pb.Prediction(label=model.bundle.labels[i], index=int(i), score=float(probs[i])) for i in order]
        timing = pb.Timing(decode_us=_us(t0, t1), preprocess_us=pre_us, queue_us=res.queue_us,
                           infer_us=res.infer_us, batch_size=res.batch_size)
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
            return pb.ClassifyResponse(request_id=request.request_id, predictions=preds,
                                       model_version=model.version, timing=timing)
        except (ImageDecodeError, InvalidRequest) as e:
            log.info("invalid request", extra={"fields": {"request_id": request.request_id, "error": str(e)}})
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except _Deadline as e:
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(e))
        except _Unavailable as e:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        finally:
            self.stats.unary_done((time.monotonic() - t0) * 1e3, ok)
        raise AssertionError("unreachable")  # context.abort always raises

    def StreamClassify(self, request_iterator: Iterator[pb.Frame], context: grpc.ServicerContext
                       ) -> Iterator[pb.FrameResult]:
        slot: LatestSlot[tuple[pb.Frame, float]] = LatestSlot()
        stats = self.stats

        def read() -> None:
            try:
                for frame in request_iterator:
                    stats.frame_received(frame.camera_id)
                    replaced = slot.put((frame, time.monotonic()))
                    if replaced is not None:
                        stats.frame_dropped(replaced[0].camera_id)
            except Exception as e:  # client cancelled / connection lost: just end the stream
                log.debug("stream reader ended", extra={"fields": {"error": repr(e)}})
            finally:
                slot.close()

        reader = threading.Thread(target=read, name="edge-stream-reader", daemon=True)
        reader.start()
        deadline = self._deadline(context)
        while True:
            got = slot.take()
            if got is None or not context.is_active():
                break
            (frame, t_recv), dropped = got
            result = pb.FrameResult(camera_id=frame.camera_id, frame_id=frame.frame_id,
                                    capture_time_us=frame.capture_time_us, dropped_before=dropped)
            try:
                preds, model, timing = self._infer_one(frame.image, frame.top_k, deadline)
                timing.total_us = _us(t_recv, time.monotonic())
                result.predictions.extend(preds)
                result.model_version = model.version
                result.timing.CopyFrom(timing)
                stats.frame_done(frame.camera_id, timing.total_us / 1e3, ok=True)
            except (ImageDecodeError, InvalidRequest, _Unavailable) as e:
                result.error = str(e)
                result.model_version = self.holder.current.version
                stats.frame_done(frame.camera_id, 0.0, ok=False)
            except _Deadline as e:
                context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(e))
            yield result

    def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.ServicerContext) -> pb.ModelInfo:
        return model_info(self.holder.current)

    def GetStats(self, request: pb.GetStatsRequest, context: grpc.ServicerContext) -> pb.Stats:
        snap = self.stats.snapshot()
        cams = [pb.CameraStats(camera_id=cid, **c) for cid, c in snap.pop("cameras").items()]
        return pb.Stats(cameras=cams, model_version=self.holder.current.version, **snap)

    def LoadModel(self, request: pb.LoadModelRequest, context: grpc.ServicerContext) -> pb.ModelInfo:
        if not self.allow_load_model:
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          "LoadModel is disabled: start the server with --token (or on a loopback address) to use it")
        if not request.bundle_path:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bundle_path is empty; give a bundle directory on the server")
        try:
            model = self.holder.load(request.bundle_path)
        except EdgetuneError as e:
            log.warning("LoadModel failed; previous model still serving",
                        extra={"fields": {"bundle": request.bundle_path, "error": str(e)}})
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"cannot load {request.bundle_path}: {e}")
        return model_info(model)


def model_info(model: ServedModel) -> pb.ModelInfo:
    b = model.bundle
    spec = b.spec
    versions: dict[str, Any] = {f"export.{k}": str(v) for k, v in (b.meta.get("versions") or {}).items()}
    versions.update({f"server.{k}": v for k, v in server_versions().items()})
    return pb.ModelInfo(
        labels=b.labels,
        input=pb.InputSpec(input_size=list(spec.input_size), resize=spec.resize, resize_mode=spec.resize_mode,
                           interpolation=spec.interpolation, mean=list(spec.mean), std=list(spec.std),
                           channel_order=spec.channel_order, layout=spec.layout),
        backend=model.runner.name, precision=model.runner.precision, bundle_sha256=b.sha256,
        model_version=b.version, backbone=str(b.meta.get("backbone", "")), versions=versions,
        max_batch_size=model.batcher.max_batch,
    )
