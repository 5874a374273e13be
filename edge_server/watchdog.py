"""Cheap per-call timeouts for the admission guard: one thread runs each callback at its deadline unless disarmed."""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("edge_server.rpc")


class Watchdog:
    """One thread that runs ``fn`` at its deadline unless disarmed first (cheap per-call timeouts)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, list[Any]]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def arm(self, timeout: float, fn: Callable[[], Any]) -> list[Any]:
        entry: list[Any] = [fn, False]  # [callback or None once disarmed, fired]
        with self._cond:
            heapq.heappush(self._heap, (time.monotonic() + timeout, next(self._seq), entry))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="edge-request-timeout", daemon=True)
                self._thread.start()
            self._cond.notify()
        return entry

    @staticmethod
    def disarm(entry: list[Any]) -> bool:
        """Disarm; True when it had already fired."""
        fired = bool(entry[1])
        entry[0] = None
        return fired

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap:
                    self._cond.wait()
                when, _, entry = self._heap[0]
                delay = when - time.monotonic()
                if delay > 0:
                    self._cond.wait(delay)
                    continue
                heapq.heappop(self._heap)
            fn = entry[0]
            if fn is not None:
                entry[1] = True
                try:
                    fn()
                except Exception:  # noqa: BLE001 - the call may be gone already
                    log.debug("request timeout callback failed", exc_info=True)
