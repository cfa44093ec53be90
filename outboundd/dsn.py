"""Delivery Status Notifications: what to send, and the bytes of the message.

Everything here is a pure function from values to values: no I/O, no clock
(callers pass ``now``), no randomness (MIME boundaries derive from the DSN's
Message-ID).  The delivery engine decides *that* something happened; this
module decides *whether* the sender hears about it (RFC 3461 NOTIFY, the null
sender, double bounces) and renders the notice as an RFC 3464 report inside an
RFC 6522 ``multipart/report``.

The rendered message is built by hand rather than with ``email.message``:
the stdlib generator re-folds and re-encodes parts (``message/delivery-status``
in particular), and a DSN must come out byte-exact — CRLF everywhere, every
line within 998 octets, the machine-readable part untouched.  The tests parse
every kind of DSN back with ``email.policy.default`` to prove it is well formed.

Decisions documented in ``docs/bounces.md``:

* NOTIFY absent means FAILURE,DELAY (RFC 3461 §4.1 leaves the choice to the
  MTA); delay notices are still only sent once ``delay_warning_time`` has
  passed, and never when it is 0.
* RET absent means FULL, as Postfix does (RFC 3461 §4.3 lets the MTA pick);
  the whole message is only returned in *failure* notices and only when it
  fits ``bounce_max_original_size`` — otherwise its header block is returned.
* A success notice is ``relayed`` when the next hop could not take the DSN
  request over, ``delivered`` on final delivery (LMTP), and not sent at all
  when the next hop accepted the DSN parameters: from then on that MTA owns
  the notification (RFC 3461 §5.2, RFC 3464 §2.3.3).
"""

from __future__ import annotations

import base64
import binascii
import email.errors
import email.header
import hashlib
import html
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Literal

__all__ = [
    "DEFAULT_BOUNCE_MAX_ORIGINAL_SIZE",
    "STATUS_EXPIRED",
    "STATUS_NO_MX",
    "STATUS_NULL_MX",
    "STATUS_OPERATOR",
    "DsnAction",
    "DsnEvent",
    "DsnRecipient",
    "DsnReport",
    "DsnTemplates",
    "DsnTransport",
    "FailureNotice",
    "ReturnContent",
    "SuccessAction",
    "default_template",
    "describe_recipients",
    "dsn_event",
    "dsn_transport",
    "format_date",
    "header_block",
    "is_null_sender",
    "notify_wants",
    "original_header",
    "original_message_id",
    "original_subject",
    "plan_failure_notice",
    "reason_for_exhaustion",
    "reason_no_mx",
    "reason_null_mx",
    "reason_nxdomain",
    "reason_operator",
    "render_dsn",
    "render_template",
    "return_content",
    "should_send_dsn",
    "subject_for",
    "success_action",
    "utf8_addr_xtext",
]

DsnAction = Literal["failed", "delayed", "delivered", "relayed", "expanded"]
DsnEvent = Literal["failure", "delay", "success"]
SuccessAction = Literal["delivered", "relayed"]
ReturnContent = Literal["full", "headers"]

DEFAULT_BOUNCE_MAX_ORIGINAL_SIZE = 10 * 1024 * 1024

# Enhanced status codes (RFC 3463, RFC 7505) for reasons that are ours, not a
# remote server's.  Multi-digit subjects/details are legal and kept as is.
STATUS_NO_MX = "5.1.2"  # bad destination system address
STATUS_NULL_MX = "5.1.10"  # RFC 7505: recipient domain publishes a null MX
STATUS_EXPIRED = "4.4.7"  # delivery time expired
STATUS_OPERATOR = "5.0.0"  # failed on an operator's (or plugin's) decision

_CRLF = "\r\n"
_SOFT_LIMIT = 78  # RFC 5322 §2.1.1: SHOULD
_HARD_LIMIT = 998  # RFC 5322 §2.1.1: MUST (octets, excluding CRLF)

_STATUS_RE = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")
_MSGID_RE = re.compile(r"<[!-;=?-~]{1,900}>")  # printable ASCII minus < and >
_TEMPLATE_VAR_RE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_HEADER_LINE_RE = re.compile(r"^[!-9;-~]+:")
_WS_RE = re.compile(r"\s+")
_ADDR_TYPE_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")

_EVENT_OF_ACTION: Mapping[str, DsnEvent] = {
    "failed": "failure",
    "delayed": "delay",
    "delivered": "success",
    "relayed": "success",
    "expanded": "success",
}
_SUBJECTS: Mapping[DsnEvent, str] = {
    "failure": "Undelivered Mail Returned to Sender",
    "delay": "Delayed Mail (still being retried)",
    "success": "Successful Mail Delivery Report",
}
_FALLBACK_STATUS: Mapping[DsnEvent, str] = {
    "failure": "5.0.0",
    "delay": "4.0.0",
    "success": "2.0.0",
}


# --------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True, slots=True)
class DsnRecipient:
    """One recipient's line in the report (an RFC 3464 per-recipient group).

    ``original_recipient`` is the ORCPT parameter as stored ("rfc822;bob@x");
    it is reported only when the submitter gave one.  ``status`` is the
    enhanced status code; an invalid one is replaced by the generic code of
    the action's class.  ``diagnostic_code``/``diagnostic_text`` are the
    remote server's reply (text after the code, enhanced code included if
    the server sent one); without a code no Diagnostic-Code is written,
    because our own reasons are not SMTP replies.  ``reason`` is our own
    sentence for a recipient without one (null MX, retries exhausted), for
    the human part.
    """

    address: str
    action: DsnAction
    status: str
    original_recipient: str | None = None
    remote_mta: str | None = None
    diagnostic_code: int | None = None
    diagnostic_text: str | None = None
    last_attempt_at: float | None = None
    will_retry_until: float | None = None
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class DsnReport:
    """Everything one DSN says about one message and one event.

    ``original_envelope_id`` is the submitter's ENVID, never our queue ID or
    the Message-ID.  ``original_message`` is the message as queued (CRLF).
    ``reason`` is the human explanation (the remote reply or our own clear
    sentence, never exception text); ``extended_reason`` the per-recipient
    detail, for example from :func:`describe_recipients`.
    """

    reporting_mta: str
    arrival_date: float
    original_sender: str
    original_message: bytes
    recipients: tuple[DsnRecipient, ...]
    reason: str
    extended_reason: str = ""
    original_envelope_id: str | None = None
    ret: Literal["FULL", "HDRS"] | None = None


@dataclass(frozen=True, slots=True)
class DsnTemplates:
    """The operator's templates (``outbound.bounce_message``, ``_html``,
    ``_image``).  They shape *failure* notices; ``text=None`` uses the
    built-in text.  The image is only used together with an HTML template."""

    text: str | None = None
    html: str | None = None
    image: bytes | None = None


@dataclass(frozen=True, slots=True)
class DsnTransport:
    """What the DSN needs from the SMTP session that carries it."""

    smtputf8: bool  # a header holds raw UTF-8 (an internationalized address)
    body_8bit: bool  # the body holds 8-bit octets (an 8-bit original returned)


@dataclass(frozen=True, slots=True)
class FailureNotice:
    """Where a failure notice goes, if anywhere, and why (for the record)."""

    send_to: str | None
    double_bounce: bool
    reason: str


# --------------------------------------------------------------------------
# Decisions


def is_null_sender(mail_from: str) -> bool:
    """True for the null reverse-path (``MAIL FROM:<>``), however spelled."""
    return mail_from.strip() in ("", "<>")


def _notify_keywords(notify: str | None) -> frozenset[str]:
    if notify is None:
        return frozenset()
    words = {w.strip().upper() for w in notify.split(",")}
    return frozenset(words & {"NEVER", "SUCCESS", "FAILURE", "DELAY"})


def notify_wants(notify: str | None, event: DsnEvent) -> bool:
    """Whether a recipient's RFC 3461 NOTIFY parameter asks for ``event``.

    ``None`` (no NOTIFY given) means FAILURE,DELAY: RFC 3461 §4.1 lets the
    MTA choose between FAILURE and FAILURE,DELAY, and a warning that mail is
    stuck is worth more than it costs.  Delay notices are additionally gated
    by ``delay_warning_time`` (0 turns them off) in the delivery engine.
    NEVER wins over anything it is (illegally) combined with; unknown words
    are ignored, and a value with no known word counts as absent.
    """
    words = _notify_keywords(notify)
    if "NEVER" in words:
        return False
    if not words:
        return event in ("failure", "delay")
    return {"failure": "FAILURE", "delay": "DELAY", "success": "SUCCESS"}[event] in words


def should_send_dsn(mail_from: str, notify: str | None, event: DsnEvent) -> bool:
    """Whether the *sender* gets a DSN for ``event`` on this recipient.

    Never for the null sender: a notice about a notice is how bounce loops
    start (RFC 5321 §4.5.5).  Double bounces are planned separately by
    :func:`plan_failure_notice`.
    """
    return not is_null_sender(mail_from) and notify_wants(notify, event)


def plan_failure_notice(
    mail_from: str,
    notify: str | None,
    *,
    double_bounce_recipient: str | None,
    is_double_bounce_notice: bool = False,
) -> FailureNotice:
    """Decide who hears that a recipient failed for good.

    A normal sender gets a DSN unless its NOTIFY excludes FAILURE.  A message
    with the null sender (typically one of our own DSNs) is a double bounce:
    it is reported to ``double_bounce_recipient`` when that is set, otherwise
    dropped with a reason that says so.  A double-bounce notice that itself
    fails is always dropped, so no configuration can make a loop.
    ``reason`` is meant for the log and the attempt record.
    """
    if not is_null_sender(mail_from):
        if notify_wants(notify, "failure"):
            return FailureNotice(send_to=mail_from, double_bounce=False, reason="failure DSN")
        return FailureNotice(
            send_to=None,
            double_bounce=False,
            reason=f"no DSN: the sender asked for NOTIFY={notify}",
        )
    if is_double_bounce_notice:
        return FailureNotice(
            send_to=None,
            double_bounce=True,
            reason="double bounce of a double-bounce notice: dropped to stop a loop",
        )
    if double_bounce_recipient:
        return FailureNotice(
            send_to=double_bounce_recipient,
            double_bounce=True,
            reason=f"double bounce: copied to {double_bounce_recipient}",
        )
    return FailureNotice(
        send_to=None,
        double_bounce=True,
        reason="double bounce: null sender and no double_bounce_recipient, dropped",
    )


def success_action(
    remote_accepted_dsn: bool, *, final_delivery: bool = False
) -> SuccessAction | None:
    """The Action of a success notice, or ``None`` when we must not send one.

    RFC 3464 §2.3.3: ``delivered`` is final delivery (for us: LMTP into the
    mailbox store); ``relayed`` means the message went on into an
    environment that will not report success — a next hop that did not take
    the DSN parameters.  When the next hop *did* accept NOTIFY=SUCCESS, it
    now owns the notification (RFC 3461 §5.2) and a notice from us would be
    a duplicate, so the answer is ``None``.
    """
    if final_delivery:
        return "delivered"
    if remote_accepted_dsn:
        return None
    return "relayed"


def return_content(
    ret: str | None, event: DsnEvent, size: int, max_size: int = DEFAULT_BOUNCE_MAX_ORIGINAL_SIZE
) -> ReturnContent:
    """How much of the original a DSN carries.

    RET=FULL asks for the whole message in *failed* DSNs (RFC 3461 §4.3);
    an absent RET is treated as FULL, as Postfix does.  Delay and success
    notices carry only the headers: the message is still on its way, and
    returning it would only double the traffic.  A message larger than
    ``max_size`` octets is always cut to its header block.
    """
    wants_full = ret is None or ret.upper() == "FULL"
    if event == "failure" and wants_full and size <= max_size:
        return "full"
    return "headers"


def dsn_event(recipients: Iterable[DsnRecipient]) -> DsnEvent:
    """The kind of notice: failure beats delay beats success."""
    events = {_EVENT_OF_ACTION[r.action] for r in recipients}
    if "failure" in events:
        return "failure"
    if "delay" in events:
        return "delay"
    return "success"


def subject_for(event: DsnEvent) -> str:
    """The built-in Subject: fixed strings bounce processors can match."""
    return _SUBJECTS[event]


# --------------------------------------------------------------------------
# Reasons (the human text of ``{reason}``)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _span(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 120:
        return _plural(s, "second")
    if s < 2 * 3600:
        return _plural(s // 60, "minute")
    if s < 2 * 86400:
        return _plural(s // 3600, "hour")
    return _plural(s // 86400, "day")


def reason_for_exhaustion(
    attempts: int, first_attempt_at: float, last_reply_text: str | None, now: float
) -> str:
    """``gave up after 13 attempts over 3 days: 451 4.4.1 ...`` — the retry
    budget ran out; the last remote reply says why the attempts failed."""
    text = f"gave up after {_plural(attempts, 'attempt')} over {_span(now - first_attempt_at)}"
    last = _one_line(last_reply_text or "")
    return f"{text}: {last}" if last else text


def reason_no_mx(domain: str) -> str:
    """The domain exists but names no host to deliver to."""
    return f"no MX for {domain}: the domain has no MX, A or AAAA records"


def reason_null_mx(domain: str) -> str:
    """The domain says it accepts no mail (RFC 7505)."""
    return f"null MX for {domain}: the domain does not accept mail (RFC 7505)"


def reason_nxdomain(domain: str) -> str:
    """The recipient's domain does not exist in the DNS."""
    return f"domain {domain} does not exist (NXDOMAIN)"


def reason_operator(text: str | None = None) -> str:
    """``outboundctl bounce`` and hooks: who decided, and what they said."""
    said = _one_line(text or "")
    return f"bounced by the operator: {said}" if said else "bounced by the operator"


def describe_recipients(recipients: Iterable[DsnRecipient]) -> str:
    """One line per recipient — ``addr: 550 5.1.1 text``, or our own
    reason when no server replied — for ``{extended_reason}``."""
    lines = []
    for r in recipients:
        if r.diagnostic_code is not None:
            detail = f"{r.diagnostic_code} {_one_line(r.diagnostic_text or '')}".strip()
        elif r.reason:
            detail = _one_line(r.reason)
        else:
            detail = f"{r.action} ({r.status})"
        lines.append(f"{r.address}: {detail}")
    return "\n".join(lines)


# --------------------------------------------------------------------------
# The original message


def _split_message(message: bytes) -> tuple[bytes, bytes]:
    """(header block including its last line end, body) of a raw message."""
    if message.startswith((b"\r\n", b"\n")):
        return b"", message
    ends = [i for i in (message.find(b"\r\n\r\n"), message.find(b"\n\n")) if i >= 0]
    if not ends:
        return message, b""
    end = min(ends)
    sep = b"\r\n" if message.startswith(b"\r\n\r\n", end) else b"\n"
    return message[: end + len(sep)], message[end + 2 * len(sep) :]


def header_block(message: bytes) -> bytes:
    """The original's header block, CRLF line ends, ending in CRLF (or empty)."""
    block, _ = _split_message(message)
    return _crlf_bytes(block)


def original_header(message: bytes, name: str) -> str | None:
    """The first ``name`` field of the original, unfolded, undecoded."""
    text = header_block(message).decode("utf-8", "replace")
    wanted = name.lower() + ":"
    value: list[str] | None = None
    for line in text.split(_CRLF):
        if value is not None:
            if line[:1] in (" ", "\t"):
                value.append(line)
                continue
            break
        if line.lower().startswith(wanted):
            value = [line[len(wanted) :]]
    if value is None:
        return None
    return "".join(value).strip()


def original_message_id(message: bytes) -> str | None:
    """The original's Message-ID as ``<id>``, or None when it has no usable one
    (missing, or anything that could not be safely copied into a header)."""
    raw = original_header(message, "Message-ID")
    if raw is None:
        return None
    match = _MSGID_RE.search(raw)
    return match.group(0) if match else None


def original_subject(message: bytes) -> str:
    """The original's Subject decoded to text (RFC 2047 and raw UTF-8), on
    one line; empty when there is none."""
    raw = original_header(message, "Subject")
    if raw is None:
        return ""
    try:
        decoded = str(email.header.make_header(email.header.decode_header(raw)))
    except (ValueError, LookupError, UnicodeError, email.errors.HeaderParseError):
        # A broken encoded-word from a third party must not stop the bounce:
        # the undecoded text is still the best description of the message.
        decoded = raw
    return _one_line(decoded)


# --------------------------------------------------------------------------
# Templates


_DEFAULT_TEMPLATES: Mapping[DsnEvent, str] = {
    "failure": """\
This is the mail delivery system at {me}.

Your message could not be delivered to one or more recipients.
This is a permanent error: no further attempts will be made.

  Subject:    {subject}
  Recipients: {recipients}

Reason: {reason}

{extended_reason}

The delivery report and your message (or its headers) are attached.
""",
    "delay": """\
This is the mail delivery system at {me}.

Your message has not yet been delivered to one or more recipients.
This is only a warning: delivery will be retried, and you do not need
to send the message again.

  Subject:    {subject}
  Recipients: {recipients}

Reason: {reason}

{extended_reason}

The delivery report and your message's headers are attached.
""",
    "success": """\
This is the mail delivery system at {me}.

Your message was delivered, or passed on to a system that does not send
delivery reports, for the recipients listed below, as you requested.

  Subject:    {subject}
  Recipients: {recipients}

{extended_reason}

The delivery report and your message's headers are attached.
""",
}


def default_template(event: DsnEvent) -> str:
    """The built-in human-readable text for a kind of notice."""
    return _DEFAULT_TEMPLATES[event]


def render_template(template: str, values: Mapping[str, str]) -> str:
    """Replace ``{name}`` with ``values[name]``; leave everything else alone.

    ``str.format`` would evaluate ``{0.__class__}``-style attribute and index
    access written by whoever edits the template; here only bare names are
    recognised, and an unknown ``{name}`` stays in the text as written so a
    typo is visible in the bounce rather than silently blank.
    """

    def substitute(match: re.Match[str]) -> str:
        return values.get(match.group(1), match.group(0))

    return _TEMPLATE_VAR_RE.sub(substitute, template)


def _split_template_headers(template: str) -> tuple[dict[str, str], str]:
    """Haraka templates start with a header block; accept that shape.

    The block is recognised when every line before the first blank line is
    a header field (or its continuation) and one of them is Subject or From.
    Only Subject is honoured; the structural fields (From, To, Date,
    Message-ID, MIME-Version, Content-Type, ...) are always generated.
    """
    text = template.replace("\r\n", "\n").replace("\r", "\n")
    head, sep, body = text.partition("\n\n")
    if not sep:
        return {}, text
    fields: dict[str, str] = {}
    current: str | None = None
    for line in head.split("\n"):
        if line[:1] in (" ", "\t") and current is not None:
            fields[current] += " " + line.strip()
        elif _HEADER_LINE_RE.match(line):
            name, _, value = line.partition(":")
            current = name.strip().lower()
            fields.setdefault(current, value.strip())
        else:
            return {}, text
    if "subject" not in fields and "from" not in fields:
        return {}, text
    return fields, body


# --------------------------------------------------------------------------
# Low-level formatting


def format_date(t: float) -> str:
    """RFC 5322 date-time in UTC with a numeric zone (``+0000``)."""
    return format_datetime(datetime.fromtimestamp(t, tz=UTC))


def _one_line(text: str) -> str:
    """Collapse every run of whitespace (CR and LF included) to one space."""
    return _WS_RE.sub(" ", text).strip()


def _printable(text: str) -> str:
    """One line with control characters removed."""
    return _one_line("".join(c if c.isprintable() or c.isspace() else " " for c in text))


def _escape_non_ascii(text: str) -> str:
    """Keep a field 7-bit: non-ASCII characters become ``\\x{HEX}`` (the
    RFC 6533 embedded-Unicode notation), so no octet above 127 reaches
    ``message/delivery-status``."""
    return "".join(c if ord(c) < 0x7F else f"\\x{{{ord(c):02X}}}" for c in text)


def utf8_addr_xtext(address: str, *, unitext: bool = False) -> str:
    """RFC 6533 utf-8-addr-xtext: QCHARs as is, everything else ``\\x{HEX}``.

    With ``unitext`` (utf-8-addr-unitext, only where SMTPUTF8 is in use)
    non-ASCII characters stay as they are.
    """
    out = []
    for c in address:
        cp = ord(c)
        if (0x21 <= cp <= 0x7E and c not in "+=\\") or (unitext and cp >= 0x80 and c.isprintable()):
            out.append(c)
        else:
            out.append(f"\\x{{{cp:02X}}}")
    return "".join(out)


def _address_field(addr_type: str, address: str) -> str:
    """``rfc822; addr`` for ASCII addresses, ``utf-8; <xtext>`` otherwise.

    An address type that is not an RFC 3464 atom (a mangled ORCPT) is
    reported as ``rfc822`` rather than copied into the report.
    """
    address = _printable(address).strip("<>")
    addr_type = addr_type.strip().lower()
    if not _ADDR_TYPE_RE.match(addr_type):
        addr_type = "rfc822"
    if address.isascii() and addr_type != "utf-8":
        return f"{addr_type}; {address}"
    return f"utf-8; {utf8_addr_xtext(address)}"


def _fold(name: str, value: str) -> str:
    """``Name: value`` folded at spaces to about 78 columns, CRLF-terminated.

    Folding only ever turns an existing space into CRLF + space, so
    unfolding (RFC 5322 §2.2.3) restores the value exactly.  A single word
    too long for a 998-octet line is split where it must be — the only
    place a word is ever broken.
    """
    words = value.split(" ")
    lines: list[str] = []
    line = f"{name}:"
    for i, word in enumerate(words):
        piece = " " + word
        if i > 0 and len((line + piece).encode()) > _SOFT_LIMIT and line.strip():
            lines.append(line)
            line = ""
        line += piece
        while len(line.encode()) > _HARD_LIMIT:
            cut = _HARD_LIMIT
            while len(line[:cut].encode()) > _HARD_LIMIT:
                cut -= 1
            lines.append(line[:cut])
            line = " " + line[cut:]
    lines.append(line)
    return _CRLF.join(lines) + _CRLF


def _unstructured(name: str, value: str) -> str:
    """A free-text header; RFC 2047 encoded words when it is not ASCII."""
    value = _printable(value)
    if value.isascii():
        return _fold(name, value)
    encoded = email.header.Header(value, "utf-8", header_name=name).encode(linesep=_CRLF)
    return f"{name}: {encoded}{_CRLF}"


def _crlf(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n").replace("\n", _CRLF)


def _crlf_bytes(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")


def _is_clean(data: bytes) -> bool:
    """True when ``data`` can travel as 7bit/8bit MIME content unchanged:
    CRLF-only line ends, no NUL, every line within 998 octets."""
    if b"\0" in data:
        return False
    lines = data.split(b"\r\n")
    if any(b"\r" in line or b"\n" in line for line in lines):
        return False
    return all(len(line) <= _HARD_LIMIT for line in lines)


def _text_part(content_type: str, text: str, extra: Iterable[str] = ()) -> bytes:
    """A text/* leaf part: 7bit when plain ASCII with short lines, else
    quoted-printable (which also keeps long template lines within limits)."""
    body = _crlf(text)
    if not body.endswith(_CRLF):
        body += _CRLF
    data = body.encode("utf-8")
    headers = [f'Content-Type: {content_type}; charset="utf-8"{_CRLF}', *extra]
    if data.isascii() and _is_clean(data):
        headers.append(f"Content-Transfer-Encoding: 7bit{_CRLF}")
    else:
        data = binascii.b2a_qp(data, istext=True)
        headers.append(f"Content-Transfer-Encoding: quoted-printable{_CRLF}")
    return "".join(headers).encode("ascii") + b"\r\n" + data


def _image_type(image: bytes) -> tuple[str, str]:
    """(MIME type, file extension) from the image's magic number."""
    if image.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png", "png"
    if image.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif", "gif"
    if image.startswith(b"\xff\xd8\xff"):
        return "image/jpeg", "jpg"
    if image.startswith(b"RIFF") and image[8:12] == b"WEBP":
        return "image/webp", "webp"
    return "application/octet-stream", "bin"


def _base64_lines(data: bytes) -> bytes:
    encoded = base64.b64encode(data)
    return b"".join([encoded[i : i + 76] + b"\r\n" for i in range(0, len(encoded), 76)])


class _Boundaries:
    """Deterministic MIME boundaries that provably do not occur in content."""

    def __init__(self, seed: str) -> None:
        self._seed = hashlib.sha256(seed.encode("utf-8", "replace")).hexdigest()[:24]
        self._count = 0

    def make(self, *contents: bytes) -> str:
        while True:
            self._count += 1
            boundary = f"=_outboundd_{self._seed}_{self._count}"
            if not any(boundary.encode() in c for c in contents):
                return boundary


def _multipart(
    content_type: str,
    boundary: str,
    parts: Iterable[bytes],
    params: str = "",
    preamble: bytes = b"",
) -> bytes:
    """A multipart entity: its Content-Type field, a blank line, the parts.

    Each part's CRLF before the next delimiter belongs to the delimiter
    (RFC 2046 §5.1.1), so parts end exactly as given.
    """
    head = f'Content-Type: {content_type};{_CRLF} boundary="{boundary}"{params}{_CRLF}'
    delimiter = b"--" + boundary.encode("ascii")
    body = b"".join([delimiter + b"\r\n" + p + b"\r\n" for p in parts])
    return head.encode("ascii") + b"\r\n" + preamble + body + delimiter + b"--\r\n"


# --------------------------------------------------------------------------
# The parts


def _delivery_status(report: DsnReport) -> bytes:
    """The RFC 3464 ``message/delivery-status`` body: one per-message group,
    then one group per recipient, groups separated by blank lines."""
    groups: list[str] = []
    fields = [_fold("Reporting-MTA", f"dns; {_escape_non_ascii(_printable(report.reporting_mta))}")]
    if report.original_envelope_id:
        envid = _escape_non_ascii(_printable(report.original_envelope_id))
        fields.append(_fold("Original-Envelope-Id", envid))
    fields.append(_fold("Arrival-Date", format_date(report.arrival_date)))
    groups.append("".join(fields))
    for r in report.recipients:
        event = _EVENT_OF_ACTION[r.action]
        fields = []
        addr_type, sep, addr = (r.original_recipient or "").partition(";")
        if not sep:
            addr_type, addr = "rfc822", addr_type
        if _printable(addr).strip("<>"):
            fields.append(_fold("Original-Recipient", _address_field(addr_type, addr)))
        fields.append(_fold("Final-Recipient", _address_field("rfc822", r.address)))
        fields.append(_fold("Action", r.action))
        status = r.status.strip()
        if not _STATUS_RE.match(status):
            status = _FALLBACK_STATUS[event]
        fields.append(_fold("Status", status))
        if r.remote_mta:
            fields.append(
                _fold("Remote-MTA", f"dns; {_escape_non_ascii(_printable(r.remote_mta))}")
            )
        if r.diagnostic_code is not None:
            text = _escape_non_ascii(_printable(r.diagnostic_text or ""))
            fields.append(_fold("Diagnostic-Code", f"smtp; {r.diagnostic_code} {text}".rstrip()))
        if r.last_attempt_at is not None:
            fields.append(_fold("Last-Attempt-Date", format_date(r.last_attempt_at)))
        if r.action == "delayed" and r.will_retry_until is not None:
            fields.append(_fold("Will-Retry-Until", format_date(r.will_retry_until)))
        groups.append("".join(fields))
    body = _CRLF.join(groups)
    head = f"Content-Type: message/delivery-status{_CRLF}Content-Transfer-Encoding: 7bit{_CRLF}"
    return (head + _CRLF + body).encode("ascii")


def _original_part(report: DsnReport, event: DsnEvent, max_size: int) -> bytes:
    """The returned message (``message/rfc822``) or its header block
    (``text/rfc822-headers``); ``message/global*`` (RFC 6532) when its
    headers are UTF-8.  Content that could not travel unchanged inside a
    MIME part (bare LF, NUL, over-long lines) is cut to its headers, and
    headers that cannot travel as they are go base64."""
    original = report.original_message
    headers_only = _crlf_bytes(_split_message(original)[0])
    utf8_headers = not headers_only.isascii()
    if return_content(report.ret, event, len(original), max_size) == "full" and _is_clean(original):
        ctype = "message/global" if utf8_headers else "message/rfc822"
        cte = "7bit" if original.isascii() else "8bit"
        head = f"Content-Type: {ctype}{_CRLF}Content-Transfer-Encoding: {cte}{_CRLF}"
        head += f"Content-Description: Undelivered Message{_CRLF}" if event == "failure" else ""
        return head.encode("ascii") + b"\r\n" + original
    ctype = "message/global-headers" if utf8_headers else "text/rfc822-headers"
    head = f"Content-Type: {ctype}{_CRLF}Content-Description: Message Headers{_CRLF}"
    if _is_clean(headers_only):
        cte = "7bit" if headers_only.isascii() else "8bit"
        return (head + f"Content-Transfer-Encoding: {cte}{_CRLF}{_CRLF}").encode() + headers_only
    head += f"Content-Transfer-Encoding: base64{_CRLF}"
    return head.encode("ascii") + b"\r\n" + _base64_lines(headers_only)


def _human_part(
    report: DsnReport,
    templates: DsnTemplates,
    event: DsnEvent,
    values: Mapping[str, str],
    boundaries: _Boundaries,
    me: str,
) -> tuple[bytes, str | None]:
    """The first part of the report, and the Subject a template asked for.

    Operator templates apply to failure notices (they are *bounce*
    templates, as in Haraka); delay and success notices use built-in text.
    """
    custom = event == "failure"
    text_template = templates.text if custom and templates.text is not None else None
    subject: str | None = None
    if text_template is None:
        text = render_template(default_template(event), values)
    else:
        fields, body = _split_template_headers(text_template)
        if "subject" in fields:
            subject = render_template(fields["subject"], values)
        text = render_template(body, values)
    text_part = _text_part("text/plain", text)
    if not (custom and templates.html):
        return text_part, subject

    html_values = {k: html.escape(v).replace("\n", "<br>\n") for k, v in values.items()}
    image = templates.image
    image_type, ext = _image_type(image) if image else ("", "")
    cid = f"bounce-image.{ext}@{me}"
    html_values["image_cid"] = html.escape(cid)
    markup = render_template(templates.html, html_values)
    if image:
        # Haraka's stock HTML template points at cid:icon.png.
        markup = markup.replace("cid:icon.png", f"cid:{cid}")
    html_part = _text_part("text/html", markup)
    if image:
        img = (
            f"Content-Type: {image_type}{_CRLF}"
            f"Content-Transfer-Encoding: base64{_CRLF}"
            f"Content-ID: <{cid}>{_CRLF}"
            f'Content-Disposition: inline; filename="bounce-image.{ext}"{_CRLF}{_CRLF}'
        ).encode("ascii") + _base64_lines(image)
        related = boundaries.make(html_part, img)
        html_part = _multipart("multipart/related", related, [html_part, img], '; type="text/html"')
    alternative = boundaries.make(text_part, html_part)
    return _multipart("multipart/alternative", alternative, [text_part, html_part]), subject


# --------------------------------------------------------------------------
# The message


def render_dsn(
    report: DsnReport,
    templates: DsnTemplates,
    *,
    me: str,
    now: float,
    message_id: str,
    pid: int,
    bounce_max_original_size: int = DEFAULT_BOUNCE_MAX_ORIGINAL_SIZE,
    recipient: str | None = None,
) -> bytes:
    """The complete DSN message, ready for ``spool.accept`` with the null sender.

    ``message_id`` is the DSN's own Message-ID (with or without ``<>``);
    ``recipient`` overrides the To address (a double-bounce copy goes to
    ``double_bounce_recipient``, not the original null sender).  The result
    has CRLF line ends only and no line over 998 octets; see
    :func:`dsn_transport` for the SMTP extensions it needs.
    """
    if not report.recipients:
        raise ValueError("a DSN must report at least one recipient")
    event = dsn_event(report.recipients)
    msgid = message_id.strip()
    if not (msgid.startswith("<") and msgid.endswith(">")):
        msgid = f"<{msgid}>"
    date = format_date(now)
    sender = report.original_sender.strip()
    to_addr = (recipient or sender).strip().strip("<>")
    original = report.original_message
    values = {
        "pid": str(pid),
        "date": date,
        "me": me,
        "from": sender or "<>",
        "to": report.recipients[0].address,
        "subject": original_subject(original),
        "recipients": ", ".join(r.address for r in report.recipients),
        "reason": report.reason,
        "extended_reason": report.extended_reason,
        "msgid": msgid,
    }
    boundaries = _Boundaries(msgid)
    human, template_subject = _human_part(report, templates, event, values, boundaries, me)
    parts = [
        human,
        _delivery_status(report),
        _original_part(report, event, bounce_max_original_size),
    ]
    boundary = boundaries.make(*parts)

    orig_id = original_message_id(original)
    headers = [
        _fold("From", f"Mail Delivery System <MAILER-DAEMON@{me}>"),
        _fold("To", f"<{_printable(to_addr)}>"),
        _unstructured("Subject", template_subject or subject_for(event)),
        _fold("Date", date),
        _fold("Message-ID", msgid),
    ]
    if orig_id:
        headers += [_fold("In-Reply-To", orig_id), _fold("References", orig_id)]
    headers += [
        _fold("Auto-Submitted", "auto-replied"),
        _fold("MIME-Version", "1.0"),
    ]
    body = _multipart(
        "multipart/report",
        boundary,
        parts,
        "; report-type=delivery-status",
        preamble=b"This is a MIME-encapsulated delivery status notification.\r\n\r\n",
    )
    return "".join(headers).encode("utf-8") + body


def dsn_transport(dsn: bytes) -> DsnTransport:
    """Which SMTP extensions carrying ``dsn`` needs: SMTPUTF8 when its
    header block holds UTF-8 (an internationalized sender), 8BITMIME when
    its body holds 8-bit octets (an 8-bit original returned in full)."""
    head, body = _split_message(dsn)
    return DsnTransport(smtputf8=not head.isascii(), body_8bit=not body.isascii())
