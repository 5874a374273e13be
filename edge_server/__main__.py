"""``python -m edge_server --bundle DIR [--port P] …`` (``make serve BUNDLE=… PORT=…``)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from edge_server.logs import configure_logging
from edge_server.runners import BACKENDS
from edgetune.errors import EdgetuneError

log = logging.getLogger("edge_server.main")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m edge_server", description="edgetune gRPC inference server")
    p.add_argument("--bundle", required=True, help="bundle directory (model.onnx + bundle.json)")
    p.add_argument("--host", default="127.0.0.1",
                   help="listen address (default 127.0.0.1; others need --tls-cert/--tls-key or --insecure)")
    p.add_argument("--port", type=int, default=50051, help="TCP port (0 = pick a free one; logged)")
    p.add_argument("--backend", default="auto", choices=BACKENDS, help="inference backend (auto logs its choice)")
    p.add_argument("--precision", default="fp16", choices=("fp32", "fp16", "int8"), help="TensorRT engine precision")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0 = all cores)")
    p.add_argument("--max-batch", type=int, default=8, help="largest micro-batch")
    p.add_argument("--max-wait-ms", type=float, default=2.0, help="how long a micro-batch waits to fill")
    p.add_argument("--batch-wait", choices=["adaptive", "fixed"], default="adaptive",
                   help="adaptive: a batch waits only for images already being decoded (a lone request runs at "
                        "once); fixed: every batch waits up to --max-wait-ms for company")
    p.add_argument("--max-concurrent", type=int, default=64, help="concurrent RPCs (streams included) before "
                   "RESOURCE_EXHAUSTED")
    p.add_argument("--max-message-mb", type=float, default=16.0, help="largest request/response message")
    p.add_argument("--max-pixels", type=int, default=64 * 1024 * 1024, help="largest decoded image (pixels)")
    p.add_argument("--token", default=None, help="require 'authorization: Bearer <token>' (or set EDGETUNE_TOKEN)")
    p.add_argument("--tls-cert", default=None, help="server certificate (PEM)")
    p.add_argument("--tls-key", default=None, help="server private key (PEM)")
    p.add_argument("--tls-client-ca", default=None, help="CA that client certificates must chain to (mutual TLS)")
    p.add_argument("--insecure", action="store_true", help="allow plaintext on a non-loopback --host")
    p.add_argument("--watch", action="store_true", help="poll --bundle and hot-swap when a new bundle appears there")
    p.add_argument("--watch-interval", type=float, default=2.0, help="seconds between --watch polls")
    p.add_argument("--grace", type=float, default=10.0, help="seconds to drain in-flight RPCs on SIGTERM/SIGINT")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    from edge_server.server import ServerConfig, serve  # after logging is set up (grpc import is slow)

    try:
        config = ServerConfig(
            bundle=args.bundle, host=args.host, port=args.port, backend=args.backend, precision=args.precision,
            intra_op_threads=args.threads, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, batch_wait=args.batch_wait,
            max_concurrent=args.max_concurrent, max_message_mb=args.max_message_mb, max_pixels=args.max_pixels,
            token=args.token or os.environ.get("EDGETUNE_TOKEN") or None, tls_cert=args.tls_cert,
            tls_key=args.tls_key, tls_client_ca=args.tls_client_ca, insecure=args.insecure, watch=args.watch,
            watch_interval_s=args.watch_interval, grace_s=args.grace,
        )
        return serve(config)
    except EdgetuneError as e:
        log.error("cannot start server", extra={"fields": {"error": str(e), "error_type": type(e).__name__}})
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
