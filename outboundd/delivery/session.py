"""One delivery attempt: a message's recipients over SMTP or LMTP to an MX.

:func:`deliver_job` takes a :class:`Job` (a claim, or a :class:`DeliveryJob`),
an ordered list of targets (MX addresses, best first) and
:class:`SessionSettings`, and returns a
:class:`SessionResult` that says, for every recipient, whether it was
delivered, deferred or bounced, with the reply that decided it.  It never
raises for anything the network, the remote server or the body file does;
only cancellation propagates.

How the outcome is decided (issue 4, items 3 and 4):

* Connection-level failures — refused, reset or timed-out connections, a
  greeting other than 220, a 421 at any point, TLS that is required but
  fails — move on to the next target address.  When every target failed,
  the recipients still pending are deferred with the last failure's reply.
* RCPT 250/251/252 accepts a recipient; 4xx defers it and 5xx bounces it,
  for that recipient only.  DATA is sent only when someone was accepted.
  A refusal of MAIL, DATA or the final dot applies only to recipients that
  are still pending — never to those already settled at RCPT.
* Over LMTP the final dot gets one reply per accepted recipient, in RCPT
  order, each deciding its own recipient.
* No reply after the final dot (a timeout or a dropped connection) defers
  the pending recipients *without* trying the next target: the remote may
  have taken the message, and trying again at once would be the duplicate
  Haraka is known for.  The retry schedule tries again later.
* A message larger than the remote's advertised SIZE bounces ``5.3.4``;
  one that needs SMTPUTF8 to a server without it bounces ``5.6.7``.  An
  8-bit body to a server without 8BITMIME is sent as it is (converting to
  7 bit, RFC 6152 §3, is out of scope; most such servers take it anyway).
* DSN parameters (RET, ENVID, NOTIFY, ORCPT; RFC 3461, xtext-encoded) are
  passed on only when the remote offers DSN; ``dsn_passed_on`` records it
  so the caller can send "relayed" notices itself when it was not.

Timeouts are per command (RFC 5321 §4.5.3.2), never one idle timeout for
the whole session.  The connection is a :class:`Connection` that can run
several transactions, so a pool can reuse it (``transact`` then ``reset``).

aiosmtplib is used for the connection, the greeting, EHLO/HELO, STARTTLS,
AUTH and every command through ``execute_command`` (so 251/252 and other
codes reach us unfiltered).  The DATA phase is ours: aiosmtplib's
``data()`` needs the whole body in memory, uses one timeout for DATA and
the dot, and cannot read LMTP's several replies.  While the body is
streamed, the transport's protocol is swapped (``set_protocol``) for a
small reader that honours flow control and parses every reply in the
buffer, then swapped back.
"""

from __future__ import annotations

import asyncio
import collections
import datetime
import functools
import io
import ipaddress
import os
import re
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO, NoReturn, Protocol, TypeAlias, cast

from aiosmtplib import (
    SMTP,
    SMTPAuthenticationError,
    SMTPException,
    SMTPResponse,
    SMTPResponseException,
    SMTPServerDisconnected,
)

from outboundd.delivery.errors import TransientFailure
from outboundd.delivery.replies import (
    Reply,
    ReplyClass,
    Stage,
    classify,
    outcome_of,
    parse_reply,
    rcpt_refusal,
    to_transient,
)
from outboundd.delivery.tlspolicy import PolicyKind, TargetPolicy, dane_verify
from outboundd.dsn import utf8_addr_xtext
from outboundd.hooks import MX
from outboundd.spool.types import Claim, Outcome

__all__ = [
    "BODY_CHUNK_SIZE",
    "Connection",
    "ConnectionInfo",
    "ConnectionSource",
    "DeliveryJob",
    "EnvelopePlan",
    "Job",
    "JobRecipient",
    "Recipient",
    "RecipientResult",
    "SessionResult",
    "SessionSettings",
    "SetupFailure",
    "Target",
    "TargetError",
    "Transaction",
    "client_tls_context",
    "deliver_job",
    "dot_stuff",
    "host_listed",
    "orcpt_param",
    "plan_envelope",
    "xtext",
]

#: Bytes of body read from disk and written per step; bounds memory per session.
BODY_CHUNK_SIZE = 256 * 1024
#: Bodies up to this size are read on the event loop (page-cache hot, cheap).
INLINE_BODY_MAX = 64 * 1024

# A reply longer than this (all lines) is hostile or broken; aiosmtplib uses
# the same bounds for the replies it reads.
_MAX_LINE = 8192
_MAX_REPLY = _MAX_LINE * 4


# --------------------------------------------------------------------------
# Inputs


class Target(Protocol):
    """One address to try: ``outboundd.delivery.mx.MXTarget`` has this shape.

    ``address`` is an IP literal, ``hostname`` the MX name (used for SNI,
    ``force_tls_hosts``/``no_tls_hosts`` and in texts), ``mx`` the
    :class:`~outboundd.hooks.MX` it came from (bind, HELO, AUTH, LMTP),
    ``tls_policy`` the DANE or MTA-STS policy it must meet (None:
    opportunistic TLS as configured).
    """

    @property
    def mx(self) -> MX: ...

    @property
    def address(self) -> str: ...

    @property
    def port(self) -> int: ...

    @property
    def hostname(self) -> str: ...

    @property
    def tls_policy(self) -> TargetPolicy | None: ...


class Recipient(Protocol):
    """What a session reads of a recipient: a :class:`JobRecipient`, or the
    spool's ``ClaimedRecipient`` itself (no copy per recipient per attempt)."""

    @property
    def id(self) -> int: ...

    @property
    def address(self) -> str: ...

    @property
    def notify(self) -> str | None: ...

    @property
    def orcpt(self) -> str | None: ...


class Job(Protocol):
    """What a session reads of a message: a :class:`DeliveryJob`, or the
    spool's ``Claim`` itself (the engine passes it as it is: no copy per
    message).  The body is CRLF and not dot-stuffed: the file at
    ``body_path``, or ``body`` itself when the spool keeps bodies in its
    database (PostgreSQL)."""

    @property
    def mail_from(self) -> str: ...

    @property
    def recipients(self) -> Sequence[Recipient]: ...

    @property
    def body_path(self) -> Path | None: ...

    @property
    def size(self) -> int: ...

    @property
    def env_id(self) -> str | None: ...

    @property
    def ret(self) -> str | None: ...

    @property
    def smtputf8(self) -> bool: ...

    @property
    def body_8bit(self) -> bool: ...

    @property
    def body(self) -> bytes | None: ...


@dataclass(slots=True)
class JobRecipient:
    """A recipient to deliver, with its RFC 3461 parameters (decoded).

    Treated as immutable.  Not ``frozen``: a frozen dataclass's ``__init__``
    sets each field through ``object.__setattr__``, three to four times the
    cost, and the per-recipient objects of delivery are made by the thousand.
    """

    id: int
    address: str
    notify: str | None = None
    orcpt: str | None = None


@dataclass(frozen=True, slots=True)
class DeliveryJob:
    """What one attempt delivers.  The body is CRLF and not dot-stuffed: the
    file at ``body_path``, or ``body`` itself when the spool keeps bodies in
    its database (PostgreSQL)."""

    mail_from: str
    recipients: tuple[Recipient, ...]
    body_path: Path | None
    size: int
    env_id: str | None = None
    ret: str | None = None
    smtputf8: bool = False
    body_8bit: bool = False
    body: bytes | None = None

    @classmethod
    def from_claim(cls, claim: Claim) -> DeliveryJob:
        return cls(
            mail_from=claim.mail_from,
            recipients=claim.recipients,
            body_path=claim.body_path,
            size=claim.size,
            env_id=claim.env_id,
            ret=claim.ret,
            smtputf8=claim.smtputf8,
            body_8bit=claim.body_8bit,
            body=claim.body,
        )


@dataclass(frozen=True, slots=True)
class SessionSettings:
    """Timeouts (seconds) and TLS policy for outbound sessions.

    ``helo`` is this host's name (``config/me``), used unless the MX names
    its own ``bind_helo``.  Every wait for the remote has its own bound
    (``outbound.ini``'s keys of the same names); the defaults are RFC 5321
    §4.5.3.2's where it gives one (greeting, MAIL, RCPT 5 min, DATA 2 min,
    each data block 3 min, end of data 10 min).  ``ehlo_timeout`` covers
    EHLO, HELO and LHLO; ``starttls_timeout`` the reply to STARTTLS and,
    separately, the TLS handshake; ``auth_timeout`` each step of AUTH;
    ``data_block_timeout`` each block of body written (the remote not
    reading); ``rset_timeout`` RSET before a reused connection's next
    message; ``quit_timeout`` the reply to QUIT.  TLS options are ``tls.ini [outbound]``'s
    (``tls_verify`` is ``reject_unauthorized``); ``tls_context`` overrides
    them with a ready context.  ``force_tls_hosts``/``no_tls_hosts``
    entries match the MX host name (case-insensitive), its IP address, or a
    CIDR network containing it.
    """

    helo: str
    connect_timeout: float = 30.0
    greeting_timeout: float = 300.0
    ehlo_timeout: float = 300.0
    starttls_timeout: float = 300.0
    auth_timeout: float = 120.0
    mail_timeout: float = 300.0
    rcpt_timeout: float = 300.0
    data_timeout: float = 120.0
    data_block_timeout: float = 180.0
    data_end_timeout: float = 600.0
    rset_timeout: float = 20.0
    quit_timeout: float = 5.0
    enable_tls: bool = True
    tls_min_version: str | None = None
    tls_ciphers: str | None = None
    tls_verify: bool = False
    tls_cafile: Path | None = None
    tls_context: ssl.SSLContext | None = None
    force_tls: bool = False
    force_tls_hosts: tuple[str, ...] = ()
    no_tls_hosts: tuple[str, ...] = ()
    sts_cafile: Path | None = None

    def ssl_context(self) -> ssl.SSLContext:
        """The client context for STARTTLS (built once per distinct options)."""
        if self.tls_context is not None:
            return self.tls_context
        return _cached_tls_context(
            self.tls_min_version, self.tls_ciphers, self.tls_verify, self.tls_cafile
        )

    def unverified_context(self) -> ssl.SSLContext:
        """For DANE: any chain is taken in the handshake, then checked against TLSA."""
        return _cached_tls_context(self.tls_min_version, self.tls_ciphers, False, None)

    def sts_context(self) -> ssl.SSLContext:
        """For MTA-STS: the chain verified (system CAs or ``sts_cafile``) and the MX name."""
        return _cached_tls_context(self.tls_min_version, self.tls_ciphers, True, self.sts_cafile)


def _tls_version(name: str) -> ssl.TLSVersion:
    try:
        return ssl.TLSVersion[name.strip().replace(".", "_")]
    except KeyError:
        raise ValueError(
            f"unknown TLS version {name!r} (use TLSv1, TLSv1.1, TLSv1.2 or TLSv1.3)"
        ) from None


def client_tls_context(
    *,
    min_version: str | None = None,
    ciphers: str | None = None,
    reject_unauthorized: bool = False,
    cafile: Path | None = None,
) -> ssl.SSLContext:
    """The client context for STARTTLS, from ``tls.ini [outbound]`` options.

    MX certificates are usually self-signed or name another host, so by
    default (as in Haraka) they are not verified: opportunistic TLS still
    protects against passive listeners.  ``reject_unauthorized`` verifies
    the chain (system CAs, or ``cafile``) and the MX host name.  Raises
    ``ValueError`` / ``ssl.SSLError`` for a bad version or cipher string.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if reject_unauthorized:
        ctx.check_hostname = True
        ctx.verify_mode = ssl.CERT_REQUIRED
        if cafile is not None:
            ctx.load_verify_locations(cafile=str(cafile))
        else:
            ctx.load_default_certs()
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if min_version:
        ctx.minimum_version = _tls_version(min_version)
    if ciphers:
        ctx.set_ciphers(ciphers)
    return ctx


@functools.lru_cache(maxsize=8)
def _cached_tls_context(
    min_version: str | None, ciphers: str | None, verify: bool, cafile: Path | None
) -> ssl.SSLContext:
    # Building a context (and loading CAs) costs far more than a handshake's
    # setup; sessions with the same options share one.
    return client_tls_context(
        min_version=min_version, ciphers=ciphers, reject_unauthorized=verify, cafile=cafile
    )


def host_listed(hostname: str, ip: str, entries: Sequence[str]) -> bool:
    """True when ``entries`` names the host, its IP, or a network containing the IP."""
    name = hostname.rstrip(".").lower()
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        addr = None
    for raw in entries:
        entry = raw.strip().rstrip(".").lower()
        if not entry:
            continue
        if entry in (name, ip.lower()):
            return True
        if addr is not None and "/" in entry:
            try:
                if addr in ipaddress.ip_network(entry, strict=False):
                    return True
            except ValueError:
                continue
    return False


# --------------------------------------------------------------------------
# Results


@dataclass(slots=True)
class ConnectionInfo:
    """Facts about one connection, as the ``attempts`` rows record them.

    ``tls`` is the negotiated version (``"TLSv1.3"``) or ``None`` for
    plaintext; ``tls_error`` says why TLS was not used although it was
    tried (handshake failure, STARTTLS refused).  ``auth_user`` and
    ``auth_mechanism`` are the credentials offered to the remote, set as
    AUTH starts, so a refused login is on the record too (the attempt's
    reply says whether it was accepted).  ``dsn`` is true when the remote
    offered DSN, i.e. our DSN parameters were passed on.  ``tls_policy``
    is the policy that applied (``none``, ``opportunistic``, ``mta-sts``,
    ``dane``) and ``tls_policy_met`` whether the connection met it (None
    for ``none``, or while undecided).  These facts stay with the
    connection whatever fails after them.
    """

    host: str
    ip: str
    port: int
    tls: str | None = None
    auth_user: str | None = None
    auth_mechanism: str | None = None
    lmtp: bool = False
    dsn: bool = False
    tls_error: str | None = None
    tls_policy: PolicyKind | None = None
    tls_policy_met: bool | None = None

    @classmethod
    def for_target(cls, target: Target) -> ConnectionInfo:
        policy = target.tls_policy
        return cls(
            target.hostname,
            target.address,
            target.port,
            lmtp=target.mx.using_lmtp,
            tls_policy=policy.kind if policy is not None else None,
        )

    @property
    def peer(self) -> str:
        return _peer_text(self.host, self.ip, self.port)


@dataclass(slots=True)
class RecipientResult:
    """How one recipient ended this attempt and the reply that decided it.

    ``connection`` is the connection it was settled on (for a recipient
    deferred because every target failed: the last target tried), or
    ``None`` when no target was tried at all.
    """

    outcome: Outcome
    reply: Reply
    stage: Stage
    connection: ConnectionInfo | None = None

    @property
    def dsn_passed_on(self) -> bool:
        return self.connection is not None and self.connection.dsn


@dataclass(frozen=True, slots=True)
class TargetError:
    """A target that failed during the attempt (for logs)."""

    host: str
    ip: str
    port: int
    stage: Stage
    reply: Reply

    def __str__(self) -> str:
        return f"{_peer_text(self.host, self.ip, self.port)} at {self.stage}: {self.reply}"


@dataclass(slots=True)
class SessionResult:
    """Every recipient's outcome plus what happened on the way.

    ``recipients`` has exactly one entry per recipient of the job, in job
    order.  ``connection`` describes the last target connected to or tried
    (``None`` only when there was no target); the flat properties
    (``mx_host`` …) read from it.  Times are POSIX seconds from the
    injected clock.

    This, :class:`Transaction` and :class:`EnvelopePlan` are made once per
    message and treated as immutable, but are not ``frozen``: a frozen
    dataclass's ``__init__`` sets each field through ``object.__setattr__``,
    two to three times the cost of a plain one.
    """

    recipients: Mapping[int, RecipientResult]
    connection: ConnectionInfo | None
    errors: tuple[TargetError, ...]
    started_at: float
    finished_at: float

    @property
    def duration(self) -> float:
        return self.finished_at - self.started_at

    @property
    def mx_host(self) -> str | None:
        return self.connection.host if self.connection else None

    @property
    def mx_ip(self) -> str | None:
        return self.connection.ip if self.connection else None

    @property
    def port(self) -> int | None:
        return self.connection.port if self.connection else None

    @property
    def tls(self) -> str | None:
        return self.connection.tls if self.connection else None

    @property
    def auth_user(self) -> str | None:
        return self.connection.auth_user if self.connection else None

    @property
    def lmtp(self) -> bool:
        return self.connection.lmtp if self.connection else False

    @property
    def dsn_passed_on(self) -> bool:
        return self.connection is not None and self.connection.dsn

    def ids(self, outcome: Outcome) -> tuple[int, ...]:
        """Recipient ids with the given outcome, in job order."""
        return tuple(rid for rid, res in self.recipients.items() if res.outcome is outcome)


@dataclass(slots=True)
class Transaction:
    """What :meth:`Connection.transact` did.

    ``settled`` recipients have their outcome; ``unsettled`` ones were cut
    short by ``failure`` (never ``None`` when something is unsettled) and
    may be tried elsewhere when ``failure.retry_elsewhere``.
    """

    settled: Mapping[int, RecipientResult]
    unsettled: tuple[Recipient, ...]
    failure: TransientFailure | None


# --------------------------------------------------------------------------
# Pure helpers: encodings and the envelope plan


def xtext(value: str) -> str:
    """RFC 3461 §4 xtext: printable ASCII except ``+`` and ``=``, the rest ``+HH``.

    Non-ASCII text is encoded as its UTF-8 bytes.
    """
    out: list[str] = []
    for byte in value.encode("utf-8"):
        if 33 <= byte <= 126 and byte not in (0x2B, 0x3D):
            out.append(chr(byte))
        else:
            out.append(f"+{byte:02X}")
    return "".join(out)


def dot_stuff(chunk: bytes, at_line_start: bool) -> tuple[bytes, bool]:
    """Dot-stuff one chunk of body (RFC 5321 §4.5.2), across chunk boundaries.

    ``at_line_start`` says whether the previous chunk ended a line (true for
    the first chunk).  Returns the bytes to send and the flag for the next
    chunk.  A line starts after every LF, so a stray bare LF is treated as a
    line end too — the safe reading, since some servers take it as one.
    """
    out = chunk.replace(b"\n.", b"\n..")
    if at_line_start and chunk.startswith(b"."):
        out = b"." + out
    return out, chunk.endswith(b"\n") if chunk else at_line_start


_BAD_ADDRESS = re.compile(r"[\x00-\x1f\x7f<>]")
_NOTIFY_WORDS = frozenset({"SUCCESS", "FAILURE", "DELAY"})
_ADDR_TYPE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]*$")


def _is_ascii(text: str) -> bool:
    return text.isascii()


def _notify_param(notify: str | None) -> str | None:
    if not notify:
        return None
    words = [w.strip().upper() for w in notify.split(",") if w.strip()]
    if words == ["NEVER"] or (words and set(words) <= _NOTIFY_WORDS):
        return "NOTIFY=" + ",".join(dict.fromkeys(words))
    return None


def orcpt_param(orcpt: str | None, *, utf8: bool) -> str | None:
    """The ORCPT parameter for the next hop, from the stored ``type;address``.

    The address type is kept.  ``utf-8`` addresses are encoded by RFC 6533:
    utf-8-addr-unitext when this transaction uses SMTPUTF8, otherwise the
    7-bit utf-8-addr-xtext (``\\x{FC}``).  Other types are xtext (RFC 3461
    §4), octet by octet of the UTF-8 form, so ``rfc822;j+C3+A4nedoe`` goes
    on exactly as it came.
    """
    if not orcpt:
        return None
    addr_type, sep, address = orcpt.partition(";")
    if not sep or not _ADDR_TYPE.match(addr_type.strip()):
        addr_type, address = "rfc822", orcpt
    address = address.strip()
    if not address:
        return None
    addr_type = addr_type.strip().lower()
    if addr_type == "utf-8":
        return f"ORCPT=utf-8;{utf8_addr_xtext(address, unitext=utf8)}"
    return f"ORCPT={addr_type};{xtext(address)}"


@dataclass(slots=True)
class EnvelopePlan:
    """What to send for a job, given the server's extensions.

    ``refusal`` (when set) applies to every recipient and nothing is sent;
    ``refused`` lists recipients that must not be sent (they bounce);
    ``utf8`` means addresses go out as UTF-8 with the SMTPUTF8 parameter.
    """

    refusal: Reply | None
    refused: Mapping[int, Reply]
    mail_params: tuple[str, ...]
    rcpt_params: Mapping[int, tuple[str, ...]]
    utf8: bool
    dsn: bool


def _size_limit(value: str) -> int:
    word = value.split()[0] if value.split() else ""
    return int(word) if word.isdigit() else 0


def plan_envelope(
    job: Job,
    recipients: Sequence[Recipient],
    extensions: Mapping[str, str],
    *,
    peer: str,
) -> EnvelopePlan:
    """Decide the MAIL/RCPT parameters and what cannot be sent at all.

    ``extensions`` maps lower-case EHLO keywords to their parameters, as
    aiosmtplib parses them (it lower-cases every keyword, so they are not
    lower-cased again here, once per message).  ``peer`` names the host in
    refusal texts.
    """
    ext = extensions
    refused: dict[int, Reply] = {}

    def refuse_all(reply: Reply) -> EnvelopePlan:
        return EnvelopePlan(reply, {}, (), {}, False, False)

    if _BAD_ADDRESS.search(job.mail_from):
        return refuse_all(
            Reply(553, "5.1.7", f"sender address {job.mail_from!r} cannot be sent over SMTP")
        )
    offers_utf8 = "smtputf8" in ext
    if (job.smtputf8 or not _is_ascii(job.mail_from)) and not offers_utf8:
        return refuse_all(
            Reply(
                553,
                "5.6.7",
                f"the message needs SMTPUTF8 (internationalized addresses or headers) "
                f"and {peer} does not offer it",
            )
        )
    sendable: list[Recipient] = []
    for r in recipients:
        if not r.address or _BAD_ADDRESS.search(r.address):
            refused[r.id] = Reply(
                553, "5.1.3", f"recipient address {r.address!r} cannot be sent over SMTP"
            )
        elif not _is_ascii(r.address) and not offers_utf8:
            refused[r.id] = Reply(
                553,
                "5.6.7",
                f"non-ASCII recipient address {r.address} and {peer} does not offer SMTPUTF8",
            )
        else:
            sendable.append(r)

    params: list[str] = []
    if "size" in ext:
        limit = _size_limit(ext["size"])
        if limit and job.size > limit:
            return refuse_all(
                Reply(
                    552,
                    "5.3.4",
                    f"message size {job.size} bytes exceeds the {limit}-byte limit of {peer}",
                )
            )
        params.append(f"SIZE={job.size}")
    utf8 = offers_utf8 and (
        job.smtputf8
        or not _is_ascii(job.mail_from)
        or any(not _is_ascii(r.address) for r in sendable)
    )
    if "8bitmime" in ext and (job.body_8bit or utf8):
        params.append("BODY=8BITMIME")
    if utf8:
        params.append("SMTPUTF8")
    dsn = "dsn" in ext
    rcpt_params: dict[int, tuple[str, ...]] = {}
    if dsn:
        if job.ret and job.ret.strip().upper() in ("FULL", "HDRS"):
            params.append("RET=" + job.ret.strip().upper())
        if job.env_id:
            params.append("ENVID=" + xtext(job.env_id))
        for r in sendable:
            if r.notify is None and r.orcpt is None:
                rcpt_params[r.id] = ()  # the usual recipient: nothing to encode
                continue
            rcpt_params[r.id] = tuple(
                p
                for p in (_notify_param(r.notify), orcpt_param(r.orcpt, utf8=utf8))
                if p is not None
            )
    return EnvelopePlan(None, refused, tuple(params), rcpt_params, utf8, dsn)


# --------------------------------------------------------------------------
# Mapping failures at the boundary


def _peer_text(host: str, ip: str, port: int) -> str:
    literal = f"[{ip}]" if ":" not in ip else f"[IPv6:{ip}]"
    if host and host.rstrip(".").lower() != ip.lower():
        return f"{host} {literal}:{port}"
    return f"{literal}:{port}"


_Failure = (SMTPException, OSError, TimeoutError, EOFError)


def _map_failure(exc: BaseException, stage: Stage, peer: str, timeout: float) -> TransientFailure:
    """Turn an aiosmtplib / ssl / socket exception into our category."""
    if isinstance(exc, TimeoutError):
        if stage is Stage.CONNECT:
            text = f"connection to {peer} timed out after {timeout:g}s"
        else:
            text = f"{peer} did not answer within {timeout:g}s at {stage}"
        status = "4.4.1" if stage in (Stage.CONNECT, Stage.GREETING) else "4.4.2"
        return TransientFailure(Reply(421, status, text), stage)
    if isinstance(exc, SMTPResponseException) and not isinstance(exc, SMTPServerDisconnected):
        if exc.code < 0:
            return TransientFailure(
                Reply(421, "4.5.0", f"malformed reply from {peer} at {stage}: {exc.message}"),
                stage,
            )
        reply = parse_reply(exc.code, exc.message)
        return TransientFailure(to_transient(reply, f"{peer} answered at {stage}"), stage)
    detail = str(exc) or type(exc).__name__
    if isinstance(exc, OSError) and exc.errno and not isinstance(exc, ssl.SSLError):
        detail = os.strerror(exc.errno)  # "Connection refused", not asyncio's wording
    if isinstance(exc, ssl.SSLError):
        return TransientFailure(
            Reply(421, "4.7.0", f"TLS error with {peer} at {stage}: {detail}"), stage
        )
    if stage is Stage.CONNECT:
        return TransientFailure(
            Reply(421, "4.4.1", f"connection to {peer} failed: {detail}"), stage
        )
    return TransientFailure(
        Reply(421, "4.4.2", f"connection to {peer} lost at {stage}: {detail}"), stage
    )


#: How a transaction reports a recipient's outcome.
Settle: TypeAlias = Callable[["Recipient", Outcome, Reply, Stage], None]


def _mail_words(job: Job, plan: EnvelopePlan) -> list[bytes]:
    """``MAIL FROM:<...> params``, as the words of the command."""
    return [
        b"MAIL",
        b"FROM:" + _encode_address(job.mail_from, plan.utf8),
        *(p.encode("ascii") for p in plan.mail_params),
    ]


def _rcpt_words(r: Recipient, plan: EnvelopePlan) -> list[bytes]:
    """``RCPT TO:<...> params``, as the words of the command."""
    return [
        b"RCPT",
        b"TO:" + _encode_address(r.address, plan.utf8),
        # UTF-8 only under SMTPUTF8 (an ORCPT in utf-8-addr-unitext); else ASCII.
        *(p.encode("utf-8" if plan.utf8 else "ascii") for p in plan.rcpt_params.get(r.id, ())),
    ]


def _rcpt_line(r: Recipient, plan: EnvelopePlan) -> bytes:
    """``b" ".join(_rcpt_words(r, plan))``, built without the list (once per recipient)."""
    line = b"RCPT TO:" + _encode_address(r.address, plan.utf8)
    params = plan.rcpt_params.get(r.id)
    if params:
        line += b" " + " ".join(params).encode("utf-8" if plan.utf8 else "ascii")
    return line


def _mail_taken(response: SMTPResponse, candidates: Sequence[Recipient], settle: Settle) -> bool:
    """True when MAIL was accepted; otherwise its reply settles every candidate."""
    if response.code // 100 == 2:
        return True
    reply = parse_reply(response.code, response.message)
    for r in candidates:
        settle(r, outcome_of(reply), reply, Stage.MAIL)
    return False


def _rcpt_taken(response: SMTPResponse, r: Recipient, settle: Settle) -> bool:
    """True when RCPT was accepted (250, 251 and 252 all accept); otherwise it settles ``r``."""
    if response.code // 100 == 2:
        return True
    outcome, reply = rcpt_refusal(parse_reply(response.code, response.message))
    settle(r, outcome, reply, Stage.RCPT)
    return False


def _settle_data_refusal(
    response: SMTPResponse,
    accepted: Sequence[Recipient],
    settle: Settle,
) -> None:
    """DATA was not answered 354: its reply settles every accepted recipient."""
    reply = parse_reply(response.code, response.message)
    # A 2xx here is a protocol error, and like any non-5xx it defers.
    outcome = Outcome.BOUNCED if response.code // 100 == 5 else Outcome.DEFERRED
    for r in accepted:
        settle(r, outcome, reply, Stage.DATA)


class _TlsFailed(Exception):
    """The STARTTLS handshake failed; the connection is gone."""


@dataclass(frozen=True, slots=True)
class _TlsPlan:
    """How one connection does TLS, and what its attempt records about policy.

    ``kind`` is the ``tls_policy`` recorded; ``require``: no TLS, no mail
    (refusals carry ``status``); ``check`` looks at the chain the handshake
    saw and returns why it is not good enough (DANE); ``met`` false marks a
    connection made although the policy could not be met (MTA-STS testing).
    """

    kind: PolicyKind
    try_tls: bool
    require: bool
    context: ssl.SSLContext
    status: str = "4.7.10"
    check: Callable[[Sequence[bytes]], str | None] | None = None
    met: bool = True


class SetupFailure(TransientFailure):
    """A target failed after its TCP connection was made (EHLO, STARTTLS, AUTH).

    ``info`` keeps what the connection did before it failed — TLS
    negotiated, the credentials offered — so the attempt's record says so.
    """

    def __init__(self, failure: TransientFailure, info: ConnectionInfo) -> None:
        super().__init__(failure.reply, failure.stage, retry_elsewhere=failure.retry_elsewhere)
        self.info = info


# --------------------------------------------------------------------------
# The DATA phase reader


def _take_responses(data: bytes, responses: collections.deque[SMTPResponse]) -> int:
    """Append every complete reply at the start of ``data`` to ``responses``.

    Returns how many bytes they took (the rest is an incomplete reply).
    One pass over the data, as many replies as it holds: a pipelined
    envelope's replies usually come in one segment.  Raises
    :class:`SMTPResponseException` for a malformed or over-long line; the
    replies before it are kept.
    """
    taken = 0  # end of the last complete reply
    start = 0  # start of the current line
    lines: list[bytes] | None = None  # the lines so far of a multi-line reply
    while True:
        end = data.find(b"\n", start)
        if end == -1:
            if len(data) - start > _MAX_LINE:
                raise SMTPResponseException(-1, "reply line too long")
            return taken
        if end - start >= _MAX_LINE:
            raise SMTPResponseException(-1, "reply line too long")
        head = data[start : start + 3]
        sep = data[start + 3 : start + 4]
        if not head.isdigit() or sep not in (b"-", b" ", b"\r", b"\n"):
            shown = data[start : end + 1].decode("utf-8", "replace").strip()
            raise SMTPResponseException(-1, f"malformed reply line: {shown!r}")
        text = data[start + 4 : end + 1].strip(b" \t\r\n")
        start = end + 1
        if sep == b"-":
            if lines is None:
                lines = [text]
            else:
                lines.append(text)
            continue
        if lines is not None:
            lines.append(text)
            text = b"\n".join(lines)
            lines = None
        responses.append(SMTPResponse(int(head), text.decode("utf-8", "surrogateescape")))
        taken = start


class _DataPhase(asyncio.Protocol):
    """Stands in for aiosmtplib's protocol while the body and dot are sent.

    It implements write flow control (so a large body waits for the
    socket instead of filling memory) and keeps every reply that arrives,
    however the bytes are split — LMTP servers often send all their
    per-recipient replies in one segment.  Connection loss is passed on to
    the original protocol so aiosmtplib's client state stays right.
    """

    def __init__(self, original: asyncio.BaseProtocol) -> None:
        self.original = original
        self._loop = asyncio.get_running_loop()
        self._buffer = bytearray()
        self._responses: collections.deque[SMTPResponse] = collections.deque()
        self._error: SMTPException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        self._paused = False
        self._timed_out = False

    def _wake(self) -> None:
        for fut in (self._waiter, self._drain_waiter):
            if fut is not None and not fut.done():
                fut.set_result(None)

    def _fail(self, error: SMTPException) -> None:
        if self._error is None:
            self._error = error
        self._wake()

    def data_received(self, data: bytes) -> None:
        if self._error is not None:
            return
        buffer = self._buffer
        if buffer:  # the start of a reply came before: rare
            buffer += data
            data = bytes(buffer)
        try:
            taken = _take_responses(data, self._responses)
        except SMTPResponseException as exc:
            self._fail(exc)
            return
        if taken != len(data):
            buffer[:] = data[taken:]
        elif buffer:
            buffer.clear()
        if len(buffer) > _MAX_REPLY:
            self._fail(SMTPResponseException(-1, "reply too long"))
            return
        self._wake()

    def eof_received(self) -> bool:
        self._fail(SMTPServerDisconnected("connection closed by the server"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        error = SMTPServerDisconnected(f"connection lost: {exc}" if exc else "connection lost")
        error.__cause__ = exc
        self._fail(error)
        self.original.connection_lost(exc)

    @property
    def writing_paused(self) -> bool:
        """True while the transport holds more than its high-water mark unsent."""
        return self._paused

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._wake()

    async def drain(self, seconds: float) -> None:
        if self._paused and self._error is None:  # else no timer at all: the usual case
            async with asyncio.timeout(seconds):
                while self._paused and self._error is None:
                    self._drain_waiter = self._loop.create_future()
                    try:
                        await self._drain_waiter
                    finally:
                        self._drain_waiter = None
        if self._error is not None:
            raise self._error

    def take(self) -> SMTPResponse | None:
        """The next reply if it has arrived (a pipelined reply often has), else None."""
        return self._responses.popleft() if self._responses else None

    async def read_response(self, seconds: float) -> SMTPResponse:
        """The next reply; ``TimeoutError`` when none came within ``seconds``.

        The time limit is one timer handle that wakes the waiter, not an
        ``asyncio.timeout`` context (its task bookkeeping cost as much again,
        twice per message).
        """
        if not self._responses:
            timer = self._loop.call_later(seconds, self._time_out)
            self._timed_out = False
            try:
                while not self._responses:
                    if self._error is not None:
                        raise self._error
                    if self._timed_out:
                        raise TimeoutError
                    self._waiter = self._loop.create_future()
                    try:
                        await self._waiter
                    finally:
                        self._waiter = None
            finally:
                timer.cancel()
        return self._responses.popleft()

    def _time_out(self) -> None:
        self._timed_out = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


# --------------------------------------------------------------------------
# The connection


def _encode_address(address: str, utf8: bool) -> bytes:
    return f"<{address}>".encode("utf-8" if utf8 else "ascii")


class Connection:
    """An open, greeted (and, when possible, encrypted and authenticated)
    SMTP/LMTP connection to one target.

    Made by :meth:`open`; run :meth:`transact` for each message (it sends
    RSET first when the previous transaction left the server mid-envelope),
    then :meth:`close`.  :attr:`usable` says whether another transaction
    may be tried, which is what a connection pool needs.
    """

    def __init__(self, target: Target, settings: SessionSettings, client: SMTP) -> None:
        self.target = target
        self.settings = settings
        self._client = client
        self.info = ConnectionInfo.for_target(target)
        self._needs_rset = False
        self._broken = False
        self._on_closed: Callable[[Connection], None] | None = None
        # The TCP transport under any TLS layer: closing a TLS transport only
        # starts a close_notify exchange, which may never finish (a peer that
        # has gone, a loop that is shutting down) and would leak the socket.
        self._raw_transport = client.transport

    # -- opening ------------------------------------------------------------

    @classmethod
    async def open(cls, target: Target, settings: SessionSettings) -> Connection:
        """Connect, greet, STARTTLS and AUTH as policy says.

        Raises :class:`TransientFailure` (``retry_elsewhere`` true) when
        this target cannot be used.  Without a DANE or MTA-STS policy on the
        target, a failed TLS handshake is retried once on the same host in
        plaintext unless TLS is required for it; with one, see
        :meth:`_open_with_policy`.
        """
        policy = target.tls_policy
        if policy is not None:
            return await cls._open_with_policy(target, settings, policy)
        required = settings.force_tls or host_listed(
            target.hostname, target.address, settings.force_tls_hosts
        )
        wanted = required or (
            settings.enable_tls
            and not host_listed(target.hostname, target.address, settings.no_tls_hosts)
        )
        plan = _TlsPlan(
            "opportunistic" if wanted else "none", wanted, required, settings.ssl_context()
        )
        try:
            return await cls._open(target, settings, plan)
        except _TlsFailed as exc:
            peer = ConnectionInfo.for_target(target).peer
            if required:
                raise TransientFailure(
                    Reply(
                        451,
                        "4.7.10",
                        f"TLS handshake with {peer} failed and TLS is required for it: {exc}",
                    ),
                    Stage.STARTTLS,
                ) from exc
            conn = await cls._open(target, settings, replace(plan, try_tls=False))
            conn.info = replace(
                conn.info, tls_error=f"TLS handshake failed: {exc}", tls_policy_met=False
            )
            return conn

    @classmethod
    async def _open_with_policy(
        cls, target: Target, settings: SessionSettings, policy: TargetPolicy
    ) -> Connection:
        """Open a connection that must meet a DANE or MTA-STS policy.

        DANE: TLS is required; the handshake accepts any certificate and
        the chain it saw is then checked against the TLSA records.
        MTA-STS: the handshake verifies the certificate chain (system CAs or
        ``mta_sts_ca_file``) and the MX name.  When the policy is enforced,
        a host that cannot meet it is refused ``4.7.5`` (and the next MX is
        tried); in MTA-STS ``testing`` mode the connection falls back to
        opportunistic TLS and the attempt records the policy as not met.
        """
        info = ConnectionInfo.for_target(target)
        peer = info.peer
        if policy.refusal is not None:
            if policy.enforce:
                raise SetupFailure(
                    TransientFailure(Reply(451, "4.7.5", policy.refusal), Stage.CONNECT),
                    replace(info, tls_policy_met=False),
                )
            return await cls._open_degraded(target, settings, policy, policy.refusal)
        if policy.kind == "dane":
            tlsa = policy.tlsa
            hostname = target.hostname

            def check(chain: Sequence[bytes]) -> str | None:
                return dane_verify(tlsa, chain, hostname, datetime.datetime.now(datetime.UTC))

            plan = _TlsPlan("dane", True, True, settings.unverified_context(), "4.7.5", check)
        else:
            plan = _TlsPlan(
                "mta-sts",
                True,
                policy.enforce,
                settings.sts_context(),
                "4.7.5" if policy.enforce else "4.7.10",
            )
        try:
            return await cls._open(target, settings, plan)
        except _TlsFailed as exc:
            reason = f"TLS with {peer} failed under its {policy.kind} policy: {exc}"
            if policy.enforce:
                raise SetupFailure(
                    TransientFailure(Reply(451, "4.7.5", reason), Stage.STARTTLS),
                    replace(info, tls_policy_met=False),
                ) from exc
            return await cls._open_degraded(target, settings, policy, reason)

    @classmethod
    async def _open_degraded(
        cls, target: Target, settings: SessionSettings, policy: TargetPolicy, reason: str
    ) -> Connection:
        """MTA-STS ``testing``: deliver opportunistically, the policy marked as not met."""
        plan = _TlsPlan(policy.kind, True, False, settings.ssl_context(), met=False)
        try:
            conn = await cls._open(target, settings, plan)
        except _TlsFailed as exc:
            conn = await cls._open(target, settings, replace(plan, try_tls=False))
            reason = f"{reason}; TLS handshake failed: {exc}"
        conn.info = replace(conn.info, tls_error=reason, tls_policy_met=False)
        return conn

    @classmethod
    async def _open(cls, target: Target, settings: SessionSettings, plan: _TlsPlan) -> Connection:
        info = ConnectionInfo.for_target(target)
        helo = (target.mx.bind_helo or settings.helo).strip()
        if not helo or any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in helo):
            raise TransientFailure(
                Reply(451, "4.3.5", f"HELO name {helo!r} is not a valid host name"), Stage.LOCAL
            )
        sock = await _connect_socket(target, settings, info.peer)
        # Every call passes its own timeout; this default only bounds what might not.
        client = SMTP(local_hostname=helo, timeout=settings.ehlo_timeout, start_tls=False)
        try:
            await client.connect(sock=sock, timeout=settings.greeting_timeout)
        except _Failure as exc:
            client.close()
            sock.close()
            raise _map_failure(exc, Stage.GREETING, info.peer, settings.greeting_timeout) from exc
        except BaseException:
            client.close()
            sock.close()
            raise
        conn = cls(target, settings, client)
        conn.info = replace(conn.info, tls_policy=plan.kind)
        try:
            await conn._setup(helo, plan)
        except TransientFailure as failure:
            conn.abort()
            raise SetupFailure(failure, conn.info) from failure
        except BaseException:
            conn.abort()
            raise
        return conn

    async def _setup(self, helo: str, plan: _TlsPlan) -> None:
        settings = self.settings
        await self._hello(helo)
        client = self._client
        require_tls = plan.require
        if plan.try_tls and client.supports_extension("starttls"):
            try:
                # SNI is the MX name; for an IP-literal MX the ssl module
                # sends no SNI (RFC 6066 §3 forbids literals) by itself.
                await client.starttls(
                    server_hostname=self.target.hostname,
                    tls_context=plan.context,
                    timeout=settings.starttls_timeout,
                )
            except SMTPResponseException as exc:
                reply = parse_reply(exc.code, exc.message)
                if exc.code < 0 or exc.code == 421 or require_tls:
                    if require_tls:
                        self.info = replace(self.info, tls_policy_met=False)
                    self.abort()
                    raise TransientFailure(
                        Reply(
                            451,
                            plan.status if require_tls else "4.4.2",
                            f"{self.info.peer} refused STARTTLS: {reply}",
                        ),
                        Stage.STARTTLS,
                    ) from exc
                # A refused STARTTLS leaves a usable plaintext session (RFC 3207 §4).
                self.info = replace(self.info, tls_error=f"STARTTLS refused: {reply}")
            except _Failure as exc:
                self.abort()
                detail = str(exc) or type(exc).__name__
                if isinstance(exc, TimeoutError):
                    detail = f"{detail} (starttls_timeout {settings.starttls_timeout:g}s)"
                raise _TlsFailed(detail) from exc
            else:
                # On the record before anything else can fail.
                self.info = replace(self.info, tls=self._tls_version())
                if plan.check is not None:
                    problem = plan.check(self._peer_chain())
                    if problem is not None:
                        self.info = replace(self.info, tls_policy_met=False)
                        self.abort()
                        raise TransientFailure(
                            Reply(451, plan.status, f"{plan.kind} policy not met: {problem}"),
                            Stage.STARTTLS,
                        )
                # RFC 3207 §4.2: forget what the plaintext EHLO said.
                await self._hello(helo)
        elif require_tls:
            self.info = replace(self.info, tls_policy_met=False)
            await self.close()
            raise TransientFailure(
                Reply(
                    451,
                    plan.status,
                    f"TLS is required for {self.info.peer} but it does not offer STARTTLS",
                ),
                Stage.STARTTLS,
            )
        tls = self._tls_version()
        self.info = replace(
            self.info,
            tls=tls,
            dsn=client.supports_extension("dsn"),
            tls_policy_met=None if plan.kind == "none" else (tls is not None and plan.met),
        )
        await self._authenticate()

    async def _hello(self, helo: str) -> None:
        client = self._client
        name = helo.encode("ascii", "replace")
        timeout = self.settings.ehlo_timeout
        if self.target.mx.using_lmtp:
            response = await self._execute(Stage.EHLO, b"LHLO", name, seconds=timeout)
            if response.code != 250:
                await self._give_up(response, Stage.EHLO, "refused LHLO")
            client.last_ehlo_response = response
            return
        response = await self._execute(Stage.EHLO, b"EHLO", name, seconds=timeout)
        if response.code == 250:
            client.last_ehlo_response = response
            return
        if classify(response.code) is not ReplyClass.PERMANENT:
            await self._give_up(response, Stage.EHLO, "refused EHLO")
        # RFC 5321 §4.1.1.1: a server that does not know EHLO gets HELO.
        response = await self._execute(Stage.EHLO, b"HELO", name, seconds=timeout)
        if response.code != 250:
            await self._give_up(response, Stage.EHLO, "refused HELO")
        client.last_helo_response = response

    async def _authenticate(self) -> None:
        mx = self.target.mx
        if mx.auth_user is None:
            return
        user, password = mx.auth_user, mx.auth_pass or ""
        peer = self.info.peer
        if self.info.tls is None and not mx.auth_without_tls:
            await self.close()
            raise TransientFailure(
                Reply(
                    451,
                    "4.7.10",
                    f"not sending AUTH credentials for {user} to {peer} without TLS "
                    "(the MX allows it only with auth_without_tls)",
                ),
                Stage.AUTH,
            )
        offered = [m.lower() for m in self._client.server_auth_methods]
        wanted = [mx.auth_type.lower()] if mx.auth_type else ["plain", "login"]
        mechanism = next((m for m in wanted if m in offered and m in ("plain", "login")), None)
        if mechanism is None:
            await self.close()
            raise TransientFailure(
                Reply(
                    451,
                    "4.7.0",
                    f"cannot authenticate as {user} at {peer}: it offers AUTH "
                    f"{' '.join(offered).upper() or '(nothing)'}, we use "
                    f"{' or '.join(wanted).upper()}",
                ),
                Stage.AUTH,
            )
        timeout = self.settings.auth_timeout
        self.info = replace(self.info, auth_user=user, auth_mechanism=mechanism.upper())
        try:
            if mechanism == "plain":
                await self._client.auth_plain(user, password, timeout=timeout)
            else:
                await self._client.auth_login(user, password, timeout=timeout)
        except SMTPAuthenticationError as exc:
            reply = parse_reply(exc.code, exc.message)
            if exc.code == 421 or not self._client.is_connected:
                self.abort()
            else:
                await self.close()
            # A refused login is our configuration's problem: defer (and
            # let an operator fix it) rather than bounce the mail.
            raise TransientFailure(
                to_transient(reply, f"authentication as {user} failed at {peer}"), Stage.AUTH
            ) from exc
        except _Failure as exc:
            self.abort()
            raise _map_failure(exc, Stage.AUTH, peer, timeout) from exc

    def _peer_chain(self) -> list[bytes]:
        """The certificates the server presented (DER, leaf first), unverified."""
        transport = self._client.transport
        ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
        if ssl_object is None:
            return []
        # Python 3.13 has get_unverified_chain(); 3.10-3.12 have it one level down.
        getter = getattr(ssl_object, "get_unverified_chain", None) or getattr(
            getattr(ssl_object, "_sslobj", None), "get_unverified_chain", None
        )
        if getter is not None:
            # 3.13 gives DER bytes; 3.11's Certificate objects give PEM text.
            return [
                c if isinstance(c, bytes) else ssl.PEM_cert_to_DER_cert(c.public_bytes())
                for c in getter() or []
            ]
        leaf = ssl_object.getpeercert(binary_form=True)
        return [leaf] if leaf else []

    def _tls_version(self) -> str | None:
        transport = self._client.transport
        if transport is None:
            return None
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is None:
            return None
        version = ssl_object.version()
        return str(version) if version else None

    # -- commands -----------------------------------------------------------

    async def _execute(self, stage: Stage, *args: bytes, seconds: float) -> SMTPResponse:
        """Send one command; transport trouble and 421 become failures."""
        return await self._checked(
            self._client.execute_command(*args, timeout=seconds), stage, seconds
        )

    async def _checked(
        self, reading: Awaitable[SMTPResponse], stage: Stage, seconds: float
    ) -> SMTPResponse:
        """Wait for a reply: transport trouble and 421 become failures (the session ends)."""
        try:
            response = await reading
        except _Failure as exc:
            self.abort()
            raise _map_failure(exc, stage, self.info.peer, seconds) from exc
        if response.code == 421:
            self._closed_by_server(response, stage)
        return response

    def _closed_by_server(self, response: SMTPResponse, stage: Stage) -> NoReturn:
        """A 421: the server is closing the session; it ends here."""
        self.abort()
        reply = parse_reply(response.code, response.message)
        raise TransientFailure(
            to_transient(reply, f"{self.info.peer} closed the session at {stage}"), stage
        )

    async def _give_up(self, response: SMTPResponse, stage: Stage, what: str) -> None:
        reply = parse_reply(response.code, response.message)
        await self.close()
        raise TransientFailure(to_transient(reply, f"{self.info.peer} {what}"), stage)

    @property
    def usable(self) -> bool:
        """True while another transaction may be run on this connection."""
        return not self._broken and self._client.is_connected

    async def reset(self) -> None:
        """RSET: leave the server ready for a new transaction (for reuse)."""
        response = await self._execute(Stage.RSET, b"RSET", seconds=self.settings.rset_timeout)
        if response.code != 250:
            self.abort()
            reply = parse_reply(response.code, response.message)
            raise TransientFailure(
                to_transient(reply, f"{self.info.peer} refused RSET"), Stage.RSET
            )
        self._needs_rset = False

    def on_closed(self, callback: Callable[[Connection], None]) -> None:
        """Call ``callback`` once, when the connection is closed (by any path)."""
        self._on_closed = callback

    def abort(self) -> None:
        """Drop the connection at once (after a failure, or after QUIT)."""
        self._broken = True
        self._client.close()
        raw = self._raw_transport
        if raw is not None and not raw.is_closing():
            # uvloop's transports are not asyncio ABC subclasses: duck-type.
            abort = getattr(raw, "abort", None)
            if callable(abort):
                abort()
            else:
                raw.close()
        callback, self._on_closed = self._on_closed, None
        if callback is not None:
            callback(self)

    async def close(self) -> None:
        """QUIT politely (bounded by ``quit_timeout``) and close."""
        if self.usable:
            try:
                await self._client.quit(timeout=self.settings.quit_timeout)
            except _Failure:
                pass
        self.abort()

    # -- the transaction ----------------------------------------------------

    async def transact(
        self, job: Job, recipients: Sequence[Recipient] | None = None
    ) -> Transaction:
        """Run one mail transaction for ``recipients`` (default: all of the job's).

        Never raises for remote or network trouble: the result says what was
        settled and, if the transaction was cut short, why.
        """
        rcpts = tuple(job.recipients if recipients is None else recipients)
        settled: dict[int, RecipientResult] = {}

        def settle(r: Recipient, outcome: Outcome, reply: Reply, stage: Stage) -> None:
            settled[r.id] = RecipientResult(outcome, reply, stage, self.info)

        try:
            if not self.usable:
                raise TransientFailure(
                    Reply(421, "4.4.2", f"connection to {self.info.peer} is closed"), Stage.MAIL
                )
            if self._needs_rset:
                await self.reset()
            await self._transact(job, rcpts, settle)
        except TransientFailure as failure:
            unsettled = tuple(r for r in rcpts if r.id not in settled)
            return Transaction(settled, unsettled, failure)
        return Transaction(settled, (), None)

    async def _transact(
        self,
        job: Job,
        rcpts: tuple[Recipient, ...],
        settle: Settle,
    ) -> None:
        plan = plan_envelope(job, rcpts, self._client.esmtp_extensions, peer=self.info.peer)
        if plan.refusal is not None:
            for r in rcpts:
                settle(r, Outcome.BOUNCED, plan.refusal, Stage.MAIL)
            return
        for r in rcpts:
            if r.id in plan.refused:
                settle(r, Outcome.BOUNCED, plan.refused[r.id], Stage.RCPT)
        candidates = [r for r in rcpts if r.id not in plan.refused]
        if not candidates:
            return
        body = io.BytesIO(job.body) if job.body is not None else await _open_body(job)
        try:
            self._needs_rset = True
            if "pipelining" in self._client.esmtp_extensions:
                await self._transact_pipelined(job, candidates, plan, body, settle)
            else:
                await self._transact_stepwise(job, candidates, plan, body, settle)
        finally:
            body.close()

    async def _transact_stepwise(
        self,
        job: Job,
        candidates: list[Recipient],
        plan: EnvelopePlan,
        body: BinaryIO,
        settle: Settle,
    ) -> None:
        """MAIL, each RCPT and DATA one at a time, each waiting for its reply."""
        settings = self.settings
        response = await self._execute(
            Stage.MAIL, *_mail_words(job, plan), seconds=settings.mail_timeout
        )
        if not _mail_taken(response, candidates, settle):
            return
        accepted: list[Recipient] = []
        for r in candidates:
            response = await self._execute(
                Stage.RCPT, *_rcpt_words(r, plan), seconds=settings.rcpt_timeout
            )
            if _rcpt_taken(response, r, settle):
                accepted.append(r)
        if not accepted:
            return
        response = await self._execute(Stage.DATA, b"DATA", seconds=settings.data_timeout)
        if response.code != 354:
            _settle_data_refusal(response, accepted, settle)
            return
        transport, phase = self._take_over(Stage.DATA)
        try:
            await self._send_data(transport, phase, body, accepted, settle)
        finally:
            _hand_back(transport, phase)

    async def _transact_pipelined(
        self,
        job: Job,
        candidates: list[Recipient],
        plan: EnvelopePlan,
        body: BinaryIO,
        settle: Settle,
    ) -> None:
        """RFC 2920: MAIL, every RCPT and DATA in one write, then their replies in order.

        One round trip for the envelope instead of one per command (2 + the
        recipients), which is most of a reused connection's time.  Each
        reply means what it means unpipelined: a refused MAIL settles every
        recipient (the RCPT and DATA replies that follow it are only read);
        a 354 with no recipient accepted is ended with a lone dot.
        """
        settings = self.settings
        transport, phase = self._take_over(Stage.MAIL)
        try:
            commands = [b" ".join(_mail_words(job, plan))]
            commands += [_rcpt_line(r, plan) for r in candidates]
            commands.append(b"DATA")
            transport.write(b"\r\n".join(commands) + b"\r\n")
            # A reply already here is taken without a coroutine (the RCPT and
            # DATA replies usually come in the segment that brought MAIL's).
            response = self._ready_reply(phase, Stage.MAIL) or await self._phase_reply(
                phase, Stage.MAIL, settings.mail_timeout
            )
            mail_ok = _mail_taken(response, candidates, settle)
            accepted: list[Recipient] = []
            for r in candidates:
                response = self._ready_reply(phase, Stage.RCPT) or await self._phase_reply(
                    phase, Stage.RCPT, settings.rcpt_timeout
                )
                if mail_ok and _rcpt_taken(response, r, settle):
                    accepted.append(r)
            response = self._ready_reply(phase, Stage.DATA) or await self._phase_reply(
                phase, Stage.DATA, settings.data_timeout
            )
            if response.code == 354 and not accepted:
                # Nothing to send, but the server waits for data: end it empty.
                transport.write(b".\r\n")
                await self._phase_reply(phase, Stage.DATA_END, settings.data_end_timeout)
                return
            if response.code != 354:
                _settle_data_refusal(response, accepted, settle)
                return
            await self._send_data(transport, phase, body, accepted, settle)
        finally:
            _hand_back(transport, phase)

    async def _send_data(
        self,
        transport: asyncio.Transport,
        phase: _DataPhase,
        body: BinaryIO,
        accepted: list[Recipient],
        settle: Settle,
    ) -> None:
        """After 354: the body and the dot, then the replies settle ``accepted``."""
        expected = len(accepted) if self.target.mx.using_lmtp else 1
        replies: list[Reply] = []
        try:
            await self._stream_body(transport, phase, body, expected, replies)
        finally:
            self._settle_data_end(accepted, replies, settle)
        self._needs_rset = False
        if any(reply.code == 421 for reply in replies):
            self.abort()

    def _ready_reply(self, phase: _DataPhase, stage: Stage) -> SMTPResponse | None:
        """The next reply if it has arrived, else None; a 421 as in ``_phase_reply``."""
        response = phase.take()
        if response is not None and response.code == 421:
            self._closed_by_server(response, stage)
        return response

    async def _phase_reply(self, phase: _DataPhase, stage: Stage, seconds: float) -> SMTPResponse:
        """The next reply while we hold the transport; failures and 421 as ``_execute``."""
        response = phase.take()
        if response is None:
            return await self._checked(phase.read_response(seconds), stage, seconds)
        if response.code == 421:
            self._closed_by_server(response, stage)
        return response

    def _settle_data_end(
        self,
        accepted: list[Recipient],
        replies: list[Reply],
        settle: Settle,
    ) -> None:
        """The replies to the dot: one per recipient for LMTP, one for all with SMTP."""
        if self.target.mx.using_lmtp:
            for r, reply in zip(accepted, replies, strict=False):
                settle(r, outcome_of(reply), reply, Stage.DATA_END)
        elif replies:
            for r in accepted:
                settle(r, outcome_of(replies[0]), replies[0], Stage.DATA_END)

    def _take_over(self, stage: Stage) -> tuple[asyncio.Transport, _DataPhase]:
        """Our own reader in front of aiosmtplib's protocol, until :func:`_hand_back`.

        (A pair of calls in ``try``/``finally`` rather than a context
        manager: it runs once or twice a message.)
        """
        # uvloop's transports are not asyncio ABC subclasses, so no isinstance().
        transport = cast(asyncio.Transport | None, self._client.transport)
        if transport is None or transport.is_closing():
            self.abort()
            raise TransientFailure(
                Reply(421, "4.4.2", f"connection to {self.info.peer} lost at {stage}"), stage
            )
        phase = _DataPhase(transport.get_protocol())
        transport.set_protocol(phase)
        return transport, phase

    async def _stream_body(
        self,
        transport: asyncio.Transport,
        phase: _DataPhase,
        body: BinaryIO,
        expected: int,
        replies: list[Reply],
    ) -> None:
        """Write the body dot-stuffed and the dot via ``phase``; collect ``expected`` replies."""
        settings = self.settings
        dot_sent = False
        timeout = settings.data_block_timeout
        try:
            at_line_start = True
            tail = b"\r\n"
            pending = b""  # the last chunk is held back to go out with the dot
            while True:
                try:
                    chunk = (
                        body.read(BODY_CHUNK_SIZE)
                        if isinstance(body, io.BytesIO)
                        else await asyncio.to_thread(body.read, BODY_CHUNK_SIZE)
                    )
                except OSError as exc:
                    self.abort()
                    raise TransientFailure(
                        Reply(451, "4.3.0", f"cannot read the message body: {exc}"),
                        Stage.LOCAL,
                        retry_elsewhere=False,
                    ) from exc
                if not chunk:
                    break
                if pending:
                    transport.write(pending)
                    await phase.drain(timeout)
                pending, at_line_start = dot_stuff(chunk, at_line_start)
                tail = (tail + chunk)[-2:]
            # One write (one segment) for a small body and its end marker.
            transport.write(pending + (b".\r\n" if tail == b"\r\n" else b"\r\n.\r\n"))
            if phase.writing_paused:
                # The remote has not read the last block, so the dot is still in
                # our buffer: a remote that stopped reading gets the block timeout.
                try:
                    await phase.drain(timeout)
                except TimeoutError:
                    raise  # it never got the dot: the next MX may be tried
                except _Failure:
                    dot_sent = True  # it may have read the dot before it went away
                    raise
            dot_sent = True
            timeout = settings.data_end_timeout
            for _ in range(expected):
                response = await phase.read_response(timeout)
                replies.append(parse_reply(response.code, response.message))
                if response.code == 421 and expected == 1:
                    # The server refused the message and is closing: it did
                    # not take it, so the next MX may be tried.
                    self.abort()
                    raise TransientFailure(
                        to_transient(
                            replies.pop(), f"{self.info.peer} closed the session at data_end"
                        ),
                        Stage.DATA_END,
                    )
        except _Failure as exc:
            self.abort()
            stage = Stage.DATA_END if dot_sent else Stage.DATA
            failure = _map_failure(exc, stage, self.info.peer, timeout)
            # Without a reply to the dot the remote may hold the message:
            # another MX now could deliver it twice.  Defer instead.
            failure.retry_elsewhere = not dot_sent
            raise failure from exc


def _hand_back(transport: asyncio.Transport, phase: _DataPhase) -> None:
    """aiosmtplib's protocol reads the connection again (see ``Connection._take_over``)."""
    if not transport.is_closing():
        transport.set_protocol(phase.original)


async def _connect_socket(target: Target, settings: SessionSettings, peer: str) -> socket.socket:
    """A connected non-blocking socket, bound to ``mx.bind`` when given.

    Connecting ourselves keeps ``connect_timeout`` (TCP connect) apart from
    ``greeting_timeout`` (the banner), which aiosmtplib would lump together.
    """
    try:
        if "%" in target.address:  # a zone ID (fe80::1%eth0) names our interface, not a host
            raise ValueError(target.address)
        ip = ipaddress.ip_address(target.address)
    except ValueError:
        raise TransientFailure(
            Reply(451, "4.4.0", f"{target.address!r} is not an IP address ({peer})"),
            Stage.CONNECT,
        ) from None
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        if target.mx.bind:
            sock.bind((target.mx.bind, 0))
        async with asyncio.timeout(settings.connect_timeout):
            await asyncio.get_running_loop().sock_connect(sock, (str(ip), target.port))
    except _Failure as exc:
        sock.close()
        failure = _map_failure(exc, Stage.CONNECT, peer, settings.connect_timeout)
        if target.mx.bind and isinstance(exc, OSError) and not isinstance(exc, TimeoutError):
            failure = TransientFailure(
                replace(failure.reply, text=f"{failure.reply.text} (bound to {target.mx.bind})"),
                Stage.CONNECT,
            )
        raise failure from exc
    except BaseException:
        sock.close()
        raise
    return sock


async def _open_body(job: Job) -> BinaryIO:
    """The body, ready to stream.

    A small body (at most ``INLINE_BODY_MAX``, the common case) was written
    moments ago and sits in the page cache: reading it on the loop costs a
    few microseconds, while a hop to a worker thread and back costs more
    than the read (it was 17% of the delivery process's Python time).
    Larger bodies are opened and read in a thread, chunk by chunk.
    """
    path, size = job.body_path, job.size
    if path is None:
        raise TransientFailure(
            Reply(451, "4.3.0", "the message body is not available"),
            Stage.LOCAL,
            retry_elsewhere=False,
        )
    try:
        if size <= INLINE_BODY_MAX:
            return io.BytesIO(_read_small(path))
        return await asyncio.to_thread(_open_binary, path)
    except OSError as exc:
        raise TransientFailure(
            Reply(451, "4.3.0", f"cannot open the message body {path}: {exc.strerror or exc}"),
            Stage.LOCAL,
            retry_elsewhere=False,
        ) from exc


def _read_small(path: Path) -> bytes:
    """The whole (small) file: open, read to the end, close; none of pathlib's layers."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, INLINE_BODY_MAX + 1):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _open_binary(path: Path) -> BinaryIO:
    return path.open("rb")


# --------------------------------------------------------------------------
# One attempt over a list of targets


@dataclass(frozen=True, slots=True)
class _Last:
    failure: TransientFailure
    info: ConnectionInfo


class ConnectionSource(Protocol):
    """Where :func:`deliver_job` gets its connections: a pool (``delivery/pool.py``)."""

    async def take(self, target: Target, settings: SessionSettings) -> Connection | None:
        """An idle connection to ``target`` to reuse, or None."""
        ...

    async def open(self, target: Target, settings: SessionSettings) -> Connection:
        """A new connection to ``target`` (raises :class:`TransientFailure`)."""
        ...

    async def give_back(self, conn: Connection, settings: SessionSettings) -> None:
        """The transaction is over: keep ``conn`` for reuse or close it."""
        ...


async def _open(
    target: Target, settings: SessionSettings, pool: ConnectionSource | None
) -> Connection:
    if pool is not None:
        return await pool.open(target, settings)
    return await Connection.open(target, settings)


async def deliver_job(
    job: Job,
    targets: Sequence[Target],
    settings: SessionSettings,
    *,
    clock: Callable[[], float] = time.time,
    pool: ConnectionSource | None = None,
) -> SessionResult:
    """Deliver ``job`` to the first target that takes it; see the module doc.

    With a ``pool``, an idle connection to the target is reused and a
    connection that ended cleanly is kept for the next message.

    Every recipient of the job gets exactly one :class:`RecipientResult`.
    Only cancellation propagates (the open connection is dropped first).
    """
    started = clock()
    results: dict[int, RecipientResult] = {}
    pending: tuple[Recipient, ...] = tuple(job.recipients)
    errors: list[TargetError] = []
    last: _Last | None = None
    connection: ConnectionInfo | None = None
    for target in targets:
        if not pending:
            break
        # What the record says of a target no connection was made to (made
        # only then: a reused connection brings its own).
        info: ConnectionInfo | None = None
        conn: Connection | None = None
        try:
            conn = await pool.take(target, settings) if pool is not None else None
            reused = conn is not None
            if conn is None:
                conn = await _open(target, settings, pool)
            tx = await conn.transact(job, pending)
            if reused and tx.failure is not None and not tx.settled:
                # The server closed the idle connection we kept: that says
                # nothing about this message.  Try once more on a fresh one.
                conn.abort()
                conn = None
                conn = await _open(target, settings, pool)
                tx = await conn.transact(job, pending)
            if pool is not None:
                await pool.give_back(conn, settings)
            else:
                await conn.close()
        except TransientFailure as failure:
            if isinstance(failure, SetupFailure):
                info = failure.info
            tx = Transaction({}, pending, failure)
        except asyncio.CancelledError:
            if conn is not None:
                conn.abort()
            raise
        except Exception as exc:  # a bug here must defer, never lose, the recipients
            if conn is not None:
                conn.abort()
                info = conn.info
            elif info is None:
                info = ConnectionInfo.for_target(target)
            tx = Transaction(
                {},
                pending,
                TransientFailure(
                    Reply(
                        451,
                        "4.3.0",
                        f"internal error delivering to {info.peer}: {type(exc).__name__}: {exc}",
                    ),
                    Stage.LOCAL,
                    retry_elsewhere=False,
                ),
            )
        if conn is not None:
            info = conn.info
        elif info is None:
            info = ConnectionInfo.for_target(target)
        connection = info
        results.update(tx.settled)
        pending = tx.unsettled
        if tx.failure is not None:
            errors.append(
                TargetError(info.host, info.ip, info.port, tx.failure.stage, tx.failure.reply)
            )
            last = _Last(tx.failure, info)
            if not tx.failure.retry_elsewhere:
                break
    for r in pending:
        if last is None:
            reply = Reply(451, "4.4.4", "no mail exchanger address to try")
            results[r.id] = RecipientResult(Outcome.DEFERRED, reply, Stage.CONNECT, None)
        else:
            results[r.id] = RecipientResult(
                Outcome.DEFERRED, last.failure.reply, last.failure.stage, last.info
            )
    ordered = {r.id: results[r.id] for r in job.recipients if r.id in results}
    return SessionResult(ordered, connection, tuple(errors), started, clock())
