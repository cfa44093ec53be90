"""AUTH, throttling, relay policy, STARTTLS and implicit TLS over loopback."""

from __future__ import annotations

import asyncio
import base64
import threading
import time
from pathlib import Path

import aiosmtplib
import pytest

from outboundd.plugins.auth_flat_file import UserStore
from tests import certs
from tests.submission_fixtures import (
    PASSWORD,
    LineClient,
    make_config,
    password_hash,
    running_relay,
)

MESSAGE = b"Subject: hello\r\n\r\nHello.\r\n"


def plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


async def test_auth_plain_success_and_failure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with running_relay(make_config(tmp_path)) as relay:
        client = await LineClient.connect(relay.port())
        await client.cmd("EHLO client.test")
        assert (await client.cmd(f"AUTH PLAIN {plain('alice', 'wrong')}")).startswith("535 5.7.8")
        assert (await client.cmd(f"AUTH PLAIN {plain('nobody', PASSWORD)}")).startswith("535 5.7.8")
        assert (await client.cmd(f"auth plain {plain('alice', PASSWORD)}")).startswith("235 2.7.0")
        assert (await client.cmd(f"AUTH PLAIN {plain('alice', PASSWORD)}")).startswith("503")
        await client.close()
    out = capsys.readouterr().out
    assert "AUTH failed" in out and "AUTH succeeded" in out
    assert PASSWORD not in out and "wrong" not in out and plain("alice", PASSWORD) not in out


async def test_auth_plain_with_challenge_and_malformed_input(tmp_path: Path) -> None:
    async with running_relay(make_config(tmp_path)) as relay:
        client = await LineClient.connect(relay.port())
        await client.cmd("EHLO client.test")
        assert (await client.cmd("AUTH PLAIN")) == "334 "
        assert (await client.cmd(plain("alice", PASSWORD))).startswith("235")
        await client.close()
        client = await LineClient.connect(relay.port())
        await client.cmd("EHLO client.test")
        assert (await client.cmd("AUTH PLAIN !!notbase64")).startswith("501 5.5.2")
        assert (await client.cmd(f"AUTH PLAIN {b64('no-nuls')}")).startswith("501 5.5.2")
        assert (await client.cmd("AUTH CRAM-MD5")).startswith("504 5.5.4")
        assert (await client.cmd("AUTH PLAIN")) == "334 "
        assert (await client.cmd("*")).startswith("501")
        await client.close()


async def test_auth_login(tmp_path: Path) -> None:
    async with running_relay(make_config(tmp_path)) as relay:
        client = await LineClient.connect(relay.port())
        await client.cmd("EHLO client.test")
        assert (await client.cmd("AUTH LOGIN")).startswith("334 ")
        assert (await client.cmd(b64("alice"))).startswith("334 ")
        assert (await client.cmd(b64("nope"))).startswith("535 5.7.8")
        assert (await client.cmd(f"AUTH LOGIN {b64('alice')}")).startswith("334 ")
        assert (await client.cmd(b64(PASSWORD))).startswith("235 2.7.0")
        await client.close()
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=relay.port(), start_tls=False)
        async with smtp:
            await smtp.ehlo()
            assert (await smtp.auth_login("alice", PASSWORD)).code == 235
            await smtp.sendmail("a@example.com", ["b@example.org"], MESSAGE)
        assert relay.messages()[0][2] == "alice"


async def test_failing_client_is_slowed_then_disconnected_and_blocked(tmp_path: Path) -> None:
    config = make_config(
        tmp_path, auth_max_failures=2, auth_failure_delay=1.0, auth_disconnect_after=4,
        auth_block_seconds=60,
    )  # fmt: skip
    async with running_relay(config) as relay:
        client = await LineClient.connect(relay.port())
        await client.cmd("EHLO client.test")
        waits = []
        for n in (1, 2, 3):
            started = time.monotonic()
            assert (await client.cmd(f"AUTH PLAIN {plain('alice', f'x{n}')}")).startswith("535")
            waits.append(time.monotonic() - started)
        # Only failures beyond auth_max_failures (2) wait: the 3rd, 1 s. The
        # delay is long enough that a loaded machine's password check stays below it.
        assert waits[0] < 1.0 and waits[1] < 1.0 <= waits[2]
        assert (await client.cmd(f"AUTH PLAIN {plain('alice', 'x4')}")).startswith("421 4.7.0")
        assert await client.closed()
        await client.close()
        # Blocked: even the right password is refused, and the connection closed.
        client = await LineClient.connect(relay.port())
        await client.cmd("EHLO client.test")
        assert (await client.cmd(f"AUTH PLAIN {plain('alice', PASSWORD)}")).startswith("421 4.7.0")
        assert await client.closed()
        await client.close()
        assert relay.query(
            "SELECT failures, in_flight, blocked_until IS NOT NULL FROM auth_throttle"
        ) == [(4, 0, 1)]


async def test_relay_needs_auth_or_acl(tmp_path: Path) -> None:
    async with running_relay(make_config(tmp_path)) as relay:
        client = await LineClient.connect(relay.port())
        await client.cmd("EHLO client.test")
        assert (await client.cmd("MAIL FROM:<a@example.com>")).startswith("250")
        # AUTH is on offer here, so the client is told to authenticate.
        assert (await client.cmd("RCPT TO:<b@example.org>")).startswith("530 5.7.0")
        assert (await client.cmd(f"AUTH PLAIN {plain('alice', PASSWORD)}")).startswith("503 5.5.1")
        assert (await client.cmd("RSET")).startswith("250")
        assert (await client.cmd(f"AUTH PLAIN {plain('alice', PASSWORD)}")).startswith("235")
        assert (await client.cmd("MAIL FROM:<a@example.com>")).startswith("250")
        assert (await client.cmd("RCPT TO:<b@example.org>")).startswith("250")
        await client.close()
        assert relay.messages() == []


async def test_relay_denied_without_any_way_to_authenticate(tmp_path: Path) -> None:
    async with running_relay(make_config(tmp_path / "a", plugins=())) as relay:
        client = await LineClient.connect(relay.port())
        await client.cmd("EHLO client.test")
        assert (await client.cmd(f"AUTH PLAIN {plain('alice', PASSWORD)}")).startswith("502 5.5.1")
        await client.cmd("MAIL FROM:<a@example.com>")
        assert (await client.cmd("RCPT TO:<b@example.org>")).startswith("550 5.7.1 Relaying denied")
        await client.close()
    # A relay ACL that does not contain the client changes nothing.
    config = make_config(tmp_path / "b", plugins=(), relay_acl=["192.0.2.0/24", "2001:db8::/32"])
    async with running_relay(config) as relay:
        client = await LineClient.connect(relay.port())
        await client.cmd("EHLO client.test")
        await client.cmd("MAIL FROM:<a@example.com>")
        assert (await client.cmd("RCPT TO:<b@example.org>")).startswith("550 5.7.1")
        await client.close()


async def test_relay_acl_allows_without_auth(tmp_path: Path) -> None:
    config = make_config(tmp_path, plugins=(), relay_acl=["127.0.0.0/8"])
    async with running_relay(config) as relay:
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=relay.port(), start_tls=False)
        async with smtp:
            await smtp.sendmail("a@example.com", ["b@example.org"], MESSAGE)
        [(_, _, auth_user, client_ip, *_)] = relay.messages()
        assert (auth_user, client_ip) == (None, "127.0.0.1")


async def test_constrain_sender(tmp_path: Path) -> None:
    users = {"bob@example.com": password_hash(), "alice": password_hash()}
    config = make_config(tmp_path, users=users, constrain_sender=True)
    async with running_relay(config) as relay:
        client = await LineClient.connect(relay.port())
        await client.cmd("EHLO client.test")
        assert (await client.cmd(f"AUTH PLAIN {plain('bob@example.com', PASSWORD)}")).startswith(
            "235"
        )
        assert (await client.cmd("MAIL FROM:<bob@other.example>")).startswith("550 5.7.1")
        assert (await client.cmd("MAIL FROM:<news@EXAMPLE.com>")).startswith("250")
        await client.close()
        client = await LineClient.connect(relay.port())
        await client.cmd("EHLO client.test")
        await client.cmd(f"AUTH PLAIN {plain('alice', PASSWORD)}")
        assert (await client.cmd("MAIL FROM:<anyone@anywhere.example>")).startswith("250")
        await client.close()


async def test_starttls_then_auth_and_send(tmp_path: Path, pki: certs.TestPKI) -> None:
    async with running_relay(make_config(tmp_path, pki=pki)) as relay:
        smtp = aiosmtplib.SMTP(
            hostname="127.0.0.1",
            port=relay.port(),
            start_tls=False,
            tls_context=pki.client_context(),
        )
        async with smtp:
            await smtp.ehlo()
            assert smtp.supports_extension("starttls")
            await smtp.starttls()
            await smtp.ehlo()
            assert not smtp.supports_extension("starttls")
            assert [m.upper() for m in smtp.server_auth_methods] == ["PLAIN", "LOGIN"]
            again = await smtp.execute_command(b"STARTTLS")
            assert (again.code, again.message[:5]) == (503, "5.5.1")
            await smtp.login("alice", PASSWORD)
            await smtp.sendmail("a@example.com", ["b@example.org"], MESSAGE)
        [(qid, *_)] = relay.messages()
        assert b" with ESMTPSA id " in relay.body(qid)


async def test_implicit_tls_listener(tmp_path: Path, pki: certs.TestPKI) -> None:
    config = make_config(tmp_path, pki=pki, implicit_tls=True)
    async with running_relay(config) as relay:
        smtp = aiosmtplib.SMTP(
            hostname="127.0.0.1", port=relay.port(implicit_tls=True), use_tls=True,
            tls_context=pki.client_context(),
        )  # fmt: skip
        async with smtp:
            await smtp.ehlo()
            assert not smtp.supports_extension("starttls")
            assert smtp.supports_extension("auth")
            await smtp.login("alice", PASSWORD)
            await smtp.sendmail("a@example.com", ["b@example.org"], MESSAGE)
        [(qid, *_)] = relay.messages()
        body = relay.body(qid)
        assert b" with ESMTPSA id " in body


async def test_implicit_tls_without_certificate_refuses_to_start(tmp_path: Path) -> None:
    from outboundd.hooks import HookRunner
    from outboundd.spool import Spool
    from outboundd.submission.server import ListenerError, start_listeners

    config = make_config(tmp_path, implicit_tls=True)
    spool = await Spool.open(config.outbound.queue_dir)
    try:
        with pytest.raises(ListenerError, match="listen_tls"):
            await start_listeners(config, spool, HookRunner([]))
    finally:
        await spool.close()


async def test_shutdown_says_421_to_idle_sessions(tmp_path: Path) -> None:
    async with running_relay(make_config(tmp_path)) as relay:
        client = await LineClient.connect(relay.port())
        await client.cmd("EHLO client.test")
        closing = asyncio.create_task(relay.listeners.close(grace=2.0))
        assert (await client.reply()).startswith("421 4.3.2")
        await closing
        await client.close()


class CountingUsers(UserStore):
    """The real user store, counting the credentials it checks."""

    def __init__(self, users: dict[str, str]) -> None:
        super().__init__(users)
        self.checked = 0
        self._count_lock = threading.Lock()

    def verify(self, user: str, password: str) -> bool:
        with self._count_lock:
            self.checked += 1
        return super().verify(user, password)


async def test_a_burst_of_parallel_auth_checks_no_more_than_the_allowance(tmp_path: Path) -> None:
    """Issue item 1: 30 connections from one IP, AUTH at the same moment, disconnect_after=5."""
    config = make_config(tmp_path, auth_disconnect_after=5, auth_failure_delay=0.01)
    async with running_relay(config) as relay:
        users = CountingUsers({"alice": password_hash()})
        relay.listeners.context.users = users
        clients = await asyncio.gather(*(LineClient.connect(relay.port()) for _ in range(30)))
        for client in clients:
            await client.cmd("EHLO client.test")
        burst, last = clients[:29], clients[29]
        for n, client in enumerate(burst):
            client.writer.write(f"AUTH PLAIN {plain('alice', f'wrong{n}')}\r\n".encode())
        await asyncio.gather(*(client.writer.drain() for client in burst))
        # While the admitted attempts may still be being checked, the
        # allowance is used up: the right password is refused unchecked.
        for _ in range(200):
            rows = relay.query("SELECT failures + in_flight FROM auth_throttle")
            if rows and rows[0][0] >= 5:
                break
            await asyncio.sleep(0.01)
        assert (await last.cmd(f"AUTH PLAIN {plain('alice', PASSWORD)}")).startswith("421 4.7.0")
        answers = await asyncio.gather(*(client.reply() for client in burst))
        assert sum(a.startswith("421 4.7.0") for a in answers) >= 24
        assert all(a.startswith(("421 4.7.0", "535 5.7.8")) for a in answers), answers
        assert users.checked == 5  # five credentials checked, not 29 (nor 30)
        for client in clients:
            await client.close()
        assert relay.query(
            "SELECT failures, in_flight, blocked_until IS NOT NULL FROM auth_throttle"
        ) == [(5, 0, 1)]
        # The block holds for a new connection too, and nothing more is checked.
        client = await LineClient.connect(relay.port())
        await client.cmd("EHLO client.test")
        assert (await client.cmd(f"AUTH PLAIN {plain('alice', PASSWORD)}")).startswith("421 4.7.0")
        await client.close()
        assert users.checked == 5


async def test_hanging_up_during_an_auth_challenge_logs_no_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with running_relay(make_config(tmp_path)) as relay:
        client = await LineClient.connect(relay.port())
        await client.cmd("EHLO client.test")
        assert (await client.cmd("AUTH LOGIN")).startswith("334 ")
        await client.send(b"half-a-line")
        await client.close()
        for _ in range(100):
            if not relay.listeners.context.sessions:
                break
            await asyncio.sleep(0.01)
        assert not relay.listeners.context.sessions
        # The relay still serves.
        client = await LineClient.connect(relay.port())
        assert (await client.cmd("EHLO client.test")).startswith("250")
        await client.close()
    out = capsys.readouterr().out
    assert "[ERROR]" not in out and "Traceback" not in out and "exception" not in out.lower()
