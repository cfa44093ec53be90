"""Operator decisions that go through the bounce path (``outboundctl bounce``)."""

from __future__ import annotations

import time

from outboundd import dsn
from outboundd.config import Config
from outboundd.delivery.notices import (
    DOUBLE_BOUNCE_NOTE,
    NoticeRecipient,
    OriginalMessage,
    notice_settings,
    queue_failure_notice,
)
from outboundd.spool import Spool, Status, admin

UNFINISHED = ("queued", "sending", "deferred")


async def bounce_message(
    spool: Spool, config: Config, queue_id: str, *, reason: str | None = None
) -> tuple[int, str | None]:
    """Fail every unfinished recipient of ``queue_id`` now and send one DSN.

    Returns how many recipients were bounced and the DSN's queue ID (None
    when no DSN is due: null sender, NOTIFY=NEVER).  The DSN is queued before
    the recipients are marked, so a failure leaves the message as it was.
    """
    detail = await admin.show_message(spool, queue_id)  # UnknownMessageError
    pending = [r for r in detail.recipients if r.status in UNFINISHED]
    if not pending:
        return 0, None
    now = time.time()
    text = dsn.reason_operator(reason)
    failed = [
        NoticeRecipient(
            report=dsn.DsnRecipient(
                address=r.recipient,
                action="failed",
                status=dsn.STATUS_OPERATOR,
                original_recipient=r.orcpt,
                last_attempt_at=r.last_attempt_at,
                reason=text,
            ),
            notify=r.notify,
        )
        for r in pending
    ]
    original = OriginalMessage(
        queue_id=detail.queue_id,
        mail_from=detail.mail_from,
        body_path=detail.body_path,
        received_at=detail.received_at,
        env_id=detail.env_id,
        ret=detail.ret,
        is_double_bounce_notice=bool(detail.notes.get(DOUBLE_BOUNCE_NOTE)),
    )
    notice = await queue_failure_notice(
        spool, notice_settings(config), original, failed, reason=text, now=now
    )
    note = f"DSN {notice.dsn_queue_id}" if notice.dsn_queue_id else notice.reason
    changed = await spool.finalize_message(
        queue_id,
        Status.BOUNCED,
        reason=f"bounced by operator: {text}; {note}",
        status_code=dsn.STATUS_OPERATOR,
        response=text,
        now=now,
    )
    return len(changed), notice.dsn_queue_id
