"""Building, starting and stopping the gRPC server (``make_server``) and the blocking ``serve``.

Safe defaults against hostile clients (issue 11): unary calls and camera streams have separate limits
(``max_concurrent``, ``max_streams``, and ``max_streams_per_connection`` for what one client connection may
hold) enforced by :class:`~edge_server.admission.Admission`, health
checks are never limited, idle streams are closed after ``stream_idle_s``, connections are kept alive
and recycled by gRPC's keepalive / max-connection-idle / max-connection-age settings, images are checked
from their header and decoded within a memory budget, per-camera statistics are bounded, and
``LoadModel`` is off unless enabled with an admin token and a model root.

Drain (SIGTERM / ``stop``): health turns NOT_SERVING and keeps answering, new calls get UNAVAILABLE,
in-flight calls finish and streams end after the frame they hold (up to ``grace_s``), then gRPC stops.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from concurrent import futures
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from edge_server.admission import Admission, default_streams_per_peer
from edge_server.auth import (
    MIN_ADMIN_TOKEN_CHARS,
    BearerTokenInterceptor,
    LoadModelPolicy,
    check_bind_policy,
    server_credentials,
)
from edge_server.budget import ByteBudget, request_memory_bound_mb
from edge_server.capture import Capture, CaptureConfig
from edge_server.logs import add_secret
from edge_server.model import ModelHolder, RunnerOptions
from edge_server.profiles import SERVER_PROFILES
from edge_server.servicer import ClassifierServicer
from edge_server.stats import DEFAULT_CAMERA_IDLE_S, DEFAULT_MAX_CAMERAS, ServerStats
from edge_server.watch import BundleWatcher
from edgetune.errors import ConfigError
from edgetune.v1 import classifier_pb2, classifier_pb2_grpc

log = logging.getLogger("edge_server.server")

SERVICE_NAME = classifier_pb2.DESCRIPTOR.services_by_name["Classifier"].full_name
#: The server's default decoded-image limit (16 MP, e.g. 4096x4096): well above camera frames, and a
#: bounded decode (the shared preprocessing's own default, 64 MP, is for training data on big machines).
DEFAULT_SERVER_MAX_PIXELS = 16 * 1024 * 1024
_DEFAULTS = SERVER_PROFILES["default"]
#: Server threads kept free for health checks and refusals, beyond what admitted calls can hold.
_THREAD_RESERVE = 16


def _positive(name: str, value: object, allow_zero: bool = False) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{name} must be {'>= 0' if allow_zero else '> 0'} seconds, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class ServerConfig(RunnerOptions):
    """Everything ``make_server`` needs (keyword fields); validated on construction.

    The runner and batcher fields (``backend``, ``max_batch``, ``max_wait_ms``, ``batch_wait``,
    ``intra_op_threads``, ``precision``) are :class:`~edge_server.model.RunnerOptions`'s, declared and
    validated there; :meth:`runner_options` gives them to the model holder.
    """

    bundle: str | Path
    host: str = "127.0.0.1"
    port: int = 50051
    token: str | None = None
    tls_cert: str | Path | None = None
    tls_key: str | Path | None = None
    tls_client_ca: str | Path | None = None
    insecure: bool = False
    max_message_mb: float = _DEFAULTS["max_message_mb"]
    max_concurrent: int = _DEFAULTS["max_concurrent"]
    max_pixels: int = DEFAULT_SERVER_MAX_PIXELS
    watch: bool = False
    watch_interval_s: float = 2.0
    grace_s: float = 10.0
    #: camera streams open at once (their own limit: unary calls and health are never starved by them)
    max_streams: int = _DEFAULTS["max_streams"]
    #: camera streams one client connection may hold at once (None: half of max_streams, rounded up), so one
    #: connection never holds the slots other cameras need
    max_streams_per_connection: int | None = None
    #: a stream that sends no frame for this long is closed, a unary call whose request message does not
    #: arrive within it is cancelled (0 = never)
    stream_idle_s: float = 30.0
    #: LoadModel: off unless enabled; needs its own admin token and a model root
    load_model: bool = False
    admin_token: str | None = None
    model_root: str | Path | None = None
    max_cameras: int = DEFAULT_MAX_CAMERAS
    camera_idle_s: float = DEFAULT_CAMERA_IDLE_S
    max_decode_mb: float = _DEFAULTS["max_decode_mb"]
    #: admitted request messages held at once (each budgeted at twice its size); beyond it a large request waits
    #: up to 2 s, then RESOURCE_EXHAUSTED (a camera frame: an error result)
    max_inflight_mb: float = _DEFAULTS["max_inflight_mb"]
    #: gRPC keepalive: the server pings idle connections every keepalive_s and drops them after no answer
    keepalive_s: float = 30.0
    keepalive_timeout_s: float = 10.0
    #: connections without calls are closed after this long; any connection gets GOAWAY after
    #: max_connection_age_s (open streams on it continue; new calls reconnect). 0 = never.
    max_connection_idle_s: float = 600.0
    max_connection_age_s: float = 1800.0
    #: --capture DIR: keep unsure and randomly sampled frames for labelling (harvest RPCs need admin_token)
    capture: CaptureConfig | None = None

    def __post_init__(self) -> None:  # noqa: C901
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be an integer in 0..65535 (0 = pick a free one), got {self.port!r}")
        if not isinstance(self.max_message_mb, (int, float)) or not 0 < self.max_message_mb <= 1024:
            raise ConfigError(f"max_message_mb must be in (0, 1024], got {self.max_message_mb!r}")
        if not isinstance(self.max_concurrent, int) or not 1 <= self.max_concurrent <= 10_000:
            raise ConfigError(f"max_concurrent must be an integer in 1..10000, got {self.max_concurrent!r}")
        if not isinstance(self.max_pixels, int) or self.max_pixels < 64:
            raise ConfigError(f"max_pixels must be an integer >= 64, got {self.max_pixels!r}")
        if not isinstance(self.grace_s, (int, float)) or self.grace_s < 0:
            raise ConfigError(f"grace_s must be >= 0 seconds, got {self.grace_s!r}")
        if not isinstance(self.watch_interval_s, (int, float)) or self.watch_interval_s <= 0:
            raise ConfigError(f"watch_interval_s must be > 0 seconds, got {self.watch_interval_s!r}")
        if not isinstance(self.max_streams, int) or not 1 <= self.max_streams <= 10_000:
            raise ConfigError(f"max_streams must be an integer in 1..10000, got {self.max_streams!r}")
        per = self.max_streams_per_connection
        if per is not None and (not isinstance(per, int) or isinstance(per, bool) or not 1 <= per <= self.max_streams):
            raise ConfigError(
                f"max_streams_per_connection must be an integer in 1..max_streams ({self.max_streams}), "
                f"or None for half of max_streams; got {per!r}"
            )
        _positive("stream_idle_s", self.stream_idle_s, allow_zero=True)
        _positive("keepalive_s", self.keepalive_s)
        _positive("keepalive_timeout_s", self.keepalive_timeout_s)
        _positive("max_connection_idle_s", self.max_connection_idle_s, allow_zero=True)
        _positive("max_connection_age_s", self.max_connection_age_s, allow_zero=True)
        if not isinstance(self.max_decode_mb, (int, float)) or not 1 <= self.max_decode_mb <= 1 << 20:
            raise ConfigError(f"max_decode_mb must be in [1, 1048576], got {self.max_decode_mb!r}")
        if not isinstance(self.max_inflight_mb, (int, float)) or not 1 <= self.max_inflight_mb <= 1 << 20:
            raise ConfigError(f"max_inflight_mb must be in [1, 1048576], got {self.max_inflight_mb!r}")
        if self.load_model:
            if not self.admin_token:
                raise ConfigError("LoadModel needs an admin token: --admin-token-file FILE or EDGETUNE_ADMIN_TOKEN")
            if self.model_root is None or not Path(self.model_root).is_dir():
                raise ConfigError(f"LoadModel needs a model root directory (--model-root), got {self.model_root!r}")
            if self.token and self.admin_token == self.token:
                raise ConfigError("the admin token must differ from the camera token")
            LoadModelPolicy(self.admin_token, self.model_root)  # validates the token
        if self.capture is not None and not isinstance(self.capture, CaptureConfig):
            raise ConfigError(f"capture must be a CaptureConfig or None, got {type(self.capture).__name__}")
        if self.capture is not None and self.admin_token:
            if len(self.admin_token) < MIN_ADMIN_TOKEN_CHARS or any(c.isspace() for c in self.admin_token):
                raise ConfigError(
                    f"the admin token must be at least {MIN_ADMIN_TOKEN_CHARS} characters without whitespace"
                )
            if self.admin_token == self.token:
                raise ConfigError("the admin token must differ from the camera token")
        check_bind_policy(self.host, tls=self.tls_cert is not None, insecure=self.insecure)
        super().__post_init__()

    def streams_per_connection(self) -> int:
        """Camera streams one client connection may hold at once (``max_streams_per_connection`` resolved)."""
        if self.max_streams_per_connection is not None:
            return self.max_streams_per_connection
        return default_streams_per_peer(self.max_streams)

    def request_memory_bound_mb(self) -> float:
        """The most memory requests can hold at once (:func:`edge_server.budget.request_memory_bound_mb`)."""
        return request_memory_bound_mb(
            self.max_message_mb, self.max_concurrent, self.max_streams, self.max_inflight_mb, self.max_decode_mb
        )

    def runner_options(self) -> RunnerOptions:
        """The :class:`RunnerOptions` part of this config (what each (re)loaded bundle is served with)."""
        return RunnerOptions(**{f.name: getattr(self, f.name) for f in fields(RunnerOptions)})


class EdgeServer:
    """A configured server: ``start()``, ``port``, ``stop(grace)``, ``wait_for_termination()``."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        add_secret(config.token)
        add_secret(config.admin_token)
        self.stats = ServerStats(max_cameras=config.max_cameras, camera_idle_s=config.camera_idle_s)
        creds = server_credentials(config.tls_cert, config.tls_key, config.tls_client_ca)
        policy = (
            LoadModelPolicy(config.admin_token, config.model_root)
            if config.load_model and config.admin_token and config.model_root is not None
            else None
        )
        self.inflight = ByteBudget(int(config.max_inflight_mb * 1024 * 1024), "the in-flight budget")
        self.admission = Admission(
            self.stats,
            max_unary=config.max_concurrent,
            max_streams=config.max_streams,
            request_timeout_s=config.stream_idle_s,
            inflight=self.inflight,
            max_streams_per_peer=config.streams_per_connection(),
        )
        # The admission guard is outermost: it also sees (and counts, and logs) the token check's refusals.
        interceptors: list[grpc.ServerInterceptor] = [self.admission]
        if config.token:
            interceptors.append(BearerTokenInterceptor(config.token))
        try:
            self.holder = ModelHolder(config.bundle, config.runner_options(), on_batch=self.stats.batch_done)
        except BaseException:
            self.admission.close()
            raise
        self.capture = Capture(config.capture) if config.capture is not None else None
        try:
            max_bytes = int(config.max_message_mb * 1024 * 1024)
            self.grpc_options = grpc_server_options(config, max_bytes)
            # Threads: every admitted call holds one; Admission bounds each kind, and the reserve keeps
            # threads free for health checks and refusals, so the pool never starves. No gRPC-level
            # maximum_concurrent_rpcs: it would refuse health checks too.
            self._grpc = grpc.server(
                futures.ThreadPoolExecutor(
                    max_workers=self.admission.threads_needed + _THREAD_RESERVE, thread_name_prefix="edge-rpc"
                ),
                interceptors=interceptors,
                options=self.grpc_options,
            )
            self._add_services(config, policy)
            self.port = self._listen(config, creds)
        except BaseException:
            self.holder.close()
            self.admission.close()
            if self.capture is not None:
                self.capture.close()
            raise
        self.tls = creds is not None
        self.watcher = BundleWatcher(self.holder, config.bundle, config.watch_interval_s) if config.watch else None
        self._stopped = threading.Event()
        self._stop_lock = threading.Lock()

    def _add_services(self, config: ServerConfig, policy: LoadModelPolicy | None) -> None:
        """The classifier, gRPC health and reflection services on the server."""
        self.servicer = ClassifierServicer(
            self.holder,
            self.stats,
            max_pixels=config.max_pixels,
            load_model=policy,
            stream_idle_s=config.stream_idle_s,
            draining=self.admission.draining,
            decode_budget=ByteBudget(int(config.max_decode_mb * 1024 * 1024), "the decode budget"),
            inflight=self.inflight,
            capture=self.capture,
            admin_token=config.admin_token if self.capture is not None else None,
        )
        classifier_pb2_grpc.add_ClassifierServicer_to_server(self.servicer, self._grpc)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._grpc)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self._grpc,
        )

    def _listen(self, config: ServerConfig, creds: grpc.ServerCredentials | None) -> int:
        """Bind the configured address (TLS where credentials are given); returns the port (ConfigError if not)."""
        address = f"[{config.host}]:{config.port}" if ":" in config.host else f"{config.host}:{config.port}"
        try:
            port = (
                self._grpc.add_secure_port(address, creds)
                if creds is not None
                else self._grpc.add_insecure_port(address)
            )
        except RuntimeError as e:
            raise ConfigError(f"cannot listen on {address}: {e}") from None
        if port == 0:
            raise ConfigError(f"cannot listen on {address} (address in use or not available)")
        return port

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    def start(self) -> EdgeServer:
        self._grpc.start()
        for svc in ("", SERVICE_NAME):
            self.health.set(svc, health_pb2.HealthCheckResponse.SERVING)
        if self.watcher is not None:
            self.watcher.start()
        m = self.holder.current
        log.info(
            "serving",
            extra={
                "fields": {
                    "address": self.address,
                    "port": self.port,
                    "tls": self.tls,
                    "mtls": self.config.tls_client_ca is not None,
                    "token": bool(self.config.token),
                    "backend": m.runner.name,
                    "precision": m.runner.precision,
                    "model_version": m.version,
                    "bundle": str(m.bundle.path),
                    "max_batch": m.batcher.max_batch,
                    "max_wait_ms": self.config.max_wait_ms,
                    "batch_wait": self.config.batch_wait,
                    "max_concurrent": self.config.max_concurrent,
                    "max_streams": self.config.max_streams,
                    "stream_idle_s": self.config.stream_idle_s,
                    "max_streams_per_connection": self.config.streams_per_connection(),
                    "max_pixels": self.config.max_pixels,
                    "load_model": self.servicer.load_model is not None,
                    "max_message_mb": self.config.max_message_mb,
                    "max_inflight_mb": self.config.max_inflight_mb,
                    "max_decode_mb": self.config.max_decode_mb,
                    "request_memory_bound_mb": round(self.config.request_memory_bound_mb()),
                    "model_root": str(self.servicer.load_model.root) if self.servicer.load_model else None,
                    "watch": self.config.watch,
                    "capture": str(self.capture.spool.folder) if self.capture else None,
                    "harvest": bool(self.capture and self.config.admin_token),
                }
            },
        )
        return self

    def stop(self, grace: float | None = None) -> None:
        """Graceful stop: health NOT_SERVING (still answered), new calls refused with UNAVAILABLE, in-flight
        calls finish and streams end after their current frame (up to ``grace`` s), then gRPC stops."""
        with self._stop_lock:
            if self._stopped.is_set():
                return
            grace = self.config.grace_s if grace is None else grace
            log.info("stopping", extra={"fields": {"grace_s": grace}})
            t0 = time.monotonic()
            self.health.enter_graceful_shutdown()
            self.admission.start_draining()
            if self.watcher is not None:
                self.watcher.stop()
            drained = False
            while True:  # a stream whose peer stopped reading cannot finish its frame: cancel it after 1 s
                drained = self.admission.wait_idle(min(0.5, max(0.0, t0 + grace - time.monotonic())))
                if drained or time.monotonic() - t0 >= grace:
                    break
                self.servicer.cancel_stuck_sends(1.0)
            # every handler has finished when drained: gRPC gets 1 s to write what they answered (a peer that does
            # not read would otherwise hold the stop for the whole grace period)
            left = max(0.0, grace - (time.monotonic() - t0))
            self._grpc.stop(min(left, 1.0) if drained else left).wait()
            self.holder.close()
            self.admission.close()
            if self.capture is not None:
                self.capture.close()  # writes what is queued, then stops its thread
            self._stopped.set()
            snap = self.stats.snapshot()
            snap["cameras"] = len(snap["cameras"])
            log.info("stopped", extra={"fields": snap | {"drained": drained}})

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        return self._stopped.wait(timeout)

    def __enter__(self) -> EdgeServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop(grace=1.0)


def grpc_server_options(config: ServerConfig, max_bytes: int) -> list[tuple[str, Any]]:
    """gRPC channel arguments of the server: message limits, keepalive and connection lifetime."""
    ms = lambda s: int(s * 1000)  # noqa: E731
    opts: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", max_bytes),
        ("grpc.max_send_message_length", max_bytes),
        ("grpc.so_reuseport", 0),
        # requests must not be compressed (images are compressed already): a gzip'ed 15.5 MB message is 16 KB on the
        # wire, so compression let a client make the server inflate and hold far more than it sends. gRPC answers
        # such a call UNIMPLEMENTED before decompressing it. (Responses are not compressed either.)
        ("grpc.compression_enabled_algorithms_bitset", 1),
        # HTTP/2 streams per connection (each call is one): bounds what one connection can queue, and stays above
        # everything the limits admit (a client's connection is shared by all its channels to this server), so
        # health checks on a busy connection are not refused by HTTP/2 itself
        ("grpc.max_concurrent_streams", config.max_streams + config.max_concurrent + _THREAD_RESERVE + 64),
        # the server pings connections to find dead peers (half-open TCP from a camera that lost power)
        ("grpc.keepalive_time_ms", ms(config.keepalive_s)),
        ("grpc.keepalive_timeout_ms", ms(config.keepalive_timeout_s)),
        # clients may ping (the camera client does every 10 s, also between calls), but not more than every 5 s
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 5000),
        ("grpc.http2.max_ping_strikes", 2),
    ]
    if config.max_connection_idle_s:
        opts.append(("grpc.max_connection_idle_ms", ms(config.max_connection_idle_s)))
    if config.max_connection_age_s:
        opts.append(("grpc.max_connection_age_ms", ms(config.max_connection_age_s)))
    return opts


def make_server(config: ServerConfig | None = None, **kwargs: Any) -> EdgeServer:
    """Build (not start) a server; pass a :class:`ServerConfig` or its fields as keywords."""
    if config is None:
        config = ServerConfig(**kwargs)
    elif kwargs:
        raise ConfigError("pass either a ServerConfig or keyword fields, not both")
    return EdgeServer(config)


def serve(config: ServerConfig) -> int:
    """Serve in the foreground until SIGINT, SIGTERM or SIGHUP; then drain and return 0."""
    server = make_server(config).start()
    stop_requested = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("signal received", extra={"fields": {"signal": signal.Signals(signum).name}})
        stop_requested.set()

    # SIGHUP (a closed terminal, `systemctl kill -s HUP`, a supervisor's reload) drains like SIGTERM: the bundle
    # is reloaded by --watch or LoadModel, not by a signal
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        while not stop_requested.wait(0.5):
            pass
        server.stop()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    return 0
