"""What a remote server's reply means: parsing, classification, status codes.

Everything here is a pure function over frozen values, so the decisions the
delivery session makes about a reply (is it final? which enhanced status code
does the record carry? what does an exhausted retry report?) are tested
without sockets.

Conventions callers may rely on:

* A :class:`Reply` always has an enhanced status code (RFC 3463) when its
  code is 2xx, 4xx or 5xx: the server's own when it gave one whose class
  matches the reply code, otherwise the neutral default ``X.0.0`` of the
  reply's class.  Any other code (a malformed reply, a 354 where a final
  reply was due) is a protocol error, handled as temporary, with ``4.5.0``.
* Replies produced locally (connection failures, size and SMTPUTF8 checks)
  use the same shape, with the specific status RFC 3463 defines for the
  case: ``4.4.1`` no answer from host, ``4.4.2`` bad connection, ``4.7.10``
  encryption needed, ``5.3.4`` message too big, ``5.6.7`` non-ASCII
  addresses not permitted, ``4.3.0`` local error.  Their ``code`` only
  classifies them; it was never sent by anyone, so it is never recorded
  or quoted (:attr:`Reply.recorded_code` is ``None``, ``sent`` is ``None``).
* ``sent`` is what a server actually sent after its code (its enhanced
  status included when it gave one), on one line: the verbatim source of
  a DSN's ``Diagnostic-Code`` (RFC 3464 §2.3.6) and of the accounting rows.
* ``text`` is one line: multi-line replies are joined with single spaces,
  control characters are replaced, and the length is capped, because the
  text ends up in log lines, SQL rows and DSNs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from outboundd.spool.types import Outcome

__all__ = [
    "MAX_TEXT_LENGTH",
    "Reply",
    "ReplyClass",
    "Stage",
    "classify",
    "default_status",
    "outcome_of",
    "parse_reply",
    "rcpt_refusal",
    "to_exhausted",
    "to_transient",
]

#: Longest reply text kept; a hostile server cannot fill our rows or logs.
MAX_TEXT_LENGTH = 2000

_STATUS_RE = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?=\s|$)")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]+")


class Stage(StrEnum):
    """Where in the session a reply (or a failure) happened."""

    CONNECT = "connect"
    GREETING = "greeting"
    EHLO = "ehlo"
    STARTTLS = "starttls"
    AUTH = "auth"
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"
    DATA_END = "data_end"
    #: RSET before the next message on a reused connection.
    RSET = "rset"
    #: Our side failed (body file unreadable, internal error): not the remote's fault.
    LOCAL = "local"


class ReplyClass(StrEnum):
    """The three things a reply code can mean to a sender."""

    POSITIVE = "positive"
    TEMPORARY = "temporary"
    PERMANENT = "permanent"


@dataclass(frozen=True, slots=True)
class Reply:
    """One SMTP reply, or our own reason in the same shape.

    ``code`` classifies the reply; ``status`` is the enhanced status code
    the record carries (the server's, or one we derived: a deferral keeps
    a 4.x.y, an exhausted retry a 5.x.y); ``text`` is the text without code
    and status.  ``sent`` is the server's reply after its code, exactly as
    sent (one line), and ``None`` for a reply we made up.  ``context`` is
    our note on what a remote reply meant here ("authentication failed"),
    kept apart so the remote's words stay verbatim.
    """

    code: int
    status: str | None
    text: str
    sent: str | None = None
    context: str | None = None

    @property
    def remote(self) -> bool:
        """True when a server sent this reply; False for our own reasons."""
        return self.sent is not None

    @property
    def recorded_code(self) -> int | None:
        """The code for ``attempts.code``/``last_code``: only one a server sent."""
        return self.code if self.sent is not None else None

    @property
    def line(self) -> str | None:
        """The server's reply line, ``550 5.1.1 text``, verbatim; None when local."""
        if self.sent is None:
            return None
        return f"{self.code} {self.sent}".rstrip()

    def __str__(self) -> str:
        """The reply for people: the remote's line (after our context), or our reason."""
        if self.sent is None:
            return self.text
        line = f"{self.code} {self.sent}".rstrip()
        return f"{self.context}: {line}" if self.context else line

    @property
    def reply_class(self) -> ReplyClass:
        return classify(self.code)


def classify(code: int) -> ReplyClass:
    """2xx positive, 5xx permanent; 4xx and anything else temporary.

    A code outside 2xx/4xx/5xx where a final reply is due is a protocol
    error; retrying later is the only answer that cannot lose mail.
    """
    if 200 <= code <= 299:
        return ReplyClass.POSITIVE
    if 500 <= code <= 599:
        return ReplyClass.PERMANENT
    return ReplyClass.TEMPORARY


def outcome_of(reply: Reply) -> Outcome:
    """The recipient outcome of a *final* reply (to MAIL, RCPT refusals, DATA, the dot)."""
    cls = classify(reply.code)
    if cls is ReplyClass.POSITIVE:
        return Outcome.DELIVERED
    if cls is ReplyClass.PERMANENT:
        return Outcome.BOUNCED
    return Outcome.DEFERRED


def rcpt_refusal(reply: Reply) -> tuple[Outcome, Reply]:
    """What a refused RCPT does to its recipient, and the reply to record.

    As :func:`outcome_of`, except ``552`` (RFC 5321 §4.5.3.1.10: "clients
    SHOULD treat a 552 code in this case as a temporary ... failure", the
    old "too many recipients" code; Postfix does the same): the recipient is
    deferred, the server's code, text and line kept as sent, the status
    moved into class 4 (``5.2.2`` → ``4.2.2``) so a deferral carries a 4.x.y.
    """
    if reply.code != 552:
        return outcome_of(reply), reply
    status = _with_class(reply.status, "4")
    return Outcome.DEFERRED, Reply(
        reply.code, status, reply.text, sent=reply.sent, context=reply.context
    )


def default_status(code: int) -> str:
    """RFC 3463's neutral status for a reply code: ``X.0.0``, or ``4.5.0``
    ("other protocol status", temporary) for codes that are not 2xx/4xx/5xx."""
    first = code // 100
    if first in (2, 4, 5) and 200 <= code <= 599:
        return f"{first}.0.0"
    return "4.5.0"


def _clean(text: str) -> str:
    text = _CONTROL_RE.sub(" ", text).strip()
    text = " ".join(text.split())
    if len(text) > MAX_TEXT_LENGTH:
        text = text[: MAX_TEXT_LENGTH - 1] + "\u2026"
    return text


def parse_reply(code: int, message: str, *, status: str | None = None) -> Reply:
    """Build a :class:`Reply` from a code and the (possibly multi-line) text.

    An enhanced status code at the start of the text (``5.7.26 ...``;
    multi-digit parts are kept) is taken out of the text when its class
    matches the reply code (RFC 3463 §2: they must agree); one that does not
    match is left in the text and the default is used instead.  The same
    status repeated at the start of continuation lines is removed too.
    ``status`` overrides the default for replies we make up ourselves.
    """
    if (
        message.isprintable()
        and "  " not in message
        and len(message) <= MAX_TEXT_LENGTH
        and not message.startswith(" ")
        and not message.endswith(" ")
    ):
        return _parse_plain_line(code, message, status)
    return _parse_lines(code, message, status)


def _parse_plain_line(code: int, message: str, status: str | None) -> Reply:
    """:func:`parse_reply` of a reply with nothing to clean (the usual one).

    One line (no CR or LF: they are not printable), no control character,
    no space but single ones between words (the only printable whitespace
    is the ASCII space), not longer than the cap: :func:`_clean` and the
    line splitting would return it as it is, so ``sent`` is the message and
    ``text`` the message after the status and its space.  A fifth of a
    delivered message's instructions in :func:`_parse_lines` went to that
    cleaning (callgrind); ``tests/test_delivery_replies.py`` holds both
    paths to the same results.
    """
    found: str | None = None
    text = message
    match = _STATUS_RE.match(message)
    if match and 200 <= code <= 599 and int(match.group(1)) == code // 100:
        found = match.group(0)
        text = message[len(found) + 1 :]
    return Reply(code, found or status or default_status(code), text, sent=message)


def _parse_lines(code: int, message: str, status: str | None) -> Reply:
    """:func:`parse_reply` of any reply: lines split, status taken, text cleaned."""
    lines = [line.strip() for line in message.replace("\r", "").split("\n")]
    sent = _clean(" ".join(line for line in lines if line))
    found: str | None = None
    if lines:
        match = _STATUS_RE.match(lines[0])
        if match and 200 <= code <= 599 and int(match.group(1)) == code // 100:
            found = match.group(0)
    if found is not None:
        stripped = []
        for line in lines:
            if line == found:
                continue
            if line.startswith(found + " ") or line.startswith(found + "\t"):
                line = line[len(found) :].strip()
            stripped.append(line)
        lines = stripped
    text = _clean(" ".join(line for line in lines if line))
    return Reply(code, found or status or default_status(code), text, sent=sent)


def _with_class(status: str | None, first: str) -> str:
    """``status`` moved into class ``first`` (``4.7.1`` → ``5.7.1``); ``first.0.0`` if none."""
    if status and status[0] in "245" and status[1:2] == ".":
        return first + status[1:]
    return f"{first}.0.0"


def to_exhausted(reply: Reply) -> Reply:
    """The reply to record when the retry schedule ran out on ``reply``.

    The final status is ours and permanent (``4.4.1`` → ``5.4.1``; none →
    ``5.0.0``); the code, text and ``sent`` line stay the remote's, because
    the remote never sent a permanent reply (nothing is made up).  A reply
    that is already permanent is returned unchanged.
    """
    status = _with_class(reply.status, "5")
    if status == reply.status:
        return reply
    return Reply(reply.code, status, reply.text, sent=reply.sent, context=reply.context)


def to_transient(reply: Reply, context: str) -> Reply:
    """The reply to record when a non-temporary answer must only defer.

    Used for answers that make us leave a host rather than fail the mail
    (a 554 greeting, a refused AUTH).  The remote's code, text and line are
    kept as sent; the status becomes temporary (``5.7.1`` → ``4.7.1``,
    ours), and ``context`` says what the answer meant to us.  A reply we
    made up ourselves gets the context in front of its text.
    """
    if reply.sent is None:
        return Reply(reply.code, _with_class(reply.status, "4"), _clean(f"{context}: {reply.text}"))
    kept = reply.status if classify(reply.code) is ReplyClass.TEMPORARY else None
    return Reply(
        reply.code,
        kept or _with_class(reply.status, "4"),
        reply.text,
        sent=reply.sent,
        context=context,
    )
