"""The spool against a real SQLite file in a temporary directory."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from outboundd.spool import (
    AttemptRecord,
    Claim,
    Lease,
    NewMessage,
    NewRecipient,
    Outcome,
    RecordResult,
    SchemaTooNewError,
    Spool,
    SpoolWriteError,
    Status,
    UnknownMessageError,
    admin,
    bodies,
    core,
    lease_owner_id,
    new_queue_id,
)
from outboundd.spool.core import INLINE_BODY_MAX, SqliteSpool, _json_strs
from outboundd.spool.errors import SpoolClosedError
from outboundd.spool.migrations import discover

BODY = b"From: a@example.test\r\nSubject: hi\r\n\r\nHello\r\n.dot line\r\n"

DELIVERIES_COLUMNS = [
    "queue_id", "mail_from", "recipient", "domain", "status", "attempts", "next_attempt_at",
    "last_code", "last_status", "last_response", "last_mx", "received_at", "finished_at", "size",
]  # fmt: skip
ATTEMPTS_COLUMNS = [
    "queue_id", "recipient", "attempt", "started_at", "finished_at", "mx_host", "mx_ip", "port",
    "tls", "auth", "code", "status", "response", "outcome", "duration_ms",
    "tls_policy", "tls_policy_met",
]  # fmt: skip
ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def message(*rcpts: str, sender: str = "a@example.test", body: bytes = BODY) -> NewMessage:
    return NewMessage(sender, [NewRecipient(r) for r in rcpts], body)


@pytest.fixture
async def spool(tmp_path: Path):  # type: ignore[no-untyped-def]
    s = await Spool.open(tmp_path / "queue")
    yield s
    await s.close()


def db(spool: Spool) -> sqlite3.Connection:
    return sqlite3.connect(spool.db_path)


def refuse_sender(spool: Spool, sender: str) -> None:
    """Make the spool's message inserts fail for ``sender`` (a trigger), as a bad row would."""
    con = db(spool)
    con.execute(
        f"CREATE TRIGGER refuse BEFORE INSERT ON messages WHEN NEW.mail_from = '{sender}' "
        "BEGIN SELECT RAISE(ABORT, 'refused by test'); END"
    )
    con.commit()


async def removed(*paths: Path, timeout: float = 10.0) -> bool:
    """Whether every one of ``paths`` is gone within ``timeout`` seconds: a body a
    record finished is removed after the commit, on the spool's removal thread."""
    deadline = time.monotonic() + timeout
    while any(p.exists() for p in paths):
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.005)
    return True


async def deliver_one(spool: Spool) -> tuple[str, RecordResult]:
    """Accept a one-recipient message, claim it and record it delivered: its queue ID and result."""
    qid = await spool.accept(message("a@d.test"))
    owner = lease_owner_id()
    [claim] = await spool.claim(owner, limit=1, lease_seconds=60)
    t = time.time()
    result = await spool.record(
        owner, claim, [AttemptRecord(claim.recipients[0].id, Outcome.DELIVERED, t, t)]
    )
    return qid, result


# --------------------------------------------------------------- migrations


async def test_migrations_applied_once_and_recorded(tmp_path: Path) -> None:
    s = await Spool.open(tmp_path / "q")
    await s.close()
    s = await Spool.open(tmp_path / "q")  # idempotent reopen
    await s.close()
    con = sqlite3.connect(tmp_path / "q" / "outbound.db")
    newest = discover()[-1].version
    assert con.execute("PRAGMA user_version").fetchone()[0] == newest
    rows = con.execute("SELECT version FROM schema_migrations ORDER BY version").fetchall()
    assert [r[0] for r in rows] == list(range(1, newest + 1))
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_refuses_newer_schema(tmp_path: Path) -> None:
    s = await Spool.open(tmp_path / "q")
    await s.close()
    con = sqlite3.connect(tmp_path / "q" / "outbound.db")
    con.execute("PRAGMA user_version = 999")
    con.commit()
    con.close()
    with pytest.raises(SchemaTooNewError, match="999"):
        await Spool.open(tmp_path / "q")


async def test_views_have_documented_columns(spool: Spool) -> None:
    con = db(spool)
    cols = [r[1] for r in con.execute("PRAGMA table_info(deliveries)")]
    assert cols == DELIVERIES_COLUMNS
    cols = [r[1] for r in con.execute("PRAGMA table_info(attempts)")]
    assert cols == ATTEMPTS_COLUMNS


# ------------------------------------------------------------------ accept


async def test_accept_stores_body_and_rows(spool: Spool) -> None:
    qid = await spool.accept(message("b@Example.ORG", "c@other.test"))
    assert re.fullmatch(r"[A-Za-z0-9._-]+", qid)
    assert spool.body_path(qid).read_bytes() == BODY
    con = db(spool)
    rows = con.execute(
        "SELECT recipient, domain, status, attempts, received_at, next_attempt_at, size "
        "FROM deliveries WHERE queue_id = ? ORDER BY recipient",
        (qid,),
    ).fetchall()
    assert [(r[0], r[1], r[2], r[3]) for r in rows] == [
        ("b@Example.ORG", "example.org", "queued", 0),
        ("c@other.test", "other.test", "queued", 0),
    ]
    assert ISO.match(rows[0][4]) and ISO.match(rows[0][5])
    assert rows[0][6] == len(BODY)
    # no temp files left behind
    assert [f for f in bodies.scan(spool.queue_dir) if f.is_temp] == []


async def test_accept_keeps_dsn_parameters(spool: Spool) -> None:
    msg = NewMessage(
        "a@example.test",
        [NewRecipient("b@example.org", notify="SUCCESS,FAILURE", orcpt="rfc822;b@example.org")],
        BODY,
        env_id="ENV-1",
        ret="HDRS",
        auth_user="alice",
        notes={"k": [1, 2]},
    )
    qid = await spool.accept(msg)
    detail = await admin.show_message(spool, qid)
    assert (detail.env_id, detail.ret, detail.auth_user, detail.notes) == (
        "ENV-1", "HDRS", "alice", {"k": [1, 2]},
    )  # fmt: skip
    assert detail.recipients[0].notify == "SUCCESS,FAILURE"
    assert detail.recipients[0].orcpt == "rfc822;b@example.org"


async def test_accept_rejects_bad_input(spool: Spool) -> None:
    with pytest.raises(ValueError, match="recipient"):
        await spool.accept(NewMessage("a@x.test", [], BODY))
    with pytest.raises(ValueError, match="RET"):
        await spool.accept(NewMessage("a@x.test", [NewRecipient("b@y.test")], BODY, ret="ALL"))


async def test_group_commit_shares_transactions(spool: Spool) -> None:
    before = spool.counters
    qids = await asyncio.gather(*(spool.accept(message(f"r{i}@example.org")) for i in range(1000)))
    after = spool.counters
    assert len(set(qids)) == 1000
    accepts = after.accepts - before.accepts
    commits = after.accept_commits - before.accept_commits
    assert accepts == 1000
    # Counted, not timed: 1000 concurrent accepts must share commits.
    assert commits <= 100, f"{commits} commits for 1000 accepts"
    count = db(spool).execute("SELECT count(*) FROM messages").fetchone()[0]
    assert count == 1000


async def test_failed_insert_removes_body_and_spares_the_batch(spool: Spool) -> None:
    refuse_sender(spool, "bad@x.test")
    good = [spool.accept(message("r@example.org")) for _ in range(20)]
    bad = spool.accept(message("r@example.org", sender="bad@x.test"))
    results = await asyncio.gather(*good, bad, return_exceptions=True)
    assert all(isinstance(r, str) for r in results[:20])
    assert isinstance(results[20], SpoolWriteError)
    names = {f.queue_id for f in bodies.scan(spool.queue_dir)}
    assert names == set(results[:20])


@pytest.mark.parametrize("size", [100, INLINE_BODY_MAX + 1], ids=["inline", "large"])
async def test_queue_id_collision_is_refused(spool: Spool, size: int) -> None:
    """Written by the database thread or (large) by a worker: the other body stays."""
    qid = await spool.accept(message("r@example.org"))
    other = b"x" * (size - 2) + b"\r\n"
    with pytest.raises(SpoolWriteError, match="already in use"):
        await spool.accept(message("r@example.org", body=other), queue_id=qid)
    assert spool.body_path(qid).read_bytes() == BODY


async def test_a_large_body_leased_at_accept_is_read_from_its_file(spool: Spool) -> None:
    """Only small bodies ride along with a leased claim; a large one is not
    kept in memory until its delivery, which streams it from the file."""
    big = (b"y" * 998 + b"\r\n") * (INLINE_BODY_MAX // 1000 + 10)
    qid, claims = await spool.accept_leased(message("r@example.org", body=big),
                                            Lease(lease_owner_id(), 60))  # fmt: skip
    assert [c.body for c in claims] == [None]
    assert claims[0].body_path == spool.body_path(qid)
    assert spool.body_path(qid).read_bytes() == big


async def test_large_body_is_written_outside_the_database_thread(spool: Spool) -> None:
    big = (b"y" * 998 + b"\r\n") * (INLINE_BODY_MAX // 1000 + 10)
    qids = await asyncio.gather(*(spool.accept(message("r@example.org", body=b)) for b in
                                  (big, BODY, big)))  # fmt: skip
    assert [spool.body_path(q).read_bytes() for q in qids] == [big, BODY, big]
    # A large body whose rows fail is removed as well.
    refuse_sender(spool, "bad@x.test")
    with pytest.raises(SpoolWriteError):
        await spool.accept(message("r@example.org", sender="bad@x.test", body=big))
    assert {f.queue_id for f in bodies.scan(spool.queue_dir)} == set(qids)


# ------------------------------------------------------------------- claim


async def test_claim_groups_by_message_and_domain(spool: Spool) -> None:
    qid = await spool.accept(message("a@one.test", "b@one.test", "c@two.test"))
    owner = lease_owner_id()
    claims = await spool.claim(owner, limit=10, lease_seconds=60)
    groups = sorted((c.domain, [r.address for r in c.recipients]) for c in claims)
    assert groups == [("one.test", ["a@one.test", "b@one.test"]), ("two.test", ["c@two.test"])]
    assert all(c.queue_id == qid and c.body_path == spool.body_path(qid) for c in claims)
    assert await spool.claim(owner, limit=10, lease_seconds=60) == []  # all leased
    statuses = {r[0] for r in db(spool).execute("SELECT status FROM deliveries")}
    assert statuses == {"sending"}


async def test_claim_always_split(spool: Spool) -> None:
    await spool.accept(message("a@one.test", "b@one.test"))
    claims = await spool.claim(lease_owner_id(), limit=10, lease_seconds=60, always_split=True)
    assert sorted(len(c.recipients) for c in claims) == [1, 1]


async def test_accept_leased_split_and_expiry(tmp_path: Path) -> None:
    s = await Spool.open(tmp_path / "q")
    try:
        qid, claims = await s.accept_leased(
            message("a@one.test", "b@one.test"), Lease("otherhost:1:dead", 1, always_split=True)
        )
        assert sorted(len(c.recipients) for c in claims) == [1, 1]
        # The accepting process died: once the lease expires, anyone may claim.
        report = await s.recover(now=time.time() + 5)
        assert report.leases_released == 2
        again = await s.claim(lease_owner_id(), limit=10, lease_seconds=60, now=time.time() + 5)
        assert [c.queue_id for c in again] == [qid]
    finally:
        await s.close()


@pytest.mark.parametrize("split", [False, True])
async def test_claim_leases_no_more_per_domain_than_its_room(spool: Spool, split: bool) -> None:
    for i in range(5):
        await spool.accept(message(f"r{i}@one.test"))
    for i in range(3):
        await spool.accept(message(f"r{i}@two.test"))
    await spool.accept(message("r@three.test"))
    owner = lease_owner_id()
    claims = await spool.claim(owner, limit=10, lease_seconds=60, always_split=split,
                               domain_room=2, room={"one.test": 1, "three.test": 0})  # fmt: skip
    assert sorted(c.domain for c in claims) == ["one.test", "two.test", "two.test"]
    # Nothing beyond those was leased (nothing to give back).
    leased = db(spool).execute("SELECT count(*) FROM recipients WHERE status = 'sending'")
    assert leased.fetchone()[0] == 3
    # The earliest-due ones came first.
    one = next(c for c in claims if c.domain == "one.test")
    assert one.recipients[0].address == "r0@one.test"


async def test_claim_respects_limit_due_time_and_exclusions(spool: Spool) -> None:
    for i in range(5):
        await spool.accept(message(f"x{i}@busy.test"))
    await spool.accept(message("y@free.test"))
    owner = lease_owner_id()
    claims = await spool.claim(owner, limit=10, lease_seconds=60, exclude_domains=["busy.test"])
    assert [c.domain for c in claims] == ["free.test"]
    claims = await spool.claim(owner, limit=2, lease_seconds=60)
    assert len(claims) == 2
    # nothing is due in the past
    assert await spool.claim(owner, limit=10, lease_seconds=60, now=time.time() - 3600) == []


async def test_two_claimers_never_share_a_group(tmp_path: Path) -> None:
    first = await Spool.open(tmp_path / "q")
    second = await Spool.open(tmp_path / "q")
    try:
        await asyncio.gather(*(first.accept(message(f"r{i}@d{i % 7}.test")) for i in range(300)))
        a, b = lease_owner_id(), lease_owner_id()
        ids_a: list[int] = []
        ids_b: list[int] = []
        for _ in range(100):  # both claim at the same moment, every round
            got_a, got_b = await asyncio.gather(
                first.claim(a, limit=5, lease_seconds=60),
                second.claim(b, limit=5, lease_seconds=60),
            )
            if not got_a and not got_b:
                break
            ids_a.extend(r.id for c in got_a for r in c.recipients)
            ids_b.extend(r.id for c in got_b for r in c.recipients)
        assert not set(ids_a) & set(ids_b)
        assert len(ids_a) + len(ids_b) == 300
        assert ids_a and ids_b
    finally:
        await first.close()
        await second.close()


# ------------------------------------------------------------------ record


async def test_record_outcomes_and_accounting(spool: Spool) -> None:
    qid = await spool.accept(message("ok@d.test", "later@d.test", "no@d.test"))
    owner = lease_owner_id()
    [claim] = await spool.claim(owner, limit=1, lease_seconds=60)
    ok_id, later_id, no_id = (r.id for r in claim.recipients)
    t = time.time()
    common = {"started_at": t, "finished_at": t + 0.25, "mx_host": "mx.d.test", "port": 25}
    result = await spool.record(
        owner,
        claim,
        [
            AttemptRecord(ok_id, Outcome.DELIVERED, code=250, status="2.0.0", response="ok",
                          tls="TLSv1.3", mx_ip="127.0.0.2", **common),  # type: ignore[arg-type]
            AttemptRecord(later_id, Outcome.DEFERRED, code=451, status="4.7.1",
                          response="greylisted", next_attempt_at=t + 64, **common),  # type: ignore[arg-type]
            AttemptRecord(no_id, Outcome.BOUNCED, code=550, status="5.1.1",
                          response="user unknown", **common),  # type: ignore[arg-type]
        ],
    )  # fmt: skip
    assert result.updated == (ok_id, later_id, no_id) and result.lease_lost == ()
    assert result.finished_messages == ()  # one recipient still deferred
    con = db(spool)
    rows = {
        r[0]: r[1:]
        for r in con.execute(
            "SELECT recipient, status, attempts, last_code, last_status, last_response, "
            "finished_at IS NOT NULL, next_attempt_at FROM deliveries"
        )
    }
    assert rows["ok@d.test"][:6] == ("delivered", 1, 250, "2.0.0", "ok", 1)
    assert rows["later@d.test"][:6] == ("deferred", 1, 451, "4.7.1", "greylisted", 0)
    assert rows["no@d.test"][:6] == ("bounced", 1, 550, "5.1.1", "user unknown", 1)
    assert rows["ok@d.test"][6] is None  # final: no next attempt
    attempts = con.execute(
        "SELECT recipient, attempt, outcome, duration_ms, tls, mx_ip FROM attempts "
        "ORDER BY recipient"
    ).fetchall()
    assert attempts == [
        ("later@d.test", 1, "deferred", 250, None, None),
        ("no@d.test", 1, "bounced", 250, None, None),
        ("ok@d.test", 1, "delivered", 250, "TLSv1.3", "127.0.0.2"),
    ]
    failures = con.execute("SELECT failures FROM recipients WHERE recipient='later@d.test'")
    assert failures.fetchone()[0] == 1
    # the deferred one comes back when due, with its counts
    assert await spool.claim(owner, limit=5, lease_seconds=60) == []
    [again] = await spool.claim(owner, limit=5, lease_seconds=60, now=t + 65)
    assert [(r.address, r.attempts, r.failures, r.previous_status) for r in again.recipients] == [
        ("later@d.test", 1, 1, Status.DEFERRED)
    ]
    t2 = t + 66
    result = await spool.record(
        owner, again, [AttemptRecord(later_id, Outcome.DELIVERED, t2, t2 + 1, code=250)]
    )
    assert result.finished_messages == (qid,)
    assert await removed(spool.body_path(qid))
    attempt_numbers = con.execute(
        "SELECT attempt FROM attempts WHERE recipient='later@d.test' ORDER BY attempt"
    ).fetchall()
    assert attempt_numbers == [(1,), (2,)]


async def test_record_without_lease_changes_nothing(spool: Spool) -> None:
    qid = await spool.accept(message("a@d.test"))
    owner = lease_owner_id()
    [claim] = await spool.claim(owner, limit=1, lease_seconds=60)
    await spool.finalize_message(qid, Status.DROPPED, reason="deleted by operator")
    t = time.time()
    rid = claim.recipients[0].id
    result = await spool.record(owner, claim, [AttemptRecord(rid, Outcome.DELIVERED, t, t)])
    assert result.lease_lost == (rid,) and result.updated == ()
    row = db(spool).execute("SELECT status, final_reason FROM recipients").fetchone()
    assert row == ("dropped", "deleted by operator")
    # the attempt happened, so it is recorded
    assert db(spool).execute("SELECT count(*) FROM attempt_log").fetchone()[0] == 1


async def test_finished_bodies_are_removed_on_their_own_thread(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not on the database thread (an unlink can wait for the journal while
    the batch's results wait for it), and not before the commit."""
    qids = [await spool.accept(message(f"r{i}@d.test")) for i in range(3)]
    owner = lease_owner_id()
    claims = await spool.claim(owner, limit=3, lease_seconds=60)
    threads: list[str] = []
    committed: list[bool] = []
    remove = bodies.remove_bodies

    def watched(paths: list[str]) -> None:
        threads.append(threading.current_thread().name)
        con = db(spool)  # the record that finished them is visible: committed
        committed.append(
            con.execute("SELECT count(*) FROM messages WHERE finished_at IS NULL").fetchone()[0]
            == 0
        )
        con.close()
        remove(paths)

    monkeypatch.setattr(bodies, "remove_bodies", watched)
    t = time.time()
    await asyncio.gather(
        *(
            spool.record(owner, c, [AttemptRecord(c.recipients[0].id, Outcome.DELIVERED, t, t)])
            for c in claims
        )
    )
    assert await removed(*(spool.body_path(q) for q in qids))
    assert threads and all(name.startswith("spool-unlink") for name in threads)
    assert all(committed)


async def test_close_waits_for_the_bodies_handed_over_for_removal(tmp_path: Path) -> None:
    spool = await Spool.open(tmp_path / "queue")
    qid, _ = await deliver_one(spool)
    path = spool.body_path(qid)
    await spool.close()
    assert not path.exists()


async def test_a_body_waits_for_the_wal_fsync_of_a_later_accept(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch of records alone commits with ``synchronous=NORMAL``: the body
    of the message it finished stays until a later commit fsynced the WAL
    (here an accept's; the explicit fsync is put off out of the test's reach)."""
    monkeypatch.setattr(core, "UNSYNCED_REMOVAL_DELAY", 60.0)
    qid, result = await deliver_one(spool)
    assert result.finished_messages == (qid,)
    path = spool.body_path(qid)
    await asyncio.sleep(0.3)
    assert path.exists()  # the record's commit is not yet known durable
    await spool.accept(message("b@d.test"))
    assert await removed(path)


async def test_a_body_waits_at_most_the_removal_delay_without_accepts(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no accept to fsync the WAL, an explicit fsync of it lets the body go."""
    monkeypatch.setattr(core, "UNSYNCED_REMOVAL_DELAY", 0.5)
    qid, _ = await deliver_one(spool)
    path = spool.body_path(qid)
    await asyncio.sleep(0.2)
    assert path.exists()
    assert await removed(path, timeout=5.0)


KILL_AFTER_RECORD_SCRIPT = """
import asyncio, sys, time
from pathlib import Path
from outboundd.spool import AttemptRecord, NewMessage, NewRecipient, Outcome, Spool
from outboundd.spool import core, lease_owner_id

core.UNSYNCED_REMOVAL_DELAY = 600.0

async def main():
    spool = await Spool.open(Path(sys.argv[1]))
    qid = await spool.accept(NewMessage("a@x.test", [NewRecipient("r@y.test")], b"body\\r\\n"))
    owner = lease_owner_id()
    [claim] = await spool.claim(owner, limit=1, lease_seconds=60)
    t = time.time()
    rid = claim.recipients[0].id
    await spool.record(owner, claim, [AttemptRecord(rid, Outcome.DELIVERED, t, t)])
    sys.stdout.write(qid + "\\n")
    sys.stdout.flush()
    await asyncio.sleep(600)

asyncio.run(main())
"""


async def test_a_kill_between_the_record_and_its_wal_fsync_keeps_the_body(
    tmp_path: Path,
) -> None:
    """SIGKILL after a record's NORMAL commit, before any WAL fsync: the
    record survives (the WAL is in the kernel's cache), the body was not
    removed ahead of its durability, and recovery removes it as a finished
    stray."""
    import signal
    import sys

    queue = tmp_path / "q"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", KILL_AFTER_RECORD_SCRIPT, str(queue), stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(30):
            qid = (await proc.stdout.readline()).decode().strip()
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        await proc.wait()
    assert qid
    path = queue / bodies.relative_body_path(qid)
    assert path.exists()
    con = sqlite3.connect(queue / "outbound.db")
    try:
        [(finished_at,)] = con.execute(
            "SELECT finished_at FROM messages WHERE queue_id = ?", (qid,)
        )
    finally:
        con.close()
    assert finished_at is not None
    s = await Spool.open(queue)
    try:
        report = await s.recover(now=time.time() + core.ORPHAN_MIN_AGE + 1)
        assert report.finished_bodies_removed == 1
        assert not path.exists()
    finally:
        await s.close()


async def test_records_of_one_batch_are_written_together(spool: Spool) -> None:
    """Concurrent records run as one batch (one transaction), each with its own answer.

    Two claims of one message (two domains) finish it together: only one of
    them reports it finished.  A claim whose lease was lost meanwhile gets
    its attempt row and no state change, beside the others' changes.
    """
    split = await spool.accept(message("a@one.test", "b@two.test"))
    singles = [await spool.accept(message(f"r{i}@three.test")) for i in range(6)]
    owner = lease_owner_id()
    claims = await spool.claim(owner, limit=20, lease_seconds=60)
    assert len(claims) == 8
    lost = next(c for c in claims if c.queue_id == singles[0])
    await spool.finalize_message(lost.queue_id, Status.DROPPED, reason="deleted by operator")
    t = time.time()
    assert isinstance(spool, SqliteSpool)
    commits = spool._counters.commits

    def records(claim: Claim) -> list[AttemptRecord]:
        if claim.domain == "two.test":
            outcome, code, status = Outcome.BOUNCED, 550, "5.1.1"
        else:
            outcome, code, status = Outcome.DELIVERED, 250, "2.0.0"
        return [
            AttemptRecord(r.id, outcome, t, t + 1, code=code, status=status, mx_host="mx.test")
            for r in claim.recipients
        ]

    results = await asyncio.gather(*(spool.record(owner, c, records(c)) for c in claims))
    assert spool._counters.commits == commits + 1
    by_claim = dict(zip((id(c) for c in claims), results, strict=True))
    for claim in claims:
        result = by_claim[id(claim)]
        ids = tuple(r.id for r in claim.recipients)
        if claim is lost:
            assert result.lease_lost == ids and result.updated == ()
            assert result.finished_messages == ()
        else:
            assert result.updated == ids and result.lease_lost == ()
    finished = [q for r in results for q in r.finished_messages]
    assert sorted(finished) == sorted([split, *singles[1:]])  # each once, the lost one not
    con = db(spool)
    statuses = dict(con.execute("SELECT recipient, status FROM deliveries").fetchall())
    assert statuses["a@one.test"] == "delivered" and statuses["b@two.test"] == "bounced"
    assert statuses["r0@three.test"] == "dropped"
    assert all(statuses[f"r{i}@three.test"] == "delivered" for i in range(1, 6))
    assert con.execute("SELECT count(*) FROM attempt_log").fetchone()[0] == 8
    done = con.execute(
        "SELECT count(*) FROM messages WHERE finished_at IS NOT NULL AND queue_id != ?",
        (singles[0],),
    ).fetchone()[0]
    assert done == 6
    assert await removed(*(spool.body_path(q) for q in [split, *singles]))


async def test_record_validates_its_input(spool: Spool) -> None:
    await spool.accept(message("a@d.test"))
    owner = lease_owner_id()
    [claim] = await spool.claim(owner, limit=1, lease_seconds=60)
    t = time.time()
    with pytest.raises(ValueError, match="not part of this claim"):
        await spool.record(owner, claim, [AttemptRecord(9999, Outcome.DELIVERED, t, t)])
    with pytest.raises(ValueError, match="next_attempt_at"):
        rid = claim.recipients[0].id
        await spool.record(owner, claim, [AttemptRecord(rid, Outcome.DEFERRED, t, t)])


async def test_release_and_renew(spool: Spool) -> None:
    await spool.accept(message("a@d.test"))
    owner = lease_owner_id()
    [claim] = await spool.claim(owner, limit=1, lease_seconds=60)
    assert await spool.renew_leases(owner, time.time() + 600) == 1
    later = time.time() + 300
    assert await spool.release(owner, [claim.recipients[0].id], next_attempt_at=later) == 1
    row = db(spool).execute("SELECT status, next_attempt_at, attempts FROM recipients").fetchone()
    assert row[0] == "queued" and abs(row[1] - later) < 1e-6 and row[2] == 0
    assert await spool.next_due_at() == pytest.approx(later)


# ---------------------------------------------------------------- recovery


async def test_recovery_releases_expired_leases(tmp_path: Path) -> None:
    s = await Spool.open(tmp_path / "q")
    await s.accept(message("a@d.test"))
    await s.claim("otherhost:1:abcd", limit=1, lease_seconds=1)
    await s.close()
    s = await Spool.open(tmp_path / "q")  # lease not yet expired: kept
    assert s.recovery is not None and s.recovery.leases_released == 0
    report = await s.recover(now=time.time() + 5)
    assert report.leases_released == 1
    claims = await s.claim(lease_owner_id(), limit=1, lease_seconds=60, now=time.time() + 5)
    assert len(claims) == 1
    await s.close()


async def test_recovery_releases_leases_of_dead_local_process(tmp_path: Path) -> None:
    import socket

    proc = await asyncio.create_subprocess_exec("true")
    await proc.wait()
    owner = f"{socket.gethostname()}:{proc.pid}:dead"
    s = await Spool.open(tmp_path / "q")
    await s.accept(message("a@d.test"))
    await s.claim(owner, limit=1, lease_seconds=3600)
    report = await s.recover()
    assert report.leases_released == 1
    await s.close()


async def test_recovery_cleans_files_and_marks_missing_bodies(tmp_path: Path) -> None:
    s = await Spool.open(tmp_path / "q")
    keep = await s.accept(message("a@d.test"))
    lost = await s.accept(message("b@d.test"))
    await s.close()
    root = tmp_path / "q" / "bodies"
    (root / "00" / ".tmp-ABC").write_bytes(b"half")
    (root / "01" / "ORPHAN01").write_bytes(b"no row")
    (root / "02" / "YOUNG02").write_bytes(b"rows may be committing right now")
    (root / "03" / ".tmp-YOUNG03").write_bytes(b"being written right now")
    old = time.time() - 3600
    for name in ("00/.tmp-ABC", "01/ORPHAN01"):
        os.utime(root / name, (old, old))
    (tmp_path / "q" / bodies.relative_body_path(lost)).unlink()
    s = await Spool.open(tmp_path / "q")
    report = s.recovery
    assert report is not None
    assert (report.temp_files_removed, report.orphan_bodies_removed) == (1, 1)
    assert report.missing_bodies == (lost,)
    # young files may belong to another process's accept in progress: kept
    assert {f.queue_id for f in bodies.scan(s.queue_dir)} == {keep, "YOUNG02", "YOUNG03"}
    row = (
        db(s)
        .execute("SELECT status, final_reason FROM recipients WHERE queue_id = ?", (lost,))
        .fetchone()
    )
    assert row[0] == "dropped" and "body file missing" in row[1]
    view = (
        db(s)
        .execute(
            "SELECT last_code, last_status, last_response FROM deliveries WHERE queue_id = ?",
            (lost,),
        )
        .fetchone()
    )
    assert view == (None, "5.3.0", "message body file missing from the spool; cannot deliver")
    await s.close()


CRASH_SCRIPT = """
import asyncio, sys
from pathlib import Path
from outboundd.spool import Spool, NewMessage, NewRecipient

async def main():
    spool = await Spool.open(Path(sys.argv[1]))
    batch = int(sys.argv[2])
    async def one(i):
        qid = await spool.accept(NewMessage("a@x.test", [NewRecipient(f"r{i}@y.test")],
                                            b"Subject: %d\\r\\n\\r\\nbody\\r\\n" % i))
        sys.stdout.write(qid + "\\n")
        sys.stdout.flush()
    i = 0
    while True:
        await asyncio.gather(*(one(i + k) for k in range(batch)))
        i += batch

asyncio.run(main())
"""


@pytest.mark.parametrize("batch", [8, 32])
async def test_sigkill_loses_no_accepted_message(tmp_path: Path, batch: int) -> None:
    """A process accepting batches is SIGKILLed: every 250'd message survives.

    Batches of 32 have their bodies fsynced from the spool's fsync threads
    (``bodies.ParallelFsync``), batches of 8 as well as one at a time.
    """
    import signal
    import sys

    from outboundd.spool.core import ORPHAN_MIN_AGE

    queue = tmp_path / "q"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CRASH_SCRIPT, str(queue), str(batch), stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    accepted: list[str] = []
    try:
        async with asyncio.timeout(30):
            while len(accepted) < 320:
                line = await proc.stdout.readline()
                if not line:
                    break
                accepted.append(line.decode().strip())
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        await proc.wait()
    assert len(accepted) >= 320
    s = await Spool.open(queue)
    try:
        con = db(s)
        rows = {r[0] for r in con.execute("SELECT queue_id FROM messages")}
        assert set(accepted) <= rows
        assert all(s.body_path(qid).read_bytes().startswith(b"Subject: ") for qid in accepted)
        # Bodies of the batch the kill cut short (written, never committed)
        # are orphans once old enough: recovery removes them, and then every
        # body file has its row, and every row its body.
        await s.recover(now=time.time() + ORPHAN_MIN_AGE + 1)
        files = {f.queue_id for f in bodies.scan(s.queue_dir)}
        assert not any(f.is_temp for f in bodies.scan(s.queue_dir))
        unfinished = {
            r[0] for r in con.execute("SELECT queue_id FROM messages WHERE finished_at IS NULL")
        }
        assert files == unfinished
    finally:
        await s.close()


# ------------------------------------------------------------------- admin


async def test_admin_list_flush_stats_show(spool: Spool) -> None:
    q1 = await spool.accept(message("a@one.test", "b@two.test"))
    await spool.accept(message("c@two.test", sender="other@example.test"))
    owner = lease_owner_id()
    claims = await spool.claim(owner, limit=10, lease_seconds=60)
    t = time.time()
    later = t + 3600
    for c in claims:
        await spool.record(
            owner,
            c,
            [
                AttemptRecord(r.id, Outcome.DEFERRED, t, t, code=451, next_attempt_at=later)
                for r in c.recipients
            ],
        )
    entries = await admin.list_queue(spool)
    assert len(entries) == 3 and all(e.status == "deferred" for e in entries)
    assert [e.recipient for e in await admin.list_queue(spool, domain="TWO.test")] == [
        "b@two.test", "c@two.test",
    ]  # fmt: skip
    assert len(await admin.list_queue(spool, sender="other@example.test")) == 1
    assert await admin.list_queue(spool, older_than=3600) == []
    assert len(await admin.list_queue(spool, limit=1)) == 1
    assert await admin.list_queue(spool, status="delivered") == []
    st = await admin.stats(spool)
    assert st.by_status["deferred"] == 3 and st.top_domains[0] == ("two.test", 2)
    assert st.last_hour["deferred"] == 3 and st.queued_messages == 2
    assert st.oldest_deferred_received_at is not None
    assert await admin.flush(spool, domain="one.test") == 1
    assert await admin.flush(spool, [q1]) == 1  # b@two.test; a@one.test already due
    assert await admin.flush(spool) == 1
    with pytest.raises(UnknownMessageError):
        await admin.flush(spool, ["NOPE"])
    with pytest.raises(UnknownMessageError):
        await admin.show_message(spool, "NOPE")
    detail = await admin.show_message(spool, q1)
    assert [len(r.history) for r in detail.recipients] == [1, 1]
    assert not await spool.is_paused()
    await spool.set_paused(True)
    assert await spool.is_paused() and (await admin.stats(spool)).paused


def test_an_unreaped_dead_process_does_not_hold_its_leases() -> None:
    """A lease owner that was killed but not yet reaped (a zombie) is dead."""
    import socket
    import subprocess

    from outboundd.spool.core import _owner_is_dead_local

    host = socket.gethostname()
    proc = subprocess.Popen(["true"])
    try:
        for _ in range(200):  # until it has exited (and is a zombie: not waited for)
            if Path(f"/proc/{proc.pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z":
                break
            time.sleep(0.01)
        assert _owner_is_dead_local(f"{host}:{proc.pid}:abcd", host)
    finally:
        proc.wait()
    import os

    assert not _owner_is_dead_local(f"{host}:{os.getpid()}:abcd", host)
    assert not _owner_is_dead_local(f"otherhost:{proc.pid}:abcd", host)


def test_bodies_of_one_second_share_a_directory() -> None:
    """So a group commit fsyncs one directory, not one per message."""
    from outboundd.spool.core import new_queue_id

    t = 1_700_000_000.0
    same = {bodies.relative_body_path(new_queue_id(t + i / 1000)).split("/")[1] for i in range(50)}
    later = bodies.relative_body_path(new_queue_id(t + 2.0)).split("/")[1]
    assert len(same) <= 2 and later not in same
    assert all(name in bodies.FANOUT for name in (*same, later))
    assert bodies.relative_body_path("custom-id-ab") == "bodies/ab/custom-id-ab"


def test_queue_ids_are_unique_across_reads_of_the_random_source() -> None:
    """The random parts come 256 IDs' worth per read of the OS's source: many
    more IDs than that are all distinct, in the documented form."""
    from outboundd.spool.core import new_queue_id

    t = 1_700_000_000.0
    ids = [new_queue_id(t) for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"[0-9A-F]{11}\.[0-9A-F]{10}", qid) for qid in ids)
    assert {qid.split(".")[0] for qid in ids} == {f"{int(t * 1000):011X}"}


def test_a_forked_child_does_not_reuse_its_parents_random_parts() -> None:
    """A process forked after the parent read random parts draws its own:
    without that, parent and child would hand out the same queue IDs."""
    from outboundd.spool.core import new_queue_id

    t = 1_700_000_000.0
    new_queue_id(t)  # the parent now holds unused random parts
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ID, then out without any clean-up
        try:
            os.write(write_end, new_queue_id(t).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        child_id = os.read(read_end, 100).decode()
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
    assert child_id and child_id != new_queue_id(t)


@pytest.mark.parametrize(
    "values",
    [[], [""], ["0193A2B3C4D.1A2B3C4D5E"], ["a", "b"], ['say "hi"'], ["back\\slash"],
     ["caf\u00e9"], ["new\nline"], ["tab\there"]],
)  # fmt: skip
def test_queue_id_json_matches_json_dumps(values: list[str]) -> None:
    """The shortcut for plain queue IDs encodes exactly what json.dumps would decode to."""
    assert json.loads(_json_strs(values)) == values


async def test_a_caller_that_goes_away_does_not_stop_its_accept(tmp_path: Path) -> None:
    """A cancelled ``accept()`` (client hung up) still commits, and only it is cancelled."""
    spool = await SqliteSpool.open(tmp_path / "q")
    started, release = threading.Event(), threading.Event()

    def hold(_conn: sqlite3.Connection) -> None:
        started.set()
        release.wait(10)

    try:
        holding = asyncio.create_task(spool.run(hold, write=False))
        assert await asyncio.to_thread(started.wait, 10)
        sent = [NewMessage("a@x.test", [NewRecipient(f"r{i}@y.test")], b"m\r\n") for i in range(3)]
        ids = [f"0000000000{i}.GONE" for i in range(3)]
        tasks = [
            asyncio.create_task(spool.accept(m, queue_id=q)) for m, q in zip(sent, ids, strict=True)
        ]
        await asyncio.sleep(0)  # every accept is queued behind the held batch
        tasks[1].cancel()
        release.set()
        await holding
        assert [await tasks[0], await tasks[2]] == [ids[0], ids[2]]
        with pytest.raises(asyncio.CancelledError):
            await tasks[1]
        for qid in ids:
            assert (await spool.show_message(qid)).queue_id == qid
        assert await spool.accept(sent[0]) is not None
    finally:
        release.set()
        await spool.close()


async def test_start_accept_commits_without_a_task_and_answers_the_queue_id(
    spool: Spool,
) -> None:
    """The SMTP session's path: a future settled by the database thread, no task."""
    assert isinstance(spool, SqliteSpool)
    spool.new_work.clear()
    tasks_before = len(asyncio.all_tasks())
    futures = [
        spool.start_accept(message(f"r{i}@example.org"), queue_id=new_queue_id()) for i in range(50)
    ]
    assert not any(isinstance(f, asyncio.Task) for f in futures)
    assert len(asyncio.all_tasks()) == tasks_before
    qids = await asyncio.gather(*futures)
    assert len(set(qids)) == 50
    assert spool.new_work.is_set()
    for qid in qids:
        assert spool.body_path(qid).read_bytes() == BODY
    stored = {row[0] for row in db(spool).execute("SELECT queue_id FROM messages")}
    assert stored == set(qids)


async def test_start_accept_failures_reach_the_future_and_leave_nothing(spool: Spool) -> None:
    refuse_sender(spool, "bad@x.test")
    good = spool.start_accept(message("r@example.org"))
    bad = spool.start_accept(message("r@example.org", sender="bad@x.test"))
    results = await asyncio.gather(good, bad, return_exceptions=True)
    assert isinstance(results[0], str)
    assert isinstance(results[1], SpoolWriteError)
    assert {f.queue_id for f in bodies.scan(spool.queue_dir)} == {results[0]}
    with pytest.raises(ValueError, match="recipient"):
        spool.start_accept(NewMessage("a@x.test", [], BODY))


async def test_start_accept_of_a_large_body_or_a_closed_spool_takes_accepts_path(
    tmp_path: Path,
) -> None:
    spool = await Spool.open(tmp_path / "queue")
    large = b"x" * INLINE_BODY_MAX + b"\r\n"
    qid = await spool.start_accept(message("r@example.org", body=large))
    assert spool.body_path(qid).read_bytes() == large
    await spool.close()
    with pytest.raises(SpoolClosedError):
        await spool.start_accept(message("r@example.org"))
