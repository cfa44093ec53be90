"""Connection reuse: one TCP connection for consecutive messages to a host."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from outboundd.delivery.pool import ConnectionPool
from outboundd.delivery.session import DeliveryJob, JobRecipient, deliver_job
from outboundd.spool import Outcome
from tests.mxserver import MXScript, mx_server
from tests.test_session import settings

BODY = b"Subject: pooled\r\n\r\nbody\r\n"


def job(tmp_path: Path, n: int) -> DeliveryJob:
    path = tmp_path / f"m{n}.eml"
    path.write_bytes(BODY)
    return DeliveryJob("a@src.test", (JobRecipient(n, f"r{n}@dest.test"),), path, len(BODY))


async def test_consecutive_messages_share_one_connection(tmp_path: Path) -> None:
    pool = ConnectionPool(idle_timeout=5)
    async with mx_server(MXScript(), host="127.0.0.2") as mx:
        target = mx.target()
        for n in range(5):
            result = await deliver_job(job(tmp_path, n), [target], settings(), pool=pool)
            assert result.recipients[n].outcome is Outcome.DELIVERED
        assert mx.connections == 1
        assert len(mx.transactions) == 5
        assert (pool.opened, pool.reused, pool.idle) == (1, 4, 1)
        await pool.close()
        assert pool.idle == 0


async def test_server_closed_idle_connection_is_replaced_transparently(tmp_path: Path) -> None:
    pool = ConnectionPool(idle_timeout=5)
    async with mx_server(MXScript(), host="127.0.0.2") as mx:
        target = mx.target()
        await deliver_job(job(tmp_path, 1), [target], settings(), pool=pool)
        await asyncio.to_thread(mx.drop_connections)
        await asyncio.sleep(0.1)
        result = await deliver_job(job(tmp_path, 2), [target], settings(), pool=pool)
        assert result.recipients[2].outcome is Outcome.DELIVERED
        assert result.errors == ()  # the stale connection is not the remote's failure
        assert len(mx.transactions) == 2
        await pool.close()


async def test_idle_connections_expire_and_cap_per_host(tmp_path: Path) -> None:
    clock_now = [0.0]
    clock: Callable[[], float] = lambda: clock_now[0]  # noqa: E731
    pool = ConnectionPool(idle_timeout=10, max_idle_per_host=1, clock=clock)
    async with mx_server(MXScript(), host="127.0.0.2") as mx:
        target = mx.target()
        jobs = [job(tmp_path, n) for n in range(3)]
        await asyncio.gather(*(deliver_job(j, [target], settings(), pool=pool) for j in jobs))
        assert pool.idle == 1  # three connections opened at once, one kept
        clock_now[0] = 11.0  # past the idle timeout: not reused
        await deliver_job(job(tmp_path, 9), [target], settings(), pool=pool)
        assert pool.reused == 0 and pool.opened == 4
        await pool.close()


def test_delivery_works_under_uvloop(tmp_path: Path) -> None:
    """The daemon runs on uvloop, whose transports are not asyncio ABC subclasses."""
    import uvloop

    from tests.mxserver import MXServer

    mx = MXServer(MXScript(), host="127.0.0.2").start()
    try:

        async def run() -> Outcome:
            pool = ConnectionPool()
            result = await deliver_job(job(tmp_path, 1), [mx.target()], settings(), pool=pool)
            await pool.close()
            return result.recipients[1].outcome

        assert uvloop.run(run()) is Outcome.DELIVERED
        assert len(mx.transactions) == 1
    finally:
        mx.stop()
