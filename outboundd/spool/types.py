"""Values that cross the spool's boundary.

Everything the rest of outboundd hands to the spool or gets back from it is a
frozen dataclass defined here, so callers never see SQL rows or cursors.
Times are POSIX seconds (``float``) inside the program; the SQL views show
them as ISO-8601 UTC text.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Final


class Status(StrEnum):
    """State of one recipient.  The last three are final."""

    QUEUED = "queued"
    SENDING = "sending"
    DEFERRED = "deferred"
    DELIVERED = "delivered"
    BOUNCED = "bounced"
    DROPPED = "dropped"

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATUSES


FINAL_STATUSES = frozenset({Status.DELIVERED, Status.BOUNCED, Status.DROPPED})

#: Why, and with which status, a message whose body file is gone is dropped
#: (at start-up recovery and at the first failed open while running).
BODY_MISSING_REASON = "message body file missing from the spool; cannot deliver"
BODY_MISSING_STATUS = "5.3.0"


class Outcome(StrEnum):
    """What one attempt did to one recipient."""

    DELIVERED = "delivered"
    DEFERRED = "deferred"
    BOUNCED = "bounced"
    DROPPED = "dropped"

    @property
    def status(self) -> Status:
        return Status(self.value)


@dataclass(frozen=True, slots=True)
class NewRecipient:
    """A recipient as accepted at RCPT, with its RFC 3461 parameters."""

    address: str
    notify: str | None = None  # "NEVER" or a comma list of SUCCESS, FAILURE, DELAY
    orcpt: str | None = None  # "rfc822;addr" as given (decoded xtext)


@dataclass(frozen=True, slots=True)
class NewMessage:
    """A message to queue.  ``body`` is the message exactly as it will be sent:
    CRLF line ends, not dot-stuffed."""

    mail_from: str  # "" for the null sender
    recipients: Sequence[NewRecipient]
    body: bytes
    auth_user: str | None = None
    client_ip: str | None = None
    env_id: str | None = None  # RFC 3461 ENVID (decoded xtext)
    ret: str | None = None  # "FULL" or "HDRS"
    smtputf8: bool = False
    body_8bit: bool = False
    notes: Mapping[str, Any] = field(default_factory=dict)
    dsn_of: str | None = None  # queue ID of the message this DSN reports on
    dsn_recipients: Sequence[str] = ()  # the original recipients it reports (linked on accept)


@dataclass(slots=True)
class ClaimedRecipient:
    """One leased recipient, as a claim (or ``accept_leased``) hands it to delivery.

    This and :class:`AttemptRecord` are made once per recipient per attempt:
    treated as immutable, but not ``frozen``, whose ``__init__`` (one
    ``object.__setattr__`` per field) costs three to four times as much.
    """

    id: int
    address: str
    notify: str | None
    orcpt: str | None
    attempts: int  # attempts made before this one
    failures: int  # temporary failures counted towards temp_fail_intervals
    previous_status: Status  # queued or deferred, before the claim
    last_code: int | None = None
    last_status: str | None = None
    last_response: str | None = None
    last_mx: str | None = None
    delay_notified: bool = False  # a delay DSN was already sent for it
    #: A failure DSN already reports it: queued just before a crash that lost
    #: the record (the DSN links itself in its own commit).  Not reported twice.
    dsn_queue_id: str | None = None


#: Status by its value: ``Status(text)`` goes through the enum's Python-level
#: ``__call__`` and ``__new__``, once per claimed recipient.
_STATUSES: Final[Mapping[str, Status]] = {s.value: s for s in Status}


def claimed_recipient(row: Sequence[Any]) -> ClaimedRecipient:
    """A recipient from a row every leasing statement returns, in both backends'
    order: ``id, queue_id, domain, recipient, notify, orcpt, attempts, failures,
    held_status, last_code, last_status, last_response, last_mx, delay_notified,
    dsn_queue_id``."""
    return ClaimedRecipient(
        id=row[0],
        address=row[3],
        notify=row[4],
        orcpt=row[5],
        attempts=row[6],
        failures=row[7],
        previous_status=_STATUSES[row[8]],
        last_code=row[9],
        last_status=row[10],
        last_response=row[11],
        last_mx=row[12],
        delay_notified=bool(row[13]),
        dsn_queue_id=row[14],
    )


@dataclass(slots=True)
class Claim:
    """A leased (queue_id, domain) group: the unit of one delivery session.

    Treated as immutable; not ``frozen`` for the cost of a frozen
    ``__init__`` (see :class:`ClaimedRecipient`), paid once per claim.
    """

    queue_id: str
    domain: str
    mail_from: str
    body_path: Path | None  # the body file (SQLite); None: ``body`` holds it
    size: int
    received_at: float
    auth_user: str | None
    env_id: str | None
    ret: str | None
    smtputf8: bool
    body_8bit: bool
    notes: Mapping[str, Any]
    dsn_of: str | None
    recipients: tuple[ClaimedRecipient, ...]
    lease_owner: str
    lease_expires_at: float
    #: The body itself: when the backend keeps it in the database, or when the
    #: claim was leased at accept and the (small) body is still in hand.
    body: bytes | None = None


@dataclass(frozen=True, slots=True)
class Lease:
    """Who takes a message's recipients at accept (``Spool.accept_leased``), for how long."""

    owner: str
    lease_seconds: float
    always_split: bool = False  # one claim per recipient instead of per domain
    #: ``domain_concurrency_max``: a shared queue (PostgreSQL) leases a group at
    #: accept only while its domain holds fewer slots on every host (None: no limit).
    domain_room: int | None = None


@dataclass(slots=True)
class AttemptRecord:
    """The result of one attempt for one recipient, written by ``record()``.

    ``next_attempt_at`` is required for ``DEFERRED``.  ``count_failure`` is
    false when the recipient was deferred without a real failure (it then
    keeps its failure count).  ``reason`` explains final states that did not
    come from a remote reply (a plugin's or an operator's decision).
    The link from a bounced recipient to its DSN is written by the DSN's
    own ``accept()`` (``NewMessage.dsn_of``/``dsn_recipients``).
    """

    recipient_id: int
    outcome: Outcome
    started_at: float
    finished_at: float
    mx_host: str | None = None
    mx_ip: str | None = None
    port: int | None = None
    tls: str | None = None  # TLS version, e.g. "TLSv1.3"; None = plaintext
    auth: str | None = None  # the AUTH user, if we authenticated
    code: int | None = None
    status: str | None = None  # enhanced status code, e.g. "5.1.1"
    response: str | None = None
    next_attempt_at: float | None = None
    count_failure: bool = True
    reason: str | None = None
    delay_notified: bool = False  # a delay DSN was queued for it in this attempt
    #: A final decision of ours (a plugin's drop, a lost body): when set, the
    #: recipient's last_status/last_response show it and last_code is NULL,
    #: while the attempt row keeps the reply the attempt really got.
    final_status: str | None = None
    final_response: str | None = None
    # Which outbound TLS policy applied ("none", "opportunistic", "mta-sts",
    # "dane"; None when no connection was tried) and whether it was met.
    tls_policy: str | None = None
    tls_policy_met: bool | None = None


@dataclass(frozen=True, slots=True)
class StoredStsPolicy:
    """A cached MTA-STS policy (RFC 8461 §5.1) as the spool keeps it.

    ``policy_id`` is the ``id`` of the ``_mta-sts`` TXT record it was
    fetched under; ``mx`` the policy's ``mx`` patterns; times are POSIX
    seconds, ``expires_at`` = ``fetched_at`` + ``max_age``.
    """

    domain: str
    policy_id: str
    mode: str
    mx: tuple[str, ...]
    max_age: int
    fetched_at: float
    expires_at: float


@dataclass(frozen=True, slots=True)
class RecordResult:
    """Which recipients' state was written, and which had lost their lease."""

    updated: tuple[int, ...]
    lease_lost: tuple[int, ...]
    finished_messages: tuple[str, ...]  # queue IDs whose every recipient is now final


@dataclass(frozen=True, slots=True)
class RecoveryReport:
    leases_released: int
    temp_files_removed: int
    orphan_bodies_removed: int
    finished_bodies_removed: int
    missing_bodies: tuple[str, ...]  # queue IDs whose body file was gone


@dataclass(frozen=True, slots=True)
class SpoolCounters:
    """Monotonic counters, for tests and ``stats``: how much group commit saved."""

    accepts: int = 0
    accept_commits: int = 0
    records: int = 0


@dataclass(frozen=True, slots=True)
class ThrottleEntry:
    """One client's AUTH attempts as the throttle counts them (table ``auth_throttle``).

    ``failures`` counts failed attempts, ``in_flight`` attempts admitted and
    still being checked (as of ``last_seen``, the time of the latest
    admission or failure); ``blocked_until`` is set once the client reached
    the disconnect limit.  See ``outboundd.plugins.auth_flat_file.AuthThrottle``.
    """

    failures: int
    in_flight: int
    last_seen: float
    blocked_until: float | None

    def live(self, now: float, forget_before: float) -> bool:
        """False once the block has ended, or (unblocked) the client was last seen too long ago."""
        if self.blocked_until is not None:
            return now < self.blocked_until
        return self.last_seen > forget_before


@dataclass(frozen=True, slots=True)
class QueueEntry:
    """One recipient as ``outboundctl list`` shows it."""

    queue_id: str
    mail_from: str
    recipient: str
    domain: str
    status: str
    attempts: int
    next_attempt_at: float | None
    last_code: int | None
    last_status: str | None
    last_response: str | None
    last_mx: str | None
    received_at: float
    finished_at: float | None
    size: int


@dataclass(frozen=True, slots=True)
class AttemptEntry:
    recipient_id: int
    attempt: int
    started_at: float
    finished_at: float
    mx_host: str | None
    mx_ip: str | None
    port: int | None
    tls: str | None
    auth: str | None
    code: int | None
    status: str | None
    response: str | None
    outcome: str
    reason: str | None


@dataclass(frozen=True, slots=True)
class RecipientDetail:
    id: int
    recipient: str
    domain: str
    notify: str | None
    orcpt: str | None
    status: str
    attempts: int
    failures: int
    next_attempt_at: float | None
    last_attempt_at: float | None
    last_code: int | None
    last_status: str | None
    last_response: str | None
    last_mx: str | None
    lease_owner: str | None
    lease_expires_at: float | None
    finished_at: float | None
    final_reason: str | None
    dsn_queue_id: str | None
    history: tuple[AttemptEntry, ...]


@dataclass(frozen=True, slots=True)
class MessageDetail:
    queue_id: str
    mail_from: str
    body_path: Path | None  # the body file (SQLite); None when the body is in the database
    size: int
    received_at: float
    auth_user: str | None
    client_ip: str | None
    env_id: str | None
    ret: str | None
    smtputf8: bool
    body_8bit: bool
    notes: dict[str, Any]
    dsn_of: str | None
    finished_at: float | None
    recipients: tuple[RecipientDetail, ...]


@dataclass(frozen=True, slots=True)
class QueueStats:
    by_status: dict[str, int]
    top_domains: tuple[tuple[str, int], ...]
    oldest_deferred_received_at: float | None
    last_hour: dict[str, int]
    queue_bytes: int
    queued_messages: int
    paused: bool
