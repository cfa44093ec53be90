"""Parsers for single values: Haraka's booleans, host:port, the retry grammar."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Final

from outboundd.config.errors import _shown

#: Haraka's words for true and false (case-insensitive).  Haraka treats every
#: word outside the first set as false; outboundd rejects words in neither set.
BOOLEAN_TRUE: Final = frozenset({"true", "yes", "ok", "enabled", "on", "1"})
BOOLEAN_FALSE: Final = frozenset({"false", "no", "off", "disabled", "0"})

#: The shortest retry delay ``temp_fail_intervals`` accepts (Haraka's limit).
MIN_TEMP_FAIL_INTERVAL: Final = 5.0
#: The longest single retry delay: one year.  Larger values would overflow the
#: spool's timestamps; no one means them.
MAX_TEMP_FAIL_INTERVAL: Final = 365 * 86400.0
#: The longest duration any other setting accepts: one year, for the same reason.
MAX_SECONDS: Final = 365 * 86400.0
#: The most retries a schedule may hold, so that ``1d*99999999`` cannot eat memory.
MAX_TEMP_FAIL_ENTRIES: Final = 1000


# --------------------------------------------------------------------------
# Values


def parse_bool(text: str) -> bool:
    """A Haraka boolean word (``true yes ok enabled on 1`` / ``false no off
    disabled 0``, any case); :class:`ValueError` for anything else."""
    word = text.strip().lower()
    if word in BOOLEAN_TRUE:
        return True
    if word in BOOLEAN_FALSE:
        return False
    raise ValueError(
        f"{_shown(text)} is not a boolean (true, yes, ok, enabled, on, 1 "
        "or false, no, off, disabled, 0)"
    )


_LABEL: Final = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
_HOSTNAME_RE: Final = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")


def _is_hostname(text: str) -> bool:
    """A DNS host name in LDH form (single labels allowed, like ``localhost``);
    an all-numeric last label is not a name but a mistyped address."""
    return (
        len(text) <= 253
        and _HOSTNAME_RE.fullmatch(text) is not None
        and not text.rsplit(".", 1)[-1].isdigit()
    )


def _parse_port(text: str) -> int:
    if not text.isdigit():
        raise ValueError(f"port {text!r} is not a number")
    port = int(text)
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} is not between 1 and 65535")
    return port


@dataclass(frozen=True, slots=True)
class HostPort:
    """A host (IP address or name) and a port.

    ``str()`` gives ``host:port``, or ``[v6]:port`` for an IPv6 address, the
    same form :meth:`parse` reads.  IP addresses are kept in their canonical
    text form, names in lower case.
    """

    host: str
    port: int

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"

    @classmethod
    def parse(
        cls, text: str, default_port: int | None = None, *, require_ip: bool = False
    ) -> HostPort:
        """Read ``127.0.0.1:2525``, ``[::1]:25``, ``::1``, ``mail.example`` or
        ``mail.example:25``; a missing port is ``default_port``.

        Raises :class:`ValueError` saying what is wrong (without repeating
        the text, which the caller shows).  ``require_ip`` rejects names.
        """
        spec = text.strip()
        port: int | None = default_port
        if not spec:
            raise ValueError("the address is empty")
        if spec.startswith("["):
            host, bracket, rest = spec[1:].partition("]")
            if not bracket:
                raise ValueError("'[' without ']'")
            try:
                host = str(ipaddress.IPv6Address(host))
            except ValueError:
                raise ValueError(f"{host!r} in brackets is not an IPv6 address") from None
            if rest.startswith(":"):
                port = _parse_port(rest[1:])
            elif rest:
                raise ValueError(f"unexpected {rest!r} after ']'")
        elif spec.count(":") > 1:
            try:
                host = str(ipaddress.IPv6Address(spec))
            except ValueError:
                raise ValueError(
                    "not an IPv6 address (write an IPv6 address with a port as [addr]:port)"
                ) from None
        else:
            host, colon, port_text = spec.partition(":")
            if colon:
                port = _parse_port(port_text)
            try:
                host = str(ipaddress.IPv4Address(host))
            except ValueError:
                if require_ip:
                    raise ValueError(f"{host!r} is not an IP address") from None
                if not _is_hostname(host):
                    raise ValueError(f"{host!r} is not an IP address or host name") from None
                host = host.lower()
        if port is None:
            raise ValueError("no port given (write host:port)")
        return cls(host, port)


# --------------------------------------------------------------------------
# temp_fail_intervals


_INTERVAL_RE: Final = re.compile(r"(\d+(?:\.\d+)?)([smhd])(?:\*(\d+))?")
_UNIT_SECONDS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_temp_fail_intervals(text: str) -> tuple[float, ...]:
    """Haraka's retry schedule grammar, expanded to seconds.

    ``<n><s|m|h|d>[*count]``, comma separated, whitespace ignored, any case:
    ``10s, 1m*2`` is ``(10.0, 60.0, 60.0)``.  ``none`` is the empty schedule
    (the first temporary failure bounces).  After the n-th temporary failure
    a recipient waits ``intervals[n-1]``; when the schedule is exhausted it
    bounces.

    Stricter than Haraka, which logs and falls back to its default on a bad
    string: every delay must be at least 5 s and at most a year, a count at
    least 1, the whole schedule at most 1000 entries, and anything else
    raises :class:`ValueError` naming the offending element.
    """
    compact = re.sub(r"\s+", "", text).lower()
    if not compact:
        raise ValueError("the schedule is empty (write 'none' for no retries)")
    if compact == "none":
        return ()
    intervals: list[float] = []
    for number, element in enumerate(compact.split(","), start=1):
        if not element:
            raise ValueError(f"element {number} is empty")
        match = _INTERVAL_RE.fullmatch(element)
        if match is None:
            raise ValueError(f"element {number} {element!r} is not <n><s|m|h|d>[*count]")
        amount, unit, count_text = match.groups()
        delay = float(amount) * _UNIT_SECONDS[unit]
        if delay < MIN_TEMP_FAIL_INTERVAL:
            raise ValueError(
                f"element {number} {element!r} is shorter than {MIN_TEMP_FAIL_INTERVAL:g} seconds"
            )
        if delay > MAX_TEMP_FAIL_INTERVAL:
            raise ValueError(f"element {number} {element!r} is longer than 365 days")
        count = 1 if count_text is None else int(count_text)
        if count < 1:
            raise ValueError(f"element {number} {element!r} repeats fewer than once")
        if len(intervals) + count > MAX_TEMP_FAIL_ENTRIES:
            raise ValueError(f"the schedule has more than {MAX_TEMP_FAIL_ENTRIES} retries")
        intervals.extend([delay] * count)
    return tuple(intervals)


def default_temp_fail_intervals(max_temp_failures: int) -> tuple[float, ...]:
    """Haraka's schedule when ``temp_fail_intervals`` is unset: ``2**(i+5)``
    seconds for i in 1..maxTempFailures-1, so the ``maxTempFailures``-th
    temporary failure bounces (13 → 64, 128, … 131072 s; 1 → none).

    Each step is capped at a year (``MAX_TEMP_FAIL_INTERVAL``, the longest
    step the explicit grammar allows): from the 20th step on, Haraka's
    formula would reach centuries, then times past year 9999 that no date
    can hold, and ``maxTempFailures`` goes up to 1000."""
    if max_temp_failures < 1:
        raise ValueError("maxTempFailures must be at least 1")
    return tuple(
        min(float(2 ** (i + 5)), MAX_TEMP_FAIL_INTERVAL) for i in range(1, max_temp_failures)
    )
