"""SMTP replies the submission service sends, as values.

Every reply carries an RFC 3463 enhanced status code, because we advertise
``ENHANCEDSTATUSCODES`` (RFC 2034 requires it on every 2xx/4xx/5xx reply
after EHLO).  Named constants keep the handler and the tests readable, and
docs/submission.md lists the same table.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

__all__ = [
    "LIBRARY_WIRE",
    "WIRE",
    "WIRE_BY_ID",
    "Reply",
    "printable_ascii",
    "wire",
    "with_enhanced_code",
]


@dataclass(frozen=True, slots=True)
class Reply:
    """One SMTP reply: basic code, enhanced status code and text."""

    code: int
    status: str
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.status} {self.text}"

    @property
    def is_success(self) -> bool:
        return 200 <= self.code < 300

    @property
    def is_temporary(self) -> bool:
        return 400 <= self.code < 500

    def with_text(self, text: str) -> Reply:
        """The same codes with another text (a plugin's message, say)."""
        return Reply(self.code, self.status, text)


def clean_text(text: str, limit: int = 400) -> str:
    """Reply text that cannot break the protocol: one line, printable, bounded.

    Plugin messages and client-supplied words end up in replies; a CR or LF
    in them would let the sender of the text forge further reply lines.
    """
    flat = "".join(ch if ch.isprintable() else " " for ch in text).strip()
    return flat[:limit] or "-"


def printable_ascii(text: str) -> str:
    """``text`` with every character outside printable ASCII replaced by ``?``.

    RFC 5321 §4.2: reply text is printable ASCII.  Used on every reply
    line, since some echo what the client sent (an unknown command, a bad
    parameter): an ESC, NUL, DEL, bare CR or UTF-8 from the client must not
    reach the client's terminal or log as it was.
    """
    return "".join(ch if " " <= ch <= "~" else "?" for ch in text)


# --- MAIL / RCPT -----------------------------------------------------------

OK_SENDER: Final = Reply(250, "2.1.0", "Sender OK")
OK_RECIPIENT: Final = Reply(250, "2.1.5", "Recipient OK")
BAD_SENDER_SYNTAX: Final = Reply(501, "5.1.7", "Bad sender address syntax")
BAD_RECIPIENT_SYNTAX: Final = Reply(501, "5.1.3", "Bad recipient address syntax")
NON_ASCII_ADDRESS: Final = Reply(553, "5.6.7", "Non-ASCII address requires MAIL FROM ... SMTPUTF8")
MAIL_SYNTAX: Final = Reply(501, "5.5.2", "Syntax: MAIL FROM:<address> [parameters]")
RCPT_SYNTAX: Final = Reply(501, "5.5.2", "Syntax: RCPT TO:<address> [parameters]")
BAD_PARAMETER: Final = Reply(501, "5.5.4", "Invalid parameter")
UNKNOWN_PARAMETER: Final = Reply(555, "5.5.4", "Parameter not recognized")
NESTED_MAIL: Final = Reply(503, "5.5.1", "Nested MAIL command")
NEED_MAIL: Final = Reply(503, "5.5.1", "Need MAIL command first")
NEED_RCPT: Final = Reply(503, "5.5.1", "Need RCPT command first")
NEED_EHLO: Final = Reply(503, "5.5.1", "Send EHLO (or HELO) first")
TOO_BIG: Final = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
TOO_MANY_RECIPIENTS: Final = Reply(452, "4.5.3", "Too many recipients")
RELAY_DENIED: Final = Reply(550, "5.7.1", "Relaying denied")
AUTH_REQUIRED: Final = Reply(530, "5.7.0", "Authentication required")
SENDER_NOT_OWNED: Final = Reply(550, "5.7.1", "Sender domain does not match the AUTH user")

# --- DATA ------------------------------------------------------------------

START_DATA: Final = "354 End data with <CR><LF>.<CR><LF>"
BARE_LINE_END: Final = Reply(
    554, "5.5.2", "Bare CR or LF in message data; line ends must be CRLF (SMTP smuggling defence)"
)
LINE_TOO_LONG: Final = Reply(554, "5.6.0", "Line too long")
DATA_SYNTAX: Final = Reply(501, "5.5.4", "Syntax: DATA")
LOCAL_ERROR: Final = Reply(451, "4.3.0", "Temporary failure, please try again later")
#: The queue's disk is full (RFC 3463 4.3.1, mail system full).
SYSTEM_FULL: Final = Reply(451, "4.3.1", "Mail system full, please try again later")
PLUGIN_DENY: Final = Reply(550, "5.7.1", "Message refused")
PLUGIN_DENYSOFT: Final = Reply(451, "4.7.1", "Message temporarily refused, try again later")
NO_RECIPIENTS_LEFT: Final = Reply(554, "5.5.1", "No recipients left to queue")

# --- AUTH / TLS / session ----------------------------------------------------

AUTH_OK: Final = "235 2.7.0 Authentication successful"
AUTH_INVALID: Final = Reply(535, "5.7.8", "Authentication credentials invalid")
AUTH_NEEDS_TLS: Final = Reply(538, "5.7.11", "Encryption required for requested authentication")
AUTH_NOT_AVAILABLE: Final = Reply(502, "5.5.1", "AUTH not available")
AUTH_IN_TRANSACTION: Final = Reply(503, "5.5.1", "AUTH not permitted during a mail transaction")
AUTH_BLOCKED: Final = Reply(
    421, "4.7.0", "Too many failed authentications from your address, closing connection"
)
AUTH_TEMPORARY: Final = Reply(454, "4.7.0", "Temporary authentication failure, try again later")
AUTH_CANCELLED: Final = Reply(501, "5.7.0", "Authentication cancelled")
AUTH_BAD_BASE64: Final = Reply(501, "5.5.2", "Cannot decode base64")
LINE_TOO_LONG_COMMAND: Final = Reply(500, "5.5.2", "Line too long")
ALREADY_TLS: Final = Reply(503, "5.5.1", "TLS already active")


# Replies aiosmtpd writes itself (unknown commands, NOOP, QUIT, ...) carry no
# enhanced code; push() adds one by the basic code's meaning.
_HAS_STATUS: Final = re.compile(r"^[245]\d\d[ -][245]\.\d{1,3}\.\d{1,3}\b")
_DEFAULT_STATUS: Final = {
    221: "2.0.0",
    235: "2.7.0",
    250: "2.0.0",
    252: "2.5.0",
    421: "4.4.2",
    451: "4.3.0",
    454: "4.7.0",
    500: "5.5.2",
    501: "5.5.4",
    502: "5.5.1",
    503: "5.5.1",
    504: "5.5.4",
    530: "5.7.0",
    535: "5.7.8",
    538: "5.7.11",
    550: "5.0.0",
    552: "5.3.4",
    554: "5.0.0",
    555: "5.5.4",
}


#: The text of aiosmtpd's 220 answer to STARTTLS (any other 220 is the greeting).
_STARTTLS_READY: Final = "Ready to start TLS"


def with_enhanced_code(line: str) -> str:
    """``line`` with an enhanced status code inserted when it has none.

    Leaves 1xx/3xx replies and the 220 greeting (where RFC 2034 has no
    code) alone, and never touches a line that already carries one.  The
    only other 220, aiosmtpd's answer to STARTTLS, gets ``2.0.0`` (RFC 2034
    exempts only the greeting and the answers to HELO/EHLO).
    """
    if len(line) < 4 or not line[:3].isdigit() or line[3] not in " -":
        return line
    code = int(line[:3])
    greeting = code == 220 and line[4:] != _STARTTLS_READY
    if greeting or code < 200 or 300 <= code < 400 or _HAS_STATUS.match(line):
        return line
    status = _DEFAULT_STATUS.get(code, f"{code // 100}.0.0")
    return f"{line[:4]}{status} {line[4:]}".rstrip()


def wire(line: str, *, raw: bool = False) -> bytes:
    """Reply ``line`` as the octets sent: printable ASCII, CRLF, and an
    enhanced status code added where it has none (unless ``raw``: the
    greeting-like replies of HELO/EHLO and DATA's 354)."""
    if not (line.isascii() and line.isprintable()):
        line = printable_ascii(line)
    if not raw:
        line = with_enhanced_code(line)
    return line.encode("ascii") + b"\r\n"


#: The octets of every named reply above, encoded once: most replies a
#: session sends are these (``250 2.1.0 Sender OK`` ...).
WIRE: Final[dict[Reply, bytes]] = {
    value: wire(str(value)) for value in list(globals().values()) if isinstance(value, Reply)
}

#: :data:`WIRE` keyed by the named replies' ``id()``: a look-up with an int
#: key, not the dataclass's Python-level ``__hash__`` and ``__eq__`` (three
#: replies a message).  The module keeps every key alive, so no other
#: object can share one's id.
WIRE_BY_ID: Final[dict[int, bytes]] = {id(value): data for value, data in WIRE.items()}


#: aiosmtpd's fixed replies that come on every message or connection
#: (RSET, NOOP, QUIT), as :func:`wire` makes them, so push() need not.
LIBRARY_WIRE: Final[dict[str, bytes]] = {line: wire(line) for line in ("250 OK", "221 Bye")}
