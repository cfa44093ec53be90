"""The bounce path: from "these recipients failed" to a queued DSN.

Shared by the delivery engine and ``outboundctl bounce`` so both send the
same notice.  The DSN is ordinary mail: rendered by :mod:`outboundd.dsn`,
queued through :meth:`Spool.accept` with the null sender, and linked to the
original message (``messages.dsn_of``) and recipients
(``recipients.dsn_queue_id``).

A DSN is DKIM-signed with the key of the ``me`` domain (or its nearest
parent domain with a key) when ``dkim.ini`` enables signing.

It must run while the original's body still exists — before the record
that makes the message final (which deletes the body).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from outboundd import dsn
from outboundd.config import Config
from outboundd.log import get_logger
from outboundd.spool import NewMessage, NewRecipient, Spool, SpoolError
from outboundd.submission.dkim import DkimSigner, DkimSignError, signer_for


async def _original_body(spool: Spool, original: OriginalMessage) -> bytes:
    """The failed message's body: in hand, its file, or read from the spool."""
    if original.body is not None:
        return original.body
    if original.body_path is None:
        return await spool.read_body(original.queue_id)
    try:
        return await asyncio.to_thread(original.body_path.read_bytes)
    except OSError as exc:
        raise SpoolError(
            f"cannot read {original.queue_id}'s body for its DSN: {exc.strerror}"
        ) from exc


#: Marks a double-bounce copy, so its own failure is dropped (no loops).
DOUBLE_BOUNCE_NOTE = "double_bounce_notice"


@dataclass(frozen=True, slots=True)
class OriginalMessage:
    """What the bounce path needs to know about the message that failed."""

    queue_id: str
    mail_from: str
    body_path: Path | None  # the body file (SQLite); None: ``body``, or ask the spool
    received_at: float
    env_id: str | None
    ret: str | None
    is_double_bounce_notice: bool = False
    body: bytes | None = None  # in hand already (PostgreSQL claims)


@dataclass(frozen=True, slots=True)
class NoticeRecipient:
    """One recipient to report, with its NOTIFY parameter (who wants to hear)."""

    report: dsn.DsnRecipient
    notify: str | None


@dataclass(frozen=True, slots=True)
class NoticeSettings:
    me: str
    templates: dsn.DsnTemplates
    bounce_max_original_size: int
    double_bounce_recipient: str | None
    signer: DkimSigner | None = None


def notice_settings(config: Config) -> NoticeSettings:
    """The DSN settings from the configuration (templates, size cap, double bounces)."""
    return NoticeSettings(
        me=config.me,
        templates=dsn.DsnTemplates(
            text=config.bounce.text, html=config.bounce.html, image=config.bounce.image
        ),
        bounce_max_original_size=config.outbound.bounce_max_original_size,
        double_bounce_recipient=config.outbound.double_bounce_recipient,
        signer=signer_for(config, get_logger("dkim")),
    )


@dataclass(frozen=True, slots=True)
class NoticeOutcome:
    """Which DSN (if any) now reports which recipients, and why not for the rest."""

    dsn_queue_id: str | None
    reported: tuple[str, ...]  # recipient addresses covered by the DSN
    reason: str  # for the record and the log
    double_bounce: bool


async def queue_failure_notice(
    spool: Spool,
    settings: NoticeSettings,
    original: OriginalMessage,
    failed: Sequence[NoticeRecipient],
    *,
    reason: str,
    now: float | None = None,
) -> NoticeOutcome:
    """Queue ONE failure DSN for every recipient in ``failed`` that should be reported."""
    return await queue_notice(
        spool, settings, original, failed, event="failure", reason=reason, now=now
    )


def _plan(
    settings: NoticeSettings, original: OriginalMessage, notify: str | None, event: dsn.DsnEvent
) -> dsn.FailureNotice:
    if event == "failure":
        return dsn.plan_failure_notice(
            original.mail_from,
            notify,
            double_bounce_recipient=settings.double_bounce_recipient,
            is_double_bounce_notice=original.is_double_bounce_notice,
        )
    if dsn.should_send_dsn(original.mail_from, notify, event):
        return dsn.FailureNotice(
            send_to=original.mail_from, double_bounce=False, reason=f"{event} DSN"
        )
    return dsn.FailureNotice(send_to=None, double_bounce=False, reason=f"no {event} DSN requested")


async def queue_notice(
    spool: Spool,
    settings: NoticeSettings,
    original: OriginalMessage,
    recipients: Sequence[NoticeRecipient],
    *,
    event: dsn.DsnEvent,
    reason: str,
    now: float | None = None,
) -> NoticeOutcome:
    """Queue ONE DSN of kind ``event`` for the ``recipients`` that should hear of it.

    Raises :class:`SpoolError` when the DSN could not be queued (the caller
    keeps the recipients unfinished so nothing is lost) or when the
    original's body is gone.
    """
    at = time.time() if now is None else now
    plans = [(f, _plan(settings, original, f.notify, event)) for f in recipients]
    wanted = [(f, plan) for f, plan in plans if plan.send_to is not None]
    if not wanted:
        first = plans[0][1] if plans else None
        return NoticeOutcome(
            None,
            (),
            first.reason if first else "nothing to report",
            bool(first and first.double_bounce),
        )
    send_to = wanted[0][1].send_to
    assert send_to is not None
    double = wanted[0][1].double_bounce
    body = await _original_body(spool, original)
    reported = tuple(f.report for f, _ in wanted)
    report = dsn.DsnReport(
        reporting_mta=settings.me,
        arrival_date=original.received_at,
        original_sender=original.mail_from,
        original_message=body,
        recipients=reported,
        reason=reason,
        extended_reason=dsn.describe_recipients(reported),
        original_envelope_id=original.env_id,
        ret="HDRS" if original.ret == "HDRS" else ("FULL" if original.ret == "FULL" else None),
    )
    dsn_qid = spool.new_queue_id()
    rendered = dsn.render_dsn(
        report,
        settings.templates,
        me=settings.me,
        now=at,
        message_id=f"{dsn_qid}@{settings.me}",
        pid=os.getpid(),
        bounce_max_original_size=settings.bounce_max_original_size,
        recipient=send_to if double else None,
    )
    if settings.signer is not None:
        try:
            rendered = settings.signer.sign_as(settings.me, rendered)
        except DkimSignError as exc:
            raise SpoolError(f"cannot DKIM-sign the DSN for {original.queue_id}: {exc}") from exc
    transport = dsn.dsn_transport(rendered)
    await spool.accept(
        NewMessage(
            mail_from="",
            recipients=[NewRecipient(send_to)],
            body=rendered,
            smtputf8=transport.smtputf8,
            body_8bit=transport.body_8bit,
            notes={DOUBLE_BOUNCE_NOTE: True} if double else {},
            dsn_of=original.queue_id,
            dsn_recipients=[r.address for r in reported] if event == "failure" else [],
        ),
        queue_id=dsn_qid,
    )
    return NoticeOutcome(dsn_qid, tuple(r.address for r in reported), wanted[0][1].reason, double)
