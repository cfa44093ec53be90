"""Moving a SQLite queue into PostgreSQL (``outboundctl queue migrate --to URL``).

What moves: every message with its envelope, every recipient in its state
(a lease left by a stopped daemon becomes due again, as recovery would
make it), the whole attempt history, the bodies of unfinished messages
(read from ``bodies/`` into the database's ``bodies`` table) and the
``control`` table (``outboundctl pause`` stays paused).  The AUTH throttle's
counters are not carried over: they describe the last minutes only.

How it stays safe:

* it holds the source queue's ``outboundd.lock`` exclusively for the whole
  run (:mod:`outboundd.spool.inuse`), so it refuses at once while any
  ``outboundd`` process uses the queue, and no daemon starts on it meanwhile;
* the destination must hold no message yet (its schema is created or
  brought up to date first, as ``outboundd`` would);
* everything is written in one PostgreSQL transaction, and before it
  commits the destination's counts (messages, recipients per status,
  attempts, bodies and their bytes, control keys) are compared with the
  source's: any difference rolls it all back;
* after the commit the source directory gets a ``MIGRATED`` note, and
  ``outboundd`` refuses to start on it again (it would deliver the same
  mail twice).  The source itself is left as it was, as a backup.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import asyncpg

from outboundd.spool.base import Spool, describe_location, is_postgres_url
from outboundd.spool.core import DB_NAME
from outboundd.spool.errors import SpoolError
from outboundd.spool.inuse import hold_exclusive, mark_migrated
from outboundd.spool.postgres.sql import Statement, bind, to_positional
from outboundd.spool.sql import parse_queries

#: Rows read from SQLite and written with one COPY at a time.
BATCH = 500
#: Statuses a lease may have left behind, and what they go back to.
LEASED = "sending"

_MESSAGE_COLUMNS = (
    "queue_id", "mail_from", "size", "received_at", "auth_user", "client_ip", "env_id", "ret",
    "smtputf8", "body_8bit", "notes", "dsn_of", "finished_at",
)  # fmt: skip
_RECIPIENT_COLUMNS = (
    "id", "queue_id", "recipient", "domain", "notify", "orcpt", "status", "attempts",
    "failures", "next_attempt_at", "last_attempt_at", "last_code", "last_status",
    "last_response", "last_mx", "held_status", "lease_owner", "lease_expires_at", "finished_at",
    "final_reason", "dsn_queue_id", "delay_notified",
)  # fmt: skip
_ATTEMPT_COLUMNS = (
    "id", "recipient_id", "attempt", "started_at", "finished_at", "mx_host", "mx_ip", "port",
    "tls", "auth", "code", "status", "response", "outcome", "reason", "tls_policy",
    "tls_policy_met",
)  # fmt: skip
_FINAL = ("delivered", "bounced", "dropped")


class MigrationRefused(SpoolError):
    """The migration did not start, or was rolled back; nothing changed."""


@dataclass
class Tally:
    """What one side holds, compared at the end."""

    messages: int = 0
    attempts: int = 0
    bodies: int = 0
    body_bytes: int = 0
    recipients: Counter[str] = field(default_factory=Counter)
    control: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        by_status = ", ".join(f"{n} {s}" for s, n in sorted(self.recipients.items())) or "none"
        return (
            f"{self.messages} messages, recipients: {by_status}; {self.attempts} attempts; "
            f"{self.bodies} bodies ({self.body_bytes} bytes)"
        )


@dataclass(frozen=True, slots=True)
class MigrationReport:
    source: Path
    destination: str
    copied: Tally
    seconds: float


@cache
def _statements() -> dict[str, str]:
    return parse_queries(Path(__file__).with_name("transfer.sql").read_text(encoding="utf-8"))


def _pg(name: str) -> Statement:
    return to_positional(_statements()[name])


def released(row: dict[str, Any]) -> dict[str, Any]:
    """A recipient row as it goes over: a stopped daemon's lease given back.

    With no daemon running, every ``sending`` row is a lease whose holder
    is gone; it becomes due again in the status it had before (as
    ``outboundd``'s recovery does), so a host of the new queue retries it.
    """
    if row["status"] != LEASED:
        return row
    return row | {
        "status": row["held_status"] or "queued",
        "held_status": None,
        "lease_owner": None,
        "lease_expires_at": None,
    }


class _Source:
    """The SQLite queue, read in batches on a worker thread (nothing writes it meanwhile)."""

    def __init__(self, queue_dir: Path) -> None:
        self.queue_dir = queue_dir
        self.conn = sqlite3.connect(queue_dir / DB_NAME, check_same_thread=False)
        self.conn.row_factory = sqlite3.Row

    def close(self) -> None:
        self.conn.close()

    def rows(self, name: str, key: str) -> Iterator[list[dict[str, Any]]]:
        """Batches of ``name``'s rows, in ``key`` order."""
        after: Any = "" if key == "queue_id" else 0
        while True:
            batch = [
                dict(row)
                for row in self.conn.execute(_statements()[name], {"after": after, "limit": BATCH})
            ]
            if not batch:
                return
            yield batch
            after = batch[-1][key]

    def control(self) -> dict[str, str]:
        return {str(k): str(v) for k, v in self.conn.execute(_statements()["sqlite_control"])}

    def counts(self) -> tuple[int, int, Counter[str]]:
        """Messages, attempts and recipients per status, counted by SQLite itself."""
        messages, attempts = self.conn.execute(_statements()["sqlite_counts"]).fetchone()
        rows = self.conn.execute(_statements()["sqlite_recipient_counts"])
        return int(messages), int(attempts), Counter({str(s): int(n) for s, n in rows})

    def body(self, message: dict[str, Any]) -> bytes | None:
        """The body of an unfinished message; None for a finished one (it has none)."""
        if message["finished_at"] is not None:
            return None
        try:
            return (self.queue_dir / str(message["body_file"])).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise MigrationRefused(
                f"cannot read the body of {message['queue_id']}: {exc.strerror or exc}"
            ) from exc


async def migrate_queue(queue_dir: Path, url: str) -> MigrationReport:
    """Copy the SQLite queue in ``queue_dir`` into the (empty) PostgreSQL queue at ``url``.

    Raises :class:`MigrationRefused` (nothing written) when a daemon uses
    the source, the destination is not empty, a body is missing, or the
    counts differ at the end; :class:`SpoolError` when a side cannot be
    opened.
    """
    if not is_postgres_url(url):
        raise MigrationRefused(f"--to must be a postgresql:// URL, not {url!r}")
    if not (queue_dir / DB_NAME).exists():
        raise MigrationRefused(f"no queue at {queue_dir} (nothing to migrate)")
    started = time.monotonic()
    lock = hold_exclusive(queue_dir)
    try:
        # Bring both schemas up to date the way outboundd would (no recovery
        # of the source: its leases are given back in the copy instead).
        await (await Spool.open(queue_dir, recover=False, create=False)).close()
        await (await Spool.open(url, recover=False)).close()
        source = _Source(queue_dir)
        try:
            copied = await _copy(source, url)
        finally:
            source.close()
        where = describe_location(url)
        mark_migrated(
            queue_dir,
            f"to {where} on {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} "
            "by outboundctl queue migrate",
        )
        return MigrationReport(queue_dir, where, copied, time.monotonic() - started)
    finally:
        lock.release()


async def _copy(source: _Source, url: str) -> Tally:
    try:
        conn = await asyncpg.connect(url)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise SpoolError(f"cannot connect to {describe_location(url)}: {exc}") from exc
    try:
        async with conn.transaction():
            present = int(await conn.fetchval(_pg("pg_message_count").text))
            if present:
                raise MigrationRefused(
                    f"the destination queue already holds {present} messages; "
                    "migrate into an empty database"
                )
            tally = await _copy_rows(source, conn)
            await conn.fetchval(_pg("pg_recipient_ids_follow").text)
            await conn.fetchval(_pg("pg_attempt_ids_follow").text)
            expected = await asyncio.to_thread(_expected, source, tally)
            found = await _count(conn)
            if not matches(expected, found):
                raise MigrationRefused(
                    "counts differ after copying, nothing was kept: source has "
                    f"{expected.describe()}; destination would have {found.describe()}"
                )
        return expected
    except asyncpg.PostgresError as exc:
        raise MigrationRefused(f"PostgreSQL refused the copy, nothing was kept: {exc}") from exc
    finally:
        await conn.close()


async def _copy_rows(source: _Source, conn: Any) -> Tally:
    tally = Tally()
    unfinished_without_body: list[str] = []
    batches = source.rows("sqlite_messages", "queue_id")
    while batch := await asyncio.to_thread(next, batches, None):
        bodies: list[tuple[str, bytes]] = []
        for message in batch:
            body = await asyncio.to_thread(source.body, message)
            if body is not None:
                bodies.append((message["queue_id"], body))
            elif message["finished_at"] is None:
                unfinished_without_body.append(message["queue_id"])
        await conn.copy_records_to_table(
            "messages",
            records=[tuple(m[c] for c in _MESSAGE_COLUMNS) for m in batch],
            columns=_MESSAGE_COLUMNS,
        )
        await conn.copy_records_to_table("bodies", records=bodies, columns=("queue_id", "body"))
        tally.messages += len(batch)
        tally.bodies += len(bodies)
        tally.body_bytes += sum(len(b) for _, b in bodies)
    waiting = set(unfinished_without_body)
    batches = source.rows("sqlite_recipients", "id")
    while batch := await asyncio.to_thread(next, batches, None):
        rows = [released(r) for r in batch]
        for row in rows:
            tally.recipients[row["status"]] += 1
            if row["queue_id"] in waiting and row["status"] not in _FINAL:
                raise MigrationRefused(
                    f"message {row['queue_id']} has unfinished recipients but its body file "
                    "is missing: start outboundd once on this queue (its recovery drops such "
                    "messages, with the reason) or `outboundctl delete` it, then migrate"
                )
        await conn.copy_records_to_table(
            "recipients",
            records=[tuple(r[c] for c in _RECIPIENT_COLUMNS) for r in rows],
            columns=_RECIPIENT_COLUMNS,
        )
    batches = source.rows("sqlite_attempts", "id")
    while batch := await asyncio.to_thread(next, batches, None):
        await conn.copy_records_to_table(
            "attempt_log",
            records=[tuple(a[c] for c in _ATTEMPT_COLUMNS) for a in batch],
            columns=_ATTEMPT_COLUMNS,
        )
        tally.attempts += len(batch)
    control = await asyncio.to_thread(source.control)
    statement = _pg("pg_control_set")
    for key, value in control.items():
        await conn.execute(statement.text, *bind(statement, {"key": key, "value": value}))
    return tally


def _expected(source: _Source, read: Tally) -> Tally:
    """What the destination must hold: the source's counts by SQLite, and the
    bodies as read from disk."""
    messages, attempts, recipients = source.counts()
    return Tally(
        messages=messages,
        attempts=attempts,
        bodies=read.bodies,
        body_bytes=read.body_bytes,
        recipients=recipients,
        control=source.control(),
    )


def matches(expected: Tally, found: Tally) -> bool:
    """Every count equal, and every source control key present with its value
    (the destination may hold more, e.g. a pause set there beforehand)."""
    return (
        (expected.messages, expected.attempts, expected.bodies, expected.body_bytes)
        == (found.messages, found.attempts, found.bodies, found.body_bytes)
        and +expected.recipients == +found.recipients
        and all(found.control.get(k) == v for k, v in expected.control.items())
    )


async def _control(conn: Any) -> dict[str, str]:
    return {str(r[0]): str(r[1]) for r in await conn.fetch(_pg("pg_control").text)}


async def _count(conn: Any) -> Tally:
    row = await conn.fetchrow(_pg("pg_counts").text)
    by_status = await conn.fetch(_pg("pg_recipient_counts").text)
    return Tally(
        messages=int(row["messages"]),
        attempts=int(row["attempts"]),
        bodies=int(row["bodies"]),
        body_bytes=int(row["body_bytes"]),
        recipients=Counter({str(s): int(n) for s, n in by_status}),
        control=await _control(conn),
    )


def report_json(report: MigrationReport) -> str:
    t = report.copied
    return json.dumps(
        {
            "source": str(report.source),
            "destination": report.destination,
            "messages": t.messages,
            "recipients": dict(t.recipients),
            "attempts": t.attempts,
            "bodies": t.bodies,
            "body_bytes": t.body_bytes,
            "control": t.control,
            "seconds": round(report.seconds, 3),
        }
    )
