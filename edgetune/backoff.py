"""Exponential backoff (optionally with jitter): the one reconnect/reopen delay policy of the edge."""

from __future__ import annotations

import random
import time
from collections.abc import Callable

from edgetune.errors import ConfigError


class Backoff:
    """Delays ``initial * factor**n`` capped at ``maximum``, with "equal jitter": each delay is drawn
    uniformly from [d/2, d] so that many cameras do not reconnect in lock-step after a restart.
    With ``jitter=False`` the delays are exactly ``d`` (e.g. reopening a local capture device).

    ``max_total`` (seconds, 0 = unlimited) bounds the time spent retrying since the first failure
    after the last :meth:`reset`; :meth:`next_delay` returns ``None`` once it is exceeded.
    """

    def __init__(
        self,
        initial: float = 0.2,
        maximum: float = 5.0,
        factor: float = 2.0,
        max_total: float = 0.0,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        jitter: bool = True,
    ) -> None:
        if not initial > 0:
            raise ConfigError(f"backoff initial delay must be > 0 s, got {initial!r}")
        if not maximum >= initial:
            raise ConfigError(f"backoff maximum delay must be >= the initial delay {initial}, got {maximum!r}")
        if not factor >= 1:
            raise ConfigError(f"backoff factor must be >= 1, got {factor!r}")
        if not max_total >= 0:
            raise ConfigError(f"max retry time must be >= 0 s (0 = retry forever), got {max_total!r}")
        self.initial, self.maximum, self.factor, self.max_total = initial, maximum, factor, max_total
        self._rng = rng or random.Random()
        self.jitter = jitter
        self._clock = clock
        self.attempts = 0
        self._first_failure: float | None = None

    def reset(self) -> None:
        """Call after a successful connection."""
        self.attempts = 0
        self._first_failure = None

    @property
    def elapsed(self) -> float:
        """Seconds since the first failure of the current outage (0 when connected)."""
        return 0.0 if self._first_failure is None else self._clock() - self._first_failure

    def next_delay(self) -> float | None:
        """The delay before the next attempt, or ``None`` when the retry time is used up."""
        now = self._clock()
        if self._first_failure is None:
            self._first_failure = now
        ceiling = min(self.maximum, self.initial * self.factor**self.attempts)
        self.attempts += 1
        delay = self._rng.uniform(ceiling / 2, ceiling) if self.jitter else ceiling
        if self.max_total:
            left = self.max_total - (now - self._first_failure)
            if left <= 0:
                return None
            delay = min(delay, left)
        return delay
