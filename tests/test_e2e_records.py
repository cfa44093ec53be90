"""End to end: what the next hop, the DSN and the record say.

The real outboundd, a loopback DNS server and scripted MX hosts (the world
of tests/test_e2e_delivery.py).  ORCPT is submitted the way Postfix and a
RFC 6533 client send it, and checked at the MX and in the DSN (parsed with
the standard library's email package); failures of one message end in one
DSN; a body lost while running ends its recipients at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import signal
from email.message import EmailMessage

import aiosmtplib
import pytest
from flufl.bounce import all_failures

from tests.harness import Daemon, running, submit
from tests.mxserver import MXScript
from tests.test_e2e_delivery import SENDER, World, world

__all__ = ["world"]  # the fixture is used by name below

BODY = b"From: <alice@sender.test>\r\nTo: <j@dest.test>\r\nSubject: orcpt\r\n\r\nHello.\r\n"


async def submit_with(
    port: int,
    sender: str,
    recipients: list[tuple[str, list[str]]],
    *,
    mail_options: list[str] | None = None,
) -> str:
    """One message with RCPT parameters, over loopback; its queue ID."""
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=10, start_tls=False)
    await client.connect()
    try:
        await client.ehlo(hostname="client.test")
        encoding = "utf-8" if mail_options and "SMTPUTF8" in mail_options else "ascii"
        await client.mail(sender, options=mail_options or [], encoding=encoding)
        for rcpt, options in recipients:
            reply = await client.rcpt(rcpt, options=options, encoding=encoding)
            assert reply.code == 250, reply
        response = await client.data(BODY)
    finally:
        with contextlib.suppress(Exception):
            await client.quit()
    assert response.code == 250, response
    return response.message.rsplit(" ", 1)[-1]


def status_groups(raw: bytes) -> list[dict[str, str]]:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage) and msg.get_content_type() == "multipart/report"
    [part] = [p for p in msg.walk() if p.get_content_type() == "message/delivery-status"]
    groups = part.get_payload()
    assert isinstance(groups, list)
    return [{k: str(v) for k, v in g.items()} for g in groups[1:]]


ORCPTS = [
    ("jane@dest.test", ["ORCPT=rfc822;j+C3+A4nedoe@dest.test"]),
    ("juergen@dest.test", ["ORCPT=utf-8;j\\x{FC}rgen@dest.test"]),
]


async def test_orcpt_round_trips_to_a_hop_without_smtputf8(world: World) -> None:
    world.mx1.script = MXScript(dsn=True)
    async with running(world.config()) as d:
        qid = await submit_with(d.smtp_port, SENDER, ORCPTS)
        await d.wait_for_status(qid, "delivered", count=2)
        stored = dict(d.query("SELECT recipient, orcpt FROM recipients WHERE queue_id = ?", (qid,)))
        assert stored == {
            "jane@dest.test": "rfc822;jänedoe@dest.test",
            "juergen@dest.test": "utf-8;jürgen@dest.test",
        }
    [txn] = world.mx1.transactions
    assert "ORCPT=rfc822;j+C3+A4nedoe@dest.test" in txn.rcpt_params["jane@dest.test"]
    assert "ORCPT=utf-8;j\\x{FC}rgen@dest.test" in txn.rcpt_params["juergen@dest.test"]


async def test_orcpt_goes_as_unitext_to_a_hop_with_smtputf8(world: World) -> None:
    world.mx1.script = MXScript(dsn=True, smtputf8=True)
    async with running(world.config()) as d:
        qid = await submit_with(d.smtp_port, "jörg@sender.test", ORCPTS, mail_options=["SMTPUTF8"])
        await d.wait_for_status(qid, "delivered", count=2)
    [txn] = world.mx1.transactions
    assert "SMTPUTF8" in txn.mail_params
    assert "ORCPT=rfc822;j+C3+A4nedoe@dest.test" in txn.rcpt_params["jane@dest.test"]
    assert "ORCPT=utf-8;jürgen@dest.test" in txn.rcpt_params["juergen@dest.test"]


async def wait_for_dsn(d: Daemon, world: World, qid: str) -> bytes:
    [(dsn_qid,)] = d.query(
        "SELECT DISTINCT dsn_queue_id FROM recipients WHERE queue_id = ? AND status = 'bounced'",
        (qid,),
    )
    assert dsn_qid
    await d.wait_for_status(dsn_qid, "delivered")
    for _ in range(100):
        if world.sender_mx.transactions:
            break
        await asyncio.sleep(0.05)
    [txn] = world.sender_mx.transactions
    return txn.body


async def test_orcpt_in_the_dsn_is_the_original_address(world: World) -> None:
    world.mx1.script = MXScript(rcpt_default="550 5.1.1 no such user")
    async with running(world.config()) as d:
        qid = await submit_with(d.smtp_port, SENDER, ORCPTS)
        await d.wait_for_status(qid, "bounced", count=2)
        raw = await wait_for_dsn(d, world, qid)
    groups = {g["Final-Recipient"]: g for g in status_groups(raw)}
    assert groups["rfc822; jane@dest.test"]["Original-Recipient"] == (
        "utf-8; j\\x{E4}nedoe@dest.test"
    )
    assert groups["rfc822; juergen@dest.test"]["Original-Recipient"] == (
        "utf-8; j\\x{FC}rgen@dest.test"
    )
    assert b"\xc3\x83" not in raw and b"+C3" not in raw  # no double encoding anywhere


@pytest.mark.parametrize("processes", [0, 1])
async def test_one_dsn_for_two_domains_refused_at_once(world: World, processes: int) -> None:
    """0: the accepting process delivers its own mail; 1: a delivery process claims it."""
    world.dns.zones["other.test"] = {"MX": [(10, "mx.dest.test")]}
    world.mx1.script = MXScript(rcpt_default="550 5.1.1 no such user")
    async with running(world.config(delivery_processes=processes)) as d:
        qid = await submit(d.smtp_port, SENDER, ["bob@dest.test", "erin@other.test"])
        await d.wait_for_status(qid, "bounced", count=2)
        assert d.query("SELECT count(*) FROM messages WHERE dsn_of = ?", (qid,)) == [(1,)]
        raw = await wait_for_dsn(d, world, qid)
    groups = status_groups(raw)
    assert sorted(g["Final-Recipient"] for g in groups) == [
        "rfc822; bob@dest.test",
        "rfc822; erin@other.test",
    ]
    assert {g["Diagnostic-Code"] for g in groups} == {"smtp; 550 5.1.1 no such user"}
    # A bounce processor (flufl.bounce, Mailman's) reads both as permanent failures.
    message = email.message_from_bytes(raw, policy=email.policy.compat32)
    assert all_failures(message) == (frozenset(), {b"bob@dest.test", b"erin@other.test"})


async def test_a_body_deleted_while_running_is_dropped_at_the_next_attempt(world: World) -> None:
    world.mx1.script = MXScript(rcpt_default="451 4.7.1 greylisted")
    async with running(world.config(temp_fail_intervals="1h")) as d:
        qid = await submit(d.smtp_port, SENDER, ["bob@dest.test"])
        await d.wait_for_status(qid, "deferred")
        d.lose_body(qid)
        world.mx1.script = MXScript()
        d.signal(signal.SIGHUP)  # due now: the next attempt finds no body
        await d.wait_for_status(qid, "dropped")
        assert d.query(
            "SELECT last_code, last_status, last_response FROM deliveries WHERE queue_id = ?",
            (qid,),
        ) == [(None, "5.3.0", "message body file missing from the spool; cannot deliver")]
        await d.wait_for(r"message body file is gone")
        assert d.query("SELECT count(*) FROM messages WHERE dsn_of = ?", (qid,)) == [(0,)]
    assert world.mx1.transactions == []
    assert not any("cannot queue the DSN" in line for line in d.lines)
