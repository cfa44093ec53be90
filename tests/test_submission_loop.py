"""The session's own command loop answers exactly as aiosmtpd's would.

``SubmissionSMTP`` replaces aiosmtpd's ``_handle_client``, ``connection_made``
and ``smtp_QUIT`` with leaner versions (no per-command log calls, bound
methods or task cancellation).  These tests run one scripted dialogue
against the listener and against a session that uses aiosmtpd's own
methods, on the same context, and require the same octets back; and they
check that a reply still waits for a client that stops reading.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiosmtpd.smtp import SMTP

from outboundd.submission.handler import SubmissionContext, SubmissionSMTP, session_template
from tests.submission_fixtures import Relay, make_config, running_relay

#: Each step: the octets sent, then whether a reply comes back (False: the
#: server closes the connection instead).
_SCRIPT: list[tuple[bytes, bool]] = [
    (b"\r\n", True),  # empty line
    (b"\xff\xfeHELO x\r\n", True),  # command not ASCII
    (b"HELO\r\n", True),  # no argument
    (b"MAIL FROM:<a@example.com>\r\n", True),  # before HELO
    (b"HELO client.test\r\n", True),
    (b"NOOP " + b"x" * 600 + b"\r\n", True),  # over 512 octets before EHLO
    (b"QUIT now\r\n", True),  # QUIT takes no argument
    (b"NOOP\r\n", True),
    (b"RSET\r\n", True),
    (b"VRFY <a@example.com>\r\n", True),
    (b"EHLO client.test\r\n", True),
    (b"MAIL FROM:<a@example.com> ENVID=" + b"e" * 1100 + b"\r\n", True),  # over the limit
    (b"MAIL FROM:<\xc3\xa9@example.com> SMTPUTF8\r\n", True),  # 8-bit argument
    (b"RCPT TO:<b@example.org>\r\n", True),
    (b"RCPT TO:<b@example.org>\r\n", True),  # duplicate
    (b"DATA now\r\n", True),
    (b"rset\r\n", True),  # commands are case-insensitive
    (b"X" * 5000 + b"\r\n", True),  # over the reader's limit
    (b"FOO\r\n", True),
    (b"BAR baz\r\n", True),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n", True),  # TLS hello: not ASCII
    (b"BAZ\r\n", True),
    (b"QUUX\r\n", True),
    (b"FROB\r\n", True),  # the fifth unknown command: 502 and the connection closes
    (b"NOOP\r\n", False),
]

_QUIT_SCRIPT: list[tuple[bytes, bool]] = [
    (b"EHLO client.test\r\n", True),
    (b"QUIT\r\n", True),
    (b"NOOP\r\n", False),
]


class _LibraryLoop(SubmissionSMTP):
    """A session whose command loop, connection set-up and QUIT are aiosmtpd's."""

    _handle_client = SMTP._handle_client
    smtp_QUIT = SMTP.smtp_QUIT

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self._streams:  # aiosmtpd's set-up makes its streams from the reader
            self._streams = True
            self._new_reader()
        SMTP.connection_made(self, transport)
        if not self._registered:
            self._registered = True
            self.ctx.session_started(self)


@contextlib.asynccontextmanager
async def _library_server(ctx: SubmissionContext) -> AsyncIterator[int]:
    template = session_template(ctx, implicit_tls=False)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: _LibraryLoop(ctx, template=template), host="127.0.0.1", port=0
    )
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        server.close()
        await server.wait_closed()


async def _dialogue(port: int, script: list[tuple[bytes, bool]]) -> list[bytes]:
    """The greeting, then every reply (or b"<closed>") of ``script``."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        got = [await asyncio.wait_for(reader.readline(), 5)]
        for data, answered in script:
            writer.write(data)
            await writer.drain()
            if not answered:
                tail = await asyncio.wait_for(reader.read(), 5)
                got.append(b"<closed>" if tail == b"" else tail)
                continue
            reply = b""
            while True:  # the lines of one reply: "250-" ... "250 "
                line = await asyncio.wait_for(reader.readline(), 5)
                assert line, f"closed after {data!r}: {got}"
                reply += line
                if line[3:4] != b"-":
                    break
            got.append(reply)
        return got
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


@pytest.mark.parametrize("script", [_SCRIPT, _QUIT_SCRIPT], ids=["errors", "quit"])
async def test_command_loop_answers_as_aiosmtpd(
    tmp_path: Path, script: list[tuple[bytes, bool]]
) -> None:
    config = make_config(tmp_path, plugins=(), relay_acl=["127.0.0.0/8"])
    async with running_relay(config) as relay:
        ours = await _dialogue(relay.port(), script)
        async with _library_server(relay.listeners.context) as port:
            theirs = await _dialogue(port, script)
        assert ours == theirs
        assert ours[0] == b"220 relay.test outboundd ESMTP\r\n"
        assert ours[-1] == b"<closed>"
        assert relay.messages() == []
        # Every session ended and was counted out, ours and the library's.
        for _ in range(100):
            if not relay.listeners.context.sessions:
                break
            await asyncio.sleep(0.01)
        assert not relay.listeners.context.sessions


async def _wait_paused(relay: Relay) -> SubmissionSMTP:
    for _ in range(500):
        for session in relay.listeners.context.sessions:
            if session._paused:
                return session
        await asyncio.sleep(0.01)
    raise AssertionError("the session never stopped writing for a client that does not read")


async def test_replies_wait_for_a_client_that_stops_reading(tmp_path: Path) -> None:
    config = make_config(tmp_path, plugins=(), relay_acl=["127.0.0.0/8"])
    async with running_relay(config) as relay:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, ("127.0.0.1", relay.port()))
        reader, writer = await asyncio.open_connection(sock=sock)
        try:
            assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"220 ")
            # Small kernel buffers on both sides, so the replies back up.
            for session in relay.listeners.context.sessions:
                transport = session.transport
                assert transport is not None
                server_socket = transport.get_extra_info("socket")
                server_socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
                transport.set_write_buffer_limits(high=256)  # type: ignore[attr-defined]
            count = 20000
            # Not drained: the server stops reading while it waits for us.
            writer.write(b"NOOP\r\n" * count)
            session = await _wait_paused(relay)
            # While paused the session waits: it takes no further command, so
            # its buffer stays near the high-water mark instead of growing by
            # a reply per NOOP (some 280 KB for all of them).
            await asyncio.sleep(0.2)
            assert session.transport is not None
            assert session.transport.get_write_buffer_size() < 1024  # type: ignore[attr-defined]
            replies = 0
            while replies < count:
                line = await asyncio.wait_for(reader.readline(), 10)
                assert line == b"250 2.0.0 OK\r\n", line
                replies += 1
            assert not session._paused
            writer.write(b"QUIT\r\n")
            assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"221 ")
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def test_data_reads_large_pieces_then_the_line_limit_applies_again(tmp_path: Path) -> None:
    """DATA widens the stream reader's limit while it reads, and gives it back.

    A message with lines ending in dots (each ``.<CRLF>`` ends a piece) and
    a stretch longer than DATA's own read limit without one is stored
    exactly; afterwards a command line is held to the command limit again.
    """
    config = make_config(tmp_path, plugins=(), relay_acl=["127.0.0.0/8"])
    async with running_relay(config) as relay:
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.port())
        try:
            assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"220 ")
            body = b"Subject: pieces\r\n\r\n" + b"A sentence.\r\n" * 3000
            body += (b"x" * 998 + b"\r\n") * 200  # 200 KB without a line ending in a dot
            writer.write(
                b"HELO client.test\r\nMAIL FROM:<a@example.com>\r\n"
                b"RCPT TO:<b@example.org>\r\nDATA\r\n"
            )
            for _ in range(4):
                await asyncio.wait_for(reader.readline(), 5)
            writer.write(body + b".\r\n")
            reply = await asyncio.wait_for(reader.readline(), 10)
            assert reply.startswith(b"250 2.0.0 Ok: queued as "), reply
            qid = reply.rstrip(b"\r\n").rsplit(b" ", 1)[1].decode()
            # The headers gain Received, Message-ID and Date; the text is exact.
            stored = relay.body(qid)
            assert stored.split(b"\r\n\r\n", 1)[1] == body.split(b"\r\n\r\n", 1)[1]
            assert b"\r\nSubject: pieces\r\n" in stored
            writer.write(b"NOOP " + b"x" * 2000 + b"\r\nNOOP\r\n")
            assert await asyncio.wait_for(reader.readline(), 5) == (
                b"500 5.5.2 Command line too long\r\n"
            )
            assert await asyncio.wait_for(reader.readline(), 5) == b"250 2.0.0 OK\r\n"
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
