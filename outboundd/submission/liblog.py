"""aiosmtpd's own log lines, with nothing a client typed during AUTH in them.

aiosmtpd logs on the standard ``mail.log`` logger, which :mod:`outboundd.log`
bridges into ours.  Several of its lines carry what the client sent: every
command line (``'%r >> %r'``, ``'_handle_client readline: %r'``), an
unrecognised command word, an answer to an AUTH challenge it could not
decode (often the raw password).  aiosmtpd masks only the argument of an
``AUTH`` command line; a password a confused client sends as a line of its
own, or an answer to a challenge, goes through as it is.

:class:`ClientDataFilter`, attached to ``mail.log``, rewrites those records
before any handler sees them, at every level:

* a command line keeps its verb only when it is a known SMTP command, and
  its argument only when that command carries no secret (``AUTH`` keeps
  the mechanism name); anything else becomes ``<N octets>``;
* an unrecognised command word becomes ``<N octets>``, in the log line that
  names it and in the logged reply that quotes it back to the client
  (``500 … command "<N octets>" not recognized``): a password sent out
  of step arrives as such a word;
* lines that exist only to show a client's AUTH answer are dropped.

Our own session code never logs a password either (see
:mod:`outboundd.submission.handler`); this closes the library's side.
"""

from __future__ import annotations

import logging
import re
from typing import Final

__all__ = ["ClientDataFilter", "describe_client_line", "describe_reply", "install"]

#: Commands whose whole line may be logged.
_PLAIN_COMMANDS: Final = frozenset(
    {
        "EHLO", "HELO", "LHLO", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "QUIT", "VRFY",
        "EXPN", "HELP", "STARTTLS", "BDAT",
    }
)  # fmt: skip

#: aiosmtpd's message formats whose arguments include a whole client line.
_LINE_FORMATS: Final = frozenset({"%r >> %r", "_handle_client readline: %r"})
#: Formats whose last argument is an unrecognised command word.
_WORD_FORMATS: Final = frozenset({"%r unrecognised: %s"})
#: The format of a reply sent to the client (bytes or str), logged at debug level.
_REPLY_FORMATS: Final = frozenset({"%r << %r"})
#: The part of the unknown-command reply that quotes the client's word back.
_QUOTED_COMMAND: Final = re.compile(r'command "(.*)" not recognized', re.DOTALL)
#: Formats that only ever show an AUTH answer: never logged.
_DROPPED_FORMATS: Final = frozenset({"%r can't decode base64: %s"})


def describe_client_line(line: bytes | str) -> str:
    """A client line as it may appear in a log: no secret, no raw octets.

    ``MAIL FROM:<a@b>`` stays as it is (decoded with replacement);
    ``AUTH PLAIN xyz`` becomes ``AUTH PLAIN ********``; anything that is
    not a known command (a password sent on its own line, garbage) becomes
    ``<N octets>``.
    """
    raw = line.encode("utf-8", "surrogateescape") if isinstance(line, str) else line
    raw = raw.rstrip(b"\r\n")
    verb, _, rest = raw.strip().partition(b" ")
    word = verb.decode("ascii", "replace").upper()
    if word == "AUTH":
        mechanism, _, secret = rest.strip().partition(b" ")
        shown = mechanism.decode("ascii", "replace")[:20]
        return f"AUTH {shown} ********" if secret.strip() else f"AUTH {shown}".rstrip()
    if word in _PLAIN_COMMANDS:
        return raw.decode("utf-8", "replace")
    return f"<{len(raw)} octets>"


def describe_reply(reply: bytes | str) -> str:
    """A reply as it may appear in a log: the quoted unknown command masked.

    ``500 5.5.2 Error: command "HUNTER2" not recognized`` becomes
    ``500 5.5.2 Error: command "<7 octets>" not recognized``; every other
    reply is our own text and stays as it is.
    """
    text = reply.decode("utf-8", "replace") if isinstance(reply, bytes) else reply

    def mask(match: re.Match[str]) -> str:
        octets = len(match[1].encode("utf-8", "surrogateescape"))
        return f'command "<{octets} octets>" not recognized'

    return _QUOTED_COMMAND.sub(mask, text)


class ClientDataFilter(logging.Filter):
    """Rewrites (or drops) ``mail.log`` records that would show client data."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.msg
        if not isinstance(msg, str):
            return True
        if msg in _DROPPED_FORMATS:
            return False
        args = record.args
        if not isinstance(args, tuple) or not args:
            return True
        if msg in _LINE_FORMATS:
            last = args[-1]
            if isinstance(last, bytes | str):
                record.args = (*args[:-1], describe_client_line(last))
        elif msg in _WORD_FORMATS:
            last = args[-1]
            if isinstance(last, bytes | str):
                record.args = (*args[:-1], f"<{len(last)} octets>")
        elif msg in _REPLY_FORMATS:
            last = args[-1]
            if isinstance(last, bytes | str):
                record.args = (*args[:-1], describe_reply(last))
        return True


_FILTER: Final = ClientDataFilter()


def install(logger: logging.Logger | None = None) -> None:
    """Attach the filter to ``mail.log`` (or ``logger``); safe to call again."""
    target = logger or logging.getLogger("mail.log")
    if _FILTER not in target.filters:
        target.addFilter(_FILTER)
