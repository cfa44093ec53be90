"""Acceptance: a graceful stop gives back every lease, even one claimed while stopping.

SIGTERM to ``outboundd`` (two delivery processes) right after a message was
queued: it exited 0, and the recipient stayed ``sending``, leased to a
process that no longer existed.  The scheduler's loop was awaiting the
spool (the pause check, or the claim itself) when ``stop()`` ran; stop saw
no running delivery, released the owner's leases, and only then did the
claim commit — a lease nobody gave back (until the next start, or the
lease's expiry).  Stop now waits for the loop's step in progress, and a
claim that returns while stopping is given back at once.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from outboundd.delivery.scheduler import Scheduler
from outboundd.spool import Claim, NewMessage, NewRecipient, Spool, lease_owner_id
from outboundd.spool.admin import list_queue
from tests.test_scheduler import Log, Settings


@pytest.mark.parametrize("yields", range(0, 12))
async def test_a_claim_in_flight_when_stop_begins_is_given_back(
    tmp_path: Path, yields: int
) -> None:
    """``yields`` lets the loop get that far into its step before stop()."""
    spool = await Spool.open(tmp_path / "q")
    started: list[Claim] = []

    async def deliver(claim: Claim) -> None:
        started.append(claim)
        await asyncio.sleep(30)  # a long session: cancelled by stop's grace

    try:
        await spool.accept(NewMessage("a@x.test", [NewRecipient("r@y.test")], b"x\r\n"))
        sched = Scheduler(spool, lambda: Settings(), deliver, owner=lease_owner_id(), log=Log(),
                          poll_interval=0.2)  # fmt: skip
        runner = asyncio.create_task(sched.run())
        for _ in range(yields):
            await asyncio.sleep(0)
        await sched.stop(0.2)
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        rows = await list_queue(spool)
        assert [(e.recipient, e.status) for e in rows] == [("r@y.test", "queued")], (
            yields,
            started,
        )
    finally:
        await spool.close()
