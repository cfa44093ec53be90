"""Queue IDs: unique, time-ordered, cheap to make for every accepted message.

A module of its own so that every backend (and :meth:`Spool.new_queue_id`)
imports it once, at load time: the function ran an ``import`` statement on
every call before (1.6% of an SMTP node's GIL samples with kept sessions).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

__all__ = ["new_queue_id"]

#: Queue IDs whose random parts one read of the OS's random source supplies.
_RANDOM_PARTS_PER_READ = 256
#: Random octets per queue ID (40 bits, 10 hex digits).
_RANDOM_OCTETS = 5


def _read_random_parts() -> Iterator[str]:
    """The random parts of the next queue IDs, from one ``os.urandom`` read.

    ``secrets.token_hex`` per ID was a ``getrandom`` system call and three
    Python calls for every accepted message (1.5% of an SMTP node's event
    loop under S2's load, py-spy); the octets come from the same source.
    """
    digits = os.urandom(_RANDOM_OCTETS * _RANDOM_PARTS_PER_READ).hex().upper()
    step = 2 * _RANDOM_OCTETS
    return iter([digits[i : i + step] for i in range(0, len(digits), step)])


#: The unused random parts (a one-item list: swapped whole when used up).
#: ``next()`` on a list iterator is atomic under the GIL, so threads never
#: share a part; a child process starts with none of its parent's.
_random_parts: list[Iterator[str]] = [iter(())]


def _forget_random_parts() -> None:
    _random_parts[0] = iter(())


os.register_at_fork(after_in_child=_forget_random_parts)


def _random_part() -> str:
    try:
        return next(_random_parts[0])
    except StopIteration:
        parts = _random_parts[0] = _read_random_parts()
        return next(parts)


def new_queue_id(now: float | None = None) -> str:
    """A unique, time-ordered queue ID of ``[0-9A-F.]``.

    Milliseconds since the epoch (11 hex digits) then 40 random bits from
    the OS's random source (read 256 IDs' worth at a time); the time part
    picks the body's fan-out directory (see :func:`bodies.relative_body_path`).
    """
    ms = int((time.time() if now is None else now) * 1000)
    return f"{ms:011X}.{_random_part()}"
