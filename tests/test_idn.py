"""Internationalised domains: the one IDNA conversion, RCPT refusal, delivery end to end.

The end-to-end cases run the real ``outboundd`` against the loopback DNS
server, which serves the A-label zone ``xn--bcher-kva.test`` only: mail to
``bob@bücher.test`` can be delivered only if the relay converts the U-label
exactly as IDNA 2008 says.
"""

from __future__ import annotations

import asyncio
import contextlib
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from outboundd import idn
from outboundd.config import ConfigError, load_config
from outboundd.delivery.mx import MXResolutionError, MXResolver
from outboundd.submission import policy, replies
from tests.dnsserver import DNSServer
from tests.harness import Daemon, running, write_config
from tests.mxserver import MXScript, MXServer, mx_server
from tests.submission_fixtures import LineClient

ROOT = Path(__file__).resolve().parent.parent
SENDER = "alice@sender.test"
#: Labels IDNA 2008 refuses that RFC 6531's syntax lets through: a symbol, a
#: joiner out of context, a leading combining mark, an RTL digit first.
NOT_IDNA = ["☃.test", "a\u200db.test", "\u0300a.test", "٣.test"]


# ---------------------------------------------------------------- the conversion (pure)


@pytest.mark.parametrize(
    ("domain", "a_label"),
    [
        ("bücher.test", "xn--bcher-kva.test"),
        ("BÜCHER.Test.", "xn--bcher-kva.test"),
        ("xn--bcher-kva.test", "xn--bcher-kva.test"),
        ("faß.de", "xn--fa-hia.de"),  # IDNA 2008 keeps ß (IDNA 2003 made it "ss")
        ("例え.テスト", "xn--r8jz45g.xn--zckzah"),
    ],
)
def test_to_ascii_gives_the_a_label_form(domain: str, a_label: str) -> None:
    assert idn.to_ascii(domain) == a_label


@pytest.mark.parametrize("domain", [*NOT_IDNA, "-bü.test", "é" * 64 + ".test"])
def test_invalid_u_labels_are_refused_in_printable_ascii(domain: str) -> None:
    with pytest.raises(idn.InvalidDomain) as info:
        idn.to_ascii(domain)
    text = str(info.value)
    assert text.startswith("invalid domain name '") and text.isascii()
    assert all(" " <= ch <= "~" for ch in text), text


def test_idna_support_is_a_declared_dependency() -> None:
    """A wheel installed without the dev tools must still resolve U-labels:
    dnspython's IDNA 2008 codec needs the ``idna`` package (its extra)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    dnspython = [d for d in project["dependencies"] if d.startswith("dnspython")]
    assert len(dnspython) == 1 and dnspython[0].startswith("dnspython[idna]"), dnspython


# ---------------------------------------------------------------- one rule at RCPT and in DNS


@pytest.mark.parametrize("domain", NOT_IDNA)
def test_rcpt_refuses_what_delivery_could_not_resolve(domain: str) -> None:
    with pytest.raises(policy.PolicyError) as info:
        policy.parse_rcpt(f"TO:<bob@{domain}>", extended=True, utf8=True)
    reply = info.value.reply
    assert (reply.code, reply.status) == (501, "5.1.3")
    assert "invalid domain name" in reply.text and reply.text.isascii()
    with pytest.raises(policy.PolicyError) as sender:
        policy.parse_mail(f"FROM:<bob@{domain}> SMTPUTF8", extended=True, max_size=0)
    assert sender.value.reply.status == replies.BAD_SENDER_SYNTAX.status


async def test_delivery_bounces_an_invalid_u_label_already_queued(dns_server: DNSServer) -> None:
    """Mail queued before this rule (or by a plugin) still ends with a clear reason."""
    resolver = MXResolver([dns_server.nameserver], timeout=2.0, local_mx_ok=True)
    with pytest.raises(MXResolutionError) as info:
        await resolver.resolve("☃.test")
    assert (info.value.permanent, info.value.status) == (True, "5.1.2")
    assert "invalid domain name" in info.value.message and "U+2603" in info.value.message
    assert dns_server.total_queries() == 0


# ---------------------------------------------------------------- end to end


@contextlib.asynccontextmanager
async def relay(dns: DNSServer, tmp: Path) -> AsyncIterator[tuple[Daemon, MXServer]]:
    dns.zones.update(
        {
            "xn--bcher-kva.test": {"MX": [(10, "mx.xn--bcher-kva.test")]},
            "mx.xn--bcher-kva.test": {"A": ["127.0.0.2"]},
            "sender.test": {"MX": [(10, "mx.sender.test")]},
            "mx.sender.test": {"A": ["127.0.0.3"]},
        }
    )
    async with contextlib.AsyncExitStack() as stack:
        mx = await stack.enter_async_context(mx_server(MXScript(smtputf8=True), host="127.0.0.2"))
        await stack.enter_async_context(mx_server(MXScript(), host="127.0.0.3", port=mx.port))
        config = write_config(tmp / "config", dns_port=dns.port, mx_port=mx.port)
        daemon = await stack.enter_async_context(running(config))
        yield daemon, mx


async def send(port: int, rcpt: str, *, utf8: bool) -> tuple[str, str | None]:
    """MAIL and RCPT over a raw session; the RCPT reply and, if accepted, the queue ID."""
    client = await LineClient.connect(port)
    try:
        await client.cmd("EHLO client.test")
        mail = await client.cmd(f"MAIL FROM:<{SENDER}>" + (" SMTPUTF8" if utf8 else ""))
        assert mail.startswith("250"), mail
        rcpt_reply = await client.cmd(f"RCPT TO:<{rcpt}>")
        if not rcpt_reply.startswith("250"):
            return rcpt_reply, None
        assert (await client.cmd("DATA")).startswith("354")
        done = await client.cmd(f"From: <{SENDER}>\r\nSubject: idn\r\n\r\nhello\r\n.")
        assert done.startswith("250"), done
        return rcpt_reply, done.rsplit(" ", 1)[-1]
    finally:
        await client.cmd("QUIT")
        await client.close()


async def test_u_label_and_a_label_recipients_are_delivered(
    dns_server: DNSServer, tmp_path: Path
) -> None:
    async with relay(dns_server, tmp_path) as (daemon, mx):
        _, unicode_qid = await send(daemon.smtp_port, "bob@bücher.test", utf8=True)
        _, ascii_qid = await send(daemon.smtp_port, "carol@xn--bcher-kva.test", utf8=False)
        assert unicode_qid is not None and ascii_qid is not None
        await daemon.wait_for_status(unicode_qid, "delivered")
        await daemon.wait_for_status(ascii_qid, "delivered")
        hosts = daemon.query("SELECT DISTINCT mx_host, mx_ip FROM attempts")
        assert hosts == [("mx.xn--bcher-kva.test", "127.0.0.2")]
    received = {t.rcpt_tos[0]: t.mail_params for t in mx.transactions}
    # The address goes on as the client wrote it; the U-label one needs SMTPUTF8.
    assert set(received) == {"bob@bücher.test", "carol@xn--bcher-kva.test"}
    assert "SMTPUTF8" in received["bob@bücher.test"]
    assert "SMTPUTF8" not in received["carol@xn--bcher-kva.test"]
    assert dns_server.count("xn--bcher-kva.test", "MX") >= 1


async def test_an_invalid_u_label_is_refused_at_rcpt_and_nothing_is_queued(
    dns_server: DNSServer, tmp_path: Path
) -> None:
    async with relay(dns_server, tmp_path) as (daemon, mx):
        reply, qid = await send(daemon.smtp_port, "dave@☃.test", utf8=True)
        assert qid is None and reply.startswith("501 5.1.3 ") and reply.isascii(), reply
        assert "invalid domain name" in reply
        assert daemon.query("SELECT count(*) FROM deliveries") == [(0,)]
    assert mx.transactions == []


def test_a_tls_host_entry_that_is_not_idna_is_a_config_error(tmp_path: Path) -> None:
    """force_tls_hosts/no_tls_hosts entries are compared in A-label form; one
    that has none stops start-up with one line naming file and key."""
    config = write_config(
        tmp_path / "config",
        dns_port=53,
        mx_port=25,
        extra_files={
            "tls.ini": "[outbound]\nno_tls_hosts=mx.bücher.test\nforce_tls_hosts=mx.☃.test\n"
        },
    )
    with pytest.raises(ConfigError) as info:
        load_config(config)
    text = str(info.value)
    assert "tls.ini" in text and "force_tls_hosts" in text and "invalid domain name" in text
    assert "\n" not in text
    config.joinpath("tls.ini").write_text("[outbound]\nno_tls_hosts=MX.Bücher.test, 127.0.0.0/8\n")
    assert load_config(config).tls.outbound.no_tls_hosts == ["mx.xn--bcher-kva.test", "127.0.0.0/8"]


async def test_a_bounce_reaches_a_u_label_sender(dns_server: DNSServer, tmp_path: Path) -> None:
    """The DSN to ``alice@bücher.test`` is routed by the same conversion and goes
    out with SMTPUTF8 (its recipient is non-ASCII)."""
    async with relay(dns_server, tmp_path) as (daemon, mx):
        mx.script = MXScript(smtputf8=True, rcpt={"gone@xn--bcher-kva.test": "550 5.1.1 gone"})
        client = await LineClient.connect(daemon.smtp_port)
        try:
            await client.cmd("EHLO client.test")
            assert (await client.cmd("MAIL FROM:<alice@bücher.test> SMTPUTF8")).startswith("250")
            assert (await client.cmd("RCPT TO:<gone@xn--bcher-kva.test>")).startswith("250")
            assert (await client.cmd("DATA")).startswith("354")
            done = await client.cmd("From: <alice@bücher.test>\r\nSubject: idn\r\n\r\nhi\r\n.")
            assert done.startswith("250"), done
        finally:
            await client.close()
        qid = done.rsplit(" ", 1)[-1]
        await daemon.wait_for_status(qid, "bounced")
        for _ in range(200):
            if any(t.mail_from in ("", "<>") for t in mx.transactions):
                break
            await asyncio.sleep(0.05)
    [dsn] = [t for t in mx.transactions if t.mail_from in ("", "<>")]
    assert dsn.rcpt_tos == ["alice@bücher.test"] and "SMTPUTF8" in dsn.mail_params
    assert b"gone@xn--bcher-kva.test" in dsn.body
