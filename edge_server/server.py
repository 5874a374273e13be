"""Building, starting and stopping the gRPC server (``make_server``) and the blocking ``serve``."""

from __future__ import annotations

import logging
import signal
import threading
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from edge_server.auth import BearerTokenInterceptor, check_bind_policy, is_loopback, server_credentials
from edge_server.model import ModelHolder, RunnerOptions
from edge_server.servicer import ClassifierServicer
from edge_server.stats import ServerStats
from edge_server.watch import BundleWatcher
from edgetune.errors import ConfigError
from edgetune.preprocess import DEFAULT_MAX_PIXELS
from edgetune.v1 import classifier_pb2, classifier_pb2_grpc

log = logging.getLogger("edge_server.server")

SERVICE_NAME = classifier_pb2.DESCRIPTOR.services_by_name["Classifier"].full_name


@dataclass(frozen=True)
class ServerConfig:
    """Everything ``make_server`` needs; validated on construction."""

    bundle: str | Path
    host: str = "127.0.0.1"
    port: int = 50051
    backend: str = "auto"
    max_batch: int = 8
    max_wait_ms: float = 2.0
    batch_wait: str = "adaptive"
    intra_op_threads: int = 0
    precision: str = "fp16"
    token: str | None = None
    tls_cert: str | Path | None = None
    tls_key: str | Path | None = None
    tls_client_ca: str | Path | None = None
    insecure: bool = False
    max_message_mb: float = 16.0
    max_concurrent: int = 64
    max_pixels: int = DEFAULT_MAX_PIXELS
    watch: bool = False
    watch_interval_s: float = 2.0
    grace_s: float = 10.0

    def __post_init__(self) -> None:
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
        check_bind_policy(self.host, tls=self.tls_cert is not None, insecure=self.insecure)


class EdgeServer:
    """A configured server: ``start()``, ``port``, ``stop(grace)``, ``wait_for_termination()``."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.stats = ServerStats()
        creds = server_credentials(config.tls_cert, config.tls_key, config.tls_client_ca)
        options = RunnerOptions(backend=config.backend, max_batch=config.max_batch, max_wait_ms=config.max_wait_ms,
                                batch_wait=config.batch_wait, intra_op_threads=config.intra_op_threads, precision=config.precision)
        interceptors = [BearerTokenInterceptor(config.token)] if config.token else []
        self.holder = ModelHolder(config.bundle, options, on_batch=self.stats.batch_done)
        try:
            max_bytes = int(config.max_message_mb * 1024 * 1024)
            # Threads: every RPC (incl. long-lived streams) holds one; the concurrency limit answers
            # RESOURCE_EXHAUSTED beyond max_concurrent, so the pool never starves.
            self._grpc = grpc.server(
                futures.ThreadPoolExecutor(max_workers=config.max_concurrent + 4, thread_name_prefix="edge-rpc"),
                interceptors=interceptors,
                options=[("grpc.max_receive_message_length", max_bytes),
                         ("grpc.max_send_message_length", max_bytes),
                         ("grpc.so_reuseport", 0)],
                maximum_concurrent_rpcs=config.max_concurrent,
            )
            self.servicer = ClassifierServicer(self.holder, self.stats, max_pixels=config.max_pixels,
                                               allow_load_model=bool(config.token) or is_loopback(config.host))
            classifier_pb2_grpc.add_ClassifierServicer_to_server(self.servicer, self._grpc)
            self.health = health.HealthServicer()
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self._grpc)
            reflection.enable_server_reflection(
                (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
                self._grpc)
            address = f"[{config.host}]:{config.port}" if ":" in config.host else f"{config.host}:{config.port}"
            try:
                self.port = (self._grpc.add_secure_port(address, creds) if creds is not None
                             else self._grpc.add_insecure_port(address))
            except RuntimeError as e:
                raise ConfigError(f"cannot listen on {address}: {e}") from None
            if self.port == 0:
                raise ConfigError(f"cannot listen on {address} (address in use or not available)")
        except BaseException:
            self.holder.close()
            raise
        self.tls = creds is not None
        self.watcher = BundleWatcher(self.holder, config.bundle, config.watch_interval_s) if config.watch else None
        self._stopped = threading.Event()
        self._stop_lock = threading.Lock()

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
        log.info("serving", extra={"fields": {
            "address": self.address, "port": self.port, "tls": self.tls, "mtls": self.config.tls_client_ca is not None,
            "token": bool(self.config.token), "backend": m.runner.name, "precision": m.runner.precision,
            "model_version": m.version, "bundle": str(m.bundle.path), "max_batch": m.batcher.max_batch,
            "max_wait_ms": self.config.max_wait_ms,
            "batch_wait": self.config.batch_wait, "max_concurrent": self.config.max_concurrent,
            "watch": self.config.watch}})
        return self

    def stop(self, grace: float | None = None) -> None:
        """Graceful stop: health NOT_SERVING, refuse new RPCs, let in-flight ones finish (up to ``grace`` s)."""
        with self._stop_lock:
            if self._stopped.is_set():
                return
            grace = self.config.grace_s if grace is None else grace
            log.info("stopping", extra={"fields": {"grace_s": grace}})
            self.health.enter_graceful_shutdown()
            if self.watcher is not None:
                self.watcher.stop()
            self._grpc.stop(grace).wait()
            self.holder.close()
            self._stopped.set()
            log.info("stopped", extra={"fields": self.stats.snapshot() | {"cameras": len(self.stats.cameras)}})

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        return self._stopped.wait(timeout)

    def __enter__(self) -> EdgeServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop(grace=1.0)


def make_server(config: ServerConfig | None = None, **kwargs: Any) -> EdgeServer:
    """Build (not start) a server; pass a :class:`ServerConfig` or its fields as keywords."""
    if config is None:
        config = ServerConfig(**kwargs)
    elif kwargs:
        raise ConfigError("pass either a ServerConfig or keyword fields, not both")
    return EdgeServer(config)


def serve(config: ServerConfig) -> int:
    """Serve in the foreground until SIGINT/SIGTERM; then drain and return 0."""
    server = make_server(config).start()
    stop_requested = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("signal received", extra={"fields": {"signal": signal.Signals(signum).name}})
        stop_requested.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop_requested.wait(0.5):
            pass
        server.stop()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    return 0
