"""Message preparation (RFC 6409 §8) and body checks, as pure functions.

* :func:`received_header` builds the trace header we prepend, with the RFC
  3848 / RFC 6531 protocol word (``ESMTPSA``, ``UTF8SMTPS`` ...).
* :func:`add_missing_headers` adds ``Message-ID: <queue-id@me>`` and
  ``Date:`` when the submitter left them out.
* :func:`normalize_contents` turns what a script hands ``send_email`` into
  the spool's form (CRLF line ends, not dot-stuffed).
* :func:`has_bare_line_end` is the SMTP-smuggling test the session applies.

All functions take bytes and return bytes; the clock is a parameter.
"""

from __future__ import annotations

import email.utils
import functools
import math
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Final

__all__ = [
    "add_missing_headers",
    "dot_unstuff",
    "find_header",
    "has_bare_line_end",
    "header_end",
    "header_values",
    "normalize_contents",
    "protocol_word",
    "received_header",
    "remove_headers",
    "rfc5322_date",
]

_FIELD_NAME: Final = re.compile(rb"[!-9;-~]+:")
_BARE: Final = re.compile(rb"\r(?!\n)|(?<!\r)\n")


def has_bare_line_end(data: bytes | bytearray) -> bool:
    """True when ``data`` holds a CR not followed by LF or an LF not after CR.

    A downstream server that took a bare LF as a line end could be made to
    see ``<LF>.<LF>`` as the end of data and the rest as new commands
    (SMTP smuggling); refusing such input keeps the relay from forwarding it.
    """
    return _BARE.search(data) is not None


def protocol_word(*, esmtp: bool, tls: bool, authenticated: bool, smtputf8: bool) -> str:
    """The ``with`` word of the Received header.

    RFC 3848: ESMTP + ``S`` for TLS, ``A`` for AUTH (``ESMTPSA``); RFC 6531
    §3.7.3: ``UTF8SMTP`` + the same suffixes when SMTPUTF8 was used.  HELO
    sessions are plain ``SMTP`` (RFC 3848 registers no suffixed forms of it,
    and a HELO client can neither AUTH nor use SMTPUTF8).
    """
    if not esmtp:
        return "SMTP"
    suffix = ("S" if tls else "") + ("A" if authenticated else "")
    return ("UTF8SMTP" if smtputf8 else "ESMTP") + suffix


def rfc5322_date(now: float) -> str:
    """``Tue, 02 Jan 2024 10:00:00 +0000`` for the POSIX time ``now``."""
    return _date_of_second(math.floor(now))


@functools.lru_cache(maxsize=8)
def _date_of_second(second: int) -> str:
    # Every message of the same second gets the same text; formatting it
    # anew for Date and Received was 3% of the listener's time.
    return email.utils.format_datetime(datetime.fromtimestamp(second, UTC))


#: Characters a header comment may not take from a client: anything but
#: visible ASCII, and the comment delimiters and quote.
_UNCLEAN: Final = re.compile(r"[^!-~]|[()\\]")


def _clean(text: str, limit: int = 255) -> str:
    """A client-supplied word made safe for a header comment (each unsafe character → ``_``)."""
    return _UNCLEAN.sub("_", text)[:limit]


def _ip_literal(ip: str) -> str:
    return f"[IPv6:{ip}]" if ":" in ip else f"[{ip}]"


def received_header(
    *,
    me: str,
    text: str,
    queue_id: str,
    now: float,
    helo: str | None = None,
    client_ip: str | None = None,
    protocol: str | None = None,
    recipient: str | None = None,
) -> bytes:
    """The ``Received:`` line (folded, CRLF-terminated) we prepend.

    ``text`` is ``outbound.ini received_header`` and goes in a comment after
    our name.  ``recipient`` is given only for single-recipient messages
    (listing all recipients would disclose Bcc addresses).  A message from
    the ``send_email`` API has no ``from``/``with`` clause.
    """
    head = _received_head(me, text, helo, client_ip, protocol)
    tail = f"\r\n\tfor <{recipient}>;\r\n\t" if recipient is not None else ";\r\n\t"
    return f"{head} id {queue_id}{tail}{rfc5322_date(now)}\r\n".encode()


@functools.lru_cache(maxsize=256)
def _received_head(
    me: str, text: str, helo: str | None, client_ip: str | None, protocol: str | None
) -> str:
    # What a session's messages share (up to the queue ID): made once per
    # session, not per message (two regex substitutions and the formatting).
    parts = ["Received:"]
    if helo is not None or client_ip is not None:
        literal = _ip_literal(client_ip) if client_ip else "unknown"
        parts.append(f" from {_clean(helo or 'unknown')} ({literal})\r\n\t")
    else:
        parts.append(" ")
    parts.append(f"by {me} ({_clean(text, 100)})")
    if protocol:
        parts.append(f" with {protocol}")
    return "".join(parts)


def header_end(message: bytes) -> int:
    """Offset where the header section ends (the start of its blank line, or
    of the first line that is not a header field).  0 when there is none."""
    pos = 0
    length = len(message)
    while pos < length:
        nl = message.find(b"\n", pos)
        end = length if nl < 0 else nl + 1
        line = message[pos:end]
        if line in (b"\r\n", b"\n"):
            return pos
        if line[:1] in (b" ", b"\t"):
            if pos == 0:
                return 0  # a continuation with nothing to continue: no headers
        elif _FIELD_NAME.match(line) is None:
            return pos
        pos = end
    return pos


def _fields(message: bytes) -> Iterator[tuple[int, int, bytes]]:
    """``(start, end, raw field incl. continuation lines)`` of each header field."""
    limit = header_end(message)
    pos = 0
    start = -1
    while pos < limit:
        nl = message.find(b"\n", pos, limit)
        end = limit if nl < 0 else nl + 1
        if message[pos : pos + 1] not in (b" ", b"\t"):
            if start >= 0:
                yield start, pos, message[start:pos]
            start = pos
        pos = end
    if start >= 0:
        yield start, limit, message[start:limit]


def _name_of(raw: bytes) -> bytes:
    return raw.split(b":", 1)[0].strip().lower()


def header_values(message: bytes, name: str) -> list[str]:
    """Every value of header ``name`` (case-insensitive), unfolded, as text."""
    wanted = name.lower().encode("ascii")
    found: list[str] = []
    for _, _, raw in _fields(message):
        if _name_of(raw) == wanted:
            value = raw.split(b":", 1)[1]
            unfolded = re.sub(rb"\r?\n(?=[ \t])", b"", value).strip()
            found.append(unfolded.decode("utf-8", "replace"))
    return found


def find_header(message: bytes, name: str) -> str | None:
    """The first value of header ``name``, or None."""
    values = header_values(message, name)
    return values[0] if values else None


def remove_headers(message: bytes, name: str) -> bytes:
    """``message`` without any ``name`` header field."""
    wanted = name.lower().encode("ascii")
    spans = [(s, e) for s, e, raw in _fields(message) if _name_of(raw) == wanted]
    if not spans:
        return message
    out = bytearray()
    pos = 0
    for start, end in spans:
        out += message[pos:start]
        pos = end
    out += message[pos:]
    return bytes(out)


def insert_header_fields(message: bytes, fields: bytes) -> bytes:
    """``fields`` (complete CRLF lines) appended to the header section.

    When the message had no blank line after its headers (or no headers),
    one is added so what follows stays the body.
    """
    if not fields:
        return message
    return _insert_at(message, header_end(message), fields)


def _insert_at(message: bytes, end: int, fields: bytes) -> bytes:
    """``fields`` put at ``end``, the header section's end, a blank line added if none follows."""
    rest = message[end:]
    separator = b"" if rest.startswith((b"\r\n", b"\n")) else b"\r\n"
    return b"".join((message[:end], fields, separator, rest))


def add_missing_headers(message: bytes, *, queue_id: str, me: str, now: float) -> bytes:
    """Add ``Message-ID: <queue_id@me>`` and ``Date:`` when absent (RFC 6409 §8.2, §8.3).

    One pass over the header section finds both fields and where the
    section ends (what :func:`header_end`, the field names of
    :func:`header_values` and :func:`insert_header_fields` would find, in
    three passes: 3.9% of an SMTP process's GIL samples with kept sessions).
    """
    has_id = has_date = False
    pos = 0
    length = len(message)
    while pos < length:
        nl = message.find(b"\n", pos)
        stop = length if nl < 0 else nl + 1
        if stop - pos <= 2 and message[pos:stop] in (b"\r\n", b"\n"):
            break  # the blank line: the header section ends here
        if message[pos] in _FOLD:
            if pos == 0:
                break  # a continuation with nothing to continue: no headers
        else:
            name = _FIELD_NAME.match(message, pos)
            if name is None:
                break  # not a header field: the body starts here
            length_of_name = name.end() - pos - 1
            if length_of_name == 10 and not has_id:
                has_id = message[pos : pos + 10].lower() == b"message-id"
            elif length_of_name == 4 and not has_date:
                has_date = message[pos : pos + 4].lower() == b"date"
        pos = stop
    if has_id and has_date:
        return message
    added = b"" if has_id else f"Message-ID: <{queue_id}@{me}>\r\n".encode()
    if not has_date:
        added += f"Date: {rfc5322_date(now)}\r\n".encode()
    return _insert_at(message, pos, added)


#: The octets that begin a folded header line's continuation (space, tab).
_FOLD: Final = frozenset(b" \t")


def normalize_contents(contents: str | bytes, *, dot_stuffed: bool = False) -> bytes:
    """What ``send_email`` was given, as the spool stores it.

    ``str`` is encoded as UTF-8.  Every CRLF, lone LF and lone CR becomes
    CRLF; a last line without a line end keeps its text and gains a CRLF.
    With ``dot_stuffed`` the leading dot of each line is removed (the text
    was prepared for the wire).
    """
    data = contents.encode("utf-8") if isinstance(contents, str) else bytes(contents)
    data = re.sub(rb"\r\n|\r|\n", b"\r\n", data)
    if data and not data.endswith(b"\r\n"):
        data += b"\r\n"
    if dot_stuffed:
        data = dot_unstuff(data)
    return data


def dot_unstuff(data: bytes) -> bytes:
    """Remove the transparency dot at the start of every line (RFC 5321 §4.5.2)."""
    if data.startswith(b"."):
        data = data[1:]
    return data.replace(b"\r\n.", b"\r\n")
