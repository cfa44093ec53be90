"""Submission decisions as pure functions: addresses, ESMTP parameters, relaying.

Nothing here does I/O or keeps state, so every rule the SMTP session
enforces can be tested with plain values.  Each parser returns a value or
raises :class:`PolicyError` carrying the exact reply to send.

Address syntax is RFC 5321 §4.1.2 (``Path``, ``Mailbox``, ``Dot-string``,
``Quoted-string``, ``address-literal``), widened by RFC 6531 to UTF-8 when
the transaction declared ``SMTPUTF8``.  A source route (``<@a,@b:u@d>``) is
accepted and dropped, as §4.1.1.3 asks.  ``MAIL FROM: <a@b>`` (a space
after the colon) is tolerated because many clients send it.

DSN parameters are RFC 3461: ``RET``/``ENVID`` on MAIL, ``NOTIFY``/``ORCPT``
on RCPT, with ``xtext`` decoded and validated.  The decoded values are what
the spool stores.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from outboundd import idn
from outboundd.submission import replies
from outboundd.submission.replies import Reply

__all__ = [
    "Address",
    "MailParams",
    "PolicyError",
    "RcptParams",
    "RelayVerdict",
    "auth_allowed",
    "ip_in_networks",
    "is_loopback",
    "parse_esmtp_params",
    "parse_mail",
    "parse_rcpt",
    "relay_verdict",
    "sender_matches_auth",
    "xtext_decode",
    "xtext_encode",
]

#: RFC 5321 §4.5.3.1.3: a path is at most 256 octets including the brackets.
MAX_PATH_OCTETS: Final = 256
#: RFC 5321 §4.5.3.1.2: a domain is at most 255 octets.
MAX_DOMAIN_OCTETS: Final = 255
#: RFC 3461 §4.4: an ENVID is at most 100 characters.
MAX_ENVID: Final = 100
#: RFC 3461 §4.2: an ORCPT parameter is at most 500 characters.
MAX_ORCPT: Final = 500

NOTIFY_WORDS: Final = ("SUCCESS", "FAILURE", "DELAY")


class PolicyError(Exception):
    """A command was refused; ``reply`` is what the client is told."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


# --------------------------------------------------------------------------
# Addresses

# RFC 5322 atext; with SMTPUTF8 any non-ASCII character also counts (RFC 6531).
_ATEXT_ASCII: Final = "-A-Za-z0-9!#$%&'*+/=?^_`{|}~"  # "-" first: a literal, not a range
_NON_ASCII: Final = "\u0080-\U0010ffff"
_ATEXT_UTF8: Final = _ATEXT_ASCII + _NON_ASCII
_DOT_STRING: Final = re.compile(rf"[{_ATEXT_ASCII}]+(?:\.[{_ATEXT_ASCII}]+)*")
_DOT_STRING_UTF8: Final = re.compile(rf"[{_ATEXT_UTF8}]+(?:\.[{_ATEXT_UTF8}]+)*")
# Quoted-string content: qtextSMTP (32-126 minus " and \) or a quoted-pair.
_QTEXT: Final = r"\x20\x21\x23-\x5b\x5d-\x7e"
_QUOTED: Final = re.compile(rf'"(?:[{_QTEXT}]|\\[\x20-\x7e])*"')
_QUOTED_UTF8: Final = re.compile(rf'"(?:[{_QTEXT}{_NON_ASCII}]|\\[\x20-\x7e])*"')
_LABEL: Final = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_LDH_UTF8: Final = "A-Za-z0-9" + _NON_ASCII
_LABEL_UTF8: Final = re.compile(rf"[{_LDH_UTF8}](?:[{_LDH_UTF8}-]*[{_LDH_UTF8}])?")
_IPV4_LITERAL: Final = re.compile(r"(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})")
_IPV6_CHARS: Final = re.compile(r"[0-9A-Fa-f:.]+")
# Undecodable octets arrive as lone surrogates (surrogateescape).  Spelled with
# chr(): mypyc cannot compile surrogates in string literals.
_SURROGATE_FIRST: Final = chr(0xD800)
_SURROGATE_LAST: Final = chr(0xDFFF)
_ROUTE: Final = re.compile(r"@[^,:]+(?:,@[^,:]+)*:")


@dataclass(frozen=True, slots=True)
class Address:
    """A mailbox as given, split at its last ``@``; the null path is ``Address("", "")``."""

    local: str
    domain: str

    def __str__(self) -> str:
        return f"{self.local}@{self.domain}" if self.domain else self.local

    @property
    def is_null(self) -> bool:
        return not self.local and not self.domain

    @property
    def is_ascii(self) -> bool:
        return str(self).isascii()

    def key(self) -> str:
        """Identity for duplicate detection: the domain is case-insensitive, the local part not."""
        return f"{self.local}@{self.domain.lower()}"


@functools.lru_cache(maxsize=4096)
def _valid_domain(domain: str, utf8: bool) -> bool:
    # Cached: recipients of a relay share a few domains, and the per-label
    # checks were 2% of the listener's time with ten recipients a message.
    if domain.startswith("[") and domain.endswith("]"):
        return valid_address_literal(domain[1:-1])
    if not domain or len(domain.encode("utf-8")) > MAX_DOMAIN_OCTETS:
        return False
    label = _LABEL_UTF8 if utf8 else _LABEL
    return all(
        label.fullmatch(part) is not None and len(part.encode("utf-8")) <= 63
        for part in domain.split(".")
    )


def valid_address_literal(inner: str) -> bool:
    """RFC 5321 §4.1.3: ``inner`` (between the brackets) is an address literal we can use.

    * IPv4-address-literal: four decimal numbers 0-255;
    * IPv6-address-literal: ``IPv6:`` and an IPv6 address in RFC 5321's
      forms — hex digits, colons and a dotted IPv4 tail only (no zone ID
      like ``%eth0``: that names an interface of the *sender's* host), and
      a ``::`` that stands for at least two groups;
    * General-address-literal: ``tag:content``, refused unless the tag is
      registered with IANA — and the only registered tag is ``IPv6``, so
      anything else could never be delivered.
    """
    ipv4 = _IPV4_LITERAL.fullmatch(inner)
    if ipv4 is not None:
        return all(int(octet) <= 255 for octet in ipv4.groups())
    tag, colon, rest = inner.partition(":")
    if not colon or tag.lower() != "ipv6" or _IPV6_CHARS.fullmatch(rest) is None:
        return False
    try:
        ipaddress.IPv6Address(rest)
    except ValueError:
        return False
    if "::" in rest:
        head, _, tail = rest.partition("::")
        groups = [g for g in (head.split(":") + tail.split(":")) if g]
        explicit = len(groups) + (1 if "." in rest else 0)  # a dotted tail is two groups
        if explicit > 6:
            return False
    return True


def _valid_local(local: str, utf8: bool) -> bool:
    if local.startswith('"'):
        return (_QUOTED_UTF8 if utf8 else _QUOTED).fullmatch(local) is not None
    return (_DOT_STRING_UTF8 if utf8 else _DOT_STRING).fullmatch(local) is not None


def _split_path(arg: str) -> tuple[str, str] | None:
    """``(inside the brackets, rest)`` of ``<...> params``, or None without brackets.

    The closing bracket is the first ``>`` outside a quoted local part.
    """
    text = arg.lstrip()
    if not text.startswith("<"):
        return None
    if '"' not in text:  # no quoted local part: the first ">" closes
        end = text.find(">")
        return None if end < 0 else (text[1:end], text[end + 1 :])
    quoted = False
    escaped = False
    for i in range(1, len(text)):
        ch = text[i]
        if escaped:
            escaped = False
        elif ch == "\\" and quoted:
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == ">" and not quoted:
            return text[1:i], text[i + 1 :]
    return None


def parse_address(text: str, *, utf8: bool, bad: Reply) -> Address:
    """Validate the inside of ``<...>`` (route already allowed); raise ``bad`` if malformed.

    Non-ASCII without ``utf8`` is a 553 5.6.7 (RFC 6531 §3.7.4.1), not a
    syntax error, so a client learns that SMTPUTF8 is the fix.  Characters
    that are not valid UTF-8 (they arrive as surrogates) are a syntax error.
    A non-ASCII domain must be valid IDNA 2008 (:mod:`outboundd.idn`); the
    reply then says why not, in printable ASCII.
    """
    route = _ROUTE.match(text)
    if route is not None:
        text = text[route.end() :]
    ascii_only = text.isascii()  # then no surrogates, and a character is an octet
    if not ascii_only and any(_SURROGATE_FIRST <= ch <= _SURROGATE_LAST for ch in text):
        raise PolicyError(bad.with_text(bad.text + " (invalid UTF-8)"))
    if not ascii_only and not utf8:
        raise PolicyError(replies.NON_ASCII_ADDRESS)
    local, at, domain = text.rpartition("@")
    if not at or not local:
        raise PolicyError(bad)
    if (len(text) if ascii_only else len(text.encode("utf-8"))) + 2 > MAX_PATH_OCTETS:
        raise PolicyError(bad.with_text(bad.text + " (address too long)"))
    if not _valid_local(local, utf8) or not _valid_domain(domain, utf8):
        raise PolicyError(bad)
    if not domain.isascii():
        # The same IDNA 2008 rules delivery resolves with (outboundd.idn):
        # a U-label DNS cannot name is refused now, not bounced later.
        try:
            idn.to_name(domain)
        except idn.InvalidDomain as exc:
            raise PolicyError(bad.with_text(f"{bad.text} ({exc})")) from None
    return Address(local, domain)


# --------------------------------------------------------------------------
# ESMTP parameters

_KEYWORD: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
_VALUE_ASCII: Final = re.compile(r"[\x21-\x3c\x3e-\x7e]+")
_VALUE_UTF8: Final = re.compile(r"[\x21-\x3c\x3e-\x7e\u0080-\U0010ffff]+")


def parse_esmtp_params(text: str, *, utf8_values: bool = False) -> dict[str, str | None]:
    """``KEY[=VALUE]`` words to ``{KEY (upper case): value or None}``.

    Keywords are case-insensitive, values keep their case (ENVID and ORCPT
    are case-sensitive).  A repeated keyword is an error: RFC 5321 does not
    say which one would win.
    """
    result: dict[str, str | None] = {}
    value_re = _VALUE_UTF8 if utf8_values else _VALUE_ASCII
    for word in text.split():
        key, eq, value = word.partition("=")
        if not _KEYWORD.fullmatch(key) or (eq and not value_re.fullmatch(value)):
            raise PolicyError(replies.BAD_PARAMETER.with_text(f"Invalid parameter {key[:40]!r}"))
        upper = key.upper()
        if upper in result:
            raise PolicyError(replies.BAD_PARAMETER.with_text(f"Duplicate parameter {upper}"))
        result[upper] = value if eq else None
    return result


_HEX: Final = frozenset("0123456789ABCDEFabcdef")


def xtext_decode(text: str) -> str:
    """Decode RFC 3461 §4 ``xtext`` (``+XX`` escapes); ValueError when malformed.

    xtext encodes octets: the decoded octets are read as UTF-8 (what
    Postfix and every current client mean by ``+C3+A4``), never one
    character per octet.  Octets that are not UTF-8 are an error.  Hex
    digits are accepted in either case (the RFC says upper case; some
    clients write lower case, and refusing them would help nobody).
    """
    out = bytearray()
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "+":
            pair = text[i + 1 : i + 3]
            if len(pair) != 2 or not set(pair) <= _HEX:
                raise ValueError("'+' must be followed by two hex digits")
            out.append(int(pair, 16))
            i += 3
            continue
        if not "!" <= ch <= "~" or ch == "=":
            raise ValueError(f"character {ch!r} is not allowed in xtext")
        out.append(ord(ch))
        i += 1
    try:
        return out.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("the encoded octets are not UTF-8") from None


def xtext_encode(text: str) -> str:
    """The xtext form of ``text`` (what a relay sends onward)."""
    return "".join(
        ch if "!" <= ch <= "~" and ch not in "+=" else "".join(f"+{b:02X}" for b in ch.encode())
        for ch in text
    )


_UNITEXT_ESCAPE: Final = re.compile(r"\\x\{([0-9A-Fa-f]{1,6})\}")


def _decode_orcpt_value(addr_type: str, value: str) -> str:
    """Decode ORCPT's address: xtext for ``rfc822``; RFC 6533 ``utf-8-addr-xtext`` for ``utf-8``."""
    if addr_type.lower() == "utf-8":
        decoded = _UNITEXT_ESCAPE.sub(lambda m: chr(int(m[1], 16)), value)
        if any(ch in "+=" or ch.isspace() or not ch.isprintable() for ch in decoded):
            raise ValueError("malformed utf-8-addr-xtext")
        return decoded
    return xtext_decode(value)


@dataclass(frozen=True, slots=True)
class MailParams:
    """What MAIL FROM declared."""

    size: int | None = None
    body: str | None = None  # "7BIT" or "8BITMIME"
    smtputf8: bool = False
    ret: str | None = None  # "FULL" or "HDRS"
    env_id: str | None = None  # decoded xtext


@dataclass(frozen=True, slots=True)
class RcptParams:
    """What one RCPT TO declared (RFC 3461)."""

    notify: str | None = None  # "NEVER" or e.g. "SUCCESS,FAILURE"
    orcpt: str | None = None  # "rfc822;decoded address"


_NO_MAIL_PARAMS: Final = MailParams()
_NO_RCPT_PARAMS: Final = RcptParams()


def _bad(text: str) -> PolicyError:
    return PolicyError(replies.BAD_PARAMETER.with_text(text))


def mail_params(params: Mapping[str, str | None], *, max_size: int) -> MailParams:
    """Validate MAIL FROM parameters; ``max_size`` 0 means no limit."""
    if not params:
        return _NO_MAIL_PARAMS  # frozen: one object serves every plain MAIL
    size: int | None = None
    body: str | None = None
    smtputf8 = False
    ret: str | None = None
    env_id: str | None = None
    for key, value in params.items():
        if key == "SIZE":
            if value is None or not value.isdigit() or not value.isascii() or len(value) > 20:
                raise _bad("SIZE takes a number of octets")
            size = int(value)
            if max_size and size > max_size:
                raise PolicyError(
                    replies.TOO_BIG.with_text(
                        f"Message size exceeds fixed maximum message size ({max_size} octets)"
                    )
                )
        elif key == "BODY":
            if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                raise _bad("BODY must be 7BIT or 8BITMIME")
            body = value.upper()
        elif key == "SMTPUTF8":
            if value is not None:
                raise _bad("SMTPUTF8 takes no value")
            smtputf8 = True
        elif key == "RET":
            if value is None or value.upper() not in ("FULL", "HDRS"):
                raise _bad("RET must be FULL or HDRS")
            ret = value.upper()
        elif key == "ENVID":
            try:
                env_id = xtext_decode(value or "")
            except ValueError as exc:
                raise _bad(f"ENVID is not valid xtext: {exc}") from exc
            if not env_id or len(env_id) > MAX_ENVID or not env_id.isascii():
                raise _bad(f"ENVID must be 1 to {MAX_ENVID} printable ASCII characters")
            if not env_id.isprintable():
                raise _bad("ENVID must be printable ASCII")
        elif key == "AUTH":
            # RFC 4954 §5: accepted and validated, but we never trust a
            # client's claim about who submitted the message.
            if value is None:
                raise _bad("AUTH takes a mailbox or <>")
            try:
                xtext_decode(value)
            except ValueError as exc:
                raise _bad(f"AUTH is not valid xtext: {exc}") from exc
        else:
            raise PolicyError(
                replies.UNKNOWN_PARAMETER.with_text(f"MAIL parameter {key[:40]} not recognized")
            )
    return MailParams(size=size, body=body, smtputf8=smtputf8, ret=ret, env_id=env_id)


def rcpt_params(params: Mapping[str, str | None]) -> RcptParams:
    """Validate RCPT TO parameters (NOTIFY, ORCPT)."""
    if not params:
        return _NO_RCPT_PARAMS  # frozen: one object serves every plain RCPT
    notify: str | None = None
    orcpt: str | None = None
    for key, value in params.items():
        if key == "NOTIFY":
            words = [w.upper() for w in (value or "").split(",")]
            if words == ["NEVER"]:
                notify = "NEVER"
                continue
            if (
                not value
                or any(w not in NOTIFY_WORDS for w in words)
                or len(set(words)) != len(words)
            ):
                raise _bad("NOTIFY must be NEVER or a list of SUCCESS, FAILURE, DELAY")
            notify = ",".join(words)
        elif key == "ORCPT":
            addr_type, semi, encoded = (value or "").partition(";")
            if not semi or not _KEYWORD.fullmatch(addr_type) or not encoded:
                raise _bad("ORCPT must be addr-type;address (e.g. rfc822;user@example.com)")
            if len(value or "") > MAX_ORCPT:
                raise _bad(f"ORCPT longer than {MAX_ORCPT} characters")
            try:
                decoded = _decode_orcpt_value(addr_type, encoded)
            except ValueError as exc:
                raise _bad(f"ORCPT is not valid xtext: {exc}") from exc
            orcpt = f"{addr_type.lower()};{decoded}"
        else:
            raise PolicyError(
                replies.UNKNOWN_PARAMETER.with_text(f"RCPT parameter {key[:40]} not recognized")
            )
    return RcptParams(notify=notify, orcpt=orcpt)


def _strip_keyword(arg: str | None, keyword: str, syntax: Reply) -> str:
    if arg is None or arg[: len(keyword)].upper() != keyword:
        raise PolicyError(syntax)
    return arg[len(keyword) :]


def parse_mail(arg: str | None, *, extended: bool, max_size: int) -> tuple[Address, MailParams]:
    """Parse the argument of ``MAIL`` (``FROM:<addr> params``).

    ``extended`` is false after HELO: parameters are then a syntax error.
    Whether the address may be UTF-8 depends on the SMTPUTF8 parameter of
    this very command, so the parameters are read first.
    """
    rest = _strip_keyword(arg, "FROM:", replies.MAIL_SYNTAX)
    split = _split_path(rest)
    if split is None:
        raise PolicyError(replies.MAIL_SYNTAX)
    path, param_text = split
    if param_text and not param_text[0].isspace():
        raise PolicyError(replies.MAIL_SYNTAX)
    if param_text.strip() and not extended:
        raise PolicyError(replies.MAIL_SYNTAX.with_text("Parameters need EHLO, not HELO"))
    params = mail_params(parse_esmtp_params(param_text, utf8_values=True), max_size=max_size)
    if path == "":
        return Address("", ""), params
    address = parse_address(path, utf8=params.smtputf8, bad=replies.BAD_SENDER_SYNTAX)
    return address, params


def parse_rcpt(arg: str | None, *, extended: bool, utf8: bool) -> tuple[Address, RcptParams]:
    """Parse the argument of ``RCPT`` (``TO:<addr> params``); ``utf8`` from MAIL's SMTPUTF8."""
    rest = _strip_keyword(arg, "TO:", replies.RCPT_SYNTAX)
    split = _split_path(rest)
    if split is None:
        raise PolicyError(replies.RCPT_SYNTAX)
    path, param_text = split
    if param_text and not param_text[0].isspace():
        raise PolicyError(replies.RCPT_SYNTAX)
    if param_text.strip() and not extended:
        raise PolicyError(replies.RCPT_SYNTAX.with_text("Parameters need EHLO, not HELO"))
    params = rcpt_params(parse_esmtp_params(param_text, utf8_values=utf8))
    if path == "":
        raise PolicyError(replies.BAD_RECIPIENT_SYNTAX.with_text("The null path is no recipient"))
    address = parse_address(path, utf8=utf8, bad=replies.BAD_RECIPIENT_SYNTAX)
    return address, params


# --------------------------------------------------------------------------
# Who may do what

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@functools.lru_cache(maxsize=4096)
def _ip(text: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    # Cached: the same client addresses come back connection after connection.
    if not text:
        return None
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped  # a dual-stack socket shows IPv4 clients as ::ffff:a.b.c.d
    return address


def ip_in_networks(ip: str | None, networks: Iterable[IPNetwork]) -> bool:
    """True when ``ip`` lies in one of ``networks`` (IPv4-mapped IPv6 counts as IPv4)."""
    address = _ip(ip)
    if address is None:
        return False
    return any(address.version == net.version and address in net for net in networks)


def is_loopback(ip: str | None) -> bool:
    address = _ip(ip)
    return address is not None and address.is_loopback


def auth_allowed(*, encrypted: bool, client_ip: str | None, require_tls: bool) -> bool:
    """AUTH is offered on an encrypted session, from loopback, or anywhere when
    ``auth_require_tls`` is off: passwords never cross a network in clear
    unless the operator says so."""
    return encrypted or not require_tls or is_loopback(client_ip)


class RelayVerdict(StrEnum):
    ALLOW = "allow"
    AUTH_REQUIRED = "auth_required"
    DENIED = "denied"


def relay_verdict(
    *,
    authenticated: bool,
    client_ip: str | None,
    relay_acl: Iterable[IPNetwork],
    auth_possible: bool,
) -> RelayVerdict:
    """May this session hand us a recipient?  Never an open relay.

    Allowed for an authenticated session or a client inside ``relay_acl``.
    Otherwise ``AUTH_REQUIRED`` (530 5.7.0) when the client could still
    authenticate in this session — AUTH is offered now or after STARTTLS —
    and ``DENIED`` (550 5.7.1) when no way to relay exists for it.
    """
    if authenticated or ip_in_networks(client_ip, relay_acl):
        return RelayVerdict.ALLOW
    return RelayVerdict.AUTH_REQUIRED if auth_possible else RelayVerdict.DENIED


def sender_matches_auth(auth_user: str | None, sender: Address) -> bool:
    """``constrain_sender`` as in Haraka's auth plugins: when the AUTH user
    looks like ``name@domain``, MAIL FROM's domain must be that domain
    (case-insensitive).  A user without a domain, or the null sender, is
    not constrained."""
    if auth_user is None or "@" not in auth_user or sender.is_null:
        return True
    return auth_user.rpartition("@")[2].lower() == sender.domain.lower()
