"""Transport security: bind-address policy, TLS / mTLS credentials, the camera bearer token, token files,
and the admin policy of ``LoadModel`` (its own credential and a model root every path must stay in)."""

from __future__ import annotations

import hmac
import ipaddress
import logging
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from edge_server.admission import abort_handler
from edgetune.errors import ConfigError, EdgetuneError

log = logging.getLogger("edge_server.auth")

#: Metadata key carrying the admin token of ``LoadModel`` (separate from the cameras' bearer token).
ADMIN_METADATA_KEY = "x-edgetune-admin-token"
MIN_ADMIN_TOKEN_CHARS = 16
_PATH_MAX = 4096

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


def server_credentials(
    cert: str | Path | None, key: str | Path | None, client_ca: str | Path | None = None
) -> grpc.ServerCredentials | None:
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
            return abort_handler(
                handler, grpc.StatusCode.UNAUTHENTICATED, "missing metadata 'authorization: Bearer <token>'"
            )
        if not hmac.compare_digest(got.encode(), self._expected):
            return abort_handler(handler, grpc.StatusCode.UNAUTHENTICATED, "invalid bearer token")
        return handler


def read_token_file(path: str | Path, what: str = "token") -> str:
    """The token in ``path`` (surrounding whitespace stripped); warns when other users can read the file."""
    p = Path(path)
    try:
        st = p.stat()
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read the {what} file {p}: {getattr(e, 'strerror', None) or e}") from None
    token = text.strip()
    if not token:
        raise ConfigError(f"the {what} file {p} is empty")
    if st.st_mode & (stat.S_IRGRP | stat.S_IROTH | stat.S_IWGRP | stat.S_IWOTH):
        log.warning(
            f"the {what} file is readable by other users; chmod 600 it",
            extra={"fields": {"file": str(p), "mode": oct(stat.S_IMODE(st.st_mode))}},
        )
    return token


def admin_authorized(context: grpc.ServicerContext, expected: str | bytes) -> bool:
    """Whether the call carries the admin token (metadata :data:`ADMIN_METADATA_KEY`), compared in constant time."""
    want = expected.encode() if isinstance(expected, str) else expected
    got = b""
    for k, v in context.invocation_metadata() or ():
        if k == ADMIN_METADATA_KEY:
            got = v.encode() if isinstance(v, str) else bytes(v)
    return bool(got) and bool(want) and hmac.compare_digest(got, want)


class InvalidBundlePath(EdgetuneError, ValueError):
    """A LoadModel path that is not inside the model root (reported as INVALID_ARGUMENT)."""


class LoadModelPolicy:
    """``LoadModel`` as an admin operation: its own token (metadata :data:`ADMIN_METADATA_KEY`) and a model
    root that every requested path must resolve into (relative paths are taken relative to it)."""

    def __init__(self, admin_token: str, model_root: str | Path) -> None:
        if (
            not isinstance(admin_token, str)
            or len(admin_token) < MIN_ADMIN_TOKEN_CHARS
            or any(c.isspace() for c in admin_token)
        ):
            raise ConfigError(f"the admin token must be at least {MIN_ADMIN_TOKEN_CHARS} characters without whitespace")
        root = Path(model_root)
        if not root.is_dir():
            raise ConfigError(f"the model root {model_root} is not a directory (--model-root)")
        self.root = root.resolve()
        self._expected = admin_token.encode()

    def authorized(self, context: grpc.ServicerContext) -> bool:
        return admin_authorized(context, self._expected)

    def resolve(self, bundle_path: str) -> Path:
        """The bundle directory ``bundle_path`` names, resolved inside the model root; raises
        :class:`InvalidBundlePath` with the same words for every path outside it (existing or not)."""
        outside = InvalidBundlePath(
            f"bundle_path {bundle_path!r} is not inside the model root (paths are resolved against the model "
            "root, symlinks included, and must stay inside it)"
        )
        if not bundle_path or "\0" in bundle_path or len(bundle_path) > _PATH_MAX:
            raise outside
        try:
            target = (self.root / bundle_path).resolve()
        except (OSError, RuntimeError):
            raise outside from None
        if not target.is_relative_to(self.root):
            raise outside
        return target
