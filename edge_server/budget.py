"""Byte budgets of the server's memory (issue 21): what images being decoded (``--max-decode-mb``) and what
admitted request messages (``--max-inflight-mb``) may hold at once, and the resulting bound of the memory
requests can take, stated in the "serving" log line and in ``edge_server/README.md``."""

from __future__ import annotations

import threading

#: Default server-wide budget of memory that images being decoded may take at once.
DEFAULT_DECODE_BUDGET_MB = 512.0
#: Default server-wide budget of admitted request messages (Classify requests, camera frames) held at once.
DEFAULT_INFLIGHT_MB = 256.0
#: An admitted message is budgeted at this many times its size: the message and the image bytes copied from it.
INFLIGHT_FACTOR = 2
#: A message being received and parsed before it can be budgeted (its size is unknown until then) is counted
#: at this many times the largest message: gRPC's buffer or the bytes read from it, and the parsed message.
RECEIVING_FACTOR = 2


class ByteBudget:
    """Bytes that concurrent users may hold together; ``acquire`` waits (up to its timeout) for a share."""

    def __init__(self, capacity_bytes: int, what: str = "budget") -> None:
        if not isinstance(capacity_bytes, int) or capacity_bytes < 1 << 20:
            raise ValueError(f"{what} must be at least 1 MiB, got {capacity_bytes!r}")
        self.capacity = capacity_bytes
        self.used = 0
        self._cond = threading.Condition()

    def acquire(self, n: int, timeout: float) -> int | None:
        """Reserve ``n`` bytes (capped at the capacity); the reserved amount, or None on timeout."""
        n = max(1, min(int(n), self.capacity))
        with self._cond:
            if not self._cond.wait_for(lambda: self.used + n <= self.capacity, timeout):
                return None
            self.used += n
            return n

    def release(self, n: int) -> None:
        with self._cond:
            self.used -= n
            self._cond.notify_all()


def request_memory_bound_mb(
    max_message_mb: float, max_concurrent: int, max_streams: int, max_inflight_mb: float, max_decode_mb: float
) -> float:
    """The most memory (MB) requests can hold at once, beyond the idle server: admitted messages
    (``max_inflight_mb``), one message being received per unary call and per stream (their count x the largest
    message x :data:`RECEIVING_FACTOR`, compressed on the wire or not: the limit applies to the decompressed
    message) and the images being decoded (``max_decode_mb``)."""
    receiving = (max_concurrent + max_streams) * RECEIVING_FACTOR * max_message_mb
    return max_inflight_mb + receiving + max_decode_mb
