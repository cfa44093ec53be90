"""Queue inspection and steering: what ``outboundctl`` asks of the spool.

These call the backend's own operations (:class:`~outboundd.spool.base.Spool`),
so they work on either backend and are safe while ``outboundd`` runs: every
change is a guarded UPDATE that leaves leased (``sending``) rows to the lease
holder except where an operator's final decision overrides it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from outboundd.spool.base import Spool
from outboundd.spool.types import (
    AttemptEntry,
    MessageDetail,
    QueueEntry,
    QueueStats,
    RecipientDetail,
)

__all__ = [
    "AttemptEntry",
    "MessageDetail",
    "QueueEntry",
    "QueueStats",
    "RecipientDetail",
    "flush",
    "list_queue",
    "message_exists",
    "show_message",
    "stats",
]


async def list_queue(
    spool: Spool,
    *,
    status: str | None = None,
    domain: str | None = None,
    sender: str | None = None,
    older_than: float | None = None,
    limit: int | None = None,
    now: float | None = None,
) -> list[QueueEntry]:
    """Recipients in the queue, oldest message first.

    Without ``status`` only unfinished recipients (queued, sending,
    deferred) are listed; name a final status to see those.
    """
    at = time.time() if now is None else now
    return await spool.list_queue(
        status=status,
        domain=domain.lower() if domain else None,
        sender=sender,
        received_before=at - older_than if older_than is not None else None,
        limit=limit,
    )


async def show_message(spool: Spool, queue_id: str) -> MessageDetail:
    """Everything about one message; :class:`UnknownMessageError` when there is none."""
    return await spool.show_message(queue_id)


async def flush(
    spool: Spool,
    queue_ids: Sequence[str] = (),
    *,
    domain: str | None = None,
    now: float | None = None,
) -> int:
    """Make waiting recipients due now (failure counts kept); return how many.

    Unknown queue IDs raise :class:`UnknownMessageError` before anything changes.
    """
    at = time.time() if now is None else now
    return await spool.flush(list(queue_ids), domain.lower() if domain else None, at)


async def message_exists(spool: Spool, queue_id: str) -> bool:
    return await spool.message_exists(queue_id)


async def stats(spool: Spool, *, now: float | None = None, top: int = 10) -> QueueStats:
    return await spool.stats(time.time() if now is None else now, top)
