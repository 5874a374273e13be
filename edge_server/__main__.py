"""``python -m edge_server --bundle DIR [--port P] …`` (``make serve BUNDLE=… PORT=…``).

Secrets never need the command line (which every local user can read in the process table): the camera
token comes from ``--token-file`` or ``EDGETUNE_TOKEN`` (``--token`` still works, with a warning), the
admin token of LoadModel only from ``--admin-token-file`` or ``EDGETUNE_ADMIN_TOKEN``.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import logging
import os
import sys
import threading
import time

from edge_server.auth import read_token_file
from edge_server.capture import CaptureConfig
from edge_server.logs import LOG_LEVELS, NativeStderr, configure_logging
from edge_server.model import BATCH_WAITS
from edge_server.profiles import PROFILE_NAMES, SERVER_PROFILES, profile_limits
from edge_server.runners import BACKENDS
from edge_server.server import ServerConfig, serve
from edgetune.dataclass_cli import HelpFormatter, add_version
from edgetune.device import PRECISIONS
from edgetune.errors import ConfigError, EdgetuneError
from edgetune.runfile import add_run_file_flags, parse_args_with_run_file, run_file_yaml

log = logging.getLogger("edge_server.main")


def _profile_text(name: str) -> str:
    v = SERVER_PROFILES[name]
    return (
        f"--max-message-mb {v['max_message_mb']:g} --max-concurrent {v['max_concurrent']} --max-streams "
        f"{v['max_streams']} --max-inflight-mb {v['max_inflight_mb']:g} --max-decode-mb {v['max_decode_mb']:g}"
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m edge_server", description="edgetune gRPC inference server", formatter_class=HelpFormatter
    )
    p.add_argument("--bundle", required=True, help="bundle directory (model.onnx + bundle.json)")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="listen address (default 127.0.0.1; others need --tls-cert/--tls-key or --insecure)",
    )
    p.add_argument("--port", type=int, default=50051, help="TCP port (0 = pick a free one; logged)")
    p.add_argument("--backend", default="auto", choices=BACKENDS, help="inference backend (auto logs its choice)")
    p.add_argument(
        "--precision",
        default="fp16",
        choices=PRECISIONS,
        help="model precision: the TensorRT engine's; with ONNX Runtime, int8 serves the bundle's INT8 "
        "variant (fp32/fp16: model.onnx)",
    )
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0 = all cores)")
    p.add_argument("--max-batch", type=int, default=8, help="largest micro-batch")
    p.add_argument("--max-wait-ms", type=float, default=2.0, help="how long a micro-batch waits to fill")
    p.add_argument(
        "--batch-wait",
        choices=BATCH_WAITS,
        default="adaptive",
        help="adaptive: a batch waits only for images already being decoded (a lone request runs at "
        "once); fixed: every batch waits up to --max-wait-ms for company",
    )
    p.add_argument(
        "--profile",
        default="default",
        choices=PROFILE_NAMES,
        help="defaults of the memory-related limits: default ("
        + _profile_text("default")
        + ") or jetson ("
        + _profile_text("jetson")
        + "; 8 GB shared with the GPU); explicit flags override them",
    )
    p.add_argument(
        "--max-concurrent",
        type=int,
        default=None,
        help="concurrent unary calls (Classify, GetStats, "
        "GetModelInfo, LoadModel) before RESOURCE_EXHAUSTED; streams and health checks are not counted "
        "(default: the profile's)",
    )
    p.add_argument(
        "--max-streams",
        type=int,
        default=None,
        help="camera streams open at once before RESOURCE_EXHAUSTED (their own limit; default: the profile's)",
    )
    p.add_argument(
        "--max-streams-per-connection",
        type=int,
        default=None,
        help="camera streams one client connection may hold at once, so that one connection never takes "
        "the slots other cameras need (default: half of --max-streams, rounded up)",
    )
    p.add_argument(
        "--stream-idle-timeout",
        type=float,
        default=30.0,
        help="close a stream that sends no frame for this many seconds (0 = never)",
    )
    p.add_argument(
        "--max-message-mb",
        type=float,
        default=None,
        help="largest request/response message, decompressed (default: the profile's)",
    )
    p.add_argument(
        "--max-inflight-mb",
        type=float,
        default=None,
        help="memory that admitted request messages may hold together (each counts twice its size); "
        "beyond it a large request waits up to 2 s, then RESOURCE_EXHAUSTED (default: the profile's)",
    )
    p.add_argument(
        "--max-pixels",
        type=int,
        default=16 * 1024 * 1024,
        help="largest image (pixels, read from its header before decoding; default 16 M = 4096x4096)",
    )
    p.add_argument(
        "--max-decode-mb",
        type=float,
        default=None,
        help="memory that images being decoded may use together; beyond it decodes wait (default: the profile's)",
    )
    p.add_argument(
        "--max-cameras", type=int, default=256, help="cameras tracked in GetStats (others are summed as '(untracked)')"
    )
    p.add_argument(
        "--camera-idle-timeout",
        type=float,
        default=300.0,
        help="seconds without a frame after which a camera's statistics may be dropped",
    )
    p.add_argument("--keepalive", type=float, default=30.0, help="seconds between the server's keepalive pings")
    p.add_argument(
        "--max-connection-age",
        type=float,
        default=1800.0,
        help="seconds after which a connection is asked to reconnect (open streams continue; 0 = never)",
    )
    p.add_argument(
        "--token-file",
        default=None,
        help="file holding the camera token: require 'authorization: Bearer <token>' (or set EDGETUNE_TOKEN)",
    )
    p.add_argument(
        "--token",
        default=None,
        help="the camera token on the command line (visible in the process table: prefer --token-file)",
    )
    p.add_argument(
        "--enable-load-model",
        action="store_true",
        help="enable the LoadModel admin RPC (needs --model-root and an admin token)",
    )
    p.add_argument(
        "--model-root",
        default=None,
        help="directory that every LoadModel bundle path must resolve into (relative paths are taken from it)",
    )
    p.add_argument(
        "--admin-token-file",
        default=None,
        help="file holding LoadModel's admin token (metadata 'x-edgetune-admin-token'; or set "
        "EDGETUNE_ADMIN_TOKEN); never the camera token",
    )
    p.add_argument("--tls-cert", default=None, help="server certificate (PEM)")
    p.add_argument("--tls-key", default=None, help="server private key (PEM)")
    p.add_argument("--tls-client-ca", default=None, help="CA that client certificates must chain to (mutual TLS)")
    p.add_argument("--insecure", action="store_true", help="allow plaintext on a non-loopback --host")
    p.add_argument("--watch", action="store_true", help="poll --bundle and hot-swap when a new bundle appears there")
    p.add_argument("--watch-interval", type=float, default=2.0, help="seconds between --watch polls")
    p.add_argument("--grace", type=float, default=10.0, help="seconds to drain in-flight RPCs on SIGTERM/SIGINT")
    g = p.add_argument_group("capture (field loop)")
    g.add_argument(
        "--capture",
        default=None,
        metavar="DIR",
        help="keep frames worth labelling in DIR (low confidence, a uniform random sample); harvest them "
        "with `make harvest` (needs an admin token)",
    )
    g.add_argument("--capture-max-mb", type=float, default=256.0, help="spool bound in MB (default 256)")
    g.add_argument("--capture-max-files", type=int, default=2000, help="spool bound in frames (default 2000)")
    g.add_argument(
        "--capture-min-confidence",
        type=float,
        default=0.6,
        help="keep frames whose top-1 probability is below this (default 0.6)",
    )
    g.add_argument(
        "--capture-min-margin",
        type=float,
        default=0.2,
        help="keep frames whose top-1 minus top-2 probability is below this (default 0.2)",
    )
    g.add_argument(
        "--capture-random-rate",
        type=float,
        default=0.02,
        help="share of the other frames kept as a uniform random sample (default 0.02)",
    )
    g.add_argument(
        "--capture-class-quota",
        type=float,
        default=0.5,
        help="share of the spool's frames that low-confidence frames of one class may hold (default 0.5)",
    )
    g.add_argument(
        "--capture-max-writes-per-s",
        type=float,
        default=20.0,
        help="frames written per second at most; beyond it frames are dropped and counted (default 20)",
    )
    p.add_argument("--log-level", default="info", choices=LOG_LEVELS, help="least severe log level written")
    add_run_file_flags(p, "server")
    add_version(p)
    return p


#: Options never printed by --print-config nor read from --config: a token belongs in a file (--token-file).
SECRET_OPTIONS = ("token",)


def _tokens(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """(camera token, admin token) from files, the environment or (camera only, warned) the command line."""
    if args.token and args.token_file:
        raise ConfigError("give the camera token once: --token-file or --token, not both")
    if args.token:
        log.warning(
            "--token puts the camera token in the process table (ps) for every local user to read; "
            "use --token-file FILE or the EDGETUNE_TOKEN environment variable instead"
        )
        token: str | None = args.token
    elif args.token_file:
        token = read_token_file(args.token_file, "camera token")
    else:
        token = os.environ.get("EDGETUNE_TOKEN") or None
    if args.admin_token_file:
        admin: str | None = read_token_file(args.admin_token_file, "admin token")
    else:
        admin = os.environ.get("EDGETUNE_ADMIN_TOKEN") or None
    if admin and not args.enable_load_model:
        log.info("an admin token is configured but LoadModel is disabled (--enable-load-model)")
    return token, admin


def _return_large_buffers_to_the_os() -> None:
    """glibc raises its mmap threshold after large frees, so image-sized buffers (messages, decoded images)
    then come from thread arenas and stay in the RSS; a fixed 256 KiB threshold keeps them mmap'ed and returned
    on free (measured: peak RSS after 16 MB requests 330 -> 223 MB). gRPC receives a message in many small
    slices, which fill the arenas of the server's threads and stayed there after an attack of 15.5 MB messages
    (issue 21: RSS 226 MB 30 s after, 125 MB before): the arenas are capped at 2 and trimmed every second
    (``malloc_trim``, which gives free pages in the middle of a heap back too). No-op without glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return
    if libc is None or not hasattr(libc, "mallopt"):
        return
    libc.mallopt(-3, 256 * 1024)  # M_MMAP_THRESHOLD (fixing it also disables the dynamic adjustment)
    libc.mallopt(-8, 2)  # M_ARENA_MAX: ~150 server threads would otherwise get up to 8 arenas per core
    if hasattr(libc, "malloc_trim"):
        trim = libc.malloc_trim

        def trim_loop() -> None:
            while True:
                time.sleep(1.0)
                trim(0)

        threading.Thread(target=trim_loop, name="edge-malloc-trim", daemon=True).start()


def _capture_config(args: argparse.Namespace) -> CaptureConfig | None:
    if not args.capture:
        return None
    return CaptureConfig(
        dir=args.capture,
        max_mb=args.capture_max_mb,
        max_files=args.capture_max_files,
        min_confidence=args.capture_min_confidence,
        min_margin=args.capture_min_margin,
        random_rate=args.capture_random_rate,
        class_quota=args.capture_class_quota,
        max_writes_per_s=args.capture_max_writes_per_s,
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parse_args_with_run_file(parser, argv, SECRET_OPTIONS)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        sys.stdout.write(run_file_yaml(parser, args, SECRET_OPTIONS))
        return 0
    _return_large_buffers_to_the_os()
    native = NativeStderr()  # libjpeg/OpenCV/ONNX Runtime stderr lines become JSON log records
    try:
        configure_logging(args.log_level, native.stream)
        return _serve(args, native)
    finally:
        native.close()


def _serve(args: argparse.Namespace, native: NativeStderr) -> int:
    try:
        token, admin_token = _tokens(args)
        config = ServerConfig(
            bundle=args.bundle,
            host=args.host,
            port=args.port,
            backend=args.backend,
            precision=args.precision,
            intra_op_threads=args.threads,
            max_batch=args.max_batch,
            max_wait_ms=args.max_wait_ms,
            batch_wait=args.batch_wait,
            **profile_limits(
                args.profile,
                max_concurrent=args.max_concurrent,
                max_streams=args.max_streams,
                max_message_mb=args.max_message_mb,
                max_inflight_mb=args.max_inflight_mb,
                max_decode_mb=args.max_decode_mb,
            ),
            max_pixels=args.max_pixels,
            token=token,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            tls_client_ca=args.tls_client_ca,
            insecure=args.insecure,
            watch=args.watch,
            watch_interval_s=args.watch_interval,
            grace_s=args.grace,
            stream_idle_s=args.stream_idle_timeout,
            max_streams_per_connection=args.max_streams_per_connection,
            load_model=args.enable_load_model,
            admin_token=admin_token,
            model_root=args.model_root,
            max_cameras=args.max_cameras,
            camera_idle_s=args.camera_idle_timeout,
            keepalive_s=args.keepalive,
            max_connection_age_s=args.max_connection_age,
            capture=_capture_config(args),
        )
        return serve(config)
    except EdgetuneError as e:
        log.error("cannot start server", extra={"fields": {"error": str(e), "error_type": type(e).__name__}})
        print(f"error: {e}", file=native.stream)  # the one plain line, for people
        return 2


if __name__ == "__main__":
    sys.exit(main())
