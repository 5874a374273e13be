"""Structured logs: one JSON object per line (``ts``, ``level``, ``logger``, ``msg`` + fields).

Extra fields are passed as ``log.info("msg", extra={"fields": {...}})``; ``extra={"group": True}`` marks a
record that may repeat under attack (errors): :class:`BoundedJsonHandler` writes such records once per second
per kind with a ``count``. gRPC's own Python loggers (``grpc._server``, ``grpc._common``, ``grpc._cython``'s
"Invalid encoding" of a non-UTF-8 header value) go to the same stream in the same format, at warning and
above, grouped too, and never with their arguments (header values, the token with them) or a traceback.
Every line is ASCII JSON with each string clipped, registered secrets (:func:`add_secret`) redacted, and
the volume bounded (:data:`WORST_CASE_BYTES_PER_S`).

:class:`NativeStderr` (the CLI server) also catches what C libraries and stray Python code write to the
process's stderr (libjpeg's "Corrupt JPEG data", OpenCV's and ONNX Runtime's warnings, tracebacks printed
by gRPC) and logs each line as a JSON record (logger ``edge_server.native``), so the log stays one JSON
object per line even under hostile input.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
import time
from typing import IO, Any

from edgetune.errors import ConfigError

LOG_LEVELS = ("debug", "info", "warning", "error")  #: ``--log-level`` / :func:`configure_logging`

#: Longest string a log field (or ``msg``) keeps; longer ones end with ``…[+N chars]``.
MAX_FIELD_CHARS = 512
#: A traceback keeps its last this many characters.
MAX_TRACEBACK_CHARS = 1500
#: Longest log line (bytes): a longer one keeps only its level, logger, clipped message and ``truncated``.
MAX_LINE_BYTES = 4096
#: Grouped records (errors) of one kind are written at most once per this period, with a ``count``.
LOG_PERIOD_S = 1.0
#: Kinds of grouped records kept apart per period; more are summed into one ``"other"`` group.
MAX_GROUPS = 32
#: Ungrouped lines written per period at most; the rest are counted in a "log lines suppressed" line.
MAX_LINES_PER_PERIOD = 20
#: Worst case of the log's volume, bytes per second: every group, every allowed line and the summary, each of
#: the longest length. Measured lines are 150-600 bytes.
WORST_CASE_BYTES_PER_S = int((MAX_GROUPS + MAX_LINES_PER_PERIOD + 1) * MAX_LINE_BYTES / LOG_PERIOD_S)

_SECRETS: set[str] = set()
_FORMAT_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(?:\d+|\*)?(?:\.\d+)?[a-zA-Z%]")


def add_secret(secret: str | None) -> None:
    """Never write ``secret`` (a token) in a log line: every occurrence becomes ``[redacted]``."""
    if secret:
        _SECRETS.add(secret)


def clip(text: str, limit: int = MAX_FIELD_CHARS) -> str:
    """``text`` cut to ``limit`` characters, saying how many were cut."""
    return text if len(text) <= limit else f"{text[:limit]}…[+{len(text) - limit} chars]"


def _library_record(record: logging.LogRecord) -> bool:
    """gRPC's own loggers: their arguments can be client bytes (header values), so they are never printed."""
    return record.name == "grpc" or record.name.startswith("grpc.")


def _message(record: logging.LogRecord) -> str:
    if _library_record(record) and record.args:
        return _FORMAT_SPEC.sub("<withheld>", str(record.msg))
    return record.getMessage()


class JsonLineFormatter(logging.Formatter):
    """One JSON object per line, ASCII only (every control or non-ASCII character escaped), each string clipped
    to :data:`MAX_FIELD_CHARS`, registered secrets redacted, at most :data:`MAX_LINE_BYTES` per line. gRPC's own
    records are written without their arguments (``<withheld>``) and without a traceback (its type only)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 6),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": clip(_message(record)),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            for k, v in fields.items():
                out.setdefault(clip(str(k), 64), clip(v) if isinstance(v, str) else v)
        if record.exc_info:
            if _library_record(record):
                out["exc_type"] = getattr(record.exc_info[0], "__name__", "?")
            else:
                tb = self.formatException(record.exc_info)
                out["exc"] = tb if len(tb) <= MAX_TRACEBACK_CHARS else "…" + tb[-MAX_TRACEBACK_CHARS:]
        line = _redact(json.dumps(out, default=lambda o: clip(str(o)), ensure_ascii=True))
        if len(line) > MAX_LINE_BYTES:
            short = {k: out[k] for k in ("ts", "time", "level", "logger")}
            short.update(msg=clip(out["msg"], 256), truncated=len(line))
            for k in ("method", "code", "count"):  # what the grouping and the soak's accounting read
                if k in out:
                    short[k] = clip(out[k], 128) if isinstance(out[k], str) else out[k]
            line = _redact(json.dumps(short, default=str, ensure_ascii=True))
        return line


def _redact(line: str) -> str:
    for secret in _SECRETS:
        if secret in line:
            line = line.replace(secret, "[redacted]")
    return line


def _group_key(record: logging.LogRecord) -> tuple[str, ...] | None:
    """Records logged with ``extra={"group": True}`` (errors: per logger, message, method and code), gRPC's own
    records and native stderr lines are grouped; others are not."""
    if getattr(record, "group", False):
        fields = getattr(record, "fields", None) or {}
        return (record.name, str(record.msg), str(fields.get("method", "")), str(fields.get("code", "")))
    if _library_record(record) or record.name == NATIVE_LOGGER:
        return (record.name, str(record.msg), "", "")
    return None


class BoundedJsonHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """JSON lines on ``stream`` with a bounded volume (:data:`WORST_CASE_BYTES_PER_S`).

    A grouped record (:func:`_group_key`) is written at once when its group has been quiet for a period, else
    counted; every :data:`LOG_PERIOD_S` the groups with a count are written once, with ``count`` (how many
    records the line stands for; the details are those of the first one). At most :data:`MAX_GROUPS` groups
    per period. Ungrouped lines beyond :data:`MAX_LINES_PER_PERIOD` per period are counted and reported in one
    "log lines suppressed" line."""

    def __init__(self, stream: IO[str]) -> None:
        super().__init__(stream)
        self.setFormatter(JsonLineFormatter())
        self._glock = threading.Lock()
        self._pending: dict[tuple[str, ...], list[Any]] = {}  # key -> [count, record]
        self._last: dict[tuple[str, ...], float] = {}
        self._window = (0.0, 0)  # (start, ungrouped lines written)
        self._suppressed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._flush_loop, name="edge-log-groups", daemon=True)
        self._thread.start()

    def emit(self, record: logging.LogRecord) -> None:
        key = _group_key(record)
        now = time.monotonic()
        with self._glock:
            if key is None:
                start, n = self._window
                if now - start >= LOG_PERIOD_S:
                    start, n = now, 0
                if n >= MAX_LINES_PER_PERIOD:
                    self._suppressed += 1
                    return
                self._window = (start, n + 1)
            elif key not in self._pending and now - self._last.get(key, -1e9) >= LOG_PERIOD_S:
                self._last[key] = now
                if len(self._last) > 4 * MAX_GROUPS:
                    self._last = {k: t for k, t in self._last.items() if now - t < LOG_PERIOD_S}
            else:
                if key not in self._pending and len(self._pending) >= MAX_GROUPS:
                    key = ("edge_server", "log records of other kinds", "", "")
                entry = self._pending.get(key)
                if entry is None:
                    self._pending[key] = [1, _detached(record)]
                else:
                    entry[0] += 1
                return
        if key is not None:
            record.fields = {**(getattr(record, "fields", None) or {}), "count": 1}
        super().emit(record)

    def flush_groups(self, force: bool = False) -> None:
        now = time.monotonic()
        with self._glock:
            due = [k for k in self._pending if force or now - self._last.get(k, -1e9) >= LOG_PERIOD_S]
            out = [self._pending.pop(k) for k in due]
            for k in due:
                self._last[k] = now
            suppressed, self._suppressed = self._suppressed, 0
        for count, rec in out:
            rec.fields = {**(getattr(rec, "fields", None) or {}), "count": count}
            rec.created = time.time()
            rec.msecs = (rec.created - int(rec.created)) * 1000
            super().emit(rec)
        if suppressed:
            rec = logging.LogRecord(
                "edge_server.logs", logging.WARNING, __file__, 0, "log lines suppressed", None, None
            )
            rec.fields = {"count": suppressed, "limit_per_s": MAX_LINES_PER_PERIOD / LOG_PERIOD_S}
            super().emit(rec)

    def _flush_loop(self) -> None:
        while not self._stop.wait(LOG_PERIOD_S / 2):
            try:
                self.flush_groups()
            except Exception:  # noqa: BLE001 - logging must never take the server down
                pass

    def close(self) -> None:
        self._stop.set()
        try:
            self.flush_groups(force=True)
        finally:
            super().close()


def _detached(record: logging.LogRecord) -> logging.LogRecord:
    """A copy of ``record`` for a later grouped line, without its traceback (no frames kept alive)."""
    rec = logging.makeLogRecord(record.__dict__)
    if rec.exc_info:
        rec.fields = {**(getattr(rec, "fields", None) or {}), "exc_type": getattr(rec.exc_info[0], "__name__", "?")}
    rec.exc_info, rec.exc_text = None, None
    return rec


def configure_logging(level: str = "info", stream: IO[str] | None = None) -> None:
    """Send the ``edge_server`` and gRPC loggers to ``stream`` (stderr) as bounded JSON lines."""
    if level not in LOG_LEVELS:
        raise ConfigError(f"log level must be one of {LOG_LEVELS}, got {level!r}")
    handler = BoundedJsonHandler(stream or sys.stderr)
    for name, lvl in (("edge_server", level.upper()), ("grpc", "WARNING")):
        logger = logging.getLogger(name)
        for h in list(logger.handlers):
            logger.removeHandler(h)
            h.close()
        logger.addHandler(handler)
        logger.setLevel(lvl)
        logger.propagate = False


NATIVE_LOGGER = "edge_server.native"


class NativeStderr:
    """Redirect file descriptor 2 into a pipe whose lines are logged as JSON; :attr:`stream` is the original
    stderr (give it to :func:`configure_logging`). ``close()`` restores fd 2 and logs what is left."""

    def __init__(self) -> None:
        sys.stderr.flush()
        self._orig_fd = os.dup(2)
        self.stream: IO[str] = os.fdopen(os.dup(self._orig_fd), "w", buffering=1, encoding="utf-8", errors="replace")
        read_fd, write_fd = os.pipe()
        os.dup2(write_fd, 2)
        os.close(write_fd)
        self._reader = os.fdopen(read_fd, "rb", buffering=0)
        self._saved_stderr = sys.stderr
        sys.stderr = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
        self._log = logging.getLogger(NATIVE_LOGGER)
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
            self._log.warning("stderr output", extra={"fields": {"text": text}})

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
