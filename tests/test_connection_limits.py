"""Connection limits and connection reuse, counted at the scripted MX.

The scheduler, the delivery engine, the real spool and the loopback DNS
run in this process; the MX servers count the connections open at once
(:class:`tests.mxserver.ConnectionGauge`) and every command they get, so
the tests see what a provider that caps connections per client would see.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from outboundd import log
from outboundd.config import load_config
from outboundd.daemon import OutboundSettings
from outboundd.delivery.engine import DeliveryEngine
from outboundd.delivery.pool import ConnectionPool, Limits
from outboundd.delivery.scheduler import Scheduler
from outboundd.delivery.session import DeliveryJob, JobRecipient, deliver_job
from outboundd.hooks import HookRunner
from outboundd.spool import NewMessage, NewRecipient, Spool, lease_owner_id
from outboundd.spool.types import Outcome
from tests.dnsserver import DNSServer
from tests.harness import write_config
from tests.mxserver import ConnectionGauge, MXScript, MXServer, mx_server
from tests.test_session_timeouts import SLACK, only

BODY = b"From: a@sender.test\r\nSubject: limits\r\n\r\nhello\r\n"
WAIT = 15.0  # the longest any test waits for its mail (they take about a second)


@dataclass
class World:
    spool: Spool
    engine: DeliveryEngine
    scheduler: Scheduler
    dest: MXServer  # dest.test at 127.0.0.2
    other: MXServer  # other.test at 127.0.0.3
    gauge: ConnectionGauge  # both MX servers' connections together

    async def send(self, *rcpts: str) -> str:
        return await self.spool.accept(
            NewMessage("a@sender.test", [NewRecipient(r) for r in rcpts], BODY)
        )

    def count(self, status: str) -> int:
        con = sqlite3.connect(self.spool.db_path)
        try:
            row = con.execute("SELECT count(*) FROM deliveries WHERE status = ?", (status,))
            return int(row.fetchone()[0])
        finally:
            con.close()

    def rows(self, sql: str, *args: object) -> list[tuple[Any, ...]]:
        con = sqlite3.connect(self.spool.db_path)
        try:
            return con.execute(sql, args).fetchall()
        finally:
            con.close()

    async def until(self, check: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + WAIT
        while not check():
            assert time.monotonic() < deadline, f"not within {WAIT}s: {what}"
            await asyncio.sleep(0.05)

    async def delivered(self, n: int) -> None:
        await self.until(lambda: self.count("delivered") == n, f"{n} delivered")


@contextlib.asynccontextmanager
async def world(
    dns: DNSServer, tmp_path: Path, script: Callable[[], MXScript], **outbound: object
) -> AsyncIterator[World]:
    dns.zones.update(
        {
            "dest.test": {"MX": [(10, "mx.dest.test")]},
            "mx.dest.test": {"A": ["127.0.0.2"]},
            "other.test": {"MX": [(10, "mx.other.test")]},
            "mx.other.test": {"A": ["127.0.0.3"]},
        }
    )
    gauge = ConnectionGauge()
    async with contextlib.AsyncExitStack() as stack:
        dest = await stack.enter_async_context(mx_server(script(), gauge=gauge))
        other = await stack.enter_async_context(
            mx_server(script(), host="127.0.0.3", port=dest.port, gauge=gauge)
        )
        config_dir = write_config(
            tmp_path / "config", dns_port=dns.port, mx_port=dest.port, outbound=outbound
        )
        config = load_config(config_dir)
        spool = await Spool.open(config.outbound.queue_dir)
        owner = lease_owner_id()
        engine = DeliveryEngine(
            config, OutboundSettings(config), spool, HookRunner([], timeout=1.0), owner=owner
        )
        scheduler = Scheduler(
            spool,
            OutboundSettings(config),
            engine.deliver,
            owner=owner,
            log=log.get_logger("test"),
            poll_interval=0.1,
        )
        runner = asyncio.create_task(scheduler.run())
        try:
            yield World(spool, engine, scheduler, dest, other, gauge)
        finally:
            await scheduler.stop(2.0)
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
            await engine.close()
            await spool.close()


@pytest.mark.parametrize("idle", [0, 10])
async def test_domain_concurrency_max_limits_connections_at_the_mx(
    dns_server: DNSServer, tmp_path: Path, idle: int
) -> None:
    """Item 17: ten messages, two at a time, never more than two connections open."""
    slow_dot = lambda: MXScript(delays={"data_end": 0.2})  # noqa: E731
    async with world(
        dns_server, tmp_path, slow_dot, domain_concurrency_max=2, pool_idle_timeout=idle
    ) as w:
        for n in range(10):
            await w.send(f"r{n}@dest.test")
        await w.delivered(10)
        assert len(w.dest.transactions) == 10
        assert w.dest.max_open_connections == 2  # the limit, and it was used
        if idle == 0:
            # Nothing kept: every connection was closed, with QUIT, before its slot was free.
            assert w.engine.pool.idle == 0
            assert w.dest.commands.count("QUIT") == w.dest.connections
        else:
            assert w.dest.connections == 2  # kept connections carried the rest


async def test_pool_idle_timeout_zero_keeps_nothing_and_every_connection_says_quit(
    dns_server: DNSServer, tmp_path: Path
) -> None:
    """Item 18: three messages due together, one connection at a time, three QUITs."""
    async with world(
        dns_server, tmp_path, MXScript, domain_concurrency_max=1, pool_idle_timeout=0
    ) as w:
        for n in range(3):
            await w.send(f"r{n}@dest.test")
        await w.delivered(3)
        await w.until(lambda: w.dest.open_connections == 0, "every connection closed")
        assert w.dest.connections == 3 and w.dest.max_open_connections == 1
        assert w.dest.commands.count("QUIT") == 3
        assert w.engine.pool.idle == 0 and w.engine.pool.open_connections == 0


async def test_idle_kept_connections_count_against_concurrency_max(
    dns_server: DNSServer, tmp_path: Path
) -> None:
    """Kept connections to one domain are closed (QUIT) before another needs the room."""
    slow_dot = lambda: MXScript(delays={"data_end": 0.2})  # noqa: E731
    async with world(
        dns_server,
        tmp_path,
        slow_dot,
        concurrency_max=2,
        domain_concurrency_max=2,
        pool_idle_timeout=30,
    ) as w:
        for n in range(2):
            await w.send(f"r{n}@dest.test")
        await w.delivered(2)
        assert (w.engine.pool.idle, w.dest.open_connections) == (2, 2)  # kept for reuse
        for n in range(2):
            await w.send(f"r{n}@other.test")
        await w.delivered(4)
        assert w.gauge.max_open == 2  # never four: the kept ones made room
        assert w.dest.commands.count("QUIT") == 2  # closed politely
        assert w.other.connections == 2


async def test_a_connection_the_server_closed_is_replaced_without_a_failure(
    dns_server: DNSServer, tmp_path: Path
) -> None:
    """The kept connection is refused (421 and closed) at the next MAIL: the message
    goes on a new connection, with one attempt and nothing counted as failed."""
    script = lambda: MXScript(max_messages=1)  # noqa: E731
    async with world(dns_server, tmp_path, script, pool_idle_timeout=30) as w:
        await w.send("first@dest.test")
        await w.delivered(1)
        assert w.engine.pool.idle == 1
        qid = await w.send("second@dest.test")
        await w.delivered(2)
        assert w.dest.connections == 2 and len(w.dest.transactions) == 2
        rows = w.rows(
            "SELECT attempt, outcome, code FROM attempts WHERE queue_id = ? ORDER BY attempt", qid
        )
        assert rows == [(1, "delivered", 250)]
        assert w.rows("SELECT attempts FROM deliveries WHERE queue_id = ?", qid) == [(1,)]


async def test_a_connection_the_server_dropped_while_idle_is_replaced(
    dns_server: DNSServer, tmp_path: Path
) -> None:
    async with world(dns_server, tmp_path, MXScript, pool_idle_timeout=30) as w:
        await w.send("first@dest.test")
        await w.delivered(1)
        await asyncio.to_thread(w.dest.drop_connections)
        qid = await w.send("second@dest.test")
        await w.delivered(2)
        assert w.dest.connections == 2
        assert w.rows("SELECT attempt, outcome FROM attempts WHERE queue_id = ?", qid) == [
            (1, "delivered")
        ]


@pytest.mark.parametrize("split", [True, False])
async def test_always_split_is_seen_at_the_mx(
    dns_server: DNSServer, tmp_path: Path, split: bool
) -> None:
    """always_split: one transaction per recipient, each within domain_concurrency_max."""
    slow_dot = lambda: MXScript(delays={"data_end": 0.2})  # noqa: E731
    async with world(
        dns_server,
        tmp_path,
        slow_dot,
        always_split=str(split).lower(),
        domain_concurrency_max=2,
        pool_idle_timeout=0,
    ) as w:
        rcpts = [f"r{n}@dest.test" for n in range(4)]
        await w.send(*rcpts)
        await w.delivered(4)
        got = sorted(tuple(t.rcpt_tos) for t in w.dest.transactions)
        if split:
            assert got == [(r,) for r in rcpts]
            assert w.dest.max_open_connections == 2
        else:
            assert got == [tuple(rcpts)]
            assert w.dest.connections == 1


# ------------------------------------------------------------ the pool alone


async def test_an_expired_kept_connection_is_closed_with_quit(tmp_path: Path) -> None:
    """Item 18: found expired when the next message wants it, or by the reaper."""
    now = [0.0]
    pool = ConnectionPool(idle_timeout=1.0, clock=lambda: now[0])
    settings = only("quit_timeout")
    path = tmp_path / "m.eml"
    path.write_bytes(BODY)
    job = DeliveryJob("a@src.test", (JobRecipient(1, "r@dest.test"),), path, len(BODY))
    async with mx_server(MXScript()) as mx:
        await deliver_job(job, [mx.target()], settings, pool=pool)
        now[0] = 2.0  # expired before the reaper came round
        result = await deliver_job(job, [mx.target()], settings, pool=pool)
        assert result.recipients[1].outcome is Outcome.DELIVERED
        assert mx.connections == 2 and mx.commands.count("QUIT") == 1
        now[0] = 10.0  # the reaper closes the second one
        deadline = time.monotonic() + WAIT
        while pool.idle:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        while mx.open_connections:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        assert mx.commands.count("QUIT") == 2
        await pool.close()


async def test_a_new_connection_waits_for_one_being_closed(tmp_path: Path) -> None:
    """At the domain's limit with the only other connection in its QUIT, the
    next one is opened only once that QUIT is done."""
    pool = ConnectionPool(idle_timeout=30)
    lane = pool.lane("dest.test", Limits(total=10, per_domain=1))
    settings = only("quit_timeout", quit_timeout=5.0)
    path = tmp_path / "m.eml"
    path.write_bytes(BODY)
    job = DeliveryJob("a@src.test", (JobRecipient(1, "r@dest.test"),), path, len(BODY))
    async with mx_server(MXScript(delays={"quit": 0.3})) as mx:
        await deliver_job(job, [mx.target()], settings, pool=lane)
        assert pool.idle == 1 and pool.open_connections == 1
        closing = asyncio.create_task(pool.close())  # QUIT, answered after 0.3 s
        await asyncio.sleep(0.05)
        began = time.monotonic()
        # A different target (another HELO name), so the kept connection cannot serve it.
        result = await deliver_job(job, [mx.target()], replace(settings, helo="other.test"),
                                   pool=lane)  # fmt: skip
        waited = time.monotonic() - began
        await closing
        assert result.recipients[1].outcome is Outcome.DELIVERED
        assert mx.max_open_connections == 1 and mx.connections == 2
        assert 0.1 < waited < 0.3 + SLACK, waited
        await pool.close()
