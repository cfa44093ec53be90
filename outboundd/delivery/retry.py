"""When a temporarily failed recipient is tried again — a pure function.

Haraka's rule, kept exactly: after the n-th temporary failure a recipient is
due again ``temp_fail_intervals[n-1]`` seconds later; when there is no such
entry (the list is exhausted) it is bounced.  With Haraka's default list
(``2**(i+5)`` for i in 1..maxTempFailures-1) the 13th failure bounces.
"""

from __future__ import annotations

from collections.abc import Sequence


def retry_delay(failures: int, intervals: Sequence[float]) -> float | None:
    """Seconds to wait after the ``failures``-th temporary failure, or None to give up.

    ``failures`` counts the failure just observed (so the first failure is 1).
    """
    if failures < 1:
        raise ValueError("failures counts the failure just observed and starts at 1")
    if failures > len(intervals):
        return None
    return float(intervals[failures - 1])


def next_attempt_at(failures: int, intervals: Sequence[float], now: float) -> float | None:
    """The time of the next attempt after the ``failures``-th failure, or None to give up."""
    delay = retry_delay(failures, intervals)
    return None if delay is None else now + delay
