"""Dynamic micro-batching across requests and streams, and per-stream latest-frame-wins slots.

:class:`MicroBatcher` owns one runner and one worker thread: callers ``submit`` a preprocessed
image and get a :class:`concurrent.futures.Future`; the worker takes the first waiting image,
keeps collecting until ``max_batch`` images or ``max_wait_ms`` have passed, runs one batch, and
resolves every future with its logits row and the batch's timing. Images whose deadline passed
while queued are failed without running.

:class:`LatestSlot` is a one-frame mailbox per camera stream: ``put`` replaces an unprocessed
frame (the replaced one counts as dropped), so a fast camera cannot build a queue.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np

from edge_server.runners.base import Runner
from edgetune.errors import ConfigError

log = logging.getLogger("edge_server.batcher")

T = TypeVar("T")


_POLL_S = 0.0005  # how often a forming batch re-checks whether images are still on their way


class BatcherClosed(RuntimeError):
    """Submitted to a batcher that no longer accepts work (shutdown or replaced by a hot swap)."""


class DeadlineExpired(RuntimeError):
    """The request's deadline passed while it waited for a batch."""


@dataclass
class BatchResult:
    logits: np.ndarray  # [C]
    queue_us: int
    infer_us: int
    batch_size: int


@dataclass
class _Item:
    x: np.ndarray
    future: Future
    enqueued: float
    deadline: float | None


class MicroBatcher:
    """Collects single images into batches for ``runner``.

    Args:
        runner: the backend (used only from the worker thread).
        max_batch: largest batch (capped at ``runner.max_batch_size``).
        max_wait_ms: how long the first image of a batch waits for company.
        adaptive: wait only while other images are announced via :meth:`incoming` (being decoded or
            preprocessed); ``False`` always waits up to ``max_wait_ms`` for a full batch.
        on_batch: called with the batch size after each batch (statistics).
    """

    def __init__(
        self,
        runner: Runner,
        max_batch: int = 8,
        max_wait_ms: float = 2.0,
        adaptive: bool = True,
        on_batch: Callable[[int], Any] | None = None,
    ) -> None:
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ConfigError(f"max_batch must be an integer >= 1, got {max_batch!r}")
        if not isinstance(max_wait_ms, (int, float)) or not 0 <= max_wait_ms <= 10_000:
            raise ConfigError(f"max_wait_ms must be a number in [0, 10000], got {max_wait_ms!r}")
        self.runner = runner
        self.max_batch = min(max_batch, runner.max_batch_size)
        self.max_wait_s = float(max_wait_ms) / 1000.0
        self.adaptive = adaptive
        self._on_batch = on_batch
        self._q: queue.Queue[_Item | None] = queue.Queue()
        self._incoming = 0  # images being decoded/preprocessed now: the only ones worth waiting for
        self._closed = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="edge-batcher", daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def incoming(self) -> Iterator[list[Any]]:
        """Announce one image from before its decode until its :meth:`submit` (pass the yielded ticket).

        While any image is on its way, a forming batch waits for it (up to ``max_wait_ms``); when none is,
        the batch runs at once, so a lone request pays no batching delay.
        """
        ticket: list[Any] = [self]  # [owner] while the announcement is open, [] once it ended
        with self._lock:
            self._incoming += 1
        try:
            yield ticket
        finally:
            with self._lock:
                if ticket:
                    self._incoming -= 1
                    ticket.clear()

    def submit(self, x: np.ndarray, deadline: float | None = None, ticket: list[Any] | None = None) -> Future:
        """Queue one ``[3, H, W]`` image; ``deadline`` is a ``time.monotonic()`` instant or None;
        ``ticket`` from :meth:`incoming` (the announcement ends as the image is queued)."""
        fut: Future = Future()
        with self._lock:
            if self._closed:
                raise BatcherClosed("batcher is closed")
            self._q.put(_Item(x, fut, time.monotonic(), deadline))
            if ticket and ticket[0] is self:
                self._incoming -= 1
                ticket.clear()
        return fut

    def close(self, close_runner: bool = True, timeout: float | None = 30.0) -> None:
        """Stop accepting work, finish what is queued, stop the worker, then close the runner."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._q.put(None)
        self._thread.join(timeout)
        if close_runner:
            self.runner.close()

    # -- worker ---------------------------------------------------------------------------
    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._q.get()
            if first is None:
                break
            items = [first]
            if self.adaptive and self._incoming == 0 and self._q.empty():
                self._run_batch(items)  # nobody else on the way: no batching delay
                continue
            until = first.enqueued + self.max_wait_s
            while len(items) < self.max_batch:
                remaining = until - time.monotonic()
                try:
                    nxt = self._q.get(timeout=min(remaining, _POLL_S)) if remaining > 0 else self._q.get_nowait()
                except queue.Empty:
                    if remaining > 0 and (self._incoming > 0 or not self.adaptive):
                        continue  # another image is being preprocessed: worth waiting for
                    break
                if nxt is None:
                    stopping = True  # drain: run what we have, then exit
                    break
                items.append(nxt)
            self._run_batch(items)
        # fail anything that raced in after the sentinel (cannot happen via submit, kept for safety)
        while True:
            try:
                item = self._q.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item.future.set_exception(BatcherClosed("batcher closed"))

    def _run_batch(self, items: list[_Item]) -> None:
        now = time.monotonic()
        live = []
        for it in items:
            if not it.future.set_running_or_notify_cancel():
                continue
            if it.deadline is not None and now > it.deadline:
                it.future.set_exception(DeadlineExpired("deadline passed while waiting for a batch"))
            else:
                live.append(it)
        if not live:
            return
        t0 = time.monotonic()
        try:
            logits = self.runner.infer(np.stack([it.x for it in live]))
        except Exception as e:  # a backend failure must reach every waiting caller, not kill the worker
            log.exception("inference failed", extra={"fields": {"batch_size": len(live)}, "group": True})
            for it in live:
                it.future.set_exception(e)
            return
        t1 = time.monotonic()
        infer_us = int((t1 - t0) * 1e6)
        for i, it in enumerate(live):
            it.future.set_result(BatchResult(logits[i], int((t0 - it.enqueued) * 1e6), infer_us, len(live)))
        if self._on_batch is not None:
            self._on_batch(len(live))


class LatestSlot(Generic[T]):
    """One-item mailbox: ``put`` overwrites; ``take`` blocks for an item or the end of input."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._item: T | None = None
        self._has = False
        self._closed = False
        self.dropped_since_take = 0

    def put(self, item: T) -> T | None:
        """Store ``item``; returns the unprocessed item it replaced (dropped), if any."""
        with self._cond:
            replaced = self._item if self._has else None
            if self._has:
                self.dropped_since_take += 1
            self._item, self._has = item, True
            self._cond.notify()
            return replaced

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called (items may still be waiting)."""
        with self._cond:
            return self._closed

    def close(self) -> None:
        """No more items will come; ``take`` returns what is left, then None."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def take(self, timeout: float | None = None) -> tuple[T, int] | None:
        """Next item and how many were dropped before it; None at end of input (or timeout)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._has or self._closed, timeout):
                return None
            if not self._has:
                return None
            item, dropped = self._item, self.dropped_since_take
            self._item, self._has, self.dropped_since_take = None, False, 0
            return item, dropped  # type: ignore[return-value]
