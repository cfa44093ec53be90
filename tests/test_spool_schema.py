"""The SQLite schema's cost per row and its indexes (migration 0005), on real files.

Why these tests exist: SQLite checks ``x IN (a, b, c, ...)`` in a CHECK
constraint or a partial index's WHERE by building a temporary b-tree for
every row written, which was more than half of its work per delivered
recipient; and a partial index serves only a query whose WHERE implies the
index's own, so a query spelled differently silently scans the table.
"""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path

import pytest

from outboundd.spool import Spool
from outboundd.spool.migrations import discover, migrate
from outboundd.spool.sql import queries

#: Statements run for every recipient (or message) accepted, leased, recorded.
ROW_WRITES = (
    "insert_message",
    "insert_recipient",
    "insert_recipient_leased",
    "insert_attempt",
    "update_after_attempt",
)

#: Queue scans that must stay on an index however large the queue grows:
#: the scheduler's due work, lease expiry, outboundctl stats and flush.
INDEXED_SCANS = {
    "due_groups": "recipients_due",
    "due_recipients": "recipients_due",
    "next_due": "recipients_due",
    "release_expired": "recipients_leased",
    "lease_owners": "recipients_leased",
    "stats_by_status": "recipients_unfinished_domain",
    "stats_top_domains": "recipients_unfinished_domain",
    "stats_queue_bytes": "messages_unfinished",
    "stats_recent_outcomes": "attempt_log_finished",
    "flush_all": "recipients_due",
    "flush_domain": "recipients_due",
    "flush_message": "recipients_queue_id",
    "record_finishing": "recipients_queue_id",
}

BAD_VALUES = (
    ("recipients", "status", ("queued", "sending", "deferred", "delivered", "bounced", "dropped")),
    ("attempt_log", "outcome", ("delivered", "deferred", "bounced", "dropped")),
    ("attempt_log", "tls_policy", ("none", "opportunistic", "mta-sts", "dane")),
)


def params_for(sql: str) -> dict[str, None] | list[None]:
    """NULL for every parameter of ``sql`` (enough for EXPLAIN)."""
    named = set(re.findall(r":(\w+)", sql))
    if named:
        return dict.fromkeys(named)
    return [None] * max((int(n) for n in re.findall(r"\?(\d+)", sql)), default=0)


def opcodes(conn: sqlite3.Connection, name: str) -> list[str]:
    sql = queries()[name]
    return [row[1] for row in conn.execute("EXPLAIN " + sql, params_for(sql))]


def plan(conn: sqlite3.Connection, name: str) -> str:
    sql = queries()[name]
    return " | ".join(row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + sql, params_for(sql)))


def fill(conn: sqlite3.Connection, messages: int, per_message: int) -> None:
    """A queue of ``messages`` x ``per_message`` recipients in every state, with attempts."""
    q = queries()
    states = ("queued", "deferred", "delivered", "bounced", "sending")
    conn.execute("BEGIN")
    conn.executemany(
        q["insert_message"],
        [(f"Q{i:06d}", "a@example.test", f"b/{i}", 10, float(i), None, None, None, None, 0, 0,
          "{}", None) for i in range(messages)],
    )  # fmt: skip
    conn.executemany(
        q["insert_recipient"],
        [(f"Q{i:06d}", f"r{j}@d{j % 7}.test", f"d{j % 7}.test", None, None, float(i))
         for i in range(messages) for j in range(per_message)],
    )  # fmt: skip
    conn.execute(
        "UPDATE recipients SET status = json_extract(?1, '$[' || (id % 5) || ']')",
        (json.dumps(states),),
    )
    conn.execute(
        "INSERT INTO attempt_log (recipient_id, attempt, started_at, finished_at, outcome)"
        " SELECT id, 1, next_attempt_at, next_attempt_at, 'deferred' FROM recipients"
    )
    # Most of a long-running queue's messages are history: finished.
    conn.execute("UPDATE messages SET finished_at = received_at WHERE rowid % 4 != 0")
    conn.execute("COMMIT")


@pytest.fixture
def conn(tmp_path: Path):  # type: ignore[no-untyped-def]
    c = sqlite3.connect(tmp_path / "outbound.db", isolation_level=None)
    c.execute("PRAGMA foreign_keys = ON")
    migrate(c, discover())
    yield c
    c.close()


@pytest.mark.parametrize("name", ROW_WRITES)
def test_row_writes_build_no_temporary_btree(conn: sqlite3.Connection, name: str) -> None:
    assert "OpenEphemeral" not in opcodes(conn, name)


@pytest.mark.parametrize(("table", "column", "allowed"), BAD_VALUES)
def test_constraints_accept_and_refuse_the_same_values(
    conn: sqlite3.Connection, table: str, column: str, allowed: tuple[str, ...]
) -> None:
    fill(conn, 1, 1)
    (rid,) = conn.execute("SELECT id FROM recipients").fetchone()
    if table == "recipients":
        write = "UPDATE recipients SET status = ? WHERE id = ?"
    else:
        write = f"UPDATE attempt_log SET {column} = ? WHERE recipient_id = ?"
    for value in allowed:
        conn.execute(write, (value, rid))
    for value in ("bogus", allowed[0].upper(), allowed[0] + " ", ""):
        with pytest.raises(sqlite3.IntegrityError, match="CHECK constraint failed"):
            conn.execute(write, (value, rid))
    if column == "tls_policy":
        conn.execute(write, (None, rid))  # no connection tried: NULL stays allowed


@pytest.mark.parametrize("analyzed", [False, True], ids=["as-run", "analyzed"])
@pytest.mark.parametrize("name", sorted(INDEXED_SCANS))
def test_queue_scans_stay_indexed_on_a_big_queue(
    conn: sqlite3.Connection, name: str, analyzed: bool
) -> None:
    """outboundd never runs ANALYZE (as-run); an operator may have (analyzed)."""
    fill(conn, 4000, 5)
    if analyzed:
        conn.execute("ANALYZE")
    chosen = plan(conn, name)
    assert f"INDEX {INDEXED_SCANS[name]}" in chosen, chosen


async def test_a_version_4_queue_upgrades_in_place(tmp_path: Path) -> None:
    """Rows, views and constraints survive migration 0005, and a connection
    opened before it (another process) sees the new schema."""
    queue = tmp_path / "q"
    queue.mkdir()
    # cached_statements=0: EXPLAIN has no schema check of its own, so a cached
    # EXPLAIN would show the plan made before the migration.
    old = sqlite3.connect(queue / "outbound.db", isolation_level=None, cached_statements=0)
    old.execute("PRAGMA journal_mode = WAL")
    migrate(old, discover()[:4])
    fill(old, 20, 3)
    deliveries = old.execute("SELECT * FROM deliveries ORDER BY queue_id, recipient").fetchall()
    attempts = old.execute("SELECT * FROM attempts ORDER BY queue_id, recipient").fetchall()
    assert "OpenEphemeral" in opcodes(old, "insert_attempt")  # the cost 0005 removes

    spool = await Spool.open(queue, recover=False)
    await spool.close()

    assert old.execute("PRAGMA user_version").fetchone()[0] == discover()[-1].version
    assert old.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    assert old.execute("SELECT * FROM deliveries ORDER BY queue_id, recipient").fetchall() == (
        deliveries
    )
    assert old.execute("SELECT * FROM attempts ORDER BY queue_id, recipient").fetchall() == attempts
    for name in ROW_WRITES:
        assert "OpenEphemeral" not in opcodes(old, name), name
    with pytest.raises(sqlite3.IntegrityError, match="CHECK constraint failed"):
        old.execute("UPDATE recipients SET status = 'lost'")
    indexes = {row[0] for row in old.execute("SELECT name FROM sqlite_schema WHERE type='index'")}
    assert not {"recipients_finished", "messages_received"} & indexes
    assert "recipients_unfinished_domain" in indexes
    old.close()
