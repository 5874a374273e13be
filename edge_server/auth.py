"""Transport security: bind-address policy, TLS / mTLS credentials and the bearer-token check."""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from edgetune.errors import ConfigError

#: Methods reachable without a token (load balancers and orchestrators probe health).
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)
LOOPBACK_NAMES = ("localhost",)


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind_policy(host: str, tls: bool, insecure: bool) -> None:
    """Listening beyond loopback needs TLS or an explicit ``--insecure``."""
    if not host:
        raise ConfigError("host must not be empty (use 127.0.0.1 for local only, 0.0.0.0 for all interfaces)")
    if not is_loopback(host) and not tls and not insecure:
        raise ConfigError(
            f"refusing to listen on {host!r} without TLS: pass --tls-cert/--tls-key (optionally --tls-client-ca for "
            "mutual TLS), or --insecure to accept plaintext on a trusted network"
        )


def _read(path: str | Path, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read {what} {path}: {e.strerror}") from None
    if b"-----BEGIN" not in data:
        raise ConfigError(f"{what} {path} is not PEM (no '-----BEGIN' line)")
    return data


def server_credentials(cert: str | Path | None, key: str | Path | None,
                       client_ca: str | Path | None = None) -> grpc.ServerCredentials | None:
    """TLS credentials, or None when neither cert nor key is given. ``client_ca`` turns on mTLS."""
    if cert is None and key is None:
        if client_ca is not None:
            raise ConfigError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if cert is None or key is None:
        raise ConfigError("TLS needs both --tls-cert and --tls-key")
    pair = (_read(key, "TLS key"), _read(cert, "TLS certificate"))
    root = _read(client_ca, "client CA") if client_ca is not None else None
    return grpc.ssl_server_credentials([pair], root_certificates=root, require_client_auth=root is not None)


def _abort_handler(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    def deny(_request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    kw = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(deny, **kw)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(deny, **kw)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(deny, **kw)
    return grpc.stream_stream_rpc_method_handler(deny, **kw)


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """Requires metadata ``authorization: Bearer <token>`` on every method but the health service."""

    def __init__(self, token: str) -> None:
        if not isinstance(token, str) or len(token) < 8 or any(c.isspace() for c in token):
            raise ConfigError("the bearer token must be at least 8 characters without whitespace")
        self._expected = f"Bearer {token}".encode()

    def intercept_service(self, continuation: Callable[[Any], Any], handler_call_details: Any) -> Any:
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(OPEN_METHOD_PREFIXES):
            return handler
        got = ""
        for k, v in handler_call_details.invocation_metadata or ():
            if k == "authorization":
                got = v if isinstance(v, str) else v.decode("latin-1")
        if not got:
            return _abort_handler(handler, "missing metadata 'authorization: Bearer <token>'")
        if not hmac.compare_digest(got.encode(), self._expected):
            return _abort_handler(handler, "invalid bearer token")
        return handler
