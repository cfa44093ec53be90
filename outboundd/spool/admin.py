"""Queue inspection and steering: what ``outboundctl`` asks of the spool.

These run through the same :class:`~outboundd.spool.core.Spool` writer as the
daemon's own work, so they are safe while ``outboundd`` runs: every change is
a guarded UPDATE that leaves leased (``sending``) rows to the lease holder
except where an operator's final decision overrides it.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from outboundd.spool.core import Spool
from outboundd.spool.errors import UnknownMessageError
from outboundd.spool.sql import q


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
    body_path: Path
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
    params = {
        "status": status,
        "all_states": status is not None,
        "domain": domain.lower() if domain else None,
        "sender": sender,
        "received_before": at - older_than if older_than is not None else None,
        "limit": -1 if limit is None else limit,
    }

    def op(conn: sqlite3.Connection) -> list[Any]:
        return conn.execute(q("list_recipients"), params).fetchall()

    rows = await spool.run(op, write=False)
    return [QueueEntry(*row) for row in rows]


async def show_message(spool: Spool, queue_id: str) -> MessageDetail:
    def op(conn: sqlite3.Connection) -> tuple[list[Any], list[Any], list[Any]]:
        params = {"queue_id": queue_id}
        msg = conn.execute(q("show_message"), params).fetchall()
        rcpts = conn.execute(q("show_recipients"), params).fetchall()
        attempts = conn.execute(q("show_attempts"), params).fetchall()
        return msg, rcpts, attempts

    msg, rcpts, attempts = await spool.run(op, write=False)
    if not msg:
        raise UnknownMessageError(queue_id)
    m = msg[0]
    history: dict[int, list[AttemptEntry]] = {}
    for row in attempts:
        history.setdefault(row[0], []).append(AttemptEntry(*row))
    fields = [f for f in RecipientDetail.__dataclass_fields__ if f != "history"]
    recipients = tuple(
        RecipientDetail(
            **dict(zip(fields, row, strict=True)), history=tuple(history.get(row[0], ()))
        )
        for row in rcpts
    )
    return MessageDetail(
        queue_id=m[0],
        mail_from=m[1],
        body_path=spool.queue_dir / m[2],
        size=m[3],
        received_at=m[4],
        auth_user=m[5],
        client_ip=m[6],
        env_id=m[7],
        ret=m[8],
        smtputf8=bool(m[9]),
        body_8bit=bool(m[10]),
        notes=json.loads(m[11]),
        dsn_of=m[12],
        finished_at=m[13],
        recipients=recipients,
    )


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
    dom = domain.lower() if domain else None

    def op(conn: sqlite3.Connection) -> int:
        for qid in queue_ids:
            found = conn.execute(q("message_exists"), {"queue_id": qid}).fetchall()
            if not list(found):
                raise UnknownMessageError(qid)
        if queue_ids:
            total = 0
            for qid in queue_ids:
                cursor = conn.execute(
                    q("flush_message"), {"now": at, "queue_id": qid, "domain": dom}
                )
                total += cursor.rowcount
            return total
        if dom is not None:
            cursor = conn.execute(q("flush_domain"), {"now": at, "domain": dom})
        else:
            cursor = conn.execute(q("flush_all"), {"now": at})
        return cursor.rowcount

    count: int = await spool.run(op)
    spool.new_work.set()
    return count


async def message_exists(spool: Spool, queue_id: str) -> bool:
    def op(conn: sqlite3.Connection) -> bool:
        return bool(conn.execute(q("message_exists"), {"queue_id": queue_id}).fetchall())

    result: bool = await spool.run(op, write=False)
    return result


async def stats(spool: Spool, *, now: float | None = None, top: int = 10) -> QueueStats:
    at = time.time() if now is None else now

    def op(conn: sqlite3.Connection) -> tuple[Any, ...]:
        by_status = conn.execute(q("stats_by_status")).fetchall()
        domains = conn.execute(q("stats_top_domains"), {"limit": top}).fetchall()
        oldest = conn.execute(q("stats_oldest_deferred")).fetchall()
        recent = conn.execute(q("stats_recent_outcomes"), {"since": at - 3600}).fetchall()
        size = conn.execute(q("stats_queue_bytes")).fetchall()
        paused = conn.execute(q("control_get"), {"key": "paused"}).fetchall()
        return by_status, domains, oldest, recent, size, paused

    by_status, domains, oldest, recent, size, paused = await spool.run(op, write=False)
    counts = {s: 0 for s in ("queued", "sending", "deferred")}
    counts.update({row[0]: row[1] for row in by_status})
    last_hour = {o: 0 for o in ("delivered", "deferred", "bounced", "dropped")}
    last_hour.update({row[0]: row[1] for row in recent})
    return QueueStats(
        by_status=counts,
        top_domains=tuple((row[0], row[1]) for row in domains),
        oldest_deferred_received_at=oldest[0][0] if oldest else None,
        last_hour=last_hour,
        queue_bytes=int(size[0][0]),
        queued_messages=int(size[0][1]),
        paused=bool(paused) and paused[0][0] == "1",
    )
