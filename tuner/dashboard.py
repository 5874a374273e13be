"""``make dashboard``: optuna-dashboard on the study storage (127.0.0.1:8080 by default)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING
from wsgiref.simple_server import make_server

from edgetune.dataclass_cli import HelpFormatter, add_version
from edgetune.logs import setup_cli_logging
from tuner.storage import masked, missing_sqlite, rdb_storage

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIApplication


def make_app(storage: str) -> WSGIApplication:
    """WSGI app serving the dashboard for ``storage`` (used by tests and by :func:`main`)."""
    from optuna_dashboard import wsgi

    app: WSGIApplication = wsgi(rdb_storage(storage))
    return app


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tuner.dashboard", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument(
        "--storage",
        default="sqlite:///" + str(Path("runs/optuna.db").resolve()),
        help="Optuna storage URL of the studies",
    )
    p.add_argument("--host", default="127.0.0.1", help="listen address")
    p.add_argument("--port", type=int, default=8080, help="listen port")
    add_version(p)
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    setup_cli_logging(verbose=False)
    missing = missing_sqlite(a.storage)
    if missing:
        print(f"error: {missing}", file=sys.stderr)
        return 2

    httpd = make_server(a.host, a.port, make_app(a.storage))
    print(f"optuna-dashboard for {masked(a.storage)} on http://{a.host}:{a.port}/ (Ctrl-C to stop)")
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
