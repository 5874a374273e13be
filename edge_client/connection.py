"""gRPC channel of the client: address parsing, TLS / mTLS, bearer token, and one-line
descriptions of RPC failures (which ones are worth retrying)."""

from __future__ import annotations

import re
import threading
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from edgetune.errors import ConfigError, EdgetuneError

#: Messages up to this size are accepted (a 4K JPEG frame is well below).
MAX_MESSAGE_BYTES = 32 * 1024 * 1024


class ClientError(EdgetuneError):
    """An expected failure of the client (server unreachable, TLS/auth rejected): one line, no traceback."""


@dataclass(frozen=True)
class ConnectionOptions:
    """Where and how to connect.

    Attributes:
        server: ``host:port`` (IPv6 as ``[addr]:port``).
        tls_ca: PEM file of the CA that signed the server certificate; enables TLS.
        tls_cert, tls_key: PEM client certificate and key for mutual TLS (both or neither; need TLS).
        tls_server_name: name to check in the server certificate instead of ``host``.
        tls: use TLS with the system's root CAs (implied by ``tls_ca``).
        token: bearer token sent as ``authorization: Bearer <token>`` metadata on every call.
    """

    server: str
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_server_name: str | None = None
    tls: bool = False
    token: str | None = None

    def __post_init__(self) -> None:
        parse_address(self.server)
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("mutual TLS needs both --tls-cert and --tls-key (got only one)")
        for name in ("tls_ca", "tls_cert", "tls_key"):
            val = getattr(self, name)
            if val is not None and not Path(val).is_file():
                raise ConfigError(f"--{name.replace('_', '-')} {val}: no such file")
        if self.token is not None and (not self.token or any(c.isspace() for c in self.token)):
            raise ConfigError("--token must be a non-empty string without whitespace")

    @property
    def secure(self) -> bool:
        return bool(self.tls or self.tls_ca or self.tls_cert)

    def metadata(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.token}")] if self.token else []


def parse_address(server: str) -> tuple[str, int]:
    """``host:port`` → (host, port); raises :class:`ConfigError` saying what is allowed."""
    m = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})", server or "")
    if not m or not 1 <= int(m.group(2)) <= 65535:
        raise ConfigError(f"--server must be host:port with a port in 1..65535 (e.g. 127.0.0.1:50051), got {server!r}")
    return m.group(1), int(m.group(2))


def _read(path: str | None) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None


#: What grpcio's connectivity poller raises when its channel is closed between two of its polls.
_GRPC_CLOSE_RACE = "Cannot monitor channel state: Channel closed"
_hook_lock = threading.Lock()
_hook_installed = False


def quiet_grpc_close_race() -> None:
    """Drop one harmless thread traceback: a channel with a connectivity subscription (:func:`watch_connected`)
    that is closed while grpcio's poller thread is between two polls (``grpc._channel._poll_connectivity``)
    makes that thread raise ``ValueError: Cannot monitor channel state: Channel closed!``, which Python printed
    on stderr (in about 1 of 10 runs of a client that gave up on a closed port). The channel was closed on
    purpose; every other thread exception goes to the previous ``threading.excepthook``. Idempotent."""
    global _hook_installed
    with _hook_lock:
        if _hook_installed:
            return
        previous = threading.excepthook

        def hook(args: Any) -> None:
            if (
                args.exc_type is ValueError
                and _GRPC_CLOSE_RACE in str(args.exc_value)
                and any(f.name == "_poll_connectivity" for f in traceback.extract_tb(args.exc_traceback))
            ):
                return
            previous(args)

        threading.excepthook = hook
        _hook_installed = True


def make_channel(opts: ConnectionOptions, connect_timeout: float = 3.0) -> grpc.Channel:
    """A new channel (connects lazily). Reconnection pacing is ours, so gRPC's own is kept short; one connection
    attempt (TCP connect, TLS and the HTTP/2 handshake) may take ``connect_timeout`` seconds. gRPC reads its
    minimum connect timeout from ``grpc.min_reconnect_backoff_ms``: at 100 ms (the pacing), a loaded machine or
    a busy server cut every attempt off mid-handshake (``tcp handshaker shutdown``, ``connection attempt timed
    out before receiving SETTINGS frame``)."""
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", max(100, int(connect_timeout * 1000))),  # = the minimum connect timeout
        ("grpc.max_reconnect_backoff_ms", 1000),
        ("grpc.keepalive_time_ms", 10_000),
        ("grpc.keepalive_timeout_ms", 5_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # a connection of its own per channel, i.e. per camera (grpcio otherwise shares one among equal channels):
        # the server lets one connection hold only its share of the stream slots (--max-streams-per-connection)
        ("grpc.use_local_subchannel_pool", 1),
    ]
    if not opts.secure:
        return grpc.insecure_channel(opts.server, options=options)
    if opts.tls_server_name:
        options.append(("grpc.ssl_target_name_override", opts.tls_server_name))
    creds = grpc.ssl_channel_credentials(
        root_certificates=_read(opts.tls_ca),
        private_key=_read(opts.tls_key),
        certificate_chain=_read(opts.tls_cert),
    )
    return grpc.secure_channel(opts.server, creds, options=options)


_TLS_HINTS = ("ssl", "tls", "handshake", "certificate", "x509", "tsi_")
#: gRPC's words for a connection attempt its deadline cut off before the handshake finished (not a TLS failure:
#: the TCP handshaker is shut down by the deadline on plain channels too)
_CUT_OFF_HINTS = ("handshaker shutdown", "connection attempt timed out", "timed out before receiving settings")
_RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,  # the server cancels open streams when it stops
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.INTERNAL,  # e.g. RST_STREAM while the server goes down
    grpc.StatusCode.UNKNOWN,
}


def _details(err: grpc.RpcError) -> str:
    details = getattr(err, "details", None)
    text = details() if callable(details) else str(err)
    return " ".join(str(text or "").split())


def _code(err: grpc.RpcError) -> grpc.StatusCode | None:
    code = getattr(err, "code", None)
    return code() if callable(code) else None


def retry_pushback_ms(err: grpc.RpcError) -> int | None:
    """The server's ``grpc-retry-pushback-ms`` trailer (a refused call may be retried after it), if any."""
    trailing = getattr(err, "trailing_metadata", None)
    try:
        for k, v in (trailing() if callable(trailing) else None) or ():
            if k == "grpc-retry-pushback-ms":
                ms = int(v)
                return ms if ms >= 0 else None
    except (TypeError, ValueError):
        return None
    return None


def watch_connected(channel: grpc.Channel) -> threading.Event:
    """An event set once ``channel`` is READY (its TCP, TLS and HTTP/2 handshakes finished): tells a deadline
    reached while connecting from one reached waiting for the server's answer."""
    ready = threading.Event()
    quiet_grpc_close_race()  # the subscription's poller may race the channel's close

    def on_state(state: grpc.ChannelConnectivity) -> None:
        if state == grpc.ChannelConnectivity.READY:
            ready.set()

    channel.subscribe(on_state, try_to_connect=False)
    return ready


def _deadline_message(
    code: grpc.StatusCode | None, details: str, where: str, deadline_s: float | None, connected: bool
) -> str | None:
    """What a deadline reached means, honestly: cut off while connecting (the handshake did not finish) or while
    waiting for the answer on a connected channel; None when the call did not end at a deadline."""
    within = f" within {deadline_s:g} s" if deadline_s else ""
    if any(h in details.lower() for h in _CUT_OFF_HINTS):
        return (
            f"deadline reached while connecting to {where}: the connection attempt was cut off before "
            f"its handshake finished{within} (server or machine slow or overloaded?) ({details})"
        )
    if code == grpc.StatusCode.DEADLINE_EXCEEDED and not connected:
        return (
            f"deadline reached while connecting to {where}: the connection or its handshake did not "
            f"finish{within} (server or machine slow or overloaded?) ({details})"
        )
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return (
            f"deadline reached waiting for {where} to answer: connected, but no answer{within} "
            f"(server slow or overloaded?) ({details})"
        )
    return None


def _unavailable_message(details: str, where: str, opts: ConnectionOptions, established: bool) -> str:
    """What UNAVAILABLE means here: refused, closed by a server that went away, closed during setup (TLS?), DNS."""
    low = details.lower()
    if "connection refused" in low:
        return f"cannot reach {where}: connection refused (is the server running on that port?)"
    if "socket closed" in low or "connection reset" in low:
        if established:
            return f"connection to {where} lost: the server closed it (stopped, killed or restarted?) ({details})"
        hint = (
            "if it requires TLS pass --tls-ca"
            if not opts.secure
            else "if it requires mutual TLS pass --tls-cert and --tls-key"
        )
        return f"cannot connect to {where}: it closed the connection during setup ({hint}) ({details})"
    if "dns" in low or "resolv" in low or "name or service" in low:
        return f"cannot resolve the host of {where}: {details}"
    return f"{where} unavailable: {details}"


def describe_rpc_error(
    err: grpc.RpcError,
    opts: ConnectionOptions,
    established: bool = False,
    deadline_s: float | None = None,
    connected: bool = False,
) -> tuple[bool, str]:
    """(retryable, one-line message) for a failed call; ``established``: a call on this server already
    succeeded, so a closed connection means the server went away, not a TLS mismatch during setup;
    ``deadline_s``: the call's deadline, named when it was reached; ``connected``: this call's channel finished
    its handshakes (:func:`watch_connected`), so a deadline was reached waiting for the answer."""
    code, details = _code(err), _details(err)
    low = details.lower()
    where = f"server {opts.server}"
    deadline = _deadline_message(code, details, where, deadline_s, connected)
    if deadline is not None:
        return True, deadline
    if any(h in low for h in _TLS_HINTS):
        if not opts.secure:
            return False, f"TLS failure talking to {where} without TLS: it may require TLS (use --tls-ca) ({details})"
        return False, (
            f"TLS handshake with {where} failed: check --tls-ca (CA of the server certificate), "
            f"--tls-cert/--tls-key for mutual TLS and --tls-server-name ({details})"
        )
    if code == grpc.StatusCode.UNAUTHENTICATED:
        hint = "no token given: pass --token" if not opts.token else "the token was rejected: check --token"
        return False, f"authentication failed at {where}: {hint} ({details})"
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return False, f"permission denied by {where}: {details}"
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return False, f"{where} does not serve edgetune.v1.Classifier (wrong port or program?): {details}"
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and retry_pushback_ms(err) is not None:
        return True, f"{where} is at its limit (RESOURCE_EXHAUSTED): {details}"
    if code in (
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.NOT_FOUND,
    ):
        name = code.name if code is not None else "ERROR"
        return False, f"{where} refused the request ({name}): {details}"
    if code == grpc.StatusCode.UNAVAILABLE:
        return True, _unavailable_message(details, where, opts, established)
    if code in _RETRYABLE:
        name = code.name if code is not None else "ERROR"
        return True, f"connection to {where} lost ({name}): {details}"
    name = code.name if code is not None else "ERROR"
    return False, f"call to {where} failed ({name}): {details}"
