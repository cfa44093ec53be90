"""FailureRounds: the claims of one message share one failure DSN.

The sender here stands in for ``queue_failure_notice`` and records what it
was asked to send; the engine tests (tests/test_engine_records.py) run the
same path against the real spool and MX hosts.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Iterator, Sequence

import pytest

from outboundd import dsn, log
from outboundd.delivery.notices import NoticeOutcome, NoticeRecipient
from outboundd.delivery.rounds import FailureRounds
from outboundd.log import Level
from outboundd.spool import SpoolError


def failed(address: str) -> NoticeRecipient:
    report = dsn.DsnRecipient(address=address, action="failed", status="5.1.1")
    return NoticeRecipient(report=report, notify=None)


class Sender:
    def __init__(self, error: Exception | None = None) -> None:
        self.sent: list[list[str]] = []
        self.error = error

    async def __call__(self, rcpts: Sequence[NoticeRecipient], reason: str) -> NoticeOutcome:
        await asyncio.sleep(0)
        if self.error is not None:
            raise self.error
        addresses = [r.report.address for r in rcpts]
        self.sent.append(addresses)
        return NoticeOutcome(f"DSN{len(self.sent)}", tuple(addresses), reason, False)


async def test_the_last_claim_to_conclude_sends_one_dsn_for_all() -> None:
    rounds, send = FailureRounds(), Sender()
    a, b, c = rounds.enter("Q"), rounds.enter("Q"), rounds.enter("Q")
    first = asyncio.create_task(rounds.report(a, [failed("a@x.test")], "550", send))
    second = asyncio.create_task(rounds.report(b, [failed("b@y.test")], "550", send))
    await asyncio.sleep(0.01)
    assert not first.done() and not second.done() and send.sent == []  # c still running
    await rounds.leave(c)  # c delivered: the round is over
    assert (await first).dsn_queue_id == (await second).dsn_queue_id == "DSN1"
    assert send.sent == [["a@x.test", "b@y.test"]]
    assert len(rounds) == 0


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    """The log written to a string, in the default format, at INFO."""
    stream = io.StringIO()
    log.configure(Level.INFO, False, "default", stream)
    yield stream
    log.shutdown()
    log.configure(Level.INFO, False, "default", None)
    log.shutdown()


async def test_a_round_s_dsn_is_logged_once_whatever_the_claims(log_stream: io.StringIO) -> None:
    """Two domains' claims share one DSN: one "DSN queued" line, not one per claim."""
    rounds, send = FailureRounds(), Sender()
    a, b = rounds.enter("Q"), rounds.enter("Q")
    first = asyncio.create_task(rounds.report(a, [failed("a@x.test")], "550", send))
    await rounds.report(b, [failed("b@y.test"), failed("c@y.test")], "550", send)
    await first
    queued = [line for line in log_stream.getvalue().splitlines() if "DSN queued" in line]
    assert queued == ["[INFO] [Q] [delivery] DSN queued dsn=DSN1 recipients=3"]


async def test_rounds_of_different_messages_do_not_wait_for_each_other() -> None:
    rounds, send = FailureRounds(), Sender()
    busy = rounds.enter("OTHER")
    mine = rounds.enter("Q")
    outcome = await asyncio.wait_for(rounds.report(mine, [failed("a@x.test")], "550", send), 1)
    assert outcome.reported == ("a@x.test",)
    await rounds.leave(busy)
    await rounds.leave(busy)  # leaving twice is harmless
    assert len(rounds) == 0


async def test_a_dsn_that_cannot_be_queued_fails_every_waiting_claim() -> None:
    rounds, send = FailureRounds(), Sender(SpoolError("disk full"))
    a, b = rounds.enter("Q"), rounds.enter("Q")
    first = asyncio.create_task(rounds.report(a, [failed("a@x.test")], "550", send))
    await asyncio.sleep(0)
    with pytest.raises(SpoolError):
        await rounds.report(b, [failed("b@y.test")], "550", send)
    with pytest.raises(SpoolError):
        await first


async def test_a_cancelled_claim_is_left_out_of_the_round_s_dsn() -> None:
    rounds, send = FailureRounds(), Sender()
    a, b, c = rounds.enter("Q"), rounds.enter("Q"), rounds.enter("Q")
    gone = asyncio.create_task(rounds.report(a, [failed("a@x.test")], "550", send))
    await asyncio.sleep(0)
    gone.cancel()  # shutdown: its recipients are released, not recorded, so not reported
    with pytest.raises(asyncio.CancelledError):
        await gone
    kept = asyncio.create_task(rounds.report(b, [failed("b@y.test")], "550", send))
    await rounds.leave(c)
    assert (await kept).reported == ("b@y.test",)
    assert send.sent == [["b@y.test"]]


async def test_reporting_twice_is_a_bug_not_a_second_dsn() -> None:
    rounds, send = FailureRounds(), Sender()
    t = rounds.enter("Q")
    await rounds.report(t, [failed("a@x.test")], "550", send)
    with pytest.raises(RuntimeError):
        await rounds.report(t, [failed("a@x.test")], "550", send)
    assert send.sent == [["a@x.test"]]
