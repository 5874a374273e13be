"""Admission control and the last line of error handling for every RPC (one gRPC server interceptor).

Limits are per kind of call, so that one kind cannot starve another (Envoy's per-route circuit breakers):

* ``unary``: Classify, GetModelInfo, GetStats, LoadModel: at most ``--max-concurrent`` at once;
* ``stream``: StreamClassify: at most ``--max-streams`` open at once, and at most
  ``--max-streams-per-connection`` of them on one client connection (gRPC's peer: its address and port; by default
  half of ``--max-streams``, rounded up), so one connection, whatever it does with its streams (a receive window
  of 0 that blocks every send, say), never holds the slots a camera on another connection needs (issue 21; idle
  streams also time out in the servicer, ``--stream-idle-timeout``). A stream is admitted in its handler, where
  the peer is known (``handler_call_details`` does not carry it): both counts are checked and taken at once;
* ``watch``: health ``Watch`` streams (:data:`MAX_HEALTH_WATCHERS`), ``reflection`` streams
  (:data:`MAX_REFLECTION_STREAMS`);
* health ``Check`` is never refused, not even while draining, and never holds a server thread for long: a
  Check whose request message has not arrived within :data:`HEALTH_REQUEST_TIMEOUT_S` is cancelled, and
  while :data:`MAX_HEALTH_PENDING` Checks are already running, the next one is answered at once with the
  server's status (SERVING, or NOT_SERVING while draining) without waiting for its request. So a flood of
  stalled health calls holds at most that many threads for at most that long (issue 21: 300 stalled Checks
  used to pin the whole pool for ``--stream-idle-timeout``).

A call over its limit gets RESOURCE_EXHAUSTED naming the limit, with the trailer
``grpc-retry-pushback-ms`` (the camera client waits that long and retries); those replies are counted in
``errors_total`` and logged. Every error log line here is grouped per second and kind with a count
(``edge_server.logs.BoundedJsonHandler``): a flood of errors must not become a flood of log lines.
While the server drains (:meth:`Admission.start_draining`), new calls other than health get UNAVAILABLE.

Every admitted call runs inside a guard: an exception that escapes a handler becomes INTERNAL (never
gRPC's UNKNOWN) with a logged traceback, and every call that ends with an error status is counted in
``errors_total`` and logged with its method and code.

The guard serves every method as a client-streaming one on the wire-compatible side (a unary request is
one message either way): gRPC then runs the handler, with its context, as soon as the call arrives,
instead of holding a server thread, outside any limit and beyond any release, until the request message
arrives. So a slot is always released when the call ends (``context.add_callback``), and a call whose
request message does not arrive within ``request_timeout_s`` is cancelled (headers-only slow loris).

Request messages are parsed by the guard, not by gRPC: grpcio (1.85) leaks the HTTP/2 stream of every
call whose request fails to deserialize, so about a hundred undecodable messages made a connection refuse
every further call (health included) with REFUSED_STREAM. Here such a call simply gets INVALID_ARGUMENT.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from edge_server.budget import INFLIGHT_FACTOR, ByteBudget
from edge_server.stats import ServerStats
from edge_server.watchdog import Watchdog

log = logging.getLogger("edge_server.rpc")

HEALTH_CHECK = "/grpc.health.v1.Health/Check"
HEALTH_WATCH = "/grpc.health.v1.Health/Watch"
REFLECTION_PREFIX = "/grpc.reflection."
#: Open health ``Watch`` streams allowed at once (each holds a server thread).
MAX_HEALTH_WATCHERS = 16
#: Open server-reflection streams allowed at once.
MAX_REFLECTION_STREAMS = 4
#: Health Checks running at once (each waits for its request message on a server thread); beyond it a Check
#: is answered at once from the server's status, without reading its request.
MAX_HEALTH_PENDING = 16
#: A health Check or Watch whose request message has not arrived within this is cancelled (a prober sends it
#: with the headers).
HEALTH_REQUEST_TIMEOUT_S = 1.0
#: Client-side mistakes: logged at info; everything else at warning (INTERNAL / UNKNOWN at error).
_CLIENT_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
}


#: Trailer telling clients when a refused call may be retried (gRPC's retry pushback, proposal A6).
RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"
RETRY_PUSHBACK_MS = 1000


def abort_handler(
    handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str, trailing: tuple[tuple[str, str], ...] = ()
) -> grpc.RpcMethodHandler:
    """A handler of the same response shape as ``handler`` that fails every call with ``code`` (and ``trailing``
    metadata) at once, without waiting for (or reading) the request message."""

    def deny(_requests: Any, context: grpc.ServicerContext) -> Any:
        if trailing:
            context.set_trailing_metadata(trailing)
        context.abort(code, message)

    kw = {"request_deserializer": None, "response_serializer": handler.response_serializer}  # never parsed
    if handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny, **kw)
    return grpc.stream_unary_rpc_method_handler(deny, **kw)


class _CallGone(Exception):
    """The request message will never be read: the client cancelled or gRPC already answered the call."""


class Admission(grpc.ServerInterceptor):
    """Per-kind concurrency limits, drain refusal and the exception guard (see the module docstring)."""

    def __init__(
        self,
        stats: ServerStats,
        max_unary: int,
        max_streams: int,
        request_timeout_s: float = 30.0,
        inflight: ByteBudget | None = None,
        max_streams_per_peer: int | None = None,
    ) -> None:
        self.stats = stats
        #: camera streams one connection (gRPC peer) may hold at once
        self.max_streams_per_peer = (
            default_streams_per_peer(max_streams) if max_streams_per_peer is None else max_streams_per_peer
        )
        self._peer_streams: dict[str, int] = {}  # peer -> streams it holds (only peers holding one)
        self.inflight = inflight
        self.request_timeout_s = request_timeout_s
        self._watchdog = Watchdog()
        self.limits = {
            "unary": max_unary,
            "stream": max_streams,
            "watch": MAX_HEALTH_WATCHERS,
            "reflection": MAX_REFLECTION_STREAMS,
            "health": MAX_HEALTH_PENDING,
        }
        self._active = dict.fromkeys(self.limits, 0)
        self._cond = threading.Condition()
        self.draining = threading.Event()

    @property
    def threads_needed(self) -> int:
        """Server threads that admitted calls can hold at once (the pool adds a reserve for health and refusals)."""
        return sum(self.limits.values())

    def active(self, kind: str) -> int:
        with self._cond:
            return self._active[kind]

    def peer_streams(self) -> dict[str, int]:
        """Camera streams held per connection (gRPC peer), only connections holding one."""
        with self._cond:
            return dict(self._peer_streams)

    def start_draining(self) -> None:
        self.draining.set()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no unary call or camera stream is running (health and watchers excluded)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._active["unary"] or self._active["stream"]:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    def close(self) -> None:
        """Nothing to release (kept for the server's stop sequence)."""

    # -- interceptor -----------------------------------------------------------------------
    @staticmethod
    def _kind(method: str, handler: grpc.RpcMethodHandler) -> str | None:
        if method == HEALTH_CHECK:
            return "health"
        if method == HEALTH_WATCH:
            return "watch"
        if method.startswith(REFLECTION_PREFIX):
            return "reflection"
        return "stream" if handler.request_streaming else "unary"

    def intercept_service(self, continuation: Callable[[Any], Any], handler_call_details: Any) -> Any:
        method = handler_call_details.method
        try:
            handler = continuation(handler_call_details)
        except Exception:  # a bug in a later interceptor: INTERNAL and a log line, not gRPC's UNKNOWN
            log.exception(
                "unexpected error looking up the handler; answered INTERNAL",
                extra={"fields": {"method": method, "code": "INTERNAL"}, "group": True},
            )
            self.stats.error()
            return abort_handler(
                grpc.stream_stream_rpc_method_handler(lambda *_: iter(())),
                grpc.StatusCode.INTERNAL,
                "internal server error; it is logged on the server",
            )
        if handler is None:
            return None
        kind = self._kind(method, handler)
        if kind is None:
            return self._guard(handler, method, None)
        if self.draining.is_set() and kind not in ("watch", "health"):
            return self._refuse(
                handler,
                method,
                grpc.StatusCode.UNAVAILABLE,
                "server is shutting down; retry on another server or once it is back",
            )
        if kind == "stream":  # admitted in the handler, where its connection is known (_admit_stream)
            return self._guard(handler, method, kind)
        with self._cond:
            admitted = self._active[kind] < self.limits[kind]
            if admitted:
                self._active[kind] += 1
        if not admitted:
            if kind == "health":
                return self._health_answer(handler)
            return self._refuse(handler, method, grpc.StatusCode.RESOURCE_EXHAUSTED, self._limit_message(kind))
        return self._guard(handler, method, kind)

    def _health_answer(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """A health Check answered at once with the server's status, its request never read (while
        :data:`MAX_HEALTH_PENDING` Checks are running already: stalled ones must not queue up on threads)."""
        status = (
            health_pb2.HealthCheckResponse.NOT_SERVING
            if self.draining.is_set()
            else health_pb2.HealthCheckResponse.SERVING
        )

        def answer(_requests: Any, _context: grpc.ServicerContext) -> Any:
            return health_pb2.HealthCheckResponse(status=status)

        return grpc.stream_unary_rpc_method_handler(
            answer, request_deserializer=None, response_serializer=handler.response_serializer
        )

    def _admit_stream(self, peer: str) -> str | None:
        """Take a stream slot for a call from ``peer``, the server's and the connection's at once: None, or why
        the call is refused."""
        with self._cond:
            if self._active["stream"] >= self.limits["stream"]:
                return self._limit_message("stream")
            held = self._peer_streams.get(peer, 0)
            if held >= self.max_streams_per_peer:
                n = self.max_streams_per_peer
                return (
                    f"too many open camera streams on this connection (limit {n}, --max-streams-per-connection);"
                    " open further cameras on their own connections, or retry later"
                )
            self._active["stream"] += 1
            self._peer_streams[peer] = held + 1
        return None

    def _admit_stream_call(self, context: grpc.ServicerContext, method: str, admitted_peer: list[str] | None) -> None:
        """Admit a stream from its handler (its peer appended to ``admitted_peer``), or refuse it as :meth:`_refuse`
        does (counted, logged, pushback; raises). Nothing to do for other calls (``admitted_peer`` None): they were
        admitted in :meth:`intercept_service`."""
        if admitted_peer is None:
            return
        peer = _peer(context)
        message = self._admit_stream(peer)
        if message is None:
            admitted_peer.append(peer)
            return
        self.stats.error(rejected=True)
        log.warning(
            "rpc rejected",
            extra={
                "fields": {"method": method, "code": "RESOURCE_EXHAUSTED", "details": message, "peer": peer},
                "group": True,
            },
        )
        context.set_trailing_metadata(((RETRY_PUSHBACK_KEY, str(RETRY_PUSHBACK_MS)),))
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, message)

    def _limit_message(self, kind: str) -> str:
        n = self.limits[kind]
        if kind == "stream":
            return f"too many open camera streams (limit {n}, --max-streams); retry later"
        if kind == "unary":
            return f"server busy: {n} calls in progress (limit {n}, --max-concurrent); retry later"
        if kind == "watch":
            return f"too many health Watch streams (limit {n}); use Check"
        return f"too many reflection streams (limit {n})"

    def _refuse(
        self, handler: grpc.RpcMethodHandler, method: str, code: grpc.StatusCode, message: str
    ) -> grpc.RpcMethodHandler:
        self.stats.error(rejected=code == grpc.StatusCode.RESOURCE_EXHAUSTED)
        log.warning(
            "rpc rejected", extra={"fields": {"method": method, "code": code.name, "details": message}, "group": True}
        )
        return abort_handler(handler, code, message, ((RETRY_PUSHBACK_KEY, str(RETRY_PUSHBACK_MS)),))

    def _release_once(self, kind: str | None, peer: list[str] | None = None) -> Callable[[], None]:
        """Give back the call's slot once (a stream's: also its connection's, once ``peer`` holds the peer)."""
        done = [False]

        def release() -> None:
            if kind is None:
                return
            with self._cond:
                if done[0] or (peer is not None and not peer):  # (a stream not admitted holds nothing)
                    return
                done[0] = True
                self._active[kind] -= 1
                if peer:
                    left = self._peer_streams.get(peer[0], 0) - 1
                    if left > 0:
                        self._peer_streams[peer[0]] = left
                    else:
                        self._peer_streams.pop(peer[0], None)
                self._cond.notify_all()

        return release

    def _failed(self, method: str, context: grpc.ServicerContext, exc: Exception) -> None:
        """Count and log a call ending in an exception; an unexpected one becomes INTERNAL (raises)."""
        code = context.code()
        self.stats.error()
        if code is not None and code != grpc.StatusCode.OK:  # context.abort(): an intended status
            details = context.details()
            text = details.decode("utf-8", "replace") if isinstance(details, bytes) else str(details or "")
            level = logging.INFO if code in _CLIENT_CODES else logging.WARNING
            log.log(
                level,
                "rpc error",
                extra={
                    "fields": {"method": method, "code": code.name, "details": text, "peer": _peer(context)},
                    "group": True,
                },
            )
            return
        log.error(
            "unexpected error in handler; answered INTERNAL",
            exc_info=(type(exc), exc, exc.__traceback__),
            extra={
                "fields": {
                    "method": method,
                    "code": "INTERNAL",
                    "error_type": type(exc).__name__,
                    "peer": _peer(context),
                },
                "group": True,
            },
        )
        context.abort(grpc.StatusCode.INTERNAL, "internal server error; it is logged on the server")

    def _unary_request(
        self,
        requests: Any,
        context: grpc.ServicerContext,
        method: str,
        timeout: float,
        parse: Callable[[bytes], Any] | None,
        shares: list[int],
    ) -> Any:
        """The one request message of a unary-request call, read (within ``timeout``), budgeted and parsed."""
        raw = self._one_request(requests, context, method, timeout)
        if not self._reserve(len(raw), context, shares):
            del raw
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "server busy: too many large requests in flight (--max-inflight-mb); retry later",
            )
        try:
            return parse(raw) if parse is not None else raw
        except Exception:  # noqa: BLE001 - protobuf raises DecodeError and others
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"the request is not a valid {_message_name(parse)}")

    def _reserve(self, size: int, context: grpc.ServicerContext, shares: list[int]) -> bool:
        """A large request message's share of the in-flight budget (appended to ``shares``), waiting up to 2 s
        (or the call's deadline); False when the budget stayed full."""
        if self.inflight is None or size < 1 << 16:  # small messages are not worth the lock
            return True
        share = self.inflight.acquire(INFLIGHT_FACTOR * size, min(2.0, _remaining(context)))
        if share is None:
            return False
        shares.append(share)
        return True

    def _release_shares(self, shares: list[int]) -> None:
        if self.inflight is not None:
            for n in shares:
                self.inflight.release(n)

    def _request_timeout(self, kind: str | None) -> float:
        return HEALTH_REQUEST_TIMEOUT_S if kind in ("health", "watch") else self.request_timeout_s

    def _one_request(self, requests: Iterator[Any], context: grpc.ServicerContext, method: str, timeout: float) -> Any:
        """The single request message of a unary-request call, within ``timeout`` s (0 = no limit)."""
        timer = self._watchdog.arm(timeout, context.cancel) if timeout else None
        try:
            return next(requests)
        except StopIteration:
            if context.is_active():  # half-closed without a message
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "expected exactly one request message, got none")
            self.stats.error()  # gRPC answered already (INTERNAL: undecodable message; logged by grpc._common)
            raise _CallGone() from None
        except grpc.RpcError:
            if timer is not None and self._watchdog.disarm(timer):
                self.stats.error()
                log.warning(
                    "rpc error",
                    extra={
                        "fields": {
                            "method": method,
                            "code": "CANCELLED",
                            "peer": _peer(context),
                            "details": f"no request message within {timeout:g} s; call cancelled",
                        },
                        "group": True,
                    },
                )
            raise _CallGone() from None
        finally:
            if timer is not None:
                self._watchdog.disarm(timer)

    def _guard(self, handler: grpc.RpcMethodHandler, method: str, kind: str | None) -> grpc.RpcMethodHandler:
        admitted_peer: list[str] | None = [] if kind == "stream" else None  # a stream's peer, once admitted
        release = self._release_once(kind, admitted_peer)
        parse = handler.request_deserializer
        kw = {"request_deserializer": None, "response_serializer": handler.response_serializer}  # raw bytes in
        unary_request = not handler.request_streaming
        timeout = self._request_timeout(kind)

        def start(requests: Any, context: grpc.ServicerContext, shares: list[int]) -> Any:
            if not context.add_callback(release):  # the call ended already
                release()
            if unary_request:
                return self._unary_request(requests, context, method, timeout, parse, shares)
            return _ParsedRequests(requests, parse, context, self, method)

        if handler.response_streaming:
            inner_stream = handler.unary_stream or handler.stream_stream

            def streaming(requests: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                shares: list[int] = []
                self._admit_stream_call(context, method, admitted_peer)  # a camera stream: admitted here
                try:
                    yield from inner_stream(start(requests, context, shares), context)
                except _CallGone:
                    context.abort(grpc.StatusCode.CANCELLED, "call ended before its request was read")
                except Exception as e:
                    self._failed(method, context, e)
                    raise
                finally:
                    release()
                    self._release_shares(shares)

            return grpc.stream_stream_rpc_method_handler(streaming, **kw)
        inner = handler.unary_unary or handler.stream_unary

        def unary(requests: Any, context: grpc.ServicerContext) -> Any:
            shares: list[int] = []
            self._admit_stream_call(context, method, admitted_peer)  # (client-streaming: none is served today)
            try:
                return inner(start(requests, context, shares), context)
            except _CallGone:
                context.abort(grpc.StatusCode.CANCELLED, "call ended before its request was read")
            except Exception as e:
                self._failed(method, context, e)
                raise
            finally:
                release()
                self._release_shares(shares)

        return grpc.stream_unary_rpc_method_handler(unary, **kw)


def default_streams_per_peer(max_streams: int) -> int:
    """``--max-streams-per-connection`` by default: half of ``--max-streams``, rounded up (the rest is always
    left to other connections once there are at least 2 slots)."""
    return max(1, (max_streams + 1) // 2)


class _ParsedRequests:
    """A stream's request messages, parsed here; an undecodable one ends the stream with INVALID_ARGUMENT."""

    def __init__(
        self,
        raw: Iterator[Any],
        parse: Callable[[bytes], Any] | None,
        context: grpc.ServicerContext,
        admission: Admission,
        method: str,
    ) -> None:
        self._raw, self._parse, self._context, self._admission, self._method = raw, parse, context, admission, method

    def __iter__(self) -> _ParsedRequests:
        return self

    def __next__(self) -> Any:
        data = next(self._raw)
        if self._parse is None:
            return data
        try:
            return self._parse(data)
        except Exception:  # noqa: BLE001 - protobuf raises DecodeError and others
            message = f"a request message is not a valid {_message_name(self._parse)}; stream ended"
            self._context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
            self._context.set_details(message)
            self._admission.stats.error()
            log.info(
                "rpc error",
                extra={
                    "fields": {
                        "method": self._method,
                        "code": "INVALID_ARGUMENT",
                        "details": message,
                        "peer": _peer(self._context),
                    },
                    "group": True,
                },
            )
            raise StopIteration from None


def _remaining(context: grpc.ServicerContext) -> float:
    """Seconds left before the call's deadline (a huge number without one)."""
    try:
        left = context.time_remaining()
    except Exception:  # noqa: BLE001 - no deadline information
        return 10.0
    return 10.0 if left is None else max(0.0, left)


def _message_name(parse: Any) -> str:
    cls = getattr(parse, "__self__", None)
    descriptor = getattr(cls, "DESCRIPTOR", None)
    return f"{descriptor.full_name} message" if descriptor is not None else "request message"


def _peer(context: grpc.ServicerContext) -> str:
    try:
        return str(context.peer())
    except Exception:  # noqa: BLE001 - the peer is only informative
        return ""
