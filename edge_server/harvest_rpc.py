"""The harvest RPCs (ListCaptures, FetchCapture, AckCaptures) and the drift / capture part of GetStats.

Admin operations: they need the server's ``--capture DIR`` and an admin token (``--admin-token-file`` or
``EDGETUNE_ADMIN_TOKEN``; metadata ``x-edgetune-admin-token``), else FAILED_PRECONDITION / UNAUTHENTICATED.
Ids in requests are checked against the server's own id pattern and looked up in the spool's index; a path
is never built from request text, so these calls cannot read or delete anything outside the spool.
"""

from __future__ import annotations

import logging
from typing import Any

import grpc

from edge_server.auth import ADMIN_METADATA_KEY, admin_authorized
from edge_server.capture import Capture, DriftMonitor
from edgetune.capture_record import is_capture_id
from edgetune.v1 import classifier_pb2 as pb

log = logging.getLogger("edge_server.harvest")

MAX_CHUNK = 1 << 20
MAX_LIST = 1000
MAX_ACKS = 1000
#: A listing stops (``more`` set) once its sidecars pass this size, so a reply stays far below --max-message-mb.
MAX_LIST_BYTES = 1 << 20


class HarvestRpcs:
    """Mixin of :class:`~edge_server.servicer.ClassifierServicer`: ``capture``, ``admin_token`` and ``drift``
    are set by its constructor (:meth:`init_field`)."""

    capture: Capture | None
    admin_token: str | None
    drift: DriftMonitor

    def init_field(self, capture: Capture | None, admin_token: str | None) -> None:
        self.capture = capture
        self.admin_token = admin_token
        self.drift = DriftMonitor()

    def observe(
        self, data: bytes, probs: Any, model: Any, camera_id: str, capture_time_us: int, frame_id: int = 0
    ) -> None:
        """Every classified image: drift counters, and the capture decision (never waits)."""
        self.drift.observe(probs)
        if self.capture is not None:
            self.capture.offer(data, probs, model, camera_id, capture_time_us, frame_id)

    def _spool(self, context: grpc.ServicerContext) -> Capture:
        if self.capture is None or not self.admin_token:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "harvest is disabled on this server; start it with --capture DIR and an admin token "
                "(--admin-token-file FILE or EDGETUNE_ADMIN_TOKEN)",
            )
            raise AssertionError("unreachable")
        if not admin_authorized(context, self.admin_token):
            context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                f"harvest needs the admin token in metadata '{ADMIN_METADATA_KEY}' (missing or invalid)",
            )
        return self.capture

    def ListCaptures(self, request: pb.ListCapturesRequest, context: grpc.ServicerContext) -> pb.CaptureList:
        cap = self._spool(context)
        if request.after and not is_capture_id(request.after):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "after must be '' or a capture id (<20 digits>-<8 hex>)")
        if request.limit > MAX_LIST:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"limit {request.limit} exceeds {MAX_LIST}")
        items, more = cap.spool.list(request.after, request.limit or 100)
        out = pb.CaptureList(more=more, spool_files=cap.spool.files, spool_bytes=cap.spool.bytes)
        size = 0
        for it in items:
            if size > MAX_LIST_BYTES:
                out.more = True
                break
            try:
                sidecar = cap.spool.read_sidecar(it)
            except OSError:  # evicted or acknowledged meanwhile
                continue
            size += len(sidecar) + 200
            out.frames.add(
                id=it.id,
                frame_name=it.frame,
                frame_bytes=it.frame_bytes,
                frame_sha256=it.frame_sha256,
                reason=it.reason,
                sidecar_json=sidecar,
            )
        return out

    def FetchCapture(self, request: pb.FetchCaptureRequest, context: grpc.ServicerContext) -> pb.CaptureChunk:
        cap = self._spool(context)
        if request.length > MAX_CHUNK:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"length {request.length} exceeds {MAX_CHUNK} bytes")
        item = cap.spool.get(request.id) if is_capture_id(request.id) else None
        if item is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no captured frame {request.id[:40]!r} in the spool")
            raise AssertionError("unreachable")
        if request.offset > item.frame_bytes:
            context.abort(
                grpc.StatusCode.OUT_OF_RANGE, f"offset {request.offset} is beyond the frame's {item.frame_bytes} bytes"
            )
        try:
            data = cap.spool.read_frame(item, request.offset, request.length or MAX_CHUNK)
        except OSError:
            context.abort(grpc.StatusCode.NOT_FOUND, f"captured frame {request.id!r} was deleted meanwhile")
        end = request.offset + len(data)
        return pb.CaptureChunk(
            id=item.id, offset=request.offset, data=data, total_bytes=item.frame_bytes, eof=end >= item.frame_bytes
        )

    def AckCaptures(self, request: pb.AckCapturesRequest, context: grpc.ServicerContext) -> pb.AckCapturesResponse:
        cap = self._spool(context)
        if len(request.acks) > MAX_ACKS:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{len(request.acks)} acks in one call; at most {MAX_ACKS}")
        out = pb.AckCapturesResponse()
        for a in request.acks:
            if is_capture_id(a.id) and cap.spool.ack(a.id, a.frame_sha256):
                out.deleted += 1
            else:
                out.not_found.append(a.id[:40])
        log.info("captures acknowledged", extra={"fields": {"deleted": out.deleted, "not_found": len(out.not_found)}})
        return out

    def fill_field_stats(self, msg: pb.Stats, labels: list[str] | tuple[str, ...], train_counts: Any) -> None:
        mean, n, counts = self.drift.snapshot(len(labels))
        train = (
            [float(c) for c in train_counts]
            if isinstance(train_counts, (list, tuple)) and len(train_counts) == len(labels)
            else []
        )
        tsum = sum(train)
        tv = 0.0
        for i, label in enumerate(labels):
            p = counts[i] / n if n else 0.0
            t = train[i] / tsum if tsum else 0.0
            tv += abs(p - t)
            msg.drift.classes.add(label=label, predicted_share=p, train_share=t)
        msg.drift.mean_confidence, msg.drift.window = mean, n
        msg.drift.total_variation = 0.5 * tv if tsum and n else 0.0
        if self.capture is not None:
            s = self.capture.snapshot()
            c = msg.capture
            c.enabled, c.spool_files, c.spool_bytes, c.paused, c.queued = (
                True,
                s["spool_files"],
                s["spool_bytes"],
                s["paused"],
                s["queued"],
            )
            c.captured.update(s["captured"])
            c.counters.update(s["counters"])
