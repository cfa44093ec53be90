"""The delivery engine on real parts: spool in tmp, loopback DNS, scripted MX, hooks.

Each test claims work from a real spool, runs ``DeliveryEngine.deliver`` and
reads the outcome back from the spool's SQL views.
"""

from __future__ import annotations

import contextlib
import email
import email.policy
import io
import sqlite3
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from outboundd import log
from outboundd.config import Config, load_config
from outboundd.daemon import OutboundSettings
from outboundd.delivery.engine import DeliveryEngine
from outboundd.hooks import MX, HookResult, HookRunner, delay, deny, denysoft, ok
from outboundd.spool import NewMessage, NewRecipient, Spool, lease_owner_id
from tests import certs
from tests.dnsserver import DNSServer
from tests.harness import write_config
from tests.mxserver import MXScript, MXServer, mx_server

SENDER = "alice@sender.test"
BODY = b"From: alice@sender.test\r\nSubject: engine\r\nMessage-ID: <m1@sender.test>\r\n\r\nhi\r\n"


@dataclass
class Rig:
    spool: Spool
    engine: DeliveryEngine
    hooks: HookRunner
    mx: MXServer
    sender_mx: MXServer
    config: Config
    owner: str
    skew: list[float]  # seconds the engine's clock runs ahead of the wall clock

    async def send(self, *rcpts: str, sender: str = SENDER, **kw: Any) -> str:
        recipients = [r if isinstance(r, NewRecipient) else NewRecipient(r) for r in rcpts]
        return await self.spool.accept(NewMessage(sender, recipients, BODY, **kw))

    async def run_once(self, now: float | None = None) -> int:
        """Claim everything due at ``now`` and deliver it (the engine's clock
        set to ``now`` too); how many groups ran."""
        self.skew[0] = 0.0 if now is None else now - time.time()
        claims = await self.spool.claim(self.owner, limit=50, lease_seconds=60, now=now)
        for claim in claims:
            await self.engine.deliver(claim)
        return len(claims)

    def rows(self, qid: str) -> dict[str, tuple[Any, ...]]:
        con = sqlite3.connect(self.spool.db_path)
        try:
            return {
                r[0]: r[1:]
                for r in con.execute(
                    "SELECT recipient, status, last_code, last_status, last_response "
                    "FROM deliveries WHERE queue_id = ?",
                    (qid,),
                )
            }
        finally:
            con.close()

    def reason(self, qid: str, rcpt: str) -> str:
        con = sqlite3.connect(self.spool.db_path)
        try:
            row = con.execute(
                "SELECT final_reason FROM recipients WHERE queue_id = ? AND recipient = ?",
                (qid, rcpt),
            ).fetchone()
            return str(row[0])
        finally:
            con.close()


async def make_rig(
    tmp_path: Path, dns: DNSServer, mx: MXServer, sender_mx: MXServer, **outbound: object
) -> Rig:
    config_dir = write_config(
        tmp_path / "config", dns_port=dns.port, mx_port=mx.port, outbound=outbound
    )
    config = load_config(config_dir)
    spool = await Spool.open(config.outbound.queue_dir)
    hooks = HookRunner([], timeout=1.0)
    owner = lease_owner_id()
    skew = [0.0]
    engine = DeliveryEngine(
        config, OutboundSettings(config), spool, hooks, owner=owner,
        clock=lambda: time.time() + skew[0],
    )  # fmt: skip
    return Rig(spool, engine, hooks, mx, sender_mx, config, owner, skew)


@pytest.fixture
async def rig(dns_server: DNSServer, tmp_path: Path) -> AsyncIterator[Rig]:
    dns_server.zones.update(
        {
            "dest.test": {"MX": [(10, "mx.dest.test")]},
            "mx.dest.test": {"A": ["127.0.0.2"]},
            "sender.test": {"MX": [(10, "mx.sender.test")]},
            "mx.sender.test": {"A": ["127.0.0.3"]},
        }
    )
    async with contextlib.AsyncExitStack() as stack:
        mx = await stack.enter_async_context(mx_server(MXScript(), host="127.0.0.2"))
        smx = await stack.enter_async_context(mx_server(MXScript(), host="127.0.0.3", port=mx.port))
        r = await make_rig(tmp_path, dns_server, mx, smx)
        try:
            yield r
        finally:
            await r.engine.close()
            await r.spool.close()


def parse(raw: bytes) -> email.message.EmailMessage:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, email.message.EmailMessage)
    return msg


# ---------------------------------------------------------------- plain SMTP


async def test_one_session_per_domain_group_and_rows(rig: Rig) -> None:
    qid = await rig.send("a@dest.test", "b@dest.test")
    assert await rig.run_once() == 1
    assert {k: v[0] for k, v in rig.rows(qid).items()} == {
        "a@dest.test": "delivered",
        "b@dest.test": "delivered",
    }
    assert rig.mx.connections == 1 and len(rig.mx.transactions) == 1


async def test_connection_is_reused_for_the_next_message(rig: Rig) -> None:
    for _ in range(3):
        await rig.send("a@dest.test")
        await rig.run_once()
    assert len(rig.mx.transactions) == 3
    assert rig.mx.connections == 1
    assert rig.engine.pool.reused == 2


async def test_bounce_dsn_is_one_message_for_all_failed_recipients(rig: Rig) -> None:
    rig.mx.script = MXScript(
        rcpt={"x@dest.test": "550 5.1.1 no such user x", "y@dest.test": "553 5.7.26 policy"}
    )
    qid = await rig.send("x@dest.test", "y@dest.test", "ok@dest.test")
    await rig.run_once()
    rows = rig.rows(qid)
    assert rows["x@dest.test"][:3] == ("bounced", 550, "5.1.1")
    assert rows["y@dest.test"][:3] == ("bounced", 553, "5.7.26")
    assert rows["ok@dest.test"][0] == "delivered"
    await rig.run_once()  # delivers the DSN to the sender's MX
    [dsn_txn] = rig.sender_mx.transactions
    assert dsn_txn.mail_from in ("", "<>") and dsn_txn.rcpt_tos == [SENDER]
    report = parse(dsn_txn.body)
    assert report.get_content_type() == "multipart/report"
    text = dsn_txn.body.decode()
    assert "Final-Recipient: rfc822; x@dest.test" in text
    assert "Final-Recipient: rfc822; y@dest.test" in text
    assert "Status: 5.7.26" in text
    assert "Diagnostic-Code: smtp; 550 5.1.1 no such user x" in text
    assert "ok@dest.test" not in text.split("Final-Recipient")[-1]


async def test_one_notice_line_per_recipient_in_order(rig: Rig) -> None:
    """Recipients sharing a reply share their formatting, never their line."""
    rig.mx.script = MXScript(rcpt={"x@dest.test": "550 5.1.1 no such user x"})
    out = io.StringIO()
    log.configure(log.Level.NOTICE, False, "default", out)
    try:
        qid = await rig.send("a@dest.test", "b@dest.test", "x@dest.test", "c@dest.test")
        await rig.run_once()
    finally:
        log.configure(log.Level.INFO, False, "default", None)
    notices = [ln for ln in out.getvalue().splitlines() if ln.startswith("[NOTICE]")]
    assert [ln.split(" rcpt=")[1].split()[0] for ln in notices] == [
        "a@dest.test",
        "b@dest.test",
        "x@dest.test",
        "c@dest.test",
    ]
    outcomes = [ln.split("] [delivery] ")[1].split()[0] for ln in notices]
    assert outcomes == ["delivered", "delivered", "bounced", "delivered"]
    assert all(f"[{qid}]" in ln and " domain=dest.test " in ln for ln in notices)
    assert 'response="550 5.1.1 no such user x"' in notices[2]
    assert notices[0].replace("a@dest.test", "c@dest.test") == notices[3]


async def test_null_sender_failure_is_a_double_bounce_dropped(rig: Rig) -> None:
    rig.mx.script = MXScript(rcpt_default="550 5.1.1 gone")
    qid = await rig.send("x@dest.test", sender="")
    await rig.run_once()
    assert rig.rows(qid)["x@dest.test"][0] == "bounced"
    assert "double bounce" in rig.reason(qid, "x@dest.test")
    assert await rig.run_once() == 0  # no DSN was queued


async def test_double_bounce_copied_when_configured(dns_server: DNSServer, tmp_path: Path) -> None:
    dns_server.zones.update(
        {"dest.test": {"MX": [(10, "mx.dest.test")]}, "mx.dest.test": {"A": ["127.0.0.2"]},
         "ops.test": {"MX": [(10, "mx.ops.test")]}, "mx.ops.test": {"A": ["127.0.0.3"]}}
    )  # fmt: skip
    async with contextlib.AsyncExitStack() as stack:
        mx = await stack.enter_async_context(
            mx_server(MXScript(rcpt={"x@dest.test": "550 5.1.1 gone"}), host="127.0.0.2")
        )
        ops = await stack.enter_async_context(mx_server(MXScript(), host="127.0.0.3", port=mx.port))
        r = await make_rig(
            tmp_path, dns_server, mx, ops, double_bounce_recipient="postmaster@ops.test"
        )
        try:
            qid = await r.send("x@dest.test", sender="")
            await r.run_once()
            await r.run_once()
            [copy] = ops.transactions
            assert copy.rcpt_tos == ["postmaster@ops.test"] and copy.mail_from in ("", "<>")
            assert "double bounce" in r.reason(qid, "x@dest.test")
            # the copy itself failing must not loop
            ops.script = MXScript(rcpt_default="550 5.1.1 no postmaster")
            qid2 = await r.send("x@dest.test", sender="")
            await r.run_once()
            await r.run_once()
            assert await r.run_once() == 0
            assert r.rows(qid2)["x@dest.test"][0] == "bounced"
        finally:
            await r.engine.close()
            await r.spool.close()


async def test_notify_never_and_ret_hdrs(rig: Rig) -> None:
    rig.mx.script = MXScript(rcpt_default="550 5.1.1 gone")
    await rig.send(NewRecipient("x@dest.test", notify="NEVER"))
    await rig.run_once()
    assert await rig.run_once() == 0  # no DSN
    await rig.send("y@dest.test", ret="HDRS", env_id="ENV-42")
    await rig.run_once()
    await rig.run_once()
    [dsn_txn] = rig.sender_mx.transactions
    text = dsn_txn.body.decode()
    assert "Original-Envelope-Id: ENV-42" in text
    assert "text/rfc822-headers" in text


async def test_success_notice_relayed_when_remote_lacks_dsn(rig: Rig) -> None:
    await rig.send(NewRecipient("a@dest.test", notify="SUCCESS", orcpt="rfc822;a@dest.test"))
    await rig.run_once()
    await rig.run_once()
    [notice] = rig.sender_mx.transactions
    text = notice.body.decode()
    assert "Action: relayed" in text and "Original-Recipient: rfc822; a@dest.test" in text


async def test_no_success_notice_when_remote_takes_the_dsn_request(rig: Rig) -> None:
    rig.mx.script = MXScript(dsn=True)
    await rig.send(NewRecipient("a@dest.test", notify="SUCCESS,FAILURE"))
    await rig.run_once()
    assert await rig.run_once() == 0
    [txn] = rig.mx.transactions
    assert "NOTIFY=SUCCESS,FAILURE" in txn.rcpt_params["a@dest.test"]


async def test_delay_notice_once_after_warning_time(dns_server: DNSServer, tmp_path: Path) -> None:
    dns_server.zones.update(
        {"dest.test": {"MX": [(10, "mx.dest.test")]}, "mx.dest.test": {"A": ["127.0.0.2"]},
         "sender.test": {"MX": [(10, "mx.sender.test")]}, "mx.sender.test": {"A": ["127.0.0.3"]}}
    )  # fmt: skip
    async with contextlib.AsyncExitStack() as stack:
        mx = await stack.enter_async_context(
            mx_server(MXScript(rcpt={"slow@dest.test": "451 4.2.1 try later"}), host="127.0.0.2")
        )
        smx = await stack.enter_async_context(mx_server(MXScript(), host="127.0.0.3", port=mx.port))
        r = await make_rig(
            tmp_path, dns_server, mx, smx, delay_warning_time=1, temp_fail_intervals="5s*5"
        )
        try:
            qid = await r.send("slow@dest.test")
            await r.run_once()  # too early for a warning
            assert r.rows(qid)["slow@dest.test"][0] == "deferred"
            later = time.time() + 10
            await r.run_once(now=later)  # second failure, past delay_warning_time
            await r.run_once(now=later)  # delivers the delay notice
            notices = [t for t in smx.transactions if t.mail_from in ("", "<>")]
            assert len(notices) == 1
            text = notices[0].body.decode()
            assert "Action: delayed" in text and "Will-Retry-Until:" in text
            await r.run_once(now=later + 10)  # third failure: no second notice
            await r.run_once(now=later + 10)
            assert len([t for t in smx.transactions if t.mail_from in ("", "<>")]) == 1
        finally:
            await r.engine.close()
            await r.spool.close()


# --------------------------------------------------------------------- hooks


async def test_send_email_delay_postpones_without_counting(rig: Rig) -> None:
    async def postpone(hmail: Any) -> HookResult:
        return delay(3600)

    rig.hooks.add("p", "send_email", postpone)
    qid = await rig.send("a@dest.test")
    await rig.run_once()
    con = sqlite3.connect(rig.spool.db_path)
    row = con.execute(
        "SELECT status, attempts, failures, next_attempt_at > ? FROM recipients WHERE queue_id=?",
        (time.time() + 3000, qid),
    ).fetchone()
    assert row == ("queued", 0, 0, 1)
    assert rig.mx.connections == 0


async def test_get_mx_plugin_routes_and_refuses(rig: Rig) -> None:
    async def route(hmail: Any, domain: str) -> HookResult | None:
        if domain == "routed.test":
            return ok(f"127.0.0.2:{rig.mx.port}")
        if domain == "denied.test":
            return deny("no route for you")
        if domain == "later.test":
            return denysoft("routing table reloading")
        if domain == "junk.test":
            return ok(42)
        return None

    rig.hooks.add("router", "get_mx", route)
    qid = await rig.send("a@routed.test", "b@denied.test", "c@later.test", "d@junk.test")
    await rig.run_once()
    rows = rig.rows(qid)
    assert rows["a@routed.test"][0] == "delivered"
    assert rows["b@denied.test"][:3] == ("bounced", None, "5.1.2")  # our decision: no code
    assert rows["c@later.test"][:3] == ("deferred", None, "4.1.2")
    assert rows["d@junk.test"][0] == "deferred"  # unusable plugin value: defer, never lose


async def test_lmtp_route_from_plugin(dns_server: DNSServer, tmp_path: Path) -> None:
    script = MXScript(lmtp=True, lmtp_replies={"b@box.test": "452 4.2.2 over quota"})
    async with contextlib.AsyncExitStack() as stack:
        lmtp = await stack.enter_async_context(mx_server(script, host="127.0.0.4"))
        other = await stack.enter_async_context(mx_server(MXScript(), host="127.0.0.5"))
        r = await make_rig(tmp_path, dns_server, lmtp, other)

        async def route(hmail: Any, domain: str) -> HookResult:
            return ok(MX("127.0.0.4", port=lmtp.port, using_lmtp=True))

        r.hooks.add("lmtp", "get_mx", route)
        try:
            qid = await r.send("a@box.test", "b@box.test")
            await r.run_once()
            rows = r.rows(qid)
            assert rows["a@box.test"][0] == "delivered"
            assert rows["b@box.test"][:3] == ("deferred", 452, "4.2.2")
        finally:
            await r.engine.close()
            await r.spool.close()


async def test_deferred_hook_overrides_delay_or_drops(rig: Rig) -> None:
    rig.mx.script = MXScript(rcpt_default="451 4.7.1 greylisted")
    seen: list[dict[str, Any]] = []

    async def on_deferred(hmail: Any, info: dict[str, Any]) -> HookResult:
        seen.append(info)
        if hmail.rcpt_to == ["drop@dest.test"]:
            return ok()
        return denysoft(7)

    rig.hooks.add("d", "deferred", on_deferred)
    q1 = await rig.send("keep@dest.test")
    q2 = await rig.send("drop@dest.test")
    await rig.run_once()
    assert rig.rows(q1)["keep@dest.test"][0] == "deferred"
    assert rig.rows(q2)["drop@dest.test"][0] == "dropped"
    assert "plugin d" in rig.reason(q2, "drop@dest.test")
    assert seen[0]["err"].startswith("451")
    con = sqlite3.connect(rig.spool.db_path)
    [(due,)] = con.execute(
        "SELECT next_attempt_at - last_attempt_at FROM recipients WHERE queue_id = ?", (q1,)
    ).fetchall()
    assert due == pytest.approx(7, abs=0.5)


async def test_bounce_hook_suppresses_dsn(rig: Rig) -> None:
    rig.mx.script = MXScript(rcpt_default="550 5.1.1 gone")

    async def quiet(hmail: Any, err: str) -> HookResult:
        assert "550" in err
        return ok()

    rig.hooks.add("quiet", "bounce", quiet)
    qid = await rig.send("x@dest.test")
    await rig.run_once()
    assert rig.rows(qid)["x@dest.test"][0] == "bounced"
    assert "suppressed by plugin quiet" in rig.reason(qid, "x@dest.test")
    assert await rig.run_once() == 0


async def test_delivered_hook_gets_the_facts(rig: Rig) -> None:
    infos: list[dict[str, Any]] = []

    async def delivered(hmail: Any, info: dict[str, Any]) -> None:
        infos.append(info)

    rig.hooks.add("acct", "delivered", delivered)
    await rig.send("a@dest.test")
    await rig.run_once()
    [info] = infos
    assert info["ip"] == "127.0.0.2" and info["mode"] == "SMTP"
    assert info["ok_recips"] == ["a@dest.test"] and info["secured"] is False
    assert info["response"].startswith("250")


async def test_raising_plugin_defers_without_counting(rig: Rig) -> None:
    async def broken(hmail: Any, domain: str) -> None:
        raise RuntimeError("database unreachable")

    rig.hooks.add("broken", "get_mx", broken)
    qid = await rig.send("a@dest.test")
    await rig.run_once()
    con = sqlite3.connect(rig.spool.db_path)
    row = con.execute(
        "SELECT status, failures, last_response FROM recipients WHERE queue_id = ?", (qid,)
    ).fetchone()
    assert row[0] == "deferred" and row[1] == 0
    assert "plugin broken failed" in row[2] and "database unreachable" in row[2]


@pytest.mark.parametrize("auth_reply", [None, "SILENT"])
async def test_attempt_row_keeps_tls_and_auth_after_a_refused_login(
    dns_server: DNSServer, tmp_path: Path, pki: certs.TestPKI, auth_reply: str | None
) -> None:
    """STARTTLS succeeded, then AUTH failed (535, or no answer): the attempt row still
    says the session was encrypted and which credentials were offered (item 19)."""
    script = MXScript(tls=pki, credentials={"relayuser": "right"}, auth=auth_reply)
    async with contextlib.AsyncExitStack() as stack:
        mx = await stack.enter_async_context(mx_server(script, host="127.0.0.4"))
        other = await stack.enter_async_context(mx_server(MXScript(), host="127.0.0.5"))
        r = await make_rig(tmp_path, dns_server, mx, other, auth_timeout=0.3)

        async def route(hmail: Any, domain: str) -> HookResult:
            return ok(MX("127.0.0.4", port=mx.port, auth_user="relayuser", auth_pass="wrong"))

        r.hooks.add("smarthost", "get_mx", route)
        try:
            qid = await r.send("a@far.test")
            await r.run_once()
            con = sqlite3.connect(r.spool.db_path)
            try:
                tls, auth, outcome, code, response = con.execute(
                    "SELECT tls, auth, outcome, code, response FROM attempts WHERE queue_id = ?",
                    (qid,),
                ).fetchone()
            finally:
                con.close()
        finally:
            await r.engine.close()
            await r.spool.close()
    assert outcome == "deferred"
    assert tls is not None and tls.startswith("TLS")
    assert auth == "PLAIN relayuser"
    if auth_reply is None:  # the server's own refusal, as sent (item 12)
        assert (code, response) == (535, "Authentication credentials invalid")
    else:  # no answer: no code, our reason
        assert code is None and "at auth" in response
    assert "MAIL" not in mx.commands
