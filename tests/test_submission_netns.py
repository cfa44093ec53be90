"""AUTH and relay policy for a client that is not on loopback, over a real veth pair.

The policy functions are tested on their own elsewhere; here a real client
on a non-loopback address talks to the real listeners.  The test makes two
network namespaces of its own joined by a veth pair, with addresses it
chooses (10.77.0.1 for the relay, 10.77.0.2 for the client): traffic never
leaves the pair.  The listening socket is created inside the relay's
namespace and handed to the listeners (as an SMTP node receives its
sockets); the client's socket is created inside the client's namespace.
A socket stays in the namespace it was made in, so both are then used
from this test's event loop.  Namespaces are deleted in teardown.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ctypes
import os
import secrets
import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest

from outboundd.config import Config
from outboundd.hooks import HookRunner
from outboundd.spool import Spool
from outboundd.submission.server import start_listeners
from tests import certs
from tests.submission_fixtures import PASSWORD, LineClient, make_config

T = TypeVar("T")

RELAY_IP = "10.77.0.1"
CLIENT_IP = "10.77.0.2"
_CLONE_NEWNET = 0x40000000


def plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@dataclass(frozen=True)
class VethPair:
    relay_ns: str
    client_ns: str


def _netns_unavailable() -> str | None:
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    return None


@pytest.fixture
def veth() -> Iterator[VethPair]:
    reason = _netns_unavailable()
    if reason is not None:
        pytest.skip(reason)
    tag = secrets.token_hex(3)
    pair = VethPair(f"obd-relay-{tag}", f"obd-client-{tag}")
    made: list[str] = []
    try:
        for ns in (pair.relay_ns, pair.client_ns):
            _ip("netns", "add", ns)
            made.append(ns)
        # Both ends are created inside the namespaces: nothing touches the host's.
        _ip("-n", pair.relay_ns, "link", "add", "r0", "type", "veth", "peer", "name", "c0",
            "netns", pair.client_ns)  # fmt: skip
        for ns, dev, address in (
            (pair.relay_ns, "r0", RELAY_IP),
            (pair.client_ns, "c0", CLIENT_IP),
        ):
            _ip("-n", ns, "addr", "add", f"{address}/30", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield pair
    finally:
        for ns in made:  # deleting a namespace deletes its end of the pair
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


def in_netns(ns: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` on a fresh thread that has joined namespace ``ns``; the thread then ends."""
    libc = ctypes.CDLL(None, use_errno=True)
    result: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
            try:
                if libc.setns(fd, _CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns {ns}")
            finally:
                os.close(fd)
            result.append(fn())
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, name=f"netns-{ns}")
    thread.start()
    thread.join(10)
    if errors:
        raise errors[0]
    return result[0]


def _listening_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((RELAY_IP, 0))
    sock.listen(64)
    sock.setblocking(False)
    return sock


@contextlib.asynccontextmanager
async def relay_in(pair: VethPair, config: Config) -> AsyncIterator[int]:
    """Real listeners and spool, serving on RELAY_IP inside the relay namespace; the port."""
    sock = in_netns(pair.relay_ns, _listening_socket)
    port = int(sock.getsockname()[1])
    spool = await Spool.open(config.outbound.queue_dir)
    try:
        listeners = await start_listeners(
            config, spool, HookRunner([]), inherited=[(sock.detach(), False)]
        )
        try:
            yield port
        finally:
            await listeners.close(grace=2.0)
    finally:
        await spool.close()


async def client_from(pair: VethPair, port: int) -> LineClient:
    """A connection from CLIENT_IP (inside the client namespace) to the relay."""

    def connect() -> socket.socket:
        sock = socket.create_connection((RELAY_IP, port), timeout=5)
        sock.setblocking(False)
        return sock

    sock = in_netns(pair.client_ns, connect)
    assert sock.getsockname()[0] == CLIENT_IP
    reader, writer = await asyncio.open_connection(sock=sock)
    client = LineClient(reader, writer)
    assert (await client.reply()).startswith("220 ")
    return client


async def starttls(client: LineClient, context: ssl.SSLContext) -> None:
    assert (await client.cmd("STARTTLS")).startswith("220")
    await client.writer.start_tls(context, server_hostname=RELAY_IP)


async def test_auth_needs_tls_from_a_non_loopback_client(tmp_path: Path, veth: VethPair) -> None:
    """auth_require_tls: no AUTH offered in clear, 538 5.7.11 if tried, fine after STARTTLS."""
    pki = certs.make_pki(tmp_path / "pki", RELAY_IP)
    config = make_config(tmp_path, pki=pki, auth_require_tls=True)
    async with relay_in(veth, config) as port:
        client = await client_from(veth, port)
        try:
            ehlo = await client.cmd("EHLO client.test")
            assert "STARTTLS" in ehlo and "AUTH" not in ehlo
            assert (await client.cmd(f"AUTH PLAIN {plain('alice', PASSWORD)}")).startswith(
                "538 5.7.11"
            )
            assert (await client.cmd("MAIL FROM:<a@client.test>")).startswith("250")
            # Not authenticated, not in the ACL, but AUTH is possible after STARTTLS.
            assert (await client.cmd("RCPT TO:<b@dest.test>")).startswith("530 5.7.0")
            assert (await client.cmd("RSET")).startswith("250")
            await starttls(client, pki.client_context())
            ehlo = await client.cmd("EHLO client.test")
            assert "AUTH PLAIN LOGIN" in ehlo and "STARTTLS" not in ehlo
            assert (await client.cmd(f"AUTH PLAIN {plain('alice', PASSWORD)}")).startswith("235")
            assert (await client.cmd("MAIL FROM:<a@client.test>")).startswith("250")
            assert (await client.cmd("RCPT TO:<b@dest.test>")).startswith("250")
        finally:
            await client.close()


async def test_auth_in_clear_is_offered_when_tls_is_not_required(
    tmp_path: Path, veth: VethPair
) -> None:
    pki = certs.make_pki(tmp_path / "pki", RELAY_IP)
    config = make_config(tmp_path, pki=pki, auth_require_tls=False)
    async with relay_in(veth, config) as port:
        client = await client_from(veth, port)
        try:
            assert "AUTH PLAIN LOGIN" in await client.cmd("EHLO client.test")
            assert (await client.cmd(f"AUTH PLAIN {plain('alice', PASSWORD)}")).startswith("235")
        finally:
            await client.close()


@pytest.mark.parametrize(
    ("acl", "allowed"),
    [
        ([f"{CLIENT_IP}/32"], True),
        (["10.77.0.0/30", "192.0.2.0/24"], True),
        (["10.77.1.0/24"], False),
        (["127.0.0.0/8", "::1/128"], False),
    ],
)
async def test_relay_acl_decides_for_a_non_loopback_client(
    tmp_path: Path, veth: VethPair, acl: list[str], allowed: bool
) -> None:
    """relay_acl_allow by CIDR; no AUTH configured, so a refusal is 550 5.7.1."""
    config = make_config(tmp_path, plugins=(), relay_acl=acl)
    async with relay_in(veth, config) as port:
        client = await client_from(veth, port)
        try:
            await client.cmd("EHLO client.test")
            assert (await client.cmd("MAIL FROM:<a@client.test>")).startswith("250")
            reply = await client.cmd("RCPT TO:<b@dest.test>")
            assert reply.startswith("250" if allowed else "550 5.7.1"), reply
        finally:
            await client.close()
