"""End to end: the real outboundd signs at submission; what the MX receives verifies.

A scripted MX first refuses the message after DATA (451), so the message is
sent twice: both copies must be the same bytes (signed once, never again)
and pass OpenDKIM.  The bounce for a refused recipient is signed with the
key of the ``me`` host's domain.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from outboundd.dkimkeys import DkimKey, generate_key
from outboundd.submission import prepare
from tests.dkimcheck import OpenDkim, opendkim
from tests.dnsserver import DNSServer
from tests.harness import running, submit, write_config
from tests.mxserver import MXScript, MXServer, mx_server

__all__ = ["opendkim"]

SENDER = "alice@mail.example"
ME = "relay.mail.example"


@dataclass
class World:
    dns: DNSServer
    mx: MXServer  # 127.0.0.2: mx.dest.test
    sender_mx: MXServer  # 127.0.0.3: mx.mail.example, where bounces go
    config_dir: Path
    keys: tuple[DkimKey, DkimKey]


@pytest.fixture
async def world(dns_server: DNSServer, tmp_path: Path, opendkim: OpenDkim) -> AsyncIterator[World]:
    dns_server.zones.update(
        {
            "dest.test": {"MX": [(10, "mx.dest.test")]},
            "mx.dest.test": {"A": ["127.0.0.2"]},
            "mail.example": {"MX": [(10, "mx.mail.example")]},
            "mx.mail.example": {"A": ["127.0.0.3"]},
        }
    )
    async with contextlib.AsyncExitStack() as stack:
        mx = await stack.enter_async_context(mx_server(MXScript(), host="127.0.0.2"))
        sender_mx = await stack.enter_async_context(
            mx_server(MXScript(), host="127.0.0.3", port=mx.port)
        )
        config_dir = write_config(
            tmp_path / "config",
            dns_port=dns_server.port,
            mx_port=mx.port,
            outbound={"temp_fail_intervals": "1h"},
            extra_files={"dkim.ini": "[sign]\nenabled = true\n"},
        )
        (config_dir / "me").write_text(ME + "\n")
        keys = (
            generate_key(config_dir / "dkim", "mail.example", "rsa1", "rsa"),
            generate_key(config_dir / "dkim", "mail.example", "ed1", "ed25519"),
        )
        for key in keys:
            opendkim.publish(key)
        yield World(dns_server, mx, sender_mx, config_dir, keys)


async def test_signature_survives_relay_byte_for_byte_and_retry_does_not_resign(
    world: World, opendkim: OpenDkim
) -> None:
    message = (
        b"From: Alice <alice@mail.example>\r\nTo: bob@dest.test\r\n"
        b"Subject: through the relay\r\nDate: Thu, 01 Jan 2026 00:00:00 +0000\r\n"
        b"Message-ID: <e2e@mail.example>\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n\r\n"
        + "Grüße\r\n.leading dot\r\n\r\n".encode()
    )
    world.mx.script = MXScript(data_end="451 4.3.0 try again")
    async with running(world.config_dir) as d:
        qid = await submit(d.smtp_port, SENDER, ["bob@dest.test"], message)
        await d.wait_for_status(qid, "deferred")
        world.mx.script = MXScript()
        d.signal(signal.SIGHUP)
        await d.wait_for_status(qid, "delivered")
    first, second = world.mx.transactions
    assert first.body == second.body  # the stored, signed body; not signed again
    received = first.body
    assert received.count(b"DKIM-Signature:") == 2
    assert received.endswith(message)  # our headers come first; the rest untouched
    assert await opendkim.passes(received)


async def test_bounce_is_signed_with_the_me_domain_key(world: World, opendkim: OpenDkim) -> None:
    world.mx.script = MXScript(rcpt={"gone@dest.test": "550 5.1.1 user unknown"})
    async with running(world.config_dir) as d:
        qid = await submit(d.smtp_port, SENDER, ["gone@dest.test"])
        await d.wait_for_status(qid, "bounced")
        [(dsn_qid,)] = d.query("SELECT dsn_queue_id FROM recipients WHERE queue_id = ?", (qid,))
        await d.wait_for_status(dsn_qid, "delivered")
    [bounce] = world.sender_mx.transactions
    assert bounce.rcpt_tos == [SENDER]
    head = bounce.body[: prepare.header_end(bounce.body)]
    assert head.count(b"DKIM-Signature:") == 2 and head.count(b"d=mail.example;") == 2
    assert b"<MAILER-DAEMON@relay.mail.example>" in head
    assert b"550 5.1.1 user unknown" in bounce.body
    assert await opendkim.passes(bounce.body)
