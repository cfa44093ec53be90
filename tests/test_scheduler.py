"""The scheduler's loop: it must sleep, not spin, when it has nothing to do."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

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
