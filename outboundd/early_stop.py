"""Stop signals that arrive before the event loop runs are kept, not fatal.

A process spends its first second or so importing and reading its
configuration.  A SIGTERM in that time (the parent stopping right after
starting a child, or a stop of the whole process group) would otherwise take
the signal's default action and kill it with status -15, which the parent
rightly reports as an error.  :func:`catch` records the signal instead, and
the daemon starts its graceful stop as soon as its loop runs
(:func:`pending`).  SIGHUP (flush) that early has nothing to flush and is
ignored.

A child of ``outboundd`` starts with SIGTERM and SIGINT blocked (see
``children.spawn_with_stop_signals_blocked``), so a stop of the whole process
group during its interpreter's start-up waits, pending, until :func:`catch`
has its handler in place and unblocks them.

Deliberately free of imports beyond ``signal``: ``python -m outboundd``
calls :func:`catch` before importing the rest of the package.
"""

from __future__ import annotations

import signal
from types import FrameType

_pending: list[str] = []


def _record(signum: int, frame: FrameType | None) -> None:
    if not _pending:
        _pending.append(signal.Signals(signum).name)


def catch() -> None:
    """Record SIGTERM/SIGINT from now on (until the loop installs its own).

    Then unblocks them: one that came while they were blocked is recorded now.
    """
    stop_signals = (signal.SIGTERM, signal.SIGINT)
    for sig in stop_signals:
        signal.signal(sig, _record)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, stop_signals)


def pending() -> str | None:
    """The name of the first stop signal caught before the loop ran, if any."""
    return _pending[0] if _pending else None
