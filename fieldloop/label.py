"""``make label DIR=dir [PORT=8765]`` (``python -m fieldloop.label``): label harvested frames in a browser.

Serves :data:`fieldloop.page.PAGE` and a small JSON API on 127.0.0.1 only (never another address): ``GET
/api/state`` (classes, their keys, progress, the next frame with the model's top-3), ``GET /frame/<id>``, ``POST
/api/decide`` ``{"id", "decision"}`` and ``POST /api/undo``. Requests must name this server in ``Host`` (a page of
another site reached through DNS rebinding is refused) and POSTs must carry ``X-Edgetune-Label`` (no CORS is ever
granted, so another origin cannot send it). Frames are looked up by capture id in the store, never by a path.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from edgetune.capture_record import is_capture_id
from edgetune.dataclass_cli import add_version
from edgetune.errors import ConfigError, EdgetuneError
from fieldloop.labels import LabelStore
from fieldloop.page import PAGE

log = logging.getLogger("fieldloop.label")
#: Keys of the classes in order: digits first, then letters other than s (skip), n (none) and u (undo).
CLASS_KEYS = tuple("123456789") + tuple(c for c in "abcdefghijklmopqrtvwxyz")
_TYPES = {".jpg": "image/jpeg", ".png": "image/png", ".webp": "image/webp", ".tif": "image/tiff", ".bmp": "image/bmp"}
MAX_BODY = 4096


def state(store: LabelStore) -> dict[str, Any]:
    nid = store.next_id()
    item = None
    if nid is not None:
        r = store.records[nid]
        item = {
            "id": r.id,
            "top3": [[lab, round(p, 4)] for lab, p in r.top[:3]],
            "camera_id": r.camera_id,
            "time_unix": r.time_unix,
            "reason": r.reason,
            "model_version": r.model_version,
        }
    keys = [CLASS_KEYS[i] if i < len(CLASS_KEYS) else "" for i in range(len(store.classes))]  # the rest: click
    return {
        "classes": list(store.classes),
        "keys": keys,
        "progress": store.progress(),
        "item": item,
        "can_undo": bool(store.decisions),
    }


class _Handler(BaseHTTPRequestHandler):
    server: LabelServer
    server_version = "edgetune-label"

    def log_message(self, fmt: str, *args: Any) -> None:
        log.debug(fmt, *args)

    def _send(self, code: int, body: bytes, ctype: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header(
            "Content-Security-Policy",
            "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self'",
        )
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the browser went away (page closed or reloaded)
            pass

    def _json(self, obj: Any, code: int = 200) -> None:
        self._send(code, json.dumps(obj).encode(), "application/json")

    def _error(self, code: HTTPStatus, msg: str) -> None:
        self._send(code, msg.encode(), "text/plain; charset=utf-8")

    def _host_ok(self) -> bool:
        port = self.server.server_address[1]
        return self.headers.get("Host", "") in {f"127.0.0.1:{port}", f"localhost:{port}"}

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if not self._host_ok():
            return self._error(HTTPStatus.FORBIDDEN, "unexpected Host header")
        store = self.server.store
        if self.path in ("/", "/index.html"):
            return self._send(200, PAGE.encode(), "text/html; charset=utf-8")
        if self.path == "/api/state":
            return self._json(state(store))
        if self.path.startswith("/frame/"):
            cid = self.path[len("/frame/") :]
            rec = store.records.get(cid) if is_capture_id(cid) else None
            if rec is None:
                return self._error(HTTPStatus.NOT_FOUND, "no such frame")
            data = (store.folder / rec.frame).read_bytes()
            return self._send(200, data, _TYPES.get(rec.frame[rec.frame.rfind(".") :], "application/octet-stream"))
        return self._error(HTTPStatus.NOT_FOUND, "not found")

    def do_POST(self) -> None:  # noqa: N802
        if not self._host_ok() or self.headers.get("X-Edgetune-Label") != "1":
            return self._error(HTTPStatus.FORBIDDEN, "a change needs the page's X-Edgetune-Label header")
        try:
            n = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            n = -1
        if not 0 <= n <= MAX_BODY:
            return self._error(HTTPStatus.BAD_REQUEST, f"the body must be 0..{MAX_BODY} bytes")
        try:
            body = json.loads(self.rfile.read(n) or b"{}")
        except ValueError:
            return self._error(HTTPStatus.BAD_REQUEST, "the body is not JSON")
        store = self.server.store
        if self.path == "/api/undo":
            store.undo()
            return self._json(state(store))
        if self.path != "/api/decide" or not isinstance(body, dict):
            return self._error(HTTPStatus.NOT_FOUND, "not found")
        try:
            store.decide(str(body.get("id", "")), str(body.get("decision", "")))
        except KeyError:
            return self._error(HTTPStatus.NOT_FOUND, "no such frame")
        except ConfigError as e:
            return self._error(HTTPStatus.BAD_REQUEST, str(e))
        return self._json(state(store))


class LabelServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, store: LabelStore, port: int = 0) -> None:
        self.store = store
        super().__init__(("127.0.0.1", port), _Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/"

    def start(self) -> LabelServer:
        threading.Thread(target=self.serve_forever, name="label-http", daemon=True).start()
        return self


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m fieldloop.label",
        description="label harvested frames in a browser (make label DIR=dir [PORT=8765]); serves on 127.0.0.1 only",
    )
    add_version(p)
    p.add_argument("--dir", required=True, help="harvested folder (make harvest OUT=...)")
    p.add_argument("--port", type=int, default=8765, help="TCP port on 127.0.0.1 (0 = pick a free one)")
    p.add_argument(
        "--classes", default="", help="comma-separated class names (default: the model's, from the sidecars)"
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="edgetune: %(message)s")
    try:
        if not 0 <= args.port <= 65535:
            raise ConfigError(f"--port must be in 0..65535, got {args.port}")
        classes = tuple(c.strip() for c in args.classes.split(",") if c.strip()) or None
        srv = LabelServer(LabelStore(args.dir, classes), args.port)
    except (EdgetuneError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    pr = srv.store.progress()
    print(f"labelling {pr['total']} frames ({pr['remaining']} left) of {srv.store.folder} at {srv.url}", flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        srv.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
