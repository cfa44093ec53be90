"""End to end: the real outboundd process, a loopback DNS server, scripted MX hosts.

Mail is submitted over SMTP to the daemon's listener, routed through DNS to
aiosmtpd servers on 127.0.0.2/127.0.0.3, and the outcome is read from the
spool's SQL views, exactly as an operator would.  Every test runs twice:
with the SQLite queue and with a PostgreSQL queue (``queue_url``, a fresh
database in the test session's cluster).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import certs
from tests.dnsserver import DNSServer
from tests.harness import Daemon, free_port, running, submit, write_config
from tests.mxserver import MXScript, MXServer, mx_server

SENDER = "alice@sender.test"


@dataclass
class World:
    dns: DNSServer
    mx1: MXServer  # 127.0.0.2, mx.dest.test (preference 10)
    sender_mx: MXServer  # 127.0.0.3, mx.sender.test: where bounces go
    mx_port: int
    tmp: Path
    queue_url: str | None  # None: SQLite; else the PostgreSQL queue (run against both)

    def config(self, smtp: dict[str, object] | None = None, **outbound: object) -> Path:
        if self.queue_url:
            outbound.setdefault("queue_url", self.queue_url)
        return write_config(self.tmp / "config", dns_port=self.dns.port, mx_port=self.mx_port,
                            outbound=outbound, smtp=smtp)  # fmt: skip


@pytest.fixture
async def world(
    dns_server: DNSServer, tmp_path: Path, queue_url: str | None
) -> AsyncIterator[World]:
    dns_server.zones.update(
        {
            "dest.test": {"MX": [(10, "mx.dest.test")]},
            "mx.dest.test": {"A": ["127.0.0.2"]},
            "sender.test": {"MX": [(10, "mx.sender.test")]},
            "mx.sender.test": {"A": ["127.0.0.3"]},
        }
    )
    async with contextlib.AsyncExitStack() as stack:
        mx1 = await stack.enter_async_context(mx_server(MXScript(), host="127.0.0.2"))
        sender_mx = await stack.enter_async_context(
            mx_server(MXScript(), host="127.0.0.3", port=mx1.port)
        )
        yield World(dns_server, mx1, sender_mx, mx1.port, tmp_path, queue_url)


@pytest.mark.parametrize("processes", [0, 1, 2])
async def test_submitted_mail_is_delivered_and_accounted(world: World, processes: int) -> None:
    """0: one process does everything; 1 (the default) and 2: delivery processes."""
    async with running(world.config(delivery_processes=processes)) as d:
        qid = await submit(d.smtp_port, SENDER, ["bob@dest.test", "carol@dest.test"])
        await d.wait_for_status(qid, "delivered", count=2)
        [txn] = world.mx1.transactions
        assert sorted(txn.rcpt_tos) == ["bob@dest.test", "carol@dest.test"]  # one session
        assert txn.mail_from == SENDER
        assert b"Hello from the test suite." in txn.body
        rows = d.query("SELECT mx_host, mx_ip, port, code, outcome, attempt FROM attempts "
                       "WHERE queue_id = ?", (qid,))  # fmt: skip
        assert rows == [("mx.dest.test", "127.0.0.2", world.mx_port, 250, "delivered", 1)] * 2
        line = await d.wait_for(r'message="delivered"')
        assert f"uuid={qid}" in line and "ip=127.0.0.2" in line and "code=250" in line
    assert d.returncode == 0
    assert not d.body_kept(qid)


async def test_mixed_outcomes_and_bounce_reaches_sender(world: World) -> None:
    world.mx1.script = MXScript(rcpt={"gone@dest.test": "550 5.1.1 user unknown"})
    async with running(world.config()) as d:
        qid = await submit(d.smtp_port, SENDER, ["bob@dest.test", "gone@dest.test"])
        await d.wait_for_status(qid, "delivered")
        await d.wait_for_status(qid, "bounced")
        [(dsn_qid,)] = d.query("SELECT dsn_queue_id FROM recipients WHERE recipient = ?",
                               ("gone@dest.test",))  # fmt: skip
        assert dsn_qid
        await d.wait_for_status(dsn_qid, "delivered")
    [bounce] = world.sender_mx.transactions
    assert bounce.mail_from in ("", "<>")  # aiosmtpd reports MAIL FROM:<> as "<>"
    assert bounce.rcpt_tos == [SENDER]
    assert b"550 5.1.1 user unknown" in bounce.body
    assert b"Final-Recipient: rfc822; gone@dest.test" in bounce.body


@pytest.mark.parametrize("processes", [0, 2])
async def test_temporary_failure_is_retried_after_sighup(world: World, processes: int) -> None:
    world.mx1.script = MXScript(rcpt_default="451 4.7.1 greylisted, come back later")
    config = world.config(temp_fail_intervals="1h", delivery_processes=processes)
    async with running(config) as d:
        qid = await submit(d.smtp_port, SENDER, ["bob@dest.test"])
        await d.wait_for_status(qid, "deferred")
        row = d.query("SELECT last_code, last_status, last_response, attempts FROM deliveries "
                      "WHERE queue_id = ?", (qid,))  # fmt: skip
        assert row == [(451, "4.7.1", "greylisted, come back later", 1)]
        world.mx1.script = MXScript()
        d.signal(signal.SIGHUP)  # flush: due now, failure count kept
        await d.wait_for_status(qid, "delivered")
        assert d.query("SELECT attempts FROM deliveries WHERE queue_id = ?", (qid,)) == [(2,)]


async def test_retries_exhausted_bounce_with_last_reply(world: World) -> None:
    world.mx1.script = MXScript(rcpt_default="452 4.2.2 mailbox full")
    async with running(world.config(temp_fail_intervals="none")) as d:
        qid = await submit(d.smtp_port, SENDER, ["bob@dest.test"])
        await d.wait_for_status(qid, "bounced")
        [(status, response)] = d.query(
            "SELECT last_status, last_response FROM deliveries WHERE queue_id = ?", (qid,)
        )
        assert status.startswith("5.") and "mailbox full" in response


async def test_failover_to_next_mx_when_first_refuses(world: World) -> None:
    # preference 5 points at 127.0.0.4 where nothing listens
    world.dns.zones["dest.test"] = {"MX": [(5, "dead.dest.test"), (10, "mx.dest.test")]}
    world.dns.zones["dead.dest.test"] = {"A": ["127.0.0.4"]}
    async with running(world.config()) as d:
        qid = await submit(d.smtp_port, SENDER, ["bob@dest.test"])
        await d.wait_for_status(qid, "delivered")
        assert d.query("SELECT mx_ip FROM attempts WHERE queue_id = ?", (qid,)) == [("127.0.0.2",)]


async def test_nxdomain_and_null_mx_bounce(world: World) -> None:
    world.dns.zones["nullmx.test"] = {"MX": [(0, ".")]}
    async with running(world.config()) as d:
        qid = await submit(d.smtp_port, SENDER, ["x@nowhere.test", "y@nullmx.test"])
        await d.wait_for_status(qid, "bounced", count=2)
        rows = dict(d.query("SELECT recipient, last_status FROM deliveries WHERE queue_id = ?",
                            (qid,)))  # fmt: skip
        assert rows == {"x@nowhere.test": "5.1.2", "y@nullmx.test": "5.1.10"}


async def test_dns_servfail_defers(world: World) -> None:
    from tests.dnsserver import SERVFAIL

    world.dns.zones["broken.test"] = SERVFAIL
    async with running(world.config()) as d:
        qid = await submit(d.smtp_port, SENDER, ["x@broken.test"])
        await d.wait_for_status(qid, "deferred")
        assert d.query("SELECT last_status FROM deliveries WHERE queue_id = ?", (qid,)) == [
            ("4.4.3",)
        ]


async def test_disabled_holds_delivery_and_hot_reload_releases_it(world: World) -> None:
    config = world.config(disabled="true")
    async with running(config) as d:
        qid = await submit(d.smtp_port, SENDER, ["bob@dest.test"])
        await asyncio.sleep(1.0)
        assert d.query("SELECT status FROM deliveries WHERE queue_id = ?", (qid,)) == [("queued",)]
        text = (config / "outbound.ini").read_text().replace("disabled=true", "disabled=false")
        (config / "outbound.ini").write_text(text)
        await d.wait_for_status(qid, "delivered", timeout=5)


@pytest.mark.parametrize("processes", [0, 1, 2])
async def test_crash_mid_delivery_is_recovered_after_restart(world: World, processes: int) -> None:
    world.mx1.script = MXScript(delays={"data_end": 30})
    config = world.config(delivery_processes=processes)
    d = Daemon(config)
    await d.start()
    qid = await submit(d.smtp_port, SENDER, ["bob@dest.test"])
    await d.wait_for_status(qid, "sending")
    for _ in range(100):  # until the session is inside DATA
        if "DATA" in world.mx1.commands:
            break
        await asyncio.sleep(0.05)
    await d.kill()
    world.mx1.script = MXScript()
    async with running(config) as again:
        await again.wait_for_status(qid, "delivered", timeout=20)
    assert any(qid in line or "leases_released=1" in line for line in again.lines)


async def test_sigterm_releases_leases_and_exits_zero(world: World) -> None:
    world.mx1.script = MXScript(delays={"rcpt": 0.5})
    config = world.config()
    async with running(config) as d:
        qid = await submit(d.smtp_port, SENDER, ["bob@dest.test"])
        await d.wait_for_status(qid, "sending")
    assert d.returncode == 0
    rows = d.query("SELECT status FROM recipients WHERE queue_id = ?", (qid,))
    assert rows[0][0] in ("delivered", "queued", "deferred")  # never left leased
    assert d.query("SELECT count(*) FROM recipients WHERE status = 'sending'") == [(0,)]


def test_free_port_is_loopback() -> None:
    assert 0 < free_port() < 65536


@pytest.mark.parametrize("delivery_processes", [0, 1])
async def test_smtp_nodes_share_the_listener_and_deliver(
    world: World, delivery_processes: int
) -> None:
    """nodes=2: a second process accepts on the same socket; while the first is
    stopped (SIGSTOP) mail is still accepted, and delivered (by that node
    itself, or by the delivery process)."""
    config = world.config(smtp={"nodes": 2}, delivery_processes=delivery_processes)
    async with running(config) as d:
        await d.wait_for(r"SMTP node started")
        assert len(d.children()) == 1 + delivery_processes
        d.signal(signal.SIGSTOP)
        try:
            qids = [await submit(d.smtp_port, SENDER, [f"n{i}@dest.test"]) for i in range(3)]
            for qid in qids:
                await d.wait_for_status(qid, "delivered")
        finally:
            d.signal(signal.SIGCONT)
        # Both take mail again, and all of it ends delivered.
        more = await asyncio.gather(
            *(submit(d.smtp_port, SENDER, [f"m{i}@dest.test"]) for i in range(10))
        )
        for qid in more:
            await d.wait_for_status(qid, "delivered")
    assert d.returncode == 0  # and stop() checked that no process of its group is left
    assert len(world.mx1.transactions) == 13


async def test_an_smtp_node_serves_implicit_tls_on_the_inherited_socket(world: World) -> None:
    pki = certs.make_pki(world.tmp / "pki", "localhost", "127.0.0.1")
    tls_port = free_port()
    outbound: dict[str, object] = {"delivery_processes": 0}
    if world.queue_url:
        outbound["queue_url"] = world.queue_url
    config = write_config(
        world.tmp / "config", dns_port=world.dns.port, mx_port=world.mx_port,
        outbound=outbound,
        smtp={"nodes": 2, "listen_tls": f"127.0.0.1:{tls_port}"},
        extra_files={"tls_cert.pem": pki.cert_pem.read_text(),
                     "tls_key.pem": pki.key_pem.read_text()},
    )  # fmt: skip
    async with running(config) as d:
        await d.wait_for(r"SMTP node started")
        d.signal(signal.SIGSTOP)  # only the node can answer now
        try:
            qid = await submit(
                tls_port, SENDER, ["tls@dest.test"], tls_context=pki.client_context()
            )
            await d.wait_for_status(qid, "delivered")
        finally:
            d.signal(signal.SIGCONT)
    assert d.returncode == 0
    assert [t.rcpt_tos for t in world.mx1.transactions] == [["tls@dest.test"]]
