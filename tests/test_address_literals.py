"""Address literals on the delivery side: an undeliverable literal ends at once.

Submission refuses malformed literals at RCPT, but mail can reach the queue
by other ways (queued by an older version, a plugin, ``send_email``).  Such
a recipient must end quickly with a clear reason — never sit in
``sending`` waiting for a connection, never hold up a SIGTERM.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from outboundd.delivery.mx import MXResolutionError, MXResolver, normalize_mx_result
from outboundd.delivery.session import DeliveryJob, JobRecipient, SessionSettings, deliver_job
from outboundd.hooks import MX
from outboundd.spool import NewMessage, NewRecipient, Spool
from outboundd.spool.types import Outcome
from tests.delivery_rig import BODY, SENDER, delivery_rig
from tests.dnsserver import DNSServer
from tests.harness import running, write_config
from tests.mxserver import MXScript, mx_server

ZONED = "[IPv6:fe80::1%eth0]"
#: Literals no connection can be made to; each must bounce 5.1.2 at once.
UNDELIVERABLE = [ZONED, "[IPv6:fe80::1%1]", "[IPv6:1.2.3.4]", "[not-an-address]", "[x:y]"]


@pytest.mark.parametrize("literal", UNDELIVERABLE)
async def test_resolver_refuses_undeliverable_literals_even_with_local_mx_ok(
    dns_server: DNSServer, literal: str
) -> None:
    resolver = MXResolver([dns_server.nameserver], timeout=2.0, local_mx_ok=True)
    with pytest.raises(MXResolutionError) as info:
        await resolver.resolve(literal)
    assert (info.value.permanent, info.value.status) == (True, "5.1.2")
    assert "invalid address literal" in info.value.message
    if "%" in literal:
        assert "zone ID" in info.value.message


async def test_an_ipv6_link_local_literal_bounces_even_with_local_mx_ok(
    dns_server: DNSServer,
) -> None:
    """Without a zone ID no connection to fe80::/10 can be made (the kernel says
    EINVAL), so retrying for days would only delay the bounce."""
    resolver = MXResolver([dns_server.nameserver], timeout=2.0, local_mx_ok=True)
    with pytest.raises(MXResolutionError) as info:
        await resolver.resolve("[IPv6:FE80::1]")
    assert (info.value.permanent, info.value.status) == (True, "5.4.4")
    assert "link-local" in info.value.message
    # An IPv4 link-local literal needs no zone: allowed when local_mx_ok says so.
    [target] = await resolver.resolve("[169.254.1.1]")
    assert target.address == "169.254.1.1"


async def test_a_zone_id_is_not_an_address_anywhere(dns_server: DNSServer) -> None:
    """Not from a plugin's MX string, not as an MX exchange, not in a target."""
    with pytest.raises(ValueError, match="fe80"):
        normalize_mx_result("[fe80::1%eth0]:25", default_port=25)
    resolver = MXResolver([dns_server.nameserver], timeout=1.0, local_mx_ok=True)
    with pytest.raises(MXResolutionError) as info:
        await resolver.resolve_mxs([MX("fe80::1%eth0")], "dest.test")
    assert info.value.permanent is False  # a plugin's route is the operator's to fix


async def test_a_session_never_connects_to_a_zoned_target(tmp_path: Path) -> None:
    """A target with a zone ID (a custom plugin's object) fails without a connection."""
    body = tmp_path / "body"
    body.write_bytes(BODY)
    job = DeliveryJob(SENDER, (JobRecipient(1, "bob@dest.test"),), body, len(BODY))

    class Zoned:
        mx = MX("fe80::1%eth0")
        address = "fe80::1%eth0"
        port = 25
        hostname = "fe80::1%eth0"
        tls_policy = None

    started = time.monotonic()
    result = await deliver_job(job, [Zoned()], SessionSettings(helo="me.test"))
    assert time.monotonic() - started < 1.0
    res = result.recipients[1]
    assert res.outcome is Outcome.DEFERRED and "not an IP address" in res.reply.text


async def test_queued_mail_to_bad_literals_bounces_at_once(
    dns_server: DNSServer, tmp_path: Path
) -> None:
    dns_server.zones.update(
        {"sender.test": {"MX": [(10, "mx.sender.test")]}, "mx.sender.test": {"A": ["127.0.0.3"]}}
    )
    async with (
        mx_server(MXScript(), host="127.0.0.3") as sender_mx,
        delivery_rig(tmp_path, dns_server, mx_port=sender_mx.port) as rig,
    ):
        rcpts = [f"bob@{literal}" for literal in UNDELIVERABLE]
        qid = await rig.send(*rcpts)
        started = time.monotonic()
        await rig.run_once()
        assert time.monotonic() - started < 2.0
        rows = rig.deliveries(qid)
        for rcpt in rcpts:
            status, _code, enhanced, response = rows[rcpt]
            assert (status, enhanced) == ("bounced", "5.1.2"), rows[rcpt]
            assert "invalid address literal" in response
        # The sender hears about it: the DSNs go out with the null sender.
        await rig.run_once()
        assert sender_mx.transactions
        assert {t.mail_from for t in sender_mx.transactions} <= {"", "<>"}


async def test_daemon_bounces_a_queued_zoned_literal_and_stops_at_once(
    dns_server: DNSServer, tmp_path: Path
) -> None:
    """Queued before start-up (as by an older version); the daemon ends it, then
    SIGTERM finds nothing in ``sending`` and exits promptly."""
    dns_server.zones.update(
        {"sender.test": {"MX": [(10, "mx.sender.test")]}, "mx.sender.test": {"A": ["127.0.0.3"]}}
    )
    async with mx_server(MXScript(), host="127.0.0.3") as sender_mx:
        config = write_config(tmp_path / "config", dns_port=dns_server.port,
                              mx_port=sender_mx.port)  # fmt: skip
        spool = await Spool.open(tmp_path / "queue")
        try:
            qid = await spool.accept(NewMessage(SENDER, [NewRecipient(f"bob@{ZONED}")], BODY))
        finally:
            await spool.close()
        async with running(config) as daemon:
            await daemon.wait_for_status(qid, "bounced", timeout=10)
            [(response,)] = daemon.query(
                "SELECT last_response FROM deliveries WHERE queue_id = ?", (qid,)
            )
            assert "zone ID" in response
            started = time.monotonic()
            assert await daemon.stop(timeout=10) == 0
            assert time.monotonic() - started < 5.0
    assert daemon.query("SELECT count(*) FROM deliveries WHERE status = 'sending'") == [(0,)]
