"""The spool contract: what every backend must do, run against SQLite and PostgreSQL.

Each test gets ``queue_location`` twice (tests/conftest.py): a queue
directory, and a fresh database in the session's throwaway PostgreSQL
cluster.  Everything goes through ``outboundd.spool.open`` and the
backend-neutral interface; the accounting views are read with each
backend's own client (:func:`sql_rows`).
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import sqlite3
import time
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from outboundd import spool as spool_backend
from outboundd.spool import (
    AttemptRecord,
    NewMessage,
    NewRecipient,
    Outcome,
    SchemaTooNewError,
    Spool,
    SpoolError,
    Status,
    UnknownMessageError,
    admin,
    is_postgres_url,
    lease_owner_id,
)
from outboundd.spool.types import Claim, Lease, StoredStsPolicy, ThrottleEntry

BODY = b"From: a@example.test\r\nSubject: hi\r\n\r\nHello\r\n.dot line\r\n"
ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
DELIVERIES_COLUMNS = [
    "queue_id", "mail_from", "recipient", "domain", "status", "attempts", "next_attempt_at",
    "last_code", "last_status", "last_response", "last_mx", "received_at", "finished_at", "size",
]  # fmt: skip
ATTEMPTS_COLUMNS = [
    "queue_id", "recipient", "attempt", "started_at", "finished_at", "mx_host", "mx_ip", "port",
    "tls", "auth", "code", "status", "response", "outcome", "duration_ms",
    "tls_policy", "tls_policy_met",
]  # fmt: skip


def message(*rcpts: str, sender: str = "a@example.test", body: bytes = BODY) -> NewMessage:
    return NewMessage(sender, [NewRecipient(r) for r in rcpts], body)


async def sql_rows(location: str | Path, sql: str) -> list[tuple[Any, ...]]:
    """Rows of one read-only statement, with the backend's own client."""
    if is_postgres_url(location):
        conn = await asyncpg.connect(str(location))
        try:
            return [tuple(r) for r in await conn.fetch(sql)]
        finally:
            await conn.close()
    con = sqlite3.connect(Path(location) / "outbound.db")
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


async def sql_columns(location: str | Path, view: str) -> list[str]:
    if is_postgres_url(location):
        conn = await asyncpg.connect(str(location))
        try:
            stmt = await conn.prepare(f"SELECT * FROM {view}")
            return [a.name for a in stmt.get_attributes()]
        finally:
            await conn.close()
    con = sqlite3.connect(Path(location) / "outbound.db")
    try:
        return [r[1] for r in con.execute(f"PRAGMA table_info({view})")]
    finally:
        con.close()


@pytest.fixture
async def spool(queue_location: str | Path):  # type: ignore[no-untyped-def]
    s = await spool_backend.open(queue_location)
    yield s
    await s.close()


# -------------------------------------------------------------- life


async def test_open_is_idempotent_and_views_have_documented_columns(
    queue_location: str | Path,
) -> None:
    for _ in range(2):
        s = await spool_backend.open(queue_location)
        await s.close()
    assert await sql_columns(queue_location, "deliveries") == DELIVERIES_COLUMNS
    assert await sql_columns(queue_location, "attempts") == ATTEMPTS_COLUMNS


async def test_refuses_a_newer_schema(queue_location: str | Path) -> None:
    s = await spool_backend.open(queue_location)
    await s.close()
    if is_postgres_url(queue_location):
        conn = await asyncpg.connect(str(queue_location))
        await conn.execute("INSERT INTO schema_migrations VALUES (999, 'future', 0)")
        await conn.close()
    else:
        con = sqlite3.connect(Path(queue_location) / "outbound.db")
        con.execute("PRAGMA user_version = 999")
        con.commit()
        con.close()
    with pytest.raises(SchemaTooNewError, match="999"):
        await spool_backend.open(queue_location)


# ------------------------------------------------------------ accept


async def test_accept_stores_body_and_rows(spool: Spool, queue_location: str | Path) -> None:
    qid = await spool.accept(message("b@Example.ORG", "c@other.test"))
    assert re.fullmatch(r"[A-Za-z0-9._-]+", qid)
    assert await spool.read_body(qid) == BODY
    rows = await sql_rows(
        queue_location,
        "SELECT recipient, domain, status, attempts, received_at, next_attempt_at, size "
        f"FROM deliveries WHERE queue_id = '{qid}' ORDER BY recipient",
    )
    assert [r[:4] for r in rows] == [
        ("b@Example.ORG", "example.org", "queued", 0),
        ("c@other.test", "other.test", "queued", 0),
    ]
    assert ISO.match(rows[0][4]) and ISO.match(rows[0][5])
    assert rows[0][6] == len(BODY)


async def test_accept_keeps_dsn_parameters_and_links(spool: Spool) -> None:
    msg = NewMessage(
        "a@example.test",
        [NewRecipient("b@example.org", notify="SUCCESS,FAILURE", orcpt="rfc822;b@example.org")],
        BODY,
        env_id="ENV-1",
        ret="HDRS",
        auth_user="alice",
        client_ip="127.0.0.9",
        smtputf8=True,
        notes={"k": [1, 2]},
    )
    qid = await spool.accept(msg)
    detail = await admin.show_message(spool, qid)
    assert (detail.env_id, detail.ret, detail.auth_user, detail.client_ip, detail.notes) == (
        "ENV-1", "HDRS", "alice", "127.0.0.9", {"k": [1, 2]},
    )  # fmt: skip
    assert detail.smtputf8 and not detail.body_8bit
    assert detail.recipients[0].notify == "SUCCESS,FAILURE"
    assert detail.recipients[0].orcpt == "rfc822;b@example.org"
    dsn = await spool.accept(
        NewMessage("", [NewRecipient("a@example.test")], b"DSN\r\n", dsn_of=qid,
                   dsn_recipients=["b@example.org"])
    )  # fmt: skip
    detail = await admin.show_message(spool, qid)
    assert detail.recipients[0].dsn_queue_id == dsn
    assert (await admin.show_message(spool, dsn)).dsn_of == qid
    # A DSN committed in one batch with a leased accept is linked the same way.
    other = await spool.accept(message("c@example.org"))
    (_, leased), dsn2 = await asyncio.gather(
        spool.accept_leased(message("d@example.org"), Lease(lease_owner_id(), 60, domain_room=5)),
        spool.accept(
            NewMessage("", [NewRecipient("a@example.test")], b"DSN\r\n", dsn_of=other,
                       dsn_recipients=["c@example.org"])
        ),
    )  # fmt: skip
    assert [c.recipients[0].address for c in leased] == ["d@example.org"]
    assert (await admin.show_message(spool, other)).recipients[0].dsn_queue_id == dsn2


async def test_accept_rejects_bad_input(spool: Spool) -> None:
    with pytest.raises(ValueError, match="recipient"):
        await spool.accept(NewMessage("a@x.test", [], BODY))
    with pytest.raises(ValueError, match="RET"):
        await spool.accept(NewMessage("a@x.test", [NewRecipient("b@y.test")], BODY, ret="ALL"))


async def test_group_commit_shares_commits(spool: Spool, queue_location: str | Path) -> None:
    before = spool.counters
    qids = await asyncio.gather(*(spool.accept(message(f"r{i}@example.org")) for i in range(500)))
    after = spool.counters
    assert len(set(qids)) == 500
    assert after.accepts - before.accepts == 500
    commits = after.accept_commits - before.accept_commits
    assert commits <= 50, f"{commits} commits for 500 accepts"
    assert (await sql_rows(queue_location, "SELECT count(*) FROM messages"))[0][0] == 500


async def test_a_duplicate_queue_id_is_refused_and_spares_the_others(spool: Spool) -> None:
    qid = await spool.accept(message("r@example.org"))
    results = await asyncio.gather(
        *(spool.accept(message("r@example.org")) for _ in range(10)),
        spool.accept(message("r@example.org", body=b"other\r\n"), queue_id=qid),
        return_exceptions=True,
    )
    assert all(isinstance(r, str) for r in results[:10])
    assert isinstance(results[10], SpoolError)
    assert await spool.read_body(qid) == BODY


async def test_read_body_of_an_unknown_message_is_a_spool_error(spool: Spool) -> None:
    with pytest.raises(SpoolError):
        await spool.read_body("NOSUCHID")


# ------------------------------------------------------------- claim


async def test_claim_groups_by_message_and_domain_and_carries_the_body(spool: Spool) -> None:
    qid = await spool.accept(message("a@one.test", "b@one.test", "c@two.test"))
    owner = lease_owner_id()
    claims = await spool.claim(owner, limit=10, lease_seconds=60)
    groups = sorted((c.domain, [r.address for r in c.recipients]) for c in claims)
    assert groups == [("one.test", ["a@one.test", "b@one.test"]), ("two.test", ["c@two.test"])]
    for c in claims:
        assert c.queue_id == qid and c.lease_owner == owner
        # Either the body in hand or a file to read: the same bytes.
        body = c.body if c.body is not None else c.body_path.read_bytes()  # type: ignore[union-attr]
        assert body == BODY
    assert await spool.claim(owner, limit=10, lease_seconds=60) == []  # all leased
    entries = await admin.list_queue(spool)
    assert {e.status for e in entries} == {"sending"}


async def test_accept_leased_returns_what_claim_would(
    spool: Spool, queue_location: str | Path
) -> None:
    """A message accepted leased (room to spare) comes back as the claims a claim()
    would give, wakes no scheduler, and is an ordinary lease that record() settles."""
    owner = lease_owner_id()
    new = NewMessage(
        "a@example.test",
        [NewRecipient("a@one.test", notify="FAILURE"), NewRecipient("b@one.test"),
         NewRecipient("c@two.test", orcpt="rfc822;c@two.test")],
        BODY,
        env_id="env-1",
        ret="HDRS",
        notes={"k": "v"},
    )  # fmt: skip
    await asyncio.sleep(0.1)  # a PostgreSQL spool's listener has connected (and woken)
    spool.new_work.clear()
    qid, leased = await spool.accept_leased(new, Lease(owner, 60, domain_room=5))
    await asyncio.sleep(0.1)  # a NOTIFY would have arrived by now
    assert not spool.new_work.is_set()  # taken already: no scheduler needs waking
    other = await spool.accept(new)
    assert spool.new_work.is_set()
    claimed = await spool.claim(owner, limit=10, lease_seconds=60)

    def shape(claims: list[Claim]) -> list[tuple[object, ...]]:
        return sorted(
            (c.domain, c.mail_from, c.size, c.env_id, c.ret, dict(c.notes), c.lease_owner,
             [(r.address, r.notify, r.orcpt, r.attempts, r.failures, r.previous_status)
              for r in c.recipients])
            for c in claims
        )  # fmt: skip

    assert [c.queue_id for c in claimed] == [other, other]  # the leased ones are taken
    assert shape(leased) == shape(claimed)
    for c in leased:
        assert c.queue_id == qid
        # The body just accepted comes with the claims: the delivery does not
        # read back what was written a moment ago (SQLite's file holds the
        # same octets and stays the durable copy).
        assert c.body == BODY
        assert c.body_path is None or c.body_path.read_bytes() == BODY
    rows = await sql_rows(
        queue_location, f"SELECT status, lease_owner FROM recipients WHERE queue_id = '{qid}'"
    )
    assert rows == [("sending", owner)] * 3
    claim = next(c for c in leased if c.domain == "two.test")
    now = time.time()
    result = await spool.record(
        owner, claim, [AttemptRecord(claim.recipients[0].id, Outcome.DELIVERED, now, now)]
    )
    assert result.updated == (claim.recipients[0].id,)
    split_qid, split = await spool.accept_leased(
        message("x@one.test", "y@one.test"), Lease(owner, 60, always_split=True)
    )
    assert sorted(len(c.recipients) for c in split) == [1, 1]
    assert {c.queue_id for c in split} == {split_qid}


async def test_claim_always_split(spool: Spool) -> None:
    await spool.accept(message("a@one.test", "b@one.test"))
    claims = await spool.claim(lease_owner_id(), limit=10, lease_seconds=60, always_split=True)
    assert sorted(len(c.recipients) for c in claims) == [1, 1]


async def test_claim_respects_limit_due_time_exclusions_and_room(spool: Spool) -> None:
    for i in range(5):
        await spool.accept(message(f"x{i}@busy.test"))
    await spool.accept(message("y@free.test"))
    owner = lease_owner_id()
    assert await spool.claim(owner, limit=10, lease_seconds=60, now=time.time() - 3600) == []
    claims = await spool.claim(owner, limit=10, lease_seconds=60, exclude_domains=["busy.test"])
    assert [c.domain for c in claims] == ["free.test"]
    claims = await spool.claim(
        owner, limit=10, lease_seconds=60, domain_room=3, room={"busy.test": 2}
    )
    assert [c.recipients[0].address for c in claims] == ["x0@busy.test", "x1@busy.test"]
    claims = await spool.claim(owner, limit=1, lease_seconds=60)
    assert len(claims) == 1


async def test_claim_passes_over_a_full_domain_and_takes_later_groups(spool: Spool) -> None:
    """Groups are taken in due order while their domain has room: a full domain's
    groups are passed over, later groups of others still taken; with always_split
    each recipient is a group of its own."""
    for name in ("a1@busy.test", "a2@busy.test", "a3@busy.test", "b1@free.test", "b2@free.test"):
        await spool.accept(message(name))
    owner = lease_owner_id()
    got = await spool.claim(owner, limit=10, lease_seconds=60, domain_room=3, room={"busy.test": 1})
    assert [r.address for c in got for r in c.recipients] == [
        "a1@busy.test",
        "b1@free.test",
        "b2@free.test",
    ]

    await spool.accept(message("c1@split.test", "c2@split.test", "c3@split.test"))
    got = await spool.claim(
        owner,
        limit=5,
        lease_seconds=60,
        always_split=True,
        exclude_domains=["busy.test", "free.test"],
        domain_room=2,
    )
    assert sorted(r.address for c in got for r in c.recipients) == [
        "c1@split.test",
        "c2@split.test",
    ]
    assert [len(c.recipients) for c in got] == [1, 1]


async def test_two_claimers_never_share_a_recipient(queue_location: str | Path) -> None:
    first = await spool_backend.open(queue_location)
    second = await spool_backend.open(queue_location)
    try:
        await asyncio.gather(*(first.accept(message(f"r{i}@d{i % 7}.test")) for i in range(200)))
        a, b = lease_owner_id(), lease_owner_id()
        ids_a: list[int] = []
        ids_b: list[int] = []
        for _ in range(100):
            got_a, got_b = await asyncio.gather(
                first.claim(a, limit=5, lease_seconds=60),
                second.claim(b, limit=5, lease_seconds=60),
            )
            if not got_a and not got_b:
                break
            ids_a.extend(r.id for c in got_a for r in c.recipients)
            ids_b.extend(r.id for c in got_b for r in c.recipients)
        assert not set(ids_a) & set(ids_b)
        assert len(ids_a) + len(ids_b) == 200
    finally:
        await first.close()
        await second.close()


# ------------------------------------------------------------ record


async def body_gone(spool: Spool, queue_id: str, timeout: float = 10.0) -> bool:
    """Whether ``read_body`` refuses ``queue_id`` within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            await spool.read_body(queue_id)
        except SpoolError:
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.005)


async def test_record_outcomes_history_and_finish(spool: Spool, queue_location: str | Path) -> None:
    qid = await spool.accept(message("ok@d.test", "later@d.test", "no@d.test"))
    owner = lease_owner_id()
    [claim] = await spool.claim(owner, limit=1, lease_seconds=60)
    ok_id, later_id, no_id = (r.id for r in claim.recipients)
    t = time.time()
    common: dict[str, Any] = {"started_at": t, "finished_at": t + 0.25, "mx_host": "mx.d.test"}
    result = await spool.record(
        owner,
        claim,
        [
            AttemptRecord(ok_id, Outcome.DELIVERED, code=250, status="2.0.0", response="ok",
                          tls="TLSv1.3", mx_ip="127.0.0.2", port=25, **common),
            AttemptRecord(later_id, Outcome.DEFERRED, code=451, status="4.7.1",
                          response="greylisted", next_attempt_at=t + 64, **common),
            AttemptRecord(no_id, Outcome.BOUNCED, code=550, status="5.1.1",
                          response="user unknown", **common),
        ],
    )  # fmt: skip
    assert result.updated == (ok_id, later_id, no_id) and result.lease_lost == ()
    assert result.finished_messages == ()
    rows = {
        r[0]: r[1:]
        for r in await sql_rows(
            queue_location,
            "SELECT recipient, status, attempts, last_code, last_status, last_response, "
            "next_attempt_at FROM deliveries",
        )
    }
    assert rows["ok@d.test"] == ("delivered", 1, 250, "2.0.0", "ok", None)
    assert rows["later@d.test"][:5] == ("deferred", 1, 451, "4.7.1", "greylisted")
    assert rows["no@d.test"] == ("bounced", 1, 550, "5.1.1", "user unknown", None)
    attempts = await sql_rows(
        queue_location,
        "SELECT recipient, attempt, outcome, duration_ms, tls, mx_ip, port FROM attempts "
        "ORDER BY recipient",
    )
    assert attempts == [
        ("later@d.test", 1, "deferred", 250, None, None, None),
        ("no@d.test", 1, "bounced", 250, None, None, None),
        ("ok@d.test", 1, "delivered", 250, "TLSv1.3", "127.0.0.2", 25),
    ]
    assert await spool.claim(owner, limit=5, lease_seconds=60) == []
    assert await spool.next_due_at() == pytest.approx(t + 64)
    [again] = await spool.claim(owner, limit=5, lease_seconds=60, now=t + 65)
    assert [(r.address, r.attempts, r.failures, r.previous_status) for r in again.recipients] == [
        ("later@d.test", 1, 1, Status.DEFERRED)
    ]
    result = await spool.record(
        owner, again, [AttemptRecord(later_id, Outcome.DELIVERED, t + 66, t + 67, code=250)]
    )
    assert result.finished_messages == (qid,)
    # A finished message's body is gone: in PostgreSQL with the record's
    # commit, in SQLite moments after it (removed on the spool's own thread).
    assert await body_gone(spool, qid)
    detail = await admin.show_message(spool, qid)
    assert detail.finished_at is not None
    later = next(r for r in detail.recipients if r.recipient == "later@d.test")
    assert [a.attempt for a in later.history] == [1, 2]


async def test_record_without_the_lease_keeps_the_attempt_only(spool: Spool) -> None:
    qid = await spool.accept(message("a@d.test"))
    owner = lease_owner_id()
    [claim] = await spool.claim(owner, limit=1, lease_seconds=60)
    await spool.finalize_message(qid, Status.DROPPED, reason="deleted by operator")
    t = time.time()
    rid = claim.recipients[0].id
    result = await spool.record(owner, claim, [AttemptRecord(rid, Outcome.DELIVERED, t, t)])
    assert result.lease_lost == (rid,) and result.updated == ()
    [r] = (await admin.show_message(spool, qid)).recipients
    assert (r.status, r.final_reason, len(r.history)) == ("dropped", "deleted by operator", 1)


async def test_record_refuses_foreign_recipients(spool: Spool) -> None:
    await spool.accept(message("a@d.test"))
    owner = lease_owner_id()
    [claim] = await spool.claim(owner, limit=1, lease_seconds=60)
    t = time.time()
    with pytest.raises(ValueError, match="not part"):
        await spool.record(owner, claim, [AttemptRecord(999999, Outcome.DELIVERED, t, t)])
    with pytest.raises(ValueError, match="next_attempt_at"):
        await spool.record(
            owner, claim, [AttemptRecord(claim.recipients[0].id, Outcome.DEFERRED, t, t)]
        )


# ------------------------------------------------------------ leases


async def test_release_renew_and_release_owner(spool: Spool) -> None:
    await spool.accept(message("a@d.test", "b@e.test"))
    owner = lease_owner_id()
    claims = await spool.claim(owner, limit=10, lease_seconds=60)
    ids = [r.id for c in claims for r in c.recipients]
    assert await spool.renew_leases(owner, time.time() + 600) == 2
    assert await spool.renew_leases("someone-else", time.time() + 600) == 0
    spool.new_work.clear()
    assert await spool.release(owner, ids[:1]) == 1
    assert spool.new_work.is_set()
    assert await spool.release("someone-else", ids[1:]) == 0  # not theirs
    later = time.time() + 300
    assert await spool.release(owner, ids[1:], next_attempt_at=later) == 1
    entries = {e.recipient: e for e in await admin.list_queue(spool)}
    assert entries["a@d.test"].status == "queued"
    assert entries["b@e.test"].next_attempt_at == pytest.approx(later)
    again = await spool.claim(owner, limit=10, lease_seconds=60)
    assert [c.recipients[0].address for c in again] == ["a@d.test"]
    assert await spool.release_owner(owner) == 1


async def test_recover_frees_expired_and_dead_local_leases_only(spool: Spool) -> None:
    for rcpt in ("expired@d.test", "dead@d.test", "remote@d.test", "live@d.test"):
        await spool.accept(message(rcpt))
    host = socket.gethostname()
    child = await asyncio.create_subprocess_exec("true")
    await child.wait()  # a pid that is surely gone
    owners = {
        "expired@d.test": (f"{host}:{os.getpid()}:x1", 1),
        "dead@d.test": (f"{host}:{child.pid}:x2", 600),
        # Another host's live pid numbers mean nothing here: left until it expires.
        "remote@d.test": (f"elsewhere.example:{child.pid}:x3", 600),
        "live@d.test": (f"{host}:{os.getpid()}:x4", 600),
    }
    now = time.time()
    for owner, seconds in owners.values():
        await spool.claim(owner, limit=1, lease_seconds=seconds, now=now)
    report = await spool.recover(now=now + 5)
    assert report.leases_released == 2
    status = {e.recipient: e.status for e in await admin.list_queue(spool)}
    assert status == {
        "expired@d.test": "queued",
        "dead@d.test": "queued",
        "remote@d.test": "sending",
        "live@d.test": "sending",
    }


# ------------------------------------------------------------ admin


async def test_finalize_flush_stats_and_control(spool: Spool) -> None:
    keep = await spool.accept(message("a@d.test", "b@e.test"))
    gone = await spool.accept(message("c@d.test"))
    changed = await spool.finalize_message(gone, Status.BOUNCED, reason="by test")
    assert [c["recipient"] for c in changed] == ["c@d.test"]
    with pytest.raises(ValueError):
        await spool.finalize_message(keep, Status.QUEUED, reason="x")
    owner = lease_owner_id()
    claims = await spool.claim(owner, limit=10, lease_seconds=60)
    t = time.time()
    for c in claims:
        rid = c.recipients[0].id
        await spool.record(
            owner, c, [AttemptRecord(rid, Outcome.DEFERRED, t, t, next_attempt_at=t + 3600)]
        )
    assert await admin.flush(spool, domain="D.TEST") == 1
    assert await admin.flush(spool, [keep]) == 1
    with pytest.raises(UnknownMessageError):
        await admin.flush(spool, ["NOSUCH"])
    assert await admin.message_exists(spool, keep)
    assert not await admin.message_exists(spool, "NOSUCH")
    stats = await admin.stats(spool)
    assert stats.by_status == {"queued": 0, "sending": 0, "deferred": 2}
    assert stats.last_hour["deferred"] == 2 and stats.queued_messages == 1
    assert dict(stats.top_domains) == {"d.test": 1, "e.test": 1}
    assert not stats.paused
    assert [e.recipient for e in await admin.list_queue(spool, status="bounced")] == ["c@d.test"]
    assert len(await admin.list_queue(spool, limit=1)) == 1
    await spool.set_paused(True)
    assert await spool.is_paused() and (await admin.stats(spool)).paused
    spool.new_work.clear()
    await spool.set_paused(False)
    assert not await spool.is_paused() and spool.new_work.is_set()
    with pytest.raises(UnknownMessageError):
        await admin.show_message(spool, "NOSUCH")


async def test_throttle_updates_from_two_spools_are_serialised(queue_location: str | Path) -> None:
    first = await spool_backend.open(queue_location)
    second = await spool_backend.open(queue_location)

    def bump(entry: ThrottleEntry | None) -> tuple[ThrottleEntry | None, int]:
        n = 1 if entry is None else entry.failures + 1
        return ThrottleEntry(n, 0, time.time(), None), n

    try:
        seen = await asyncio.gather(
            *(s.throttle_update("203.0.113.9", bump) for _ in range(15) for s in (first, second))
        )
        assert sorted(seen) == list(range(1, 31))  # no update lost, none counted twice
        peek = await first.throttle_update("203.0.113.9", lambda e: (e, e), write=False)
        assert peek is not None and peek.failures == 30
        await second.throttle_update("gone", bump)
        assert await first.throttle_prune(time.time(), time.time() + 1, 10) == 2
    finally:
        await first.close()
        await second.close()


async def test_sts_policies_are_cached_and_replaced(queue_location: str | Path) -> None:
    first = await spool_backend.open(queue_location)
    second = await spool_backend.open(queue_location)
    try:
        assert await first.get_sts_policy("dest.test") is None
        t = time.time()
        policy = StoredStsPolicy("dest.test", "id1", "enforce", ("mx.dest.test", "*.dest.test"),
                                 86400, t, t + 86400)  # fmt: skip
        await first.put_sts_policy(policy)
        assert await second.get_sts_policy("dest.test") == policy  # shared by every process
        newer = StoredStsPolicy("dest.test", "id2", "testing", ("mx2.dest.test",), 600, t, t + 600)
        await second.put_sts_policy(newer)
        assert await first.get_sts_policy("dest.test") == newer
    finally:
        await first.close()
        await second.close()
