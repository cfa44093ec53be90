"""The SQLite backend's queue inspection and steering (``outboundctl``'s reads and flush).

Reached through :class:`~outboundd.spool.base.Spool`'s admin methods; they run
through the same writer as the daemon's own work, so they are safe while
``outboundd`` runs.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from outboundd.spool.errors import UnknownMessageError
from outboundd.spool.sql import q
from outboundd.spool.types import (
    AttemptEntry,
    MessageDetail,
    QueueEntry,
    QueueStats,
    RecipientDetail,
)

if TYPE_CHECKING:
    from outboundd.spool.core import SqliteSpool


async def list_queue(
    spool: SqliteSpool,
    *,
    status: str | None,
    domain: str | None,
    sender: str | None,
    received_before: float | None,
    limit: int | None,
) -> list[QueueEntry]:
    params = {
        "status": status,
        "all_states": status is not None,
        "domain": domain,
        "sender": sender,
        "received_before": received_before,
        "limit": -1 if limit is None else limit,
    }

    def op(conn: sqlite3.Connection) -> list[Any]:
        return conn.execute(q("list_recipients"), params).fetchall()

    rows = await spool.run(op, write=False)
    return [QueueEntry(*row) for row in rows]


async def show_message(spool: SqliteSpool, queue_id: str) -> MessageDetail:
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


async def flush(spool: SqliteSpool, queue_ids: Sequence[str], domain: str | None, at: float) -> int:
    dom = domain

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


async def message_exists(spool: SqliteSpool, queue_id: str) -> bool:
    def op(conn: sqlite3.Connection) -> bool:
        return bool(conn.execute(q("message_exists"), {"queue_id": queue_id}).fetchall())

    result: bool = await spool.run(op, write=False)
    return result


async def stats(spool: SqliteSpool, at: float, top: int) -> QueueStats:

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
