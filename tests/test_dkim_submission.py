"""DKIM at submission: real listeners and spool on loopback, OpenDKIM checks the result."""

from __future__ import annotations

import base64
import logging
from collections.abc import Iterator
from pathlib import Path

import aiosmtplib
import pytest

from outboundd.config import Config, DkimConfig
from outboundd.dkimkeys import DkimKey, generate_key
from outboundd.hooks import HookRunner
from outboundd.submission import api
from tests.dkimcheck import OpenDkim, opendkim
from tests.harness import queued_id
from tests.submission_fixtures import (
    PASSWORD,
    LineClient,
    make_config,
    password_hash,
    running_relay,
)

__all__ = ["opendkim"]

DOMAIN = "mail.example"
USER = "alice@mail.example"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[DkimKey, DkimKey]:
    base = tmp_path_factory.mktemp("dkim")
    return (
        generate_key(base, DOMAIN, "rsa1", "rsa"),
        generate_key(base, DOMAIN, "ed1", "ed25519"),
    )


@pytest.fixture(autouse=True)
def mail_log_level() -> Iterator[None]:
    """The listeners quieten aiosmtpd's global ``mail.log`` logger; put it back
    for the test modules that run after this one (test_log reads it)."""
    logger = logging.getLogger("mail.log")
    level = logger.level
    try:
        yield
    finally:
        logger.setLevel(level)


def dkim_config(tmp_path: Path, keys: tuple[DkimKey, ...], **settings: object) -> Config:
    config = make_config(
        tmp_path,
        relay_acl=["127.0.0.0/8"],
        users={USER: password_hash()},
        auth_require_tls=False,
    )
    dkim = DkimConfig(enabled=True, keys={DOMAIN: keys}, **settings)  # type: ignore[arg-type]
    return config.model_copy(update={"dkim": dkim})


async def send(port: int, message: bytes, *, sender: str = USER) -> aiosmtplib.SMTPResponse:
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=10, start_tls=False)
    await client.connect()
    try:
        await client.ehlo(hostname="client.test")
        await client.mail(sender)
        await client.rcpt("bob@dest.test")
        return await client.data(message)
    finally:
        await client.quit()


async def test_message_is_signed_before_it_is_spooled(
    tmp_path: Path,
    keys: tuple[DkimKey, DkimKey],
    opendkim: OpenDkim,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for key in keys:
        opendkim.publish(key)
    message = (
        b"From: Alice <alice@mail.example>\r\nTo: bob@dest.test\r\nSubject: signed\r\n"
        b"\r\n.a dot-leading line (stuffed on the wire)\r\nbye\r\n"
    )
    async with running_relay(dkim_config(tmp_path, keys)) as relay:
        reply = await send(relay.port(), message)
        assert reply.code == 250, reply
        stored = relay.body(queued_id(reply.message))
    assert stored.startswith(b"DKIM-Signature: v=1; a=rsa-sha256;")
    assert stored.count(b"DKIM-Signature:") == 2
    assert stored.index(b"a=ed25519-sha256") < stored.index(b"Received:")
    assert stored.endswith(b"\r\n.a dot-leading line (stuffed on the wire)\r\nbye\r\n")
    assert await opendkim.passes(stored)
    assert "DKIM" not in capsys.readouterr().out  # nothing to report


async def test_domain_without_key_goes_unsigned_and_is_logged_once(
    tmp_path: Path, keys: tuple[DkimKey, DkimKey], capsys: pytest.CaptureFixture[str]
) -> None:
    message = b"From: someone@other.example\r\nSubject: unsigned\r\n\r\nhello\r\n"
    async with running_relay(dkim_config(tmp_path, keys)) as relay:
        ids = [queued_id((await send(relay.port(), message)).message) for _ in range(2)]
        bodies = [relay.body(qid) for qid in ids]
    assert all(b"DKIM-Signature" not in body for body in bodies)
    out = capsys.readouterr().out
    assert out.count("no DKIM key for this domain") == 1
    assert "domain=other.example" in out


async def test_signing_failure_answers_451_and_stores_nothing(
    tmp_path: Path, keys: tuple[DkimKey, DkimKey], capsys: pytest.CaptureFixture[str]
) -> None:
    """Signing by the AUTH user's domain, a message without From cannot be signed."""
    config = dkim_config(tmp_path, keys, key_domain="auth_user")
    async with running_relay(config) as relay:
        client = await LineClient.connect(relay.port())
        await client.cmd("EHLO client.test")
        login = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()
        assert (await client.cmd(f"AUTH PLAIN {login}")).startswith("235")
        assert (await client.cmd(f"MAIL FROM:<{USER}>")).startswith("250")
        assert (await client.cmd("RCPT TO:<bob@dest.test>")).startswith("250")
        assert (await client.cmd("DATA")).startswith("354")
        reply = await client.cmd(b"Subject: no From field\r\n\r\nbody\r\n.")
        assert reply.startswith("451 4.3.0"), reply
        # The session goes on: the same client can send a good message next.
        assert (await client.cmd(f"MAIL FROM:<{USER}>")).startswith("250")
        assert (await client.cmd("RCPT TO:<bob@dest.test>")).startswith("250")
        assert (await client.cmd("DATA")).startswith("354")
        reply = await client.cmd(b"From: <alice@mail.example>\r\n\r\nbody\r\n.")
        assert reply.startswith("250"), reply
        await client.close()
        assert len(relay.messages()) == 1
        assert relay.body(queued_id(reply)).startswith(b"DKIM-Signature:")
    out = capsys.readouterr().out
    assert "DKIM signing failed; message refused temporarily" in out
    assert "no From field" in out and "Traceback" not in out


async def test_send_email_api_signs_too(
    tmp_path: Path, keys: tuple[DkimKey, DkimKey], opendkim: OpenDkim
) -> None:
    for key in keys:
        opendkim.publish(key)
    config = dkim_config(tmp_path, keys)
    async with running_relay(config) as relay:
        api.install(relay.spool, config, HookRunner([]))
        try:
            qid = await api.send_email(
                USER, "bob@dest.test", "From: alice@mail.example\nSubject: api\n\nhi\n"
            )
        finally:
            api.uninstall()
        stored = relay.body(qid)
    assert stored.count(b"DKIM-Signature:") == 2
    assert await opendkim.passes(stored)
