"""The study's wall-clock budget: when it ends, what is kept for the finish, and the search's deadline
(:class:`Clock`, made once by :func:`tuner.run.run_study`, read by the search and the final fit)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

#: Seconds kept after the search and the refit for post-hoc selection (tuner/posthoc.py: every candidate's
#: validation and test predictions over 4 flip views), the test evaluation, export (ONNX + parity) and plots.
FINISH_RESERVE_S = 45.0  #: the default, until the probe stage measured this study's forward speed


@dataclass
class Clock:
    """The study's wall-clock budget from ``t0`` (unix time)."""

    budget_s: float
    t0: float = field(default_factory=time.time)
    #: seconds kept after the final fit for post-hoc selection, the test evaluation and export (measured by the
    #: probe stage where it ran: tuner.probe.finish_reserve)
    finish_reserve_s: float = FINISH_RESERVE_S

    def left(self) -> float:
        return (self.t0 + self.budget_s - time.time()) if self.budget_s else float("inf")

    def end(self) -> float | None:
        return self.t0 + self.budget_s if self.budget_s else None

    def search_deadline(self, refit: bool, refit_share: float) -> float | None:
        """No trial epoch ends after this: what remains is for the refit (a share of the budget) and the finish."""
        if not self.budget_s:
            return None
        keep = self.finish_reserve_s + (refit_share * self.budget_s if refit else 0.0)
        return self.t0 + self.budget_s - keep
