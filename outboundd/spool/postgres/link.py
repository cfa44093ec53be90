"""Whether the queue's PostgreSQL server can be reached: back-off and one log line per interval.

When a connection attempt or a statement fails for want of the server, the
spool stops trying for a while (0.5 s, doubling up to 30 s) and fails fast
instead: submission answers ``451 4.3.0`` at once rather than holding every
client for a connect timeout, and a dead server is not hammered.  The
outage is logged once when it starts and then at most once per
``LOG_INTERVAL``; its end is logged once.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import asyncpg

from outboundd import log

LOG = log.get_logger("spool")

BACKOFF_MIN = 0.5
BACKOFF_MAX = 30.0
LOG_INTERVAL = 30.0

#: Errors that mean "the server is not there", not "the statement was wrong".
UNREACHABLE: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.TooManyConnectionsError,
)


def is_unreachable(exc: BaseException) -> bool:
    """True for a lost or refused connection (asyncpg reports a closed one as InterfaceError)."""
    if isinstance(exc, UNREACHABLE):
        return True
    return isinstance(exc, asyncpg.InterfaceError) and "connection" in str(exc).lower()


def describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())


class Link:
    """The reachability of one server, shared by every connection of one spool."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.down_since: float | None = None
        self._retry_at = 0.0
        self._backoff = BACKOFF_MIN
        self._logged_at = float("-inf")

    @property
    def up(self) -> bool:
        return self.down_since is None

    def wait_time(self) -> float:
        """Seconds until the next attempt is allowed (0 when it is now)."""
        return max(0.0, self._retry_at - self._clock()) if self.down_since is not None else 0.0

    def failed(self, exc: BaseException, location: str) -> None:
        now = self._clock()
        if self.down_since is None:
            self.down_since = now
            self._backoff = BACKOFF_MIN
        else:
            self._backoff = min(self._backoff * 2, BACKOFF_MAX)
        self._retry_at = now + self._backoff
        if now - self._logged_at >= LOG_INTERVAL:
            self._logged_at = now
            LOG.error(
                "queue database unreachable; submission answers 451, retrying with back-off",
                queue=location,
                error=describe(exc),
                retry_in=round(self._backoff, 1),
            )

    def succeeded(self, location: str) -> None:
        if self.down_since is not None:
            LOG.notice(
                "queue database reachable again",
                queue=location,
                down_seconds=round(self._clock() - self.down_since, 1),
            )
            self.down_since = None
            self._backoff = BACKOFF_MIN
            self._logged_at = float("-inf")
