"""``outboundctl queue migrate --to URL``: a real SQLite queue into a real PostgreSQL one.

The source is filled through the spool itself (accept, claim, record: the
daemon's own calls) with every kind of row: a deferred and a delivered
recipient with their attempts, a finished message whose body is gone, a
recipient still leased by a daemon that stopped, and a pause.  The command
runs as the operator runs it (a subprocess); the destination is a fresh
database in the session's throwaway cluster (tests/pgcluster.py).
"""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
import sys
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from outboundd import spool as spool_backend
from outboundd.config import load_config
from outboundd.spool import AttemptRecord, NewMessage, NewRecipient, Outcome, SpoolError
from outboundd.spool.inuse import MIGRATED_NAME, hold_for_daemon
from outboundd.spool.transfer import Tally, matches
from tests.harness import free_port, running, write_config
from tests.test_ctl import Result, assert_failed, ctl

BODY = b"From: <alice@sender.test>\r\nSubject: moving house\r\n\r\nsame mail, new home\r\n"
#: What is compared, in which order: every table (columns as in PostgreSQL) and both views.
TABLES = {
    "messages": "queue_id",
    "recipients": "id",
    "attempt_log": "id",
    "control": "key",
}
VIEWS = {"deliveries": "queue_id, recipient", "attempts": "queue_id, recipient, attempt"}
SQLITE_COLUMNS = {
    # The SQLite table's column that PostgreSQL does not have (bodies are a table there).
    "messages": "queue_id, mail_from, size, received_at, auth_user, client_ip, env_id, ret, "
    "smtputf8, body_8bit, notes, dsn_of, finished_at",
}
ISO_TIME = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)\.\d{3}Z$")


@dataclass
class Source:
    config: Path
    queue_dir: Path
    deferred: str  # bob@dest.test deferred (451), carol@other.test delivered
    leased: str  # x@dest.test claimed by a daemon that stopped: status 'sending'
    finished: str  # y@other.test delivered: message finished, body removed


@pytest.fixture
async def source(tmp_path: Path) -> Source:
    config = write_config(tmp_path / "config", dns_port=free_port(), mx_port=free_port())
    queue_dir = load_config(config).outbound.queue_dir
    spool = await spool_backend.open(queue_dir)
    try:
        rcpts = [NewRecipient("bob@dest.test"), NewRecipient("carol@other.test")]
        deferred = await spool.accept(NewMessage("alice@sender.test", rcpts, BODY, auth_user="a"))
        finished = await spool.accept(NewMessage("", [NewRecipient("y@other.test")], BODY))
        now = time.time()
        common: dict[str, Any] = {"started_at": now - 0.2, "finished_at": now, "port": 25}
        outcomes = {
            "bob@dest.test": AttemptRecord(
                0, Outcome.DEFERRED, **common, mx_host="mx.dest.test", code=451,
                status="4.7.1", response="greylisted", next_attempt_at=now + 3600,
            ),
            "carol@other.test": AttemptRecord(
                0, Outcome.DELIVERED, **common, mx_host="mx.other.test", code=250,
                status="2.0.0", response="ok", tls="TLSv1.3", tls_policy="dane",
                tls_policy_met=True,
            ),
            "y@other.test": AttemptRecord(
                0, Outcome.DELIVERED, **common, mx_host="mx.other.test", code=250,
                status="2.0.0", response="ok",
            ),
        }  # fmt: skip
        for claim in await spool.claim("daemon-1", limit=100, lease_seconds=600):
            records = [replace(outcomes[r.address], recipient_id=r.id) for r in claim.recipients]
            await spool.record("daemon-1", claim, records)
        leased = await spool.accept(
            NewMessage("bob@sender.test", [NewRecipient("x@dest.test")], BODY)
        )
        claims = await spool.claim("host:4242:gone", limit=10, lease_seconds=600)
        assert [c.queue_id for c in claims] == [leased]
        await spool.set_paused(True)
    finally:
        await spool.close()
    return Source(config, queue_dir, deferred, leased, finished)


def sqlite_rows(queue_dir: Path, name: str, order: str) -> list[tuple[Any, ...]]:
    con = sqlite3.connect(queue_dir / "outbound.db")
    try:
        columns = SQLITE_COLUMNS.get(name, "*")
        return [tuple(r) for r in con.execute(f"SELECT {columns} FROM {name} ORDER BY {order}")]
    finally:
        con.close()


def normalised(name: str, row: tuple[Any, ...]) -> tuple[Any, ...]:
    """A source row as it must arrive: the stopped daemon's lease given back."""
    if name == "recipients" and row[6] == "sending":
        # status <- held_status; held_status, lease_owner, lease_expires_at cleared
        return (*row[:6], row[15], *row[7:15], None, None, None, *row[18:])
    if name == "deliveries" and row[4] == "sending":
        return (*row[:4], "queued", *row[5:])
    return row


def seconds(row: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(
        ISO_TIME.sub(r"\1", v) if isinstance(v, str) and ISO_TIME.match(v) else v for v in row
    )


async def pg_rows(url: str, sql: str) -> list[tuple[Any, ...]]:
    conn = await asyncpg.connect(url)
    try:
        return [tuple(r) for r in await conn.fetch(sql)]
    finally:
        await conn.close()


async def migrate(source: Source, url: str, *extra: str) -> Result:
    return await ctl(source.config, "queue", "migrate", "--to", url, *extra)


# ------------------------------------------------------------------ tests


async def test_everything_moves_and_the_counts_are_verified(source: Source, pg_url: str) -> None:
    before = {
        name: sqlite_rows(source.queue_dir, name, order) for name, order in (TABLES | VIEWS).items()
    }
    statuses = Counter(row[4] for row in before["deliveries"])
    assert statuses == {"deferred": 1, "delivered": 2, "sending": 1}

    result = await migrate(source, pg_url, "--json")
    assert result.code == 0, result
    assert result.err == ""
    report = json.loads(result.out)
    assert report["messages"] == 3
    # The stopped daemon's lease is given back: x@dest.test is due again.
    assert report["recipients"] == {"deferred": 1, "delivered": 2, "queued": 1}
    assert report["attempts"] == 3
    assert report["bodies"] == 2  # the finished message has none
    assert report["body_bytes"] == 2 * len(BODY)
    assert report["control"] == {"paused": "1"}
    assert report["destination"] == pg_url  # no password in it to hide

    # Every row and value is the same (floats included), the lease aside.
    for table, order in TABLES.items():
        moved = await pg_rows(pg_url, f"SELECT * FROM {table} ORDER BY {order}")
        assert moved == [normalised(table, row) for row in before[table]], table
    # The accounting views too (times compared on their seconds: the two
    # backends may round the milliseconds of the same float differently).
    for view, order in VIEWS.items():
        moved = await pg_rows(pg_url, f"SELECT * FROM {view} ORDER BY {order}")
        assert [seconds(row) for row in moved] == [
            seconds(normalised(view, row)) for row in before[view]
        ], view

    dest = await spool_backend.open(pg_url, recover=False)
    try:
        assert await dest.is_paused()
        assert await dest.read_body(source.deferred) == BODY
        assert await dest.read_body(source.leased) == BODY
        detail = await dest.show_message(source.leased)
        assert [(r.recipient, r.status) for r in detail.recipients] == [("x@dest.test", "queued")]
        # New rows are numbered after the copied ones.
        qid = await dest.accept(NewMessage("new@sender.test", [NewRecipient("z@dest.test")], BODY))
        ids = await pg_rows(pg_url, "SELECT id FROM recipients ORDER BY id")
        assert len({i for (i,) in ids}) == 5
        assert (await dest.show_message(qid)).recipients[0].recipient == "z@dest.test"
    finally:
        await dest.close()

    # The source is kept, marked: no daemon starts on it again.
    assert sqlite_rows(source.queue_dir, "deliveries", VIEWS["deliveries"]) == before["deliveries"]
    assert "to " + pg_url in (source.queue_dir / MIGRATED_NAME).read_text()
    with pytest.raises(SpoolError, match="this queue was migrated"):
        hold_for_daemon(source.queue_dir)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "outboundd", "-c", str(source.config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 1
    assert b"this queue was migrated" in out and b"Traceback" not in out


async def test_the_text_report(source: Source, pg_url: str) -> None:
    result = await migrate(source, pg_url)
    assert result.code == 0, result
    assert "(counts verified)" in result.out
    assert "recipients: 1 deferred, 2 delivered, 1 queued" in result.out
    assert "control:    paused=1" in result.out
    assert "marked MIGRATED" in result.out


async def test_refused_while_outboundd_runs_on_the_queue(source: Source, pg_url: str) -> None:
    async with running(source.config):
        result = await migrate(source, pg_url)
        assert_failed(result, r"an outboundd process is using .*: stop every outboundd")
    # Nothing was written anywhere: not even the schema.
    tables = await pg_rows(pg_url, "SELECT count(*) FROM pg_tables WHERE tablename = 'messages'")
    assert tables == [(0,)]
    assert not (source.queue_dir / MIGRATED_NAME).exists()
    # A stopped daemon holds nothing: now it runs.
    result = await migrate(source, pg_url)
    assert result.code == 0, result


async def test_outboundd_does_not_start_while_a_migration_holds_the_queue(
    source: Source,
) -> None:
    from outboundd.spool.inuse import QueueInUseError, hold_exclusive

    lock = hold_exclusive(source.queue_dir)
    try:
        with pytest.raises(QueueInUseError, match="is being migrated"):
            hold_for_daemon(source.queue_dir)
    finally:
        lock.release()
    again = hold_for_daemon(source.queue_dir)  # released: a daemon may start
    assert again is not None
    again.release()


async def test_refused_when_the_destination_holds_mail(source: Source, pg_url: str) -> None:
    dest = await spool_backend.open(pg_url)
    try:
        await dest.accept(NewMessage("other@sender.test", [NewRecipient("a@b.test")], BODY))
    finally:
        await dest.close()
    result = await migrate(source, pg_url)
    assert_failed(result, r"the destination queue already holds 1 messages")
    assert await pg_rows(pg_url, "SELECT count(*) FROM messages") == [(1,)]
    assert not (source.queue_dir / MIGRATED_NAME).exists()


async def test_a_missing_body_keeps_nothing(source: Source, pg_url: str) -> None:
    con = sqlite3.connect(source.queue_dir / "outbound.db")
    try:
        (body_file,) = con.execute(
            "SELECT body_file FROM messages WHERE queue_id = ?", (source.leased,)
        ).fetchone()
    finally:
        con.close()
    (source.queue_dir / body_file).unlink()
    result = await migrate(source, pg_url)
    assert_failed(result, rf"message {source.leased} has unfinished recipients but its body")
    assert await pg_rows(pg_url, "SELECT count(*) FROM messages") == [(0,)]
    assert not (source.queue_dir / MIGRATED_NAME).exists()


async def test_usage_errors(source: Source, tmp_path: Path) -> None:
    result = await migrate(source, str(tmp_path / "elsewhere"))
    assert_failed(result, r"--to must be a postgresql:// URL")
    empty = write_config(tmp_path / "empty" / "config", dns_port=free_port(), mx_port=free_port())
    result = await ctl(empty, "queue", "migrate", "--to", "postgresql://127.0.0.1:1/x")
    assert_failed(result, r"no queue at .* \(nothing to migrate\)")
    result = await ctl(source.config, "queue", "migrate")
    assert result.code == 2 and "--to" in result.err


async def test_an_unreachable_destination_is_one_line(source: Source) -> None:
    result = await migrate(source, f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere")
    assert result.code == 1, result
    assert "Traceback" not in result.err and len(result.err_lines) == 1, result.err
    assert not (source.queue_dir / MIGRATED_NAME).exists()


def test_the_verification_compares_every_count() -> None:
    """The check before COMMIT: any difference fails it (and rolls the copy back)."""
    expected = Tally(3, 3, 2, 100, Counter(queued=1, delivered=2), {"paused": "1"})
    assert matches(expected, Tally(3, 3, 2, 100, Counter(queued=1, delivered=2), {"paused": "1"}))
    # The destination may hold more control keys than the source.
    assert matches(
        expected, Tally(3, 3, 2, 100, Counter(queued=1, delivered=2), {"paused": "1", "x": "y"})
    )
    for wrong in (
        Tally(2, 3, 2, 100, Counter(queued=1, delivered=2), {"paused": "1"}),
        Tally(3, 2, 2, 100, Counter(queued=1, delivered=2), {"paused": "1"}),
        Tally(3, 3, 1, 100, Counter(queued=1, delivered=2), {"paused": "1"}),
        Tally(3, 3, 2, 99, Counter(queued=1, delivered=2), {"paused": "1"}),
        Tally(3, 3, 2, 100, Counter(queued=2, delivered=1), {"paused": "1"}),
        Tally(3, 3, 2, 100, Counter(queued=1, delivered=2), {"paused": "0"}),
        Tally(3, 3, 2, 100, Counter(queued=1, delivered=2), {}),
    ):
        assert not matches(expected, wrong), wrong
