"""Structured logs: one JSON object per line (``ts``, ``level``, ``logger``, ``msg`` + fields).

Extra fields are passed as ``log.info("msg", extra={"fields": {...}})``. gRPC's own Python loggers
(``grpc._server``, ``grpc._common``: undeserialisable requests, exceptions outside our handlers) go to
the same stream in the same format, at warning and above.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import IO


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
    levels = ("debug", "info", "warning", "error")
    if level not in levels:
        from edgetune.errors import ConfigError

        raise ConfigError(f"log level must be one of {levels}, got {level!r}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonLineFormatter())
    for name, lvl in (("edge_server", level.upper()), ("grpc", "WARNING")):
        logger = logging.getLogger(name)
        for h in list(logger.handlers):
            logger.removeHandler(h)
        logger.addHandler(handler)
        logger.setLevel(lvl)
        logger.propagate = False
