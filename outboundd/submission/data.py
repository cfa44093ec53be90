"""Judging the octets of a DATA transfer: end, size, line length, smuggling, dot-stuffing.

The session reads DATA in large pieces (each ends at the next ``.<CRLF>``,
or wherever the stream reader's limit cut it) instead of line by line:
with one ``readuntil`` per line, a 4 KB message cost some 60 awaits and
Python loop turns, 15% of the listener's time.  :class:`DataCollector` is
the pure part: it is fed those pieces, says when the end-of-data line has
arrived, and then judges the whole message with a few C-level byte
operations.  No I/O here; the tests feed it bytes.
"""

from __future__ import annotations

import enum
import re

__all__ = ["DataCollector", "DataProblem"]

_END = b".\r\n"
_CRLF_END = b"\r\n.\r\n"
_STUFFED = re.compile(rb"^\.", re.MULTILINE)


def _has_long_line(raw: bytes, limit: int) -> bool:
    """True when a line of ``raw`` (wire form) is longer than ``limit`` unstuffed.

    The usual message has no line near the limit, which :func:`_lines_fit`
    shows without splitting it; only a message it cannot vouch for is split
    into its lines and judged line by line.
    """
    if _lines_fit(raw, limit):
        return False
    lines = raw.split(b"\r\n")
    return any(
        len(line) > limit + 1 or (len(line) == limit + 1 and not line.startswith(b"."))
        for line in lines
    )


def _lines_fit(raw: bytes, limit: int) -> bool:
    """True when every CRLF-separated line of ``raw`` is at most ``limit`` octets.

    From the start of a line, the last CRLF that begins within the next
    ``limit`` octets ends only lines of at most ``limit`` octets, so the
    search jumps to just after it: a few ``rfind`` calls a message instead
    of a bytes object per line.  False when some line may be longer (no
    CRLF within ``limit`` octets of a line's start).
    """
    start = 0
    end = len(raw)
    while end - start > limit:
        found = raw.rfind(b"\r\n", start, start + limit + 2)
        if found < 0:
            return False
        start = found + 2
    return True


class DataProblem(enum.Enum):
    """Why a message is refused, in the order they are reported."""

    TOO_BIG = "too big"
    LINE_TOO_LONG = "line too long"
    BARE_LINE_END = "bare CR or LF"


class DataCollector:
    """Collects one message's DATA pieces; judges it once the end has come.

    ``max_size`` is the limit on the unstuffed message (0 = none);
    ``max_line`` the longest line of the message, without its CRLF: on the
    wire a line may be one octet longer only when that octet is the
    transparency dot of a dot-stuffed line (RFC 5321 §4.5.2).  Past what
    could still be a message within ``max_size`` nothing more is kept
    (unstuffing removes at most one octet in four, so that bound is 4/3 of
    the limit), so an oversized message never costs
    more memory than that.
    """

    def __init__(self, *, max_size: int, max_line: int) -> None:
        self.max_size = max_size
        self.max_line = max_line
        self._keep_up_to = max_size * 4 // 3 + len(_CRLF_END) if max_size else 0
        self._pieces: list[bytes] = []
        self._kept = 0
        self.size = 0  # octets seen on the wire, the end line included
        self._too_big = False
        # The last octets of the stream so far; DATA starts at a line start,
        # as if after a CRLF.  The end marker's CRLF may end the previous piece.
        self._tail = b"\r\n"

    def feed(self, piece: bytes) -> bool:
        """Take the next piece of the stream; True when it ended the data.

        A piece is any run of octets in stream order; the end is a
        ``.<CRLF>`` that starts a line; the reader cuts pieces right after
        every ``.<CRLF>`` and never inside one, so it ends a piece.
        """
        self.size += len(piece)
        joined = self._tail + piece[-len(_CRLF_END) :]
        ended = joined.endswith(_CRLF_END)
        self._tail = joined[-(len(_CRLF_END) - 1) :]
        if not self._too_big:
            self._kept += len(piece)
            if self._keep_up_to and self._kept > self._keep_up_to:
                self._too_big = True
                self._pieces.clear()
            else:
                self._pieces.append(piece)
        return ended

    def result(self) -> tuple[bytes, None] | tuple[None, DataProblem]:
        """The unstuffed message (CRLF line ends), or why it is refused."""
        if self._too_big:
            return None, DataProblem.TOO_BIG
        raw = b"".join(self._pieces)[: -len(_END)]
        self._pieces.clear()
        too_long = _has_long_line(raw, self.max_line)
        crlf = raw.count(b"\r\n")
        bare = raw.count(b"\r") != crlf or raw.count(b"\n") != crlf
        body = self._unstuff(raw)
        if self.max_size and len(body) > self.max_size:
            return None, DataProblem.TOO_BIG
        if too_long:
            return None, DataProblem.LINE_TOO_LONG
        if bare:
            return None, DataProblem.BARE_LINE_END
        return body, None

    @staticmethod
    def _unstuff(raw: bytes) -> bytes:
        """RFC 5321 §4.5.2: drop the first dot of every line that starts with one."""
        if raw.startswith(b".") or b"\r\n." in raw:
            return _STUFFED.sub(b"", raw)
        return raw
