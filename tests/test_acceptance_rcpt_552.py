"""Acceptance: a 552 to RCPT defers the recipient (RFC 5321 §4.5.3.1.10).

An MX answering ``RCPT`` with ``552`` (historically "too many recipients";
RFC 5321 says clients SHOULD treat it as temporary, and Postfix does) made
the recipient bounce at once.  It is now deferred, the record keeping the
server's 552 and text with a class-4 status, and delivered when the server
takes it later.
"""

from __future__ import annotations

import signal

from outboundd.delivery.replies import parse_reply, rcpt_refusal
from outboundd.spool.types import Outcome
from tests.harness import running, submit
from tests.mxserver import MXScript
from tests.test_e2e_delivery import SENDER, World, world

__all__ = ["world"]  # the fixture is used by name below


def test_552_at_rcpt_is_temporary_and_keeps_the_server_words() -> None:
    outcome, reply = rcpt_refusal(parse_reply(552, "5.2.2 mailbox over quota"))
    assert outcome is Outcome.DEFERRED
    assert (reply.recorded_code, reply.status, reply.line) == (
        552,
        "4.2.2",
        "552 5.2.2 mailbox over quota",
    )
    outcome, reply = rcpt_refusal(parse_reply(552, "too many recipients"))
    assert outcome is Outcome.DEFERRED and reply.status == "4.0.0"
    outcome, reply = rcpt_refusal(parse_reply(550, "5.1.1 no such user"))
    assert outcome is Outcome.BOUNCED and reply.status == "5.1.1"


async def test_a_recipient_refused_with_552_is_retried_and_delivered(world: World) -> None:
    world.mx1.script = MXScript(rcpt={"full@dest.test": "552 5.2.2 mailbox over quota"})
    async with running(world.config(temp_fail_intervals="1m")) as d:
        qid = await submit(d.smtp_port, SENDER, ["full@dest.test", "ok@dest.test"])
        await d.wait_for_status(qid, "delivered")
        await d.wait_for_status(qid, "deferred")
        [row] = d.query(
            "SELECT code, status, response, outcome FROM attempts WHERE recipient = ?",
            ("full@dest.test",),
        )
        assert row == (552, "4.2.2", "mailbox over quota", "deferred")
        world.mx1.script = MXScript()  # the mailbox has room again
        d.signal(signal.SIGHUP)  # flush: due now
        await d.wait_for_status(qid, "delivered", count=2)
    assert world.sender_mx.transactions == []  # no bounce was sent
    assert [t.rcpt_tos for t in world.mx1.transactions] == [["ok@dest.test"], ["full@dest.test"]]
