"""Command line of the camera client: ``python -m edge_client --source … --server host:port``.

Exit status: 0 when every source ended (or Ctrl-C / window closed), 1 when the server could not be
used (unreachable for --max-retry-time, TLS or authentication rejected), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from typing import Any

from edge_client.client import CameraStream
from edge_client.connection import ClientError, ConnectionOptions
from edge_client.frames import EncodeOptions
from edge_client.once import classify_once
from edge_client.output import LOG_FORMATS, OverlayWindow, ResultLog
from edge_client.sources import open_sources
from edge_client.stream_options import StreamOptions
from edgetune.dataclass_cli import HelpFormatter, add_version
from edgetune.errors import ConfigError, EdgetuneError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m edge_client",
        description="Stream camera frames to an edgetune server and log/show the classifications.",
        formatter_class=HelpFormatter,
    )
    add_version(p)
    src = p.add_argument_group("input")
    src.add_argument(
        "--source",
        action="append",
        default=[],
        metavar="[NAME=]SOURCE",
        help="camera index (0), csi:N, gst:<pipeline>, rtsp/http(s) URL, video file or image directory; "
        "repeat for several cameras (each its own stream); NAME= sets the camera id",
    )
    src.add_argument("--once", metavar="IMAGE", help="classify one image with a unary call and print JSON")
    src.add_argument("--raw", action="store_true", help="with --once: send the file bytes unchanged (no resize)")
    src.add_argument(
        "--live",
        action="store_true",
        help="replay video files as cameras at their native frame rate (frames dropped when slow)",
    )
    srv = p.add_argument_group("server")
    srv.add_argument(
        "--server",
        default=os.environ.get("EDGETUNE_SERVER", "127.0.0.1:50051"),
        help="host:port of the server (default $EDGETUNE_SERVER or 127.0.0.1:50051)",
    )
    srv.add_argument("--tls", action="store_true", help="use TLS with the system root CAs")
    srv.add_argument("--tls-ca", help="PEM CA of the server certificate (enables TLS)")
    srv.add_argument("--tls-cert", help="PEM client certificate (mutual TLS)")
    srv.add_argument("--tls-key", help="PEM client key (mutual TLS)")
    srv.add_argument("--tls-server-name", help="name expected in the server certificate (default: the host)")
    srv.add_argument(
        "--token-file",
        help="file holding the bearer token (default: $EDGETUNE_TOKEN), sent as 'authorization: Bearer <token>'",
    )
    srv.add_argument(
        "--token",
        help="the bearer token on the command line (visible in the process table: "
        "prefer --token-file or $EDGETUNE_TOKEN)",
    )
    srv.add_argument(
        "--max-retry-time",
        type=float,
        default=60.0,
        help="seconds to keep reconnecting to an unreachable server before giving up (0 = forever)",
    )
    srv.add_argument("--connect-timeout", type=float, default=3.0, help="seconds per connection attempt")
    st = p.add_argument_group("streaming")
    st.add_argument(
        "--max-size",
        type=int,
        default=640,
        help="resize frames so that the longer side is at most this many pixels before JPEG (0 = off)",
    )
    st.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality 1..100")
    st.add_argument("--fps", type=float, default=0.0, help="maximum frames per second per camera (0 = no limit)")
    st.add_argument("--top-k", type=int, default=1, help="predictions per frame")
    st.add_argument(
        "--max-inflight",
        type=int,
        default=None,
        help="unanswered frames per camera before waiting (default: 1 for files/directories, so that "
        "every frame is processed; "
        "unlimited for live sources; 0 = unlimited)",
    )
    st.add_argument(
        "--result-timeout",
        type=float,
        default=10.0,
        help="seconds to wait for outstanding results at the end of a file",
    )
    out = p.add_argument_group("output")
    out.add_argument("--log", help="write every result to this file: .csv → CSV, otherwise JSON lines; '-' = stdout")
    out.add_argument("--log-format", choices=LOG_FORMATS, help="override the format chosen from --log's name")
    out.add_argument(
        "--display",
        action="store_true",
        help="show an overlay window per camera (label, score, FPS, latency); needs a display",
    )
    out.add_argument("--quiet", action="store_true", help="no per-camera summary on stderr at the end")
    return p


def _run_once(args: argparse.Namespace, conn: Any) -> int:
    enc = None if args.raw else EncodeOptions(max_size=args.max_size, jpeg_quality=args.jpeg_quality)
    result = classify_once(conn, args.once, enc, top_k=args.top_k, timeout=max(args.connect_timeout, 10.0))
    print(json.dumps(result))
    return EXIT_OK


def _run_stream(args: argparse.Namespace, conn: Any) -> int:
    opts = StreamOptions(
        encode=EncodeOptions(max_size=args.max_size, jpeg_quality=args.jpeg_quality),
        fps=args.fps,
        top_k=args.top_k,
        max_inflight=args.max_inflight,
        max_retry_time=args.max_retry_time,
        result_timeout=args.result_timeout,
        connect_timeout=args.connect_timeout,
        keep_images=args.display,
    )
    overlay = OverlayWindow() if args.display else None
    log = ResultLog(args.log, args.log_format) if args.log else None
    sinks = _result_sinks(overlay, log)
    sources = open_sources(args.source, live=args.live)
    stop = threading.Event()
    streams = [CameraStream(s, conn, opts, sinks, stop) for s in sources]
    failures: list[str] = []

    def run_one(cs: CameraStream) -> None:
        try:
            cs.run()
        except EdgetuneError as e:
            failures.append(f"[{cs.source.camera_id}] {e}")
            stop.set()
        except Exception as e:  # an unexpected bug in one camera must not leave the others running
            failures.append(f"[{cs.source.camera_id}] unexpected {type(e).__name__}: {e}")
            stop.set()
            raise

    threads = [
        threading.Thread(target=run_one, args=(cs,), name=f"cam-{cs.source.camera_id}", daemon=True) for cs in streams
    ]
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        _supervise(threads, stop, overlay)
    finally:
        signal.signal(signal.SIGTERM, previous)
        for s in sources:
            s.close()
        if log is not None:
            log.close()
        if overlay is not None:
            overlay.close()
    if not args.quiet:
        for cs in streams:
            print("edge_client: summary " + json.dumps(cs.stats.summary()), file=sys.stderr)
    for msg in failures:
        print(f"edge_client: error: {msg}", file=sys.stderr)
    return EXIT_FAILED if failures else EXIT_OK


def _result_sinks(overlay: Any, log: Any) -> list[Any]:
    """Where each result goes: the ``--log`` file and/or the ``--display`` window (a note when neither)."""
    sinks: list[Any] = []
    if log is not None:
        sinks.append(lambda rec, _img: log.write(rec))
    if overlay is not None:
        sinks.append(overlay.update)
    if not sinks:
        print("edge_client: no --log and no --display: results are only summarised at the end", file=sys.stderr)
    return sinks


def _supervise(threads: list[threading.Thread], stop: threading.Event, overlay: Any) -> None:
    """Start the camera threads and wait for them, pumping the overlay window; Ctrl-C (or closing the window)
    stops them all."""
    try:
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            if overlay is not None and not overlay.pump():
                stop.set()
            for t in threads:
                t.join(timeout=0.03 if overlay is not None else 0.2)
    except KeyboardInterrupt:
        stop.set()
        for t in threads:
            t.join(timeout=10.0)


def _token(args: argparse.Namespace) -> str | None:
    if args.token and args.token_file:
        raise ConfigError("give the token once: --token-file or --token, not both")
    if args.token:
        print(
            "edge_client: warning: --token puts the token in the process table (ps) for every local user to "
            "read; use --token-file FILE or the EDGETUNE_TOKEN environment variable instead",
            file=sys.stderr,
        )
        return str(args.token)
    if args.token_file:
        try:
            token = open(args.token_file, encoding="utf-8").read().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(
                f"cannot read the token file {args.token_file}: {getattr(e, 'strerror', None) or e}"
            ) from None
        if not token:
            raise ConfigError(f"the token file {args.token_file} is empty")
        return token
    return os.environ.get("EDGETUNE_TOKEN") or None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if bool(args.once) == bool(args.source):
        parser.print_usage(sys.stderr)
        print("edge_client: error: give either --source (one or more) or --once IMAGE", file=sys.stderr)
        return EXIT_USAGE

    try:
        conn = ConnectionOptions(
            server=args.server,
            tls_ca=args.tls_ca,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            tls_server_name=args.tls_server_name,
            tls=args.tls,
            token=_token(args),
        )
        return _run_once(args, conn) if args.once else _run_stream(args, conn)
    except ConfigError as e:
        print(f"edge_client: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (ClientError, EdgetuneError) as e:
        print(f"edge_client: error: {e}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
