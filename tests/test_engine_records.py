"""What the record and the DSN say: only what happened.

``attempts.code``/``deliveries.last_code`` hold a code a server sent, or
NULL; our own reasons are text with no code.  A DSN's Diagnostic-Code is the
server's reply line verbatim; Status may be ours.  Real spool, loopback DNS,
scripted MX hosts (the rig of tests/test_engine.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import sqlite3
from collections.abc import AsyncIterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from flufl.bounce import all_failures

from outboundd.hooks import MX, HookResult, ok
from outboundd.spool import NewMessage, NewRecipient
from tests.dnsserver import SERVFAIL, DNSServer
from tests.mxserver import MXScript, mx_server, refusing_address
from tests.test_engine import SENDER, Rig, make_rig, rig

__all__ = ["rig"]  # the fixture is used by name below


@pytest.fixture
async def once(dns_server: DNSServer, tmp_path: Path) -> AsyncIterator[Rig]:
    """A rig whose first temporary failure exhausts the schedule."""
    dns_server.zones.update(
        {
            "dest.test": {"MX": [(10, "mx.dest.test")]},
            "mx.dest.test": {"A": ["127.0.0.2"]},
            "other.test": {"MX": [(10, "mx.other.test")]},
            "mx.other.test": {"A": ["127.0.0.2"]},
            "sender.test": {"MX": [(10, "mx.sender.test")]},
            "mx.sender.test": {"A": ["127.0.0.3"]},
            "nullmx.test": {"MX": [(0, ".")]},
            "broken.test": SERVFAIL,
        }
    )
    async with contextlib.AsyncExitStack() as stack:
        mx = await stack.enter_async_context(mx_server(MXScript(), host="127.0.0.2"))
        smx = await stack.enter_async_context(mx_server(MXScript(), host="127.0.0.3", port=mx.port))
        r = await make_rig(tmp_path, dns_server, mx, smx, temp_fail_intervals="none")
        try:
            yield r
        finally:
            await r.engine.close()
            await r.spool.close()


def attempts(rig: Rig, qid: str) -> dict[str, tuple[Any, ...]]:
    con = sqlite3.connect(rig.spool.db_path)
    try:
        return {
            r[0]: r[1:]
            for r in con.execute(
                "SELECT recipient, outcome, code, status, response FROM attempts "
                "WHERE queue_id = ? ORDER BY attempt",
                (qid,),
            )
        }
    finally:
        con.close()


def delivery_status(raw: bytes) -> list[dict[str, str]]:
    """The per-recipient groups of a DSN, parsed by the standard library."""
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage) and msg.get_content_type() == "multipart/report"
    # The report's own part comes first (a returned DSN may hold another).
    part = next(p for p in msg.walk() if p.get_content_type() == "message/delivery-status")
    groups = part.get_payload()
    assert isinstance(groups, list)
    return [{k: str(v) for k, v in g.items()} for g in groups[1:]]


async def dsn_of(rig: Rig) -> bytes:
    """Deliver the queued DSN to the sender's MX and return it."""
    await rig.run_once()
    [txn] = rig.sender_mx.transactions
    assert txn.rcpt_tos == [SENDER]
    return txn.body


async def test_connection_refused_records_no_code(once: Rig) -> None:
    host, port = refusing_address()

    async def route(hmail: Any, domain: str) -> HookResult | None:
        return ok(MX(host, port=port)) if domain == "dest.test" else None

    once.hooks.add("router", "get_mx", route)
    qid = await once.send("a@dest.test")
    await once.run_once()
    status, code, last_status, response = once.rows(qid)["a@dest.test"]
    assert (status, code, last_status) == ("bounced", None, "5.4.1")
    assert "Connection refused" in response
    assert attempts(once, qid)["a@dest.test"][:3] == ("bounced", None, "5.4.1")
    [group] = delivery_status(await dsn_of(once))
    assert "Diagnostic-Code" not in group and "Remote-MTA" not in group
    assert group["Status"] == "5.4.1"


async def test_dns_servfail_records_no_code(once: Rig) -> None:
    qid = await once.send("a@broken.test")
    await once.run_once()
    status, code, last_status, response = once.rows(qid)["a@broken.test"]
    assert (status, code, last_status) == ("bounced", None, "5.4.3")
    assert response.startswith("DNS lookup for broken.test failed")


async def test_null_mx_records_no_code_and_the_dsn_gives_our_reason(once: Rig) -> None:
    qid = await once.send("a@nullmx.test")
    await once.run_once()
    assert once.rows(qid)["a@nullmx.test"] == (
        "bounced",
        None,
        "5.1.10",
        "null MX for nullmx.test: the domain does not accept mail (RFC 7505)",
    )
    raw = await dsn_of(once)
    [group] = delivery_status(raw)
    assert "Diagnostic-Code" not in group and group["Status"] == "5.1.10"
    assert "Reason: null MX for nullmx.test: the domain does not accept mail" in raw.decode()
    assert " 556 " not in raw.decode()


async def test_exhausted_keeps_the_remote_reply_and_only_the_status_is_ours(once: Rig) -> None:
    once.mx.script = MXScript(rcpt_default="451 4.7.1 greylisted, come back later")
    qid = await once.send("a@dest.test")
    await once.run_once()
    assert once.rows(qid)["a@dest.test"] == (
        "bounced",
        451,
        "5.7.1",
        "greylisted, come back later",
    )
    assert attempts(once, qid)["a@dest.test"] == (
        "bounced",
        451,
        "5.7.1",
        "greylisted, come back later",
    )
    raw = await dsn_of(once)
    [group] = delivery_status(raw)
    assert group["Status"] == "5.7.1"
    assert group["Diagnostic-Code"] == "smtp; 451 4.7.1 greylisted, come back later"
    assert "last reply" not in raw.decode() and " 554 " not in raw.decode()
    assert "Reason: gave up after 1 attempt" in raw.decode()
    # A bounce processor reads it as a permanent failure of the recipient.
    message = email.message_from_bytes(raw, policy=email.policy.compat32)
    assert all_failures(message) == (frozenset(), {b"a@dest.test"})


async def test_exhausted_452_stays_452(once: Rig) -> None:
    once.mx.script = MXScript(rcpt_default="452 mailbox full")
    qid = await once.send("a@dest.test")
    await once.run_once()
    assert once.rows(qid)["a@dest.test"][:3] == ("bounced", 452, "5.0.0")
    [group] = delivery_status(await dsn_of(once))
    assert group["Diagnostic-Code"] == "smtp; 452 mailbox full"


async def test_diagnostic_code_without_enhanced_status_is_verbatim(once: Rig) -> None:
    once.mx.script = MXScript(rcpt_default="550 mailbox unavailable")
    qid = await once.send("a@dest.test")
    await once.run_once()
    assert once.rows(qid)["a@dest.test"][:3] == ("bounced", 550, "5.0.0")
    [group] = delivery_status(await dsn_of(once))
    assert group["Diagnostic-Code"] == "smtp; 550 mailbox unavailable"
    assert group["Status"] == "5.0.0"
    assert group["Remote-MTA"] == "dns; mx.dest.test"


async def test_a_refused_greeting_records_the_code_the_server_sent(once: Rig) -> None:
    once.mx.script = MXScript(banner="554 5.7.1 no thanks")
    qid = await once.send("a@dest.test")
    await once.run_once()
    outcome, code, status, response = attempts(once, qid)["a@dest.test"]
    assert (outcome, code, status, response) == ("bounced", 554, "5.7.1", "no thanks")


# ---------------------------------------------------------------- every final row says why


async def test_a_body_lost_while_running_drops_the_whole_message_at_once(once: Rig) -> None:
    qid = await once.send("a@dest.test", "b@other.test", "c@dest.test")
    once.spool.body_path(qid).unlink()
    await once.run_once()
    view = once.rows(qid)
    reason = "message body file missing from the spool; cannot deliver"
    assert view == {
        "a@dest.test": ("dropped", None, "5.3.0", reason),
        "b@other.test": ("dropped", None, "5.3.0", reason),
        "c@dest.test": ("dropped", None, "5.3.0", reason),
    }
    assert {a[0] for a in attempts(once, qid).values()} == {"dropped"}
    assert await once.run_once() == 0  # no retry, no DSN
    con = sqlite3.connect(once.spool.db_path)
    try:
        assert con.execute("SELECT count(*) FROM messages WHERE dsn_of = ?", (qid,)).fetchone() == (
            0,
        )
        [(finished,)] = con.execute("SELECT finished_at FROM messages WHERE queue_id = ?", (qid,))
        assert finished is not None
    finally:
        con.close()


async def test_a_body_lost_before_its_dsn_is_dropped_not_retried_forever(once: Rig) -> None:
    # A null MX bounces without a session: the first read of the body is the DSN's.
    qid = await once.send("a@nullmx.test")
    once.spool.body_path(qid).unlink()
    await once.run_once()
    status, code, last_status, response = once.rows(qid)["a@nullmx.test"]
    assert (status, code, last_status) == ("dropped", None, "5.3.0")
    assert response == "message body file missing from the spool; cannot deliver"
    assert await once.run_once() == 0  # nothing left to retry, no DSN queued


async def test_a_deferred_hook_drop_shows_the_plugin_in_the_view(rig: Rig) -> None:
    async def on_deferred(hmail: Any, info: dict[str, Any]) -> HookResult:
        return ok()

    rig.hooks.add("janitor", "deferred", on_deferred)
    rig.mx.script = MXScript(rcpt_default="451 4.7.1 greylisted")
    qid = await rig.send("a@dest.test")
    await rig.run_once()
    reason = "dropped by plugin janitor in the deferred hook"
    assert rig.rows(qid)["a@dest.test"] == ("dropped", None, "5.0.0", reason)
    # The attempt row keeps what the server really answered.
    assert attempts(rig, qid)["a@dest.test"] == ("dropped", 451, "4.7.1", "greylisted")


# ---------------------------------------------------------------- one DSN per message per round


async def test_failures_in_two_domains_that_end_together_make_one_dsn(once: Rig) -> None:
    once.mx.script = MXScript(rcpt_default="550 5.1.1 no such user")
    qid = await once.send("bob@dest.test", "erin@other.test")
    claims = await once.spool.claim(once.owner, limit=10, lease_seconds=60)
    assert sorted(c.domain for c in claims) == ["dest.test", "other.test"]
    # The scheduler runs claims side by side; so does this test.
    await asyncio.gather(*(once.engine.deliver(c) for c in claims))
    assert len(once.engine.rounds) == 0  # nothing left waiting
    con = sqlite3.connect(once.spool.db_path)
    try:
        links = dict(
            con.execute("SELECT recipient, dsn_queue_id FROM recipients WHERE queue_id = ?", (qid,))
        )
        [(dsns,)] = con.execute("SELECT count(*) FROM messages WHERE dsn_of = ?", (qid,))
    finally:
        con.close()
    assert dsns == 1 and links["bob@dest.test"] == links["erin@other.test"] is not None
    groups = delivery_status(await dsn_of(once))
    assert sorted(g["Final-Recipient"] for g in groups) == [
        "rfc822; bob@dest.test",
        "rfc822; erin@other.test",
    ]


async def test_a_failure_waits_for_the_message_s_slower_claim(
    once: Rig, dns_server: DNSServer
) -> None:
    dns_server.zones["slow.test"] = {"MX": [(10, "mx.slow.test")]}
    dns_server.zones["mx.slow.test"] = {"A": ["127.0.0.4"]}
    script = MXScript(rcpt_default="550 5.1.1 gone too", delays={"rcpt": 0.5})
    async with mx_server(script, host="127.0.0.4", port=once.mx.port):
        once.mx.script = MXScript(rcpt={"bob@dest.test": "550 5.1.1 no such user"})
        qid = await once.send("bob@dest.test", "carol@dest.test", "slow@slow.test")
        claims = await once.spool.claim(once.owner, limit=10, lease_seconds=60)
        await asyncio.gather(*(once.engine.deliver(c) for c in claims))
    view = once.rows(qid)
    assert view["carol@dest.test"][0] == "delivered"
    assert view["bob@dest.test"][0] == view["slow@slow.test"][0] == "bounced"
    groups = delivery_status(await dsn_of(once))
    assert sorted(g["Final-Recipient"] for g in groups) == [
        "rfc822; bob@dest.test",
        "rfc822; slow@slow.test",
    ]
    assert {g["Diagnostic-Code"] for g in groups} == {
        "smtp; 550 5.1.1 no such user",
        "smtp; 550 5.1.1 gone too",
    }


async def test_claims_one_after_the_other_are_separate_rounds(once: Rig) -> None:
    once.mx.script = MXScript(rcpt_default="550 5.1.1 no such user")
    qid = await once.send("bob@dest.test", "erin@other.test")
    await once.run_once()  # one claim after the other: nothing to wait for
    con = sqlite3.connect(once.spool.db_path)
    try:
        [(dsns,)] = con.execute("SELECT count(*) FROM messages WHERE dsn_of = ?", (qid,))
    finally:
        con.close()
    assert dsns == 2 and len(once.engine.rounds) == 0


# ---------------------------------------------------------------- a DSN that needs SMTPUTF8


@pytest.mark.parametrize("copy_to", [None, "postmaster@sender.test"])
async def test_a_dsn_to_a_utf8_sender_whose_mx_lacks_smtputf8(
    dns_server: DNSServer, tmp_path: Path, copy_to: str | None
) -> None:
    """The DSN to ``jörg@sender.test`` needs SMTPUTF8 (its To: is the
    sender's address, which no downgrade can make ASCII, RFC 6531 §3.2).
    The sender's MX does not offer it: the DSN bounces ``5.6.7`` with the
    reason recorded, and, being a double bounce, is copied to
    ``double_bounce_recipient`` when set (the copy is ASCII-addressed and
    goes through) or dropped with the reason — never lost in silence."""
    dns_server.zones.update(
        {
            "dest.test": {"MX": [(10, "mx.dest.test")]},
            "mx.dest.test": {"A": ["127.0.0.2"]},
            "sender.test": {"MX": [(10, "mx.sender.test")]},
            "mx.sender.test": {"A": ["127.0.0.3"]},
        }
    )
    refusing = MXScript(smtputf8=True, rcpt_default="550 5.1.1 no such user")
    async with contextlib.AsyncExitStack() as stack:
        mx = await stack.enter_async_context(mx_server(refusing, host="127.0.0.2"))
        smx = await stack.enter_async_context(
            mx_server(MXScript(smtputf8=False), host="127.0.0.3", port=mx.port)
        )
        extra = {"double_bounce_recipient": copy_to} if copy_to else {}
        r = await make_rig(tmp_path, dns_server, mx, smx, **extra)
        try:
            qid = await r.send("bob@dest.test", sender="jörg@sender.test", smtputf8=True)
            await r.run_once()
            con = sqlite3.connect(r.spool.db_path)
            [(dsn_qid, smtputf8)] = con.execute(
                "SELECT queue_id, smtputf8 FROM messages WHERE dsn_of = ?", (qid,)
            ).fetchall()
            con.close()
            assert smtputf8 == 1
            await r.run_once()  # the DSN meets the sender's MX
            status, code, last_status, response = r.rows(dsn_qid)["jörg@sender.test"]
            assert (status, code, last_status) == ("bounced", None, "5.6.7")
            assert "does not offer it" in response
            await r.run_once()  # the double-bounce copy, if any
            assert await r.run_once() == 0  # nothing loops
            if copy_to is None:
                assert "dropped" in r.reason(dsn_qid, "jörg@sender.test")
                assert smx.transactions == []
            else:
                [copy] = smx.transactions
                assert copy.rcpt_tos == [copy_to] and copy.mail_from in ("", "<>")
                assert "SMTPUTF8" not in copy.mail_params
                groups = delivery_status(copy.body)
                assert groups[0]["Final-Recipient"] == "utf-8; j\\x{F6}rg@sender.test"
                assert groups[0]["Status"] == "5.6.7"
        finally:
            await r.engine.close()
            await r.spool.close()


async def test_a_dsn_queued_before_a_crash_is_not_sent_again(once: Rig) -> None:
    """The DSN links itself to its recipients in its own commit; when the
    record that follows is lost (a crash), the recipients are retried with
    that link in place, and their failure is not reported a second time."""
    once.mx.script = MXScript(rcpt_default="550 5.1.1 no such user")
    qid = await once.send("bob@dest.test")
    # What the engine commits first: the DSN, linked to bob ...
    earlier = await once.spool.accept(
        NewMessage("", [NewRecipient(SENDER)], b"Subject: DSN\r\n\r\nx\r\n", dsn_of=qid,
                   dsn_recipients=["bob@dest.test"])
    )  # fmt: skip
    # ... and then the process died before recording bob as bounced.
    await once.run_once()
    assert once.rows(qid)["bob@dest.test"][0] == "bounced"
    assert once.reason(qid, "bob@dest.test") == f"DSN {earlier} (queued earlier)"
    con = sqlite3.connect(once.spool.db_path)
    try:
        assert con.execute("SELECT queue_id FROM messages WHERE dsn_of = ?", (qid,)).fetchall() == [
            (earlier,)
        ]
    finally:
        con.close()
