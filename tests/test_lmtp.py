"""LMTP through the engine: every recipient gets its own reply, and only its own.

A ``get_mx`` plugin routes ``box.test`` to ``lmtp://`` scripted servers
(RFC 2033: LHLO, one reply per accepted recipient after the final dot).
Each scripted reply names its recipient, so a reply attributed to the
wrong recipient shows in the ``deliveries`` view.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from outboundd.hooks import MX, HookResult, ok
from outboundd.spool import NewRecipient
from tests.delivery_rig import Rig, delivery_rig
from tests.dnsserver import DNSServer
from tests.mxserver import DROP, MXScript, MXServer, mx_server


@dataclass
class World:
    rig: Rig
    lmtp: MXServer  # 127.0.0.4
    spare: MXServer  # 127.0.0.5, also LMTP: the second route
    sender_mx: MXServer  # 127.0.0.3: where DSNs go


@contextlib.asynccontextmanager
async def world(dns: DNSServer, tmp: Path, script: MXScript) -> AsyncIterator[World]:
    dns.zones.update(
        {"sender.test": {"MX": [(10, "mx.sender.test")]}, "mx.sender.test": {"A": ["127.0.0.3"]}}
    )
    async with contextlib.AsyncExitStack() as stack:
        lmtp = await stack.enter_async_context(mx_server(script, host="127.0.0.4"))
        spare = await stack.enter_async_context(mx_server(MXScript(lmtp=True), host="127.0.0.5"))
        sender_mx = await stack.enter_async_context(mx_server(MXScript(), host="127.0.0.3"))
        rig = await stack.enter_async_context(delivery_rig(tmp, dns, mx_port=sender_mx.port))

        async def get_mx(hmail: Any, domain: str) -> HookResult | None:
            if domain != "box.test":
                return None
            # The string form has priority 0; the spare is the lower-preference route.
            spare_mx = MX("127.0.0.5", port=spare.port, priority=10, using_lmtp=True)
            return ok([f"lmtp://127.0.0.4:{lmtp.port}", spare_mx])

        rig.hooks.add("mailstore", "get_mx", get_mx)
        yield World(rig, lmtp, spare, sender_mx)


async def test_each_reply_after_the_dot_settles_its_own_recipient(
    dns_server: DNSServer, tmp_path: Path
) -> None:
    script = MXScript(
        lmtp=True,
        rcpt={"carol@box.test": "550 5.1.1 carol: no such mailbox"},
        lmtp_replies={
            "amy@box.test": "250 2.0.0 amy: stored",
            "bob@box.test": "452 4.2.2 bob: over quota",
            "dan@box.test": "554 5.6.0 dan: content refused",
            "eve@box.test": "250 2.0.0 eve: stored",
        },
    )
    async with world(dns_server, tmp_path, script) as w:
        names = ["amy", "bob", "carol", "dan", "eve"]
        qid = await w.rig.send(*(f"{n}@box.test" for n in names))
        await w.rig.run_once()
        rows = w.rig.deliveries(qid)
        expected = {
            "amy": ("delivered", 250, "2.0.0"),
            "bob": ("deferred", 452, "4.2.2"),
            "carol": ("bounced", 550, "5.1.1"),
            "dan": ("bounced", 554, "5.6.0"),
            "eve": ("delivered", 250, "2.0.0"),
        }
        for name, (status, code, enhanced) in expected.items():
            row = rows[f"{name}@box.test"]
            assert row[:3] == (status, code, enhanced), (name, row)
            assert row[3].startswith(f"{name}:"), (name, row)  # its own reply, nobody else's
        # One DSN for the two that failed for good, naming only them.
        await w.rig.run_once()
        [dsn_txn] = w.sender_mx.transactions
        final = re.findall(rb"(?im)^Final-Recipient: *rfc822; *(\S+)", dsn_txn.body)
        assert sorted(final) == [b"carol@box.test", b"dan@box.test"]
    [txn] = w.lmtp.transactions
    assert txn.rcpt_tos == ["amy@box.test", "bob@box.test", "dan@box.test", "eve@box.test"]
    assert w.lmtp.commands[0] == "LHLO" and "EHLO" not in w.lmtp.commands
    assert w.spare.connections == 0


async def test_a_dropped_connection_after_some_replies_keeps_what_was_answered(
    dns_server: DNSServer, tmp_path: Path
) -> None:
    """amy's reply came before the drop: delivered.  bob and carol may have been
    stored: deferred, and not given to the second route at once (no duplicate)."""
    script = MXScript(lmtp=True, lmtp_replies={"bob@box.test": DROP})
    async with world(dns_server, tmp_path, script) as w:
        qid = await w.rig.send("amy@box.test", "bob@box.test", "carol@box.test")
        await w.rig.run_once()
        rows = w.rig.deliveries(qid)
        assert rows["amy@box.test"][0] == "delivered"
        assert rows["bob@box.test"][0] == rows["carol@box.test"][0] == "deferred"
    assert w.spare.connections == 0 and w.spare.transactions == []


async def test_recipients_refused_at_rcpt_go_to_no_one_and_the_rest_are_delivered_once(
    dns_server: DNSServer, tmp_path: Path
) -> None:
    """Over LMTP the replies after the dot are for the *accepted* recipients only:
    with the first two refused, the single reply belongs to the third."""
    script = MXScript(
        lmtp=True,
        rcpt={"amy@box.test": "550 5.1.1 amy: unknown", "bob@box.test": "450 4.2.1 bob: busy"},
        lmtp_replies={"carol@box.test": "250 2.0.0 carol: stored"},
    )
    async with world(dns_server, tmp_path, script) as w:
        qid = await w.rig.send("amy@box.test", "bob@box.test", "carol@box.test")
        await w.rig.run_once()
        rows = w.rig.deliveries(qid)
        assert rows["amy@box.test"][:3] == ("bounced", 550, "5.1.1")
        assert rows["bob@box.test"][:3] == ("deferred", 450, "4.2.1")
        assert rows["carol@box.test"][:4] == ("delivered", 250, "2.0.0", "carol: stored")
    assert [t.rcpt_tos for t in w.lmtp.transactions] == [["carol@box.test"]]


async def test_success_notice_over_lmtp_says_delivered(
    dns_server: DNSServer, tmp_path: Path
) -> None:
    """LMTP is final delivery (RFC 3464 §2.3.3): NOTIFY=SUCCESS gets Action: delivered."""
    async with world(dns_server, tmp_path, MXScript(lmtp=True)) as w:
        await w.rig.send(NewRecipient("amy@box.test", notify="SUCCESS"))
        await w.rig.run_once()
        await w.rig.run_once()
        [notice] = w.sender_mx.transactions
    assert b"Action: delivered" in notice.body and b"amy@box.test" in notice.body
