"""SMTP nodes share the sessions: a burst of long-lived connections is split.

The real ``outboundd`` with ``nodes=2``; which process serves each session is
read from the kernel (``/proc/net/tcp`` and each process's descriptors), not
from anything outboundd says about itself.  The session board on its own is
tested in this process.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from outboundd.log import Logger
from outboundd.submission.acceptor import NOT_ACCEPTING, Acceptor, SessionBoard
from tests import certs
from tests.dnsserver import DNSServer
from tests.harness import Daemon, write_config
from tests.submission_fixtures import make_config, running_relay

SESSIONS = 20


def _server_socket_inodes(port: int) -> dict[int, int]:
    """Client port → inode of the server side's socket, for connections to ``port``."""
    found: dict[int, int] = {}
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, state, inode = fields[1], fields[2], fields[3], int(fields[9])
        if state == "01" and int(local.split(":")[1], 16) == port:  # ESTABLISHED
            found[int(remote.split(":")[1], 16)] = inode
    return found


def _owner_of(inodes: set[int], pids: list[int]) -> dict[int, int]:
    """inode → the PID holding that socket open."""
    owners: dict[int, int] = {}
    for pid in pids:
        fd_dir = Path(f"/proc/{pid}/fd")
        for entry in fd_dir.iterdir():
            try:
                target = os.readlink(entry)
            except OSError:
                continue  # closed meanwhile
            if target.startswith("socket:["):
                inode = int(target[8:-1])
                if inode in inodes:
                    owners[inode] = pid
    return owners


async def _last_reply_line(reader: asyncio.StreamReader) -> bytes:
    """The code and separator of the last line of a (multi-line) reply."""
    for _ in range(50):
        line = await asyncio.wait_for(reader.readline(), 10)
        if line[3:4] != b"-":
            return line[:4]
    raise AssertionError("a reply of more than 50 lines")


@pytest.fixture
async def two_nodes(dns_server: DNSServer, tmp_path: Path) -> AsyncIterator[Daemon]:
    config = write_config(
        tmp_path / "config", dns_port=dns_server.port, mx_port=9, smtp={"nodes": 2}
    )
    d = Daemon(config)
    await d.start()  # "ready": the node accepts too (the first process waited for it)
    try:
        yield d
    finally:
        await d.stop()


async def _split_of_a_burst(d: Daemon) -> Counter[int]:
    """20 clients connect at once and keep their sessions open (as submitters
    reusing connections do): how many sessions each process serves."""
    opened = await asyncio.gather(
        *(asyncio.open_connection("127.0.0.1", d.smtp_port) for _ in range(SESSIONS))
    )
    try:
        for reader, writer in opened:
            assert (await asyncio.wait_for(reader.readline(), 10)).startswith(b"220 ")
            writer.write(b"EHLO client.test\r\n")
        for reader, _ in opened:
            assert await _last_reply_line(reader) == b"250 "
        client_ports = [writer.get_extra_info("sockname")[1] for _, writer in opened]
        inodes = _server_socket_inodes(d.smtp_port)
        served = {inodes[port] for port in client_ports}
        assert d.proc is not None
        owners = _owner_of(served, [d.proc.pid, *d.children()])
        assert len(owners) == SESSIONS
        return Counter(owners.values())
    finally:
        for _, writer in opened:
            writer.write(b"QUIT\r\n")
            writer.close()


async def test_a_burst_of_kept_sessions_is_split_between_the_nodes(two_nodes: Daemon) -> None:
    """Both SMTP processes serve about half.  Before the acceptor, all 20
    went to the first process."""
    per_process = await _split_of_a_burst(two_nodes)
    assert len(per_process) == 2, per_process
    assert min(per_process.values()) >= SESSIONS // 2 - 3, per_process
    accepting = next(i for i, ln in enumerate(two_nodes.lines) if "SMTP node accepting" in ln)
    assert accepting < next(i for i, ln in enumerate(two_nodes.lines) if 'message="ready"' in ln)


async def test_clients_that_come_while_the_nodes_start_are_split_too(
    dns_server: DNSServer, tmp_path: Path
) -> None:
    """The burst comes the moment the listening socket exists (a client
    retrying while the relay restarts, a load generator that only waits for
    the port): it waits in the kernel's queue until every process accepts,
    then is shared.  Before, every such session stayed on the first process
    (seen in tools/bench --reuse-sessions: all 20 on one process)."""
    config = write_config(
        tmp_path / "config", dns_port=dns_server.port, mx_port=9, smtp={"nodes": 2}
    )
    d = Daemon(config)
    try:
        await d.start(until=re.compile(r'message="listening"'))
        per_process = await _split_of_a_burst(d)
        assert len(per_process) == 2, per_process
        assert min(per_process.values()) >= SESSIONS // 2 - 3, per_process
    finally:
        await d.stop()


async def test_a_session_ends_on_every_node_after_the_split(two_nodes: Daemon) -> None:
    """The sessions the second node took work like any other: a full EHLO,
    MAIL, RCPT and RSET exchange on each of them."""
    d = two_nodes
    opened = await asyncio.gather(
        *(asyncio.open_connection("127.0.0.1", d.smtp_port) for _ in range(6))
    )
    for reader, writer in opened:
        assert (await asyncio.wait_for(reader.readline(), 10)).startswith(b"220 ")
        for command, code in (
            (b"HELO client.test", b"250"),
            (b"MAIL FROM:<alice@sender.test>", b"250"),
            (b"RCPT TO:<bob@dest.test>", b"250"),
            (b"RSET", b"250"),
            (b"QUIT", b"221"),
        ):
            writer.write(command + b"\r\n")
            assert (await asyncio.wait_for(reader.readline(), 10)).startswith(code)
        writer.close()


def test_the_board_tells_a_busier_node_from_the_others() -> None:
    board = SessionBoard.create(3)
    try:
        assert board.counts() == [NOT_ACCEPTING] * 3  # nobody accepts yet
        node = SessionBoard.attach(os.dup(board.fd), 2)
        try:
            board.publish(4)
            node.publish(3)
            assert board.counts() == [4, NOT_ACCEPTING, 3]
            # Slot 1 does not accept: nobody leaves it a connection.
            assert not board.busier_than_another(4)
            assert board.busier_than_another(5)  # 2 more than slot 2
            assert not node.busier_than_another(3)
            late = SessionBoard.attach(os.dup(board.fd), 1)
            late.publish(0)  # slot 1 starts accepting
            late.close()
            assert board.busier_than_another(4)
            assert node.busier_than_another(3)
            assert not node.busier_than_another(1)  # one more than slot 1: at par
            board.retire(1)  # the first process saw node 1 exit
            assert board.counts() == [4, NOT_ACCEPTING, 3]
            assert not node.busier_than_another(3)
        finally:
            node.close()
    finally:
        board.close()


def test_a_slot_outside_the_board_is_refused() -> None:
    board = SessionBoard.create(2)
    try:
        with pytest.raises(ValueError, match="slot 2"):
            SessionBoard(board.fd, 2, 2)
    finally:
        board.close()


async def test_failed_set_ups_leave_nothing_behind(tmp_path: Path, pki: certs.TestPKI) -> None:
    """Clients that fail or abandon the implicit-TLS handshake, or hang up at
    once, are dropped without a trace: the listener goes on accepting, and
    the count of sessions being set up (what a node publishes on the board)
    comes back to zero."""
    config = make_config(tmp_path, pki=pki, implicit_tls=True, relay_acl=["127.0.0.0/8"])
    async with running_relay(config) as relay:
        # Plaintext where a TLS hello is due: the server hangs up.
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.port(implicit_tls=True))
        writer.write(b"EHLO client.test\r\n")
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()
        # Connections abandoned before the handshake, and before the greeting.
        for port in (relay.port(implicit_tls=True), relay.port()):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", relay.port(implicit_tls=True), ssl=pki.client_context()
        )
        assert (await asyncio.wait_for(reader.readline(), 10)).startswith(b"220 ")
        writer.write(b"QUIT\r\n")
        assert (await asyncio.wait_for(reader.readline(), 10)).startswith(b"221 ")
        writer.close()
        for _ in range(200):
            counts = [acceptor.open_sessions() for acceptor in relay.listeners.acceptors]
            if counts == [0] * len(counts):
                break
            await asyncio.sleep(0.02)
        assert counts == [0] * len(counts)
        assert relay.messages() == []


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
async def test_an_accepted_socket_is_what_accept_would_have_made(host: str) -> None:
    """The acceptor's socket for a connection (family and type kept as plain
    attributes, not asked of the descriptor) says what the kernel says, and
    matches, in every property a transport reads, the socket that
    ``socket.accept()`` makes for the next connection."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as listener:
        listener.bind((host, 0))
        listener.listen(8)
        listener.setblocking(False)
        acceptor = Acceptor(
            listener.fileno(), asyncio.Protocol, None, Logger("test"), sessions=lambda: 0
        )
        clients = [socket.create_connection(listener.getsockname()[:2]) for _ in range(2)]
        try:
            ours = acceptor._accept_socket()
            # What socket.accept() makes, on the very socket the acceptor polls.
            theirs, _ = acceptor._socket.accept()
            with ours, theirs:
                for name in ("family", "type"):
                    told = getattr(ours, name)
                    # socket.socket's own property asks the descriptor.
                    asked = getattr(socket.socket, name).fget(ours)
                    assert told == asked == getattr(theirs, name)
                    assert type(told) is type(asked)
                assert ours.proto == theirs.proto
                assert ours.getblocking() == theirs.getblocking()
                assert ours.gettimeout() == theirs.gettimeout()
                assert ours.getpeername() == clients[0].getsockname()
                assert theirs.getpeername() == clients[1].getsockname()
        finally:
            acceptor.close()
            for client in clients:
                client.close()
