"""Structured logs: one JSON object per line (``ts``, ``level``, ``logger``, ``msg`` + fields).

Extra fields are passed as ``log.info("msg", extra={"fields": {...}})``. gRPC's own Python loggers
(``grpc._server``, ``grpc._common``: undeserialisable requests, exceptions outside our handlers) go to
the same stream in the same format, at warning and above.

:class:`NativeStderr` (the CLI server) also catches what C libraries and stray Python code write to the
process's stderr (libjpeg's "Corrupt JPEG data", OpenCV's and ONNX Runtime's warnings, tracebacks printed
by gRPC) and logs each line as a JSON record (logger ``edge_server.native``), so the log stays one JSON
object per line even under hostile input.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from typing import IO

LOG_LEVELS = ("debug", "info", "warning", "error")  #: ``--log-level`` / :func:`configure_logging`


class JsonLineFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": round(record.created, 6),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            for k, v in fields.items():
                out.setdefault(k, v)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def configure_logging(level: str = "info", stream: IO[str] | None = None) -> None:
    """Send the ``edge_server`` loggers to ``stream`` (stderr) as JSON lines."""
    if level not in LOG_LEVELS:
        from edgetune.errors import ConfigError

        raise ConfigError(f"log level must be one of {LOG_LEVELS}, got {level!r}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonLineFormatter())
    for name, lvl in (("edge_server", level.upper()), ("grpc", "WARNING")):
        logger = logging.getLogger(name)
        for h in list(logger.handlers):
            logger.removeHandler(h)
        logger.addHandler(handler)
        logger.setLevel(lvl)
        logger.propagate = False


class NativeStderr:
    """Redirect file descriptor 2 into a pipe whose lines are logged as JSON; :attr:`stream` is the original
    stderr (give it to :func:`configure_logging`). ``close()`` restores fd 2 and logs what is left."""

    def __init__(self) -> None:
        sys.stderr.flush()
        self._orig_fd = os.dup(2)
        self.stream: IO[str] = os.fdopen(os.dup(self._orig_fd), "w", buffering=1, encoding="utf-8",
                                         errors="replace")
        read_fd, write_fd = os.pipe()
        os.dup2(write_fd, 2)
        os.close(write_fd)
        self._reader = os.fdopen(read_fd, "rb", buffering=0)
        self._saved_stderr = sys.stderr
        sys.stderr = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
        self._log = logging.getLogger("edge_server.native")
        self._thread = threading.Thread(target=self._pump, name="edge-native-stderr", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        buf = b""
        while True:
            try:
                chunk = self._reader.read(65536)
            except OSError:
                break
            if not chunk:
                break
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                self._emit(line)
        if buf:
            self._emit(buf)

    def _emit(self, line: bytes) -> None:
        text = line.decode("utf-8", "replace").rstrip()
        if text:
            self._log.warning("stderr output", extra={"fields": {"text": text[:2000]}})

    def close(self) -> None:
        """Restore fd 2 and Python's stderr; the reader logs the last lines and ends."""
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        stray, sys.stderr = sys.stderr, self._saved_stderr
        os.dup2(self._orig_fd, 2)  # the pipe's last writer (besides ``stray``) goes away
        try:
            stray.close()
        except OSError:
            pass
        self._thread.join(timeout=5)
        os.close(self._orig_fd)
        self.stream.flush()
