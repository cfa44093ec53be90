"""What only a shared PostgreSQL queue promises: limits across hosts, wake-ups, outages.

Two ``PostgresSpool`` instances with different lease owners stand for two
hosts on one queue.  The outage tests start their own cluster
(tests/pgcluster.py) so that they can kill and restart it.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

from outboundd import spool as spool_backend
from outboundd.spool import (
    AttemptRecord,
    Claim,
    NewMessage,
    NewRecipient,
    Outcome,
    Spool,
    SpoolError,
    SpoolUnavailableError,
    admin,
    lease_owner_id,
)
from outboundd.spool.postgres import PostgresSpool
from outboundd.spool.postgres import core as pg_core
from outboundd.spool.postgres.link import BACKOFF_MAX, BACKOFF_MIN, Link
from outboundd.spool.postgres.sql import to_positional
from outboundd.spool.types import Lease
from tests.harness import Daemon, free_port, submit, write_config
from tests.pgcluster import PgCluster
from tests.test_ctl import assert_failed, ctl

BODY = b"Subject: x\r\n\r\nhello\r\n"


def message(*rcpts: str) -> NewMessage:
    return NewMessage("a@example.test", [NewRecipient(r) for r in rcpts], BODY)


@pytest.fixture
async def two_hosts(pg_url: str) -> AsyncIterator[tuple[Spool, Spool]]:
    first = await spool_backend.open(pg_url)
    second = await spool_backend.open(pg_url)
    try:
        yield first, second
    finally:
        await first.close()
        await second.close()


async def wait_set(event: asyncio.Event, seconds: float = 5.0) -> bool:
    try:
        await asyncio.wait_for(event.wait(), seconds)
    except TimeoutError:
        return False
    return True


def test_named_parameters_become_positional_once() -> None:
    stmt = to_positional("SELECT :a::text, :b, :a FROM t WHERE x = ANY (:ids::bigint[])")
    assert stmt.text == "SELECT $1::text, $2, $1 FROM t WHERE x = ANY ($3::bigint[])"
    assert stmt.names == ("a", "b", "ids")


async def test_domain_limit_holds_across_hosts(two_hosts: tuple[Spool, Spool]) -> None:
    first, second = two_hosts
    for i in range(4):
        await first.accept(message(f"r{i}@slow.test"))
    await first.accept(message("x@other.test"))
    a, b = lease_owner_id(), lease_owner_id()
    got_a = await first.claim(a, limit=10, lease_seconds=60, domain_room=2)
    assert sorted(c.domain for c in got_a) == ["other.test", "slow.test", "slow.test"]
    # The second host's own room is untouched, but the domain's is used up.
    assert await second.claim(b, limit=10, lease_seconds=60, domain_room=2) == []
    done = next(c for c in got_a if c.domain == "slow.test")
    t = time.time()
    await first.record(a, done, [AttemptRecord(done.recipients[0].id, Outcome.DELIVERED, t, t)])
    got_b = await second.claim(b, limit=10, lease_seconds=60, domain_room=2)
    assert [c.domain for c in got_b] == ["slow.test"]


async def test_claim_counts_the_slots_every_host_holds(two_hosts: tuple[Spool, Spool]) -> None:
    """Leased groups (recipients, with always_split) of a domain, on any host, use
    its room; a full domain's groups are passed over, other domains' still taken."""
    first, second = two_hosts
    for name in ("a1@busy.test", "a2@busy.test", "a3@busy.test", "b1@free.test", "b2@free.test"):
        await first.accept(message(name))
    a, b = lease_owner_id(), lease_owner_id()

    def taken(claims: list[Claim]) -> list[str]:
        return [r.address for c in claims for r in c.recipients]

    assert taken(await first.claim(a, limit=1, lease_seconds=60)) == ["a1@busy.test"]
    got = await second.claim(b, limit=2, lease_seconds=60, domain_room=2, room={"free.test": 5})
    assert taken(got) == ["a2@busy.test", "b1@free.test"]
    got = await second.claim(b, limit=5, lease_seconds=60, domain_room=2)
    assert taken(got) == ["b2@free.test"]  # busy.test holds 2 of 2, one on each host
    assert taken(await second.claim(b, limit=5, lease_seconds=60, domain_room=3)) == [
        "a3@busy.test"
    ]

    await first.accept(message("c1@split.test", "c2@split.test", "c3@split.test"))
    got = await first.claim(a, limit=1, lease_seconds=60, always_split=True)
    assert len(taken(got)) == 1
    got = await second.claim(b, limit=5, lease_seconds=60, always_split=True, domain_room=2)
    assert len(taken(got)) == 1 and [len(c.recipients) for c in got] == [1]
    assert await second.claim(b, limit=5, lease_seconds=60, always_split=True, domain_room=2) == []


async def test_a_claim_is_one_round_trip(pg_url: str) -> None:
    """Due rows, the domains' locks and counts, the lease and the messages: one
    call, whether it finds work or not."""
    spool = await spool_backend.open(pg_url)
    try:
        assert isinstance(spool, PostgresSpool)
        await asyncio.gather(*(spool.accept(message(f"r{i}@d{i % 3}.test")) for i in range(9)))
        owner = lease_owner_id()
        for expected in (4, 2, 0):  # 2 of the 3 groups of each of 3 domains
            before = spool.round_trips
            claims = await spool.claim(owner, limit=4, lease_seconds=60, domain_room=2)
            assert len(claims) == expected
            assert spool.round_trips - before == 1
    finally:
        await spool.close()


async def test_a_claim_for_a_full_domain_locks_a_few_rows_not_a_scan_per_free_slot(
    pg_url: str,
) -> None:
    """A claim locks SCAN_FACTOR rows per group it may take, and it may take no more
    than domain_room: with 40 due in one domain and room for 2, a claim asking for
    50 leaves at most SCAN_FACTOR x 2 rows with a lock mark, not all 40."""
    spool = await spool_backend.open(pg_url)
    try:
        await asyncio.gather(*(spool.accept(message(f"r{i}@full.test")) for i in range(40)))
        claims = await spool.claim(lease_owner_id(), limit=50, lease_seconds=60, domain_room=2)
        assert len(claims) == 2
        conn = await asyncpg.connect(pg_url)
        try:
            # A row locked FOR UPDATE by a committed transaction keeps that
            # transaction in its xmax; an untouched row has 0.
            marked = await conn.fetchval("SELECT count(*) FROM recipients WHERE xmax::text <> '0'")
        finally:
            await conn.close()
        assert 2 <= marked <= pg_core.SCAN_FACTOR * 2, marked
    finally:
        await spool.close()


async def test_accept_leased_counts_the_slots_every_host_holds(
    two_hosts: tuple[Spool, Spool],
) -> None:
    """New mail is leased at accept only while its domain has room on every host:
    a group without room is queued due, and wakes the schedulers for it."""
    first, second = two_hosts
    assert isinstance(second, PostgresSpool)
    for name in ("a1@busy.test", "a2@busy.test"):
        await first.accept(message(name))
    a, b = lease_owner_id(), lease_owner_id()
    assert len(await first.claim(a, limit=2, lease_seconds=60)) == 2  # busy.test: 2 slots
    await asyncio.sleep(0.1)
    second.new_work.clear()
    before = second.round_trips
    qid, leased = await second.accept_leased(
        message("n@busy.test", "m@free.test"), Lease(b, 60, domain_room=3)
    )
    assert second.round_trips - before == 1
    assert sorted(c.domain for c in leased) == ["busy.test", "free.test"]  # 2 + 1 <= 3
    assert not second.new_work.is_set()
    qid, leased = await second.accept_leased(
        message("o@busy.test", "p@free.test"), Lease(b, 60, domain_room=3)
    )
    assert [c.domain for c in leased] == ["free.test"]  # busy.test holds 3 of 3
    assert second.new_work.is_set()
    assert await wait_set(first.new_work)
    # The queued group is due, for whichever host has room once a slot is free.
    assert await first.claim(a, limit=5, lease_seconds=60, domain_room=3) == []
    [later] = await first.claim(a, limit=5, lease_seconds=60, domain_room=4)
    assert later.queue_id == qid and later.recipients[0].address == "o@busy.test"


async def test_accept_leased_takes_a_domains_last_slots_in_batch_order(pg_url: str) -> None:
    """Accepts committed together share a domain's room in the order they came."""
    spool = await spool_backend.open(pg_url)
    try:
        owner = lease_owner_id()
        results = await asyncio.gather(
            *(
                spool.accept_leased(message(f"r{i}@one.test"), Lease(owner, 60, domain_room=2))
                for i in range(4)
            )
        )
        assert [len(claims) for _, claims in results] == [1, 1, 0, 0]
        queued = await admin.list_queue(spool, status="queued")
        assert sorted(e.recipient for e in queued) == ["r2@one.test", "r3@one.test"]
    finally:
        await spool.close()


async def test_an_empty_claim_answers_until_work_is_queued(
    two_hosts: tuple[Spool, Spool], pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A claim that finds nothing due says when the next attempt is; until then,
    or until a NOTIFY or this spool's own accept, release or deferral, claims and
    next_due_at answer without a round trip, for at most IDLE_HINT_SECONDS."""
    first, second = two_hosts
    assert isinstance(first, PostgresSpool)
    monkeypatch.setattr(pg_core, "IDLE_HINT_SECONDS", 30.0)  # no timing in the asserts
    owner = lease_owner_id()
    await asyncio.sleep(0.1)
    t = time.time()
    await first.accept(message("a@d.test"))
    [claim] = await first.claim(owner, limit=5, lease_seconds=60)
    await first.record(
        owner,
        claim,
        [AttemptRecord(claim.recipients[0].id, Outcome.DEFERRED, t, t, next_attempt_at=t + 900)],
    )
    before = first.round_trips
    assert await first.claim(owner, limit=5, lease_seconds=60) == []
    assert first.round_trips - before == 1
    assert await first.claim(owner, limit=5, lease_seconds=60) == []
    assert await first.next_due_at() == pytest.approx(t + 900)
    assert first.round_trips - before == 1  # both answered from the empty claim
    # Work due later than that is still claimed when it is due.
    [due] = await first.claim(owner, limit=5, lease_seconds=60, now=t + 901)
    assert due.recipients[0].address == "a@d.test"
    await first.release(owner, [due.recipients[0].id], next_attempt_at=t + 900)
    # Another host's accept wakes this one through the NOTIFY: claimed at once.
    assert await first.claim(owner, limit=5, lease_seconds=60) == []
    # Cleared first: set by an earlier wake-up, the event would let the claim
    # below run before the NOTIFY of this accept arrived.
    first.new_work.clear()
    await second.accept(message("b@d.test"))
    assert await wait_set(first.new_work)
    [new] = await first.claim(owner, limit=5, lease_seconds=60)
    assert new.recipients[0].address == "b@d.test"
    # Without a NOTIFY (work made due behind its back), the answer expires.
    assert await first.claim(owner, limit=5, lease_seconds=60) == []
    conn = await asyncpg.connect(pg_url)
    try:
        await conn.execute(
            "UPDATE recipients SET next_attempt_at = $1 WHERE status = 'deferred'", t
        )
    finally:
        await conn.close()
    assert await first.claim(owner, limit=5, lease_seconds=60) == []
    monkeypatch.setattr(pg_core, "IDLE_HINT_SECONDS", 0.05)
    await asyncio.sleep(0.1)
    [behind] = await first.claim(owner, limit=5, lease_seconds=60)
    assert behind.recipients[0].address == "a@d.test"


async def test_concurrent_claims_never_exceed_the_domain_limit(pg_url: str) -> None:
    spools = [await spool_backend.open(pg_url, recover=False) for _ in range(4)]
    try:
        for i in range(20):
            await spools[0].accept(message(f"r{i}@slow.test"))
        owners = [lease_owner_id() for _ in spools]
        results = await asyncio.gather(
            *(
                s.claim(o, limit=10, lease_seconds=60, domain_room=3)
                for s, o in zip(spools, owners, strict=True)
            )
        )
        assert sum(len(r) for r in results) == 3
    finally:
        for s in spools:
            await s.close()


async def test_new_flushed_and_released_work_wakes_other_hosts(
    two_hosts: tuple[Spool, Spool],
) -> None:
    first, second = two_hosts
    await asyncio.sleep(0.2)  # the listener is connected
    second.new_work.clear()
    qid = await first.accept(message("a@d.test"))
    assert await wait_set(second.new_work), "accept did not wake the other host"
    owner = lease_owner_id()
    [claim] = await first.claim(owner, limit=1, lease_seconds=60)
    t = time.time()
    await first.record(
        owner,
        claim,
        [AttemptRecord(claim.recipients[0].id, Outcome.DEFERRED, t, t, next_attempt_at=t + 900)],
    )
    second.new_work.clear()
    assert await admin.flush(first, [qid]) == 1
    assert await wait_set(second.new_work), "flush did not wake the other host"
    [claim] = await first.claim(owner, limit=1, lease_seconds=60)
    second.new_work.clear()
    await first.release(owner, [claim.recipients[0].id])
    assert await wait_set(second.new_work), "release did not wake the other host"
    second.new_work.clear()
    await first.set_paused(False)
    assert await wait_set(second.new_work), "resume did not wake the other host"


async def test_expired_leases_of_a_dead_host_are_taken_by_another(
    two_hosts: tuple[Spool, Spool],
) -> None:
    first, second = two_hosts
    await first.accept(message("a@d.test"))
    dead = "deadhost.example:4242:abcd"
    now = time.time()
    [taken] = await first.claim(dead, limit=1, lease_seconds=10, now=now)
    assert taken.recipients[0].address == "a@d.test"
    assert await second.claim(lease_owner_id(), limit=1, lease_seconds=60, now=now + 5) == []
    # Once it expired, a claim sweeps it (no restart needed anywhere).
    [again] = await second.claim(lease_owner_id(), limit=1, lease_seconds=60, now=now + 20)
    assert again.recipients[0].id == taken.recipients[0].id
    # The dead host's late record changes nothing but the history.
    t = time.time()
    result = await first.record(dead, taken, [AttemptRecord(again.recipients[0].id,
                                                             Outcome.DELIVERED, t, t)])  # fmt: skip
    assert result.lease_lost == (again.recipients[0].id,)


async def test_hosts_finishing_one_message_at_once_finish_it(
    two_hosts: tuple[Spool, Spool],
) -> None:
    """Two hosts record the last recipients of one message (different domains) at
    the same moment: the message must end finished and its body deleted, which
    needs each to see the other's committed state."""
    first, second = two_hosts
    for _ in range(10):
        qid = await first.accept(message("a@one.test", "b@two.test"))
        a, b = lease_owner_id(), lease_owner_id()
        [one] = await first.claim(a, limit=1, lease_seconds=60)
        [two] = await second.claim(b, limit=1, lease_seconds=60)
        t = time.time()
        results = await asyncio.gather(
            first.record(a, one, [AttemptRecord(one.recipients[0].id, Outcome.DELIVERED, t, t)]),
            second.record(b, two, [AttemptRecord(two.recipients[0].id, Outcome.BOUNCED, t, t)]),
        )
        assert [r.finished_messages for r in results].count((qid,)) == 1
        assert (await admin.show_message(first, qid)).finished_at is not None
        with pytest.raises(SpoolError):
            await first.read_body(qid)


async def test_accepts_and_records_are_group_committed(pg_url: str) -> None:
    """Round trips, counted: concurrent accepts share one statement, concurrent
    records one call, so each costs well under one round trip per message."""
    spool = await spool_backend.open(pg_url)
    try:
        assert isinstance(spool, PostgresSpool)
        before = spool.round_trips
        await asyncio.gather(*(spool.accept(message(f"r@d{i}.test")) for i in range(60)))
        assert spool.round_trips - before <= 6
        owner = lease_owner_id()
        claims = await spool.claim(owner, limit=60, lease_seconds=60)
        assert len(claims) == 60
        before = spool.round_trips
        t = time.time()
        results = await asyncio.gather(
            *(
                spool.record(owner, c, [AttemptRecord(c.recipients[0].id, Outcome.DELIVERED, t, t)])
                for c in claims
            )
        )
        assert spool.round_trips - before <= 6
        assert all(r.updated and not r.lease_lost for r in results)
        assert sorted(q for r in results for q in r.finished_messages) == sorted(
            c.queue_id for c in claims
        )
        assert await admin.list_queue(spool) == []
    finally:
        await spool.close()


async def test_records_ending_close_together_share_one_call(pg_url: str) -> None:
    """A batch's first record waits RECORD_GATHER_SECONDS for others: two deliveries
    that end a millisecond apart are written by one call, where without the wait
    the second would follow the first's call in one of its own."""
    spool = await spool_backend.open(pg_url)
    try:
        assert isinstance(spool, PostgresSpool)
        await asyncio.gather(*(spool.accept(message(f"r{i}@d.test")) for i in range(2)))
        owner = lease_owner_id()
        first, second = await spool.claim(owner, limit=2, lease_seconds=60)
        t = time.time()

        async def record(claim: Claim, delay: float) -> None:
            await asyncio.sleep(delay)
            done = [AttemptRecord(claim.recipients[0].id, Outcome.DELIVERED, t, t)]
            assert (await spool.record(owner, claim, done)).updated

        before = spool.round_trips
        await asyncio.gather(record(first, 0), record(second, 0.001))
        assert spool.round_trips - before == 1
    finally:
        await spool.close()


async def test_close_writes_a_record_still_gathering(pg_url: str) -> None:
    """A record waiting for others to join its batch is written when the spool
    closes (the daemon's shutdown), not dropped."""
    spool = await spool_backend.open(pg_url)
    await spool.accept(message("r@d.test"))
    owner = lease_owner_id()
    (claim,) = await spool.claim(owner, limit=1, lease_seconds=60)
    t = time.time()
    done = [AttemptRecord(claim.recipients[0].id, Outcome.DELIVERED, t, t)]
    recording = asyncio.create_task(spool.record(owner, claim, done))
    await asyncio.sleep(0)  # queued, inside the gathering wait
    await spool.close()
    assert (await recording).finished_messages == (claim.queue_id,)
    reopened = await spool_backend.open(pg_url, recover=False)
    try:
        assert await admin.list_queue(reopened) == []
        shown = await reopened.show_message(claim.queue_id)
        assert [r.status for r in shown.recipients] == ["delivered"]
    finally:
        await reopened.close()


def test_link_backs_off_and_recovers() -> None:
    clock = [100.0]
    link = Link(clock=lambda: clock[0])
    assert link.up and link.wait_time() == 0
    waits = []
    for _ in range(10):
        link.failed(OSError("refused"), "postgresql://x/y")
        waits.append(link.wait_time())
    assert waits[0] == BACKOFF_MIN and waits[-1] == BACKOFF_MAX
    assert waits == sorted(waits)
    clock[0] += BACKOFF_MAX
    assert link.wait_time() == 0 and not link.up
    link.succeeded("postgresql://x/y")
    assert link.up and link.wait_time() == 0


# ----------------------------------------------------------------- outages


@pytest.fixture
def own_cluster() -> Iterator[PgCluster]:
    base = Path(tempfile.mkdtemp(prefix="outboundd-pgown-"))
    cluster = PgCluster.start(base / "cluster")
    try:
        yield cluster
    finally:
        cluster.stop()
        base.rmdir()


async def test_server_down_refuses_accepts_keeps_records_and_recovers(
    own_cluster: PgCluster,
) -> None:
    url = own_cluster.create_database("queue")
    spool = await spool_backend.open(url)
    try:
        await spool.accept(message("a@d.test"))
        owner = lease_owner_id()
        [claim] = await spool.claim(owner, limit=1, lease_seconds=600)
        own_cluster.kill()
        started = time.monotonic()
        with pytest.raises(SpoolUnavailableError):
            await spool.accept(message("b@d.test"))
        # Backing off: the next refusal is immediate, not a connect timeout.
        quick = time.monotonic()
        with pytest.raises(SpoolUnavailableError):
            await spool.accept(message("c@d.test"))
        assert time.monotonic() - quick < 0.5
        assert time.monotonic() - started < 15
        with pytest.raises(SpoolError):
            await spool.claim(owner, limit=1, lease_seconds=60)
        # A delivery that finished while the server is away waits to record it.
        t = time.time()
        pending = asyncio.create_task(
            spool.record(
                owner, claim, [AttemptRecord(claim.recipients[0].id, Outcome.DELIVERED, t, t)]
            )
        )
        await asyncio.sleep(1.0)
        assert not pending.done()
        await asyncio.to_thread(own_cluster.start_server)
        result = await asyncio.wait_for(pending, 60)
        assert result.updated == (claim.recipients[0].id,)
        assert result.finished_messages == (claim.queue_id,)
        # Accepts work again once the back-off has passed.
        deadline = time.monotonic() + 60
        while True:
            try:
                qid = await spool.accept(message("d@d.test"))
                break
            except SpoolUnavailableError:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.5)
        assert await spool.read_body(qid) == BODY
        entries = {e.recipient for e in await admin.list_queue(spool, status="queued")}
        assert entries == {"d@d.test"}  # nothing of the refused accepts was kept
    finally:
        await spool.close()


async def test_open_fails_in_words_when_the_server_is_not_there(
    own_cluster: PgCluster,
) -> None:
    url = own_cluster.database_url("postgres")
    own_cluster.kill()
    with pytest.raises(SpoolError, match="cannot connect to the queue"):
        await spool_backend.open(url)


async def test_the_daemon_waits_for_the_database_at_start(
    own_cluster: PgCluster, tmp_path: Path
) -> None:
    """Started while PostgreSQL is down: it says so and waits (no exit, no crash
    loop), then becomes ready and queues mail once the server is up."""
    url = own_cluster.create_database("queue")
    own_cluster.kill()
    config = write_config(
        tmp_path / "config",
        dns_port=free_port(),
        mx_port=free_port(),
        outbound={"queue_url": url, "disabled": "true"},
    )
    daemon = Daemon(config)
    starting = asyncio.create_task(daemon.start(timeout=90))
    try:
        line = await daemon.wait_for(r"queue database unreachable", 30)
        assert "postgresql://postgres@127.0.0.1" in line
        assert daemon.proc is not None and daemon.proc.returncode is None
        await asyncio.sleep(2.0)  # several attempts (0.5 s, 1 s, ...), one log line
        assert not starting.done()
        assert sum("queue database unreachable" in text for text in daemon.lines) == 1
        await asyncio.to_thread(own_cluster.start_server)
        await starting
        await daemon.wait_for(r"queue database reachable again")
        qid = await submit(daemon.smtp_port, "a@example.test", ["b@dest.test"])
        assert daemon.query("SELECT status FROM deliveries WHERE queue_id = ?", (qid,)) == [
            ("queued",)
        ]
        assert not any("Traceback" in text for text in daemon.lines)
    finally:
        if not starting.done():
            starting.cancel()
        if daemon.proc is not None and daemon.proc.returncode is None:
            await daemon.stop()
    assert daemon.returncode == 0


async def test_outboundctl_says_in_one_line_when_the_database_is_down(tmp_path: Path) -> None:
    url = f"postgresql://outboundd:s3cret@127.0.0.1:{free_port()}/queue"
    config = write_config(
        tmp_path / "config", dns_port=free_port(), mx_port=free_port(), outbound={"queue_url": url}
    )
    result = await ctl(config, "stats")
    assert_failed(
        result, r"^outboundctl: cannot connect to the queue postgresql://outboundd:\*\*\*@"
    )
    assert "s3cret" not in result.err
