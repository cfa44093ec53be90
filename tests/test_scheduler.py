"""The scheduler's loop: it must sleep, not spin, when it has nothing to do."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from outboundd.delivery.scheduler import Scheduler
from outboundd.spool import Claim, NewMessage, NewRecipient, Spool, lease_owner_id


@dataclass
class Settings:
    disabled: bool = False
    concurrency_max: int = 10
    domain_concurrency_max: int = 10
    always_split: bool = False
    lease_seconds: float = 60.0


class Log:
    def error(self, message: str, /, **fields: object) -> None:
        raise AssertionError(message)

    def warn(self, message: str, /, **fields: object) -> None:
        raise AssertionError(message)

    def notice(self, message: str, /, **fields: object) -> None:
        """Notices need no checking here."""

    def info(self, message: str, /, **fields: object) -> None:
        """Info lines (lease releases) need no checking here."""


async def test_disabled_scheduler_sleeps_while_mail_keeps_arriving(tmp_path: Path) -> None:
    spool = await Spool.open(tmp_path / "q")
    settings = Settings(disabled=True)
    delivered: list[Claim] = []
    all_delivered = asyncio.Event()

    async def deliver(claim: Claim) -> None:
        delivered.append(claim)
        if len(delivered) == 20:
            all_delivered.set()

    sched = Scheduler(spool, lambda: settings, deliver, owner=lease_owner_id(), log=Log(),
                      poll_interval=0.2)  # fmt: skip
    steps = 0
    real_step = sched._step

    async def counting_step() -> None:
        nonlocal steps
        steps += 1
        await real_step()

    sched._step = counting_step  # type: ignore[method-assign]
    runner = asyncio.create_task(sched.run())
    try:
        for i in range(20):  # every accept sets new_work
            await spool.accept(NewMessage("a@x.test", [NewRecipient(f"r{i}@y.test")], b"x\r\n"))
        await asyncio.sleep(1.0)
        # one wake per accept at most, plus the poll interval: never a spin
        assert steps <= 20 + 1.0 / 0.2 + 2, steps
        assert delivered == []
        settings.disabled = False  # resuming takes effect within the poll interval
        await asyncio.wait_for(all_delivered.wait(), 2)
        assert len(delivered) == 20
    finally:
        await sched.stop(1.0)
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        await spool.close()


async def test_reservations_respect_caps_and_hand_new_mail_over_without_a_claim(
    tmp_path: Path,
) -> None:
    spool = await Spool.open(tmp_path / "q")
    settings = Settings(concurrency_max=3, domain_concurrency_max=2)
    started = asyncio.Event()
    release = asyncio.Event()
    delivered: list[Claim] = []

    async def deliver(claim: Claim) -> None:
        delivered.append(claim)
        started.set()
        await release.wait()

    sched = Scheduler(spool, lambda: settings, deliver, owner=lease_owner_id(), log=Log())
    try:
        first = sched.reserve(["one.test"])
        second = sched.reserve(["one.test"])
        assert first is not None and second is not None
        assert sched.reserve(["one.test"]) is None  # domain_concurrency_max
        third = sched.reserve(["two.test"])
        assert third is not None
        assert sched.reserve(["three.test"]) is None  # concurrency_max
        sched.cancel(second)
        sched.cancel(third)
        # Given back: only the first reservation's slot is still held.
        assert dict(sched._reserved) == {"one.test": 1}
        again = sched.reserve(["one.test"])
        assert again is not None and sched.reserve(["one.test"]) is None
        sched.cancel(again)
        assert dict(sched._reserved) == {"one.test": 1}
        # A reservation turns into a running delivery with no claim at all.
        message = NewMessage("a@x.test", [NewRecipient("r@one.test")], b"x\r\n")
        qid, claims = await spool.accept_leased(message, first.lease)
        sched.adopt(first, claims)
        await asyncio.wait_for(started.wait(), 2)
        assert [c.queue_id for c in delivered] == [qid] and sched.active == 1
        assert await spool.claim(sched.owner, limit=10, lease_seconds=60) == []
        # Slots in use count against new reservations; off and paused give none.
        assert sched.reserve(["one.test", "two.test"]) is not None
        assert sched.reserve(["four.test"]) is None
        settings.disabled = True
        sched._reserved.clear()
        assert sched.reserve(["one.test"]) is None
        settings.disabled = False
        sched._paused_cache = (sched._paused_cache[0], True)
        assert sched.reserve(["one.test"]) is None
    finally:
        release.set()
        await sched.stop(1.0)
        await spool.close()


async def test_a_busy_domain_backlog_is_not_rescanned_on_every_wake(tmp_path: Path) -> None:
    """While the only due domain is at domain_concurrency_max, each wake-up
    (here: 20 accepts) must not run a claim that scans the whole backlog."""
    spool = await Spool.open(tmp_path / "q")
    settings = Settings(concurrency_max=10, domain_concurrency_max=1)
    release = asyncio.Event()
    delivered: list[Claim] = []

    async def deliver(claim: Claim) -> None:
        delivered.append(claim)
        await release.wait()

    sched = Scheduler(spool, lambda: settings, deliver, owner=lease_owner_id(), log=Log(),
                      poll_interval=0.5)  # fmt: skip
    claims = 0
    real_claim = spool.claim

    async def counting_claim(*args: object, **kwargs: object) -> list[Claim]:
        nonlocal claims
        claims += 1
        return await real_claim(*args, **kwargs)  # type: ignore[arg-type]

    spool.claim = counting_claim  # type: ignore[method-assign]
    runner = asyncio.create_task(sched.run())
    try:
        for i in range(20):
            await spool.accept(NewMessage("a@x.test", [NewRecipient(f"r{i}@busy.test")], b"x\r\n"))
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        assert len(delivered) == 1  # the domain's one slot
        assert claims <= 4, claims  # not one per wake-up
        release.set()  # slots free again: the backlog drains
        for _ in range(100):
            if len(delivered) == 20:
                break
            await asyncio.sleep(0.05)
        assert len(delivered) == 20
    finally:
        release.set()
        await sched.stop(1.0)
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        await spool.close()


class Held:
    """Deliveries that end only when the test says so, in the order they started."""

    def __init__(self) -> None:
        self.started: list[asyncio.Event] = []

    async def deliver(self, claim: Claim) -> None:
        done = asyncio.Event()
        self.started.append(done)
        await done.wait()

    async def wait_started(self, count: int, seconds: float = 5.0) -> None:
        for _ in range(int(seconds / 0.01)):
            if len(self.started) >= count:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"{len(self.started)} deliveries started, not {count}")


@contextlib.asynccontextmanager
async def drain_one_domain(tmp_path: Path, gather: float) -> AsyncIterator[Held]:
    """20 due messages in one domain, domain_concurrency_max 8, and the scheduler
    running with its first 8 deliveries started; every delivery released, the
    scheduler stopped and the spool closed on the way out."""
    spool = await Spool.open(tmp_path / "q")
    spool.claim_gather = gather
    for i in range(20):
        await spool.accept(NewMessage("a@x.test", [NewRecipient(f"r{i}@one.test")], b"x\r\n"))
    settings = Settings(concurrency_max=100, domain_concurrency_max=8)
    held = Held()
    sched = Scheduler(spool, lambda: settings, held.deliver, owner=lease_owner_id(), log=Log())
    runner = asyncio.create_task(sched.run())
    try:
        await held.wait_started(8)
        yield held
    finally:
        for done in held.started:
            done.set()
        await sched.stop(1.0)
        await asyncio.gather(runner, return_exceptions=True)
        await spool.close()


@pytest.mark.parametrize("gather", [0.0, 30.0])
async def test_after_a_short_claim_the_next_waits_for_a_quarter_of_a_domains_slots(
    tmp_path: Path, gather: float
) -> None:
    """With ``spool.claim_gather`` (PostgreSQL: a claim is a server call), a claim
    that took less than it had room for makes the next one wait until a quarter
    of domain_concurrency_max's slots (8 // 4 = 2) is free; without it (SQLite)
    every delivery that ends is replaced at once."""
    async with drain_one_domain(tmp_path, gather) as held:
        held.started[0].set()
        await held.wait_started(9)  # one slot free: a claim of one, short
        held.started[1].set()
        await asyncio.sleep(0.2)
        assert len(held.started) == (9 if gather else 10)
        held.started[2].set()
        await held.wait_started(11)  # two ended since the short claim: both refilled
        await asyncio.sleep(0.1)
        assert len(held.started) == 11


async def test_a_gathering_claim_waits_no_longer_than_claim_gather(tmp_path: Path) -> None:
    """One slot freed after a short claim is refilled once ``claim_gather`` has
    passed, even if no other delivery ends."""
    async with drain_one_domain(tmp_path, 0.5) as held:
        held.started[0].set()
        await held.wait_started(9)
        held.started[1].set()
        await asyncio.sleep(0.15)
        assert len(held.started) == 9
        await held.wait_started(10, seconds=2.0)
