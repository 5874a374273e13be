"""Aggregated logging of refused calls: a flood of rejections must not become a flood of log lines."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

log = logging.getLogger("edge_server.rpc")


class RejectionLog:
    """Logs the first event of a key at once, then at most one line per ``period_s`` with the count since."""

    def __init__(self, period_s: float = 1.0) -> None:
        self.period_s = period_s
        self._lock = threading.Lock()
        self._pending: dict[tuple[str, str], list[Any]] = {}  # key -> [count, first_time, details]
        self._last: dict[tuple[str, str], float] = {}

    def add(self, method: str, code: str, details: str) -> None:
        now = time.monotonic()
        key = (method, code)
        with self._lock:
            if now - self._last.get(key, -1e9) >= self.period_s and key not in self._pending:
                self._last[key] = now
                emit = True
            else:
                entry = self._pending.setdefault(key, [0, now, details])
                entry[0] += 1
                emit = False
        if emit:
            self._emit(key, 1, details)

    def flush(self, force: bool = False) -> None:
        now = time.monotonic()
        with self._lock:
            due = [(k, v) for k, v in self._pending.items() if force or now - self._last.get(k, -1e9) >= self.period_s]
            for k, _ in due:
                del self._pending[k]
                self._last[k] = now
        for k, (count, _t, details) in due:
            self._emit(k, count, details)

    @staticmethod
    def _emit(key: tuple[str, str], count: int, details: str) -> None:
        log.warning("rpc rejected", extra={"fields": {"method": key[0], "code": key[1], "count": count,
                                                      "details": details}})
