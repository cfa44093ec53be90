"""Commands answered in ``data_received`` answer exactly as aiosmtpd's loop would.

``SubmissionSMTP`` answers EHLO, HELO, MAIL, RCPT, RSET, NOOP, QUIT and
error lines in its protocol's ``data_received``, with no session task, and
starts a task only for a command that must wait (DATA, AUTH, STARTTLS ...).
Each dialogue here runs against the listener and against a session whose
command loop is aiosmtpd's own (``_LibraryLoop``, which never answers in
``data_received``), on the same context, and the octets that come back
must be the same (queue IDs aside): pipelined groups, lines cut across
segments, bare LF, over-long lines, dot-stuffing cut across segments,
RSET in a transaction, QUIT with more after it, AUTH with challenges,
STARTTLS then EHLO, timeouts and clients that leave.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import re
import socket
import ssl
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from outboundd.config import Config
from outboundd.hooks import HookRunner
from outboundd.spool.types import NewMessage
from outboundd.submission.handler import SubmissionSMTP
from outboundd.submission.queueing import SpoolSink
from outboundd.submission.transaction import Transaction
from tests import certs
from tests.submission_fixtures import PASSWORD, LineClient, Relay, make_config, running_relay
from tests.test_submission_loop import _library_server, _wait_paused


@dataclass(frozen=True)
class Send:
    """Octets written in one ``write`` (one segment on loopback), then ``replies`` read.

    ``replies=-1`` reads to the end of the connection instead.
    """

    data: bytes
    replies: int = 1


@dataclass(frozen=True)
class Pause:
    """Wait, so the next octets arrive in a segment of their own."""

    seconds: float = 0.05


@dataclass(frozen=True)
class StartTLS:
    """Upgrade the client's side of the connection (after the 220 to STARTTLS)."""


@dataclass(frozen=True)
class HalfClose:
    """Shut the client's writing side: the server sees the end of the stream."""


Step = Send | Pause | StartTLS | HalfClose

_QUEUE_ID = re.compile(rb"queued as \S+")
_CLOSED = b"<closed>"
_MESSAGE = b"Subject: t\r\n\r\nline one\r\n..stuffed\r\n"


def _plain(user: str, password: str) -> bytes:
    return base64.b64encode(f"\0{user}\0{password}".encode())


async def _read_reply(reader: asyncio.StreamReader) -> bytes:
    reply = b""
    while True:  # the lines of one reply: "250-" ... "250 "
        line = await asyncio.wait_for(reader.readline(), 5)
        if not line:
            return reply + _CLOSED
        reply += line
        if line[3:4] != b"-":
            return reply


async def _dialogue(
    port: int, script: Sequence[Step], tls: certs.TestPKI | None = None
) -> list[bytes]:
    """The greeting, then every reply the script reads (queue IDs replaced)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    got = [await _read_reply(reader)]
    try:
        for step in script:
            if isinstance(step, Pause):
                await asyncio.sleep(step.seconds)
            elif isinstance(step, StartTLS):
                assert tls is not None
                await writer.start_tls(tls.client_context(), server_hostname="localhost")
            elif isinstance(step, HalfClose):
                writer.write_eof()
            elif step.replies < 0:
                if step.data:
                    writer.write(step.data)
                tail = await asyncio.wait_for(reader.read(), 5)
                got.append(tail + _CLOSED)
            else:
                writer.write(step.data)
                await writer.drain()
                for _ in range(step.replies):
                    got.append(await _read_reply(reader))
        return [_QUEUE_ID.sub(b"queued as ID", reply) for reply in got]
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()


async def _both(
    relay: Relay, script: Sequence[Step], tls: certs.TestPKI | None = None
) -> list[bytes]:
    """Run ``script`` against our listener and aiosmtpd's loop; require the same octets."""
    ours = await _dialogue(relay.port(), script, tls)
    async with _library_server(relay.listeners.context) as port:
        theirs = await _dialogue(port, script, tls)
    assert ours == theirs
    await _sessions_end(relay)
    return ours


async def _sessions_end(relay: Relay) -> None:
    for _ in range(250):
        if not relay.listeners.context.sessions:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("a session was never counted out")


@contextlib.asynccontextmanager
async def _greeted_session(
    relay: Relay, sock: socket.socket | None = None
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter, SubmissionSMTP]]:
    """A client connected (on ``sock`` if given) and greeted, with the relay's
    session it talks to; the client closed on the way out."""
    if sock is None:
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.port())
    else:
        reader, writer = await asyncio.open_connection(sock=sock)
    try:
        await _read_reply(reader)
        (session,) = relay.listeners.context.sessions
        assert isinstance(session, SubmissionSMTP)
        yield reader, writer, session
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def _config(tmp_path: Path, **kwargs: object) -> Config:
    kwargs.setdefault("plugins", ())
    kwargs.setdefault("relay_acl", ["127.0.0.0/8"])
    return make_config(tmp_path, **kwargs)  # type: ignore[arg-type]


async def test_a_pipelined_group_is_answered_in_order(tmp_path: Path) -> None:
    script: list[Step] = [
        Send(b"EHLO client.test\r\n"),
        Send(
            b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\n"
            b"RCPT TO:<bad address>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n",
            5,
        ),
        Send(_MESSAGE + b".\r\nMAIL FROM:<c@example.com>\r\nRSET\r\nNOOP\r\n", 4),
        Send(b"QUIT\r\nNOOP\r\nNOOP\r\n", -1),
    ]
    async with running_relay(_config(tmp_path)) as relay:
        got = await _both(relay, script)
        assert got[1].startswith(b"250-relay.test\r\n")
        assert got[2:12] == [
            b"250 2.1.0 Sender OK\r\n",
            b"250 2.1.5 Recipient OK\r\n",
            got[4],
            b"250 2.1.5 Recipient OK (duplicate ignored)\r\n",
            b"354 End data with <CR><LF>.<CR><LF>\r\n",
            b"250 2.0.0 Ok: queued as ID\r\n",
            b"250 2.1.0 Sender OK\r\n",
            b"250 2.0.0 OK\r\n",
            b"250 2.0.0 OK\r\n",
            b"221 2.0.0 Bye\r\n" + _CLOSED,
        ]
        assert got[4].startswith(b"501 ")
        assert len(relay.messages()) == 2


async def test_lines_cut_across_segments_and_bare_lf(tmp_path: Path) -> None:
    script: list[Step] = [
        Send(b"EH", 0),
        Pause(),
        Send(b"LO client.test\r\nMA"),
        Pause(),
        Send(b"IL FROM:<a@example.com>\r", 0),
        Pause(),
        Send(b"\nRCPT TO:<b@example.org>\n", 2),  # bare LF ends a command line
        Send(b"DATA\r\n"),
        Send(b"Subject: cut\r\n\r\nfirst\r\n.", 0),
        Pause(),
        Send(b".stuffed\r\nlast\r\n", 0),
        Pause(),
        Send(b".", 0),
        Pause(),
        Send(b"\r", 0),
        Pause(),
        Send(b"\nNOOP\n", 2),
        Send(b"QUIT\r\n", -1),
    ]
    async with running_relay(_config(tmp_path)) as relay:
        got = await _both(relay, script)
        assert got[2:7] == [
            b"250 2.1.0 Sender OK\r\n",
            b"250 2.1.5 Recipient OK\r\n",
            b"354 End data with <CR><LF>.<CR><LF>\r\n",
            b"250 2.0.0 Ok: queued as ID\r\n",
            b"250 2.0.0 OK\r\n",
        ]
        for queue_id, *_ in relay.messages():
            assert relay.body(queue_id).endswith(b"\r\n\r\nfirst\r\n.stuffed\r\nlast\r\n")


async def test_over_long_lines_whole_cut_and_followed(tmp_path: Path) -> None:
    script: list[Step] = [
        Send(b"NOOP " + b"x" * 600 + b"\r\n"),  # over 512 before EHLO
        Send(b"EHLO client.test\r\n"),
        Send(b"MAIL FROM:<a@example.com> " + b"x" * 970 + b"\r\n"),  # within MAIL's limit
        Send(b"RSET " + b"x" * 994 + b"\r\n"),  # the reader's limit, over RSET's
        Send(b"X" * 3000, 0),
        Pause(),
        Send(b"Y" * 3000, 0),
        Pause(),
        Send(b"Z" * 10 + b"\r\nNOOP\r\n", 2),
        Send(b"MAIL FROM:<a@example.com> " + b"x" * 5000 + b"\r\nNOOP\r\n", 2),
        Send(b"QUIT\r\n", -1),
    ]
    async with running_relay(_config(tmp_path)) as relay:
        got = await _both(relay, script)
        too_long = b"500 5.5.2 Command line too long\r\n"
        assert got[1] == got[4] == got[5] == got[7] == too_long
        assert got[3].startswith(b"555 ")  # a command line: its parameter is refused
        assert got[6] == got[8] == b"250 2.0.0 OK\r\n"


async def test_rset_in_a_transaction_and_commands_out_of_order(tmp_path: Path) -> None:
    script: list[Step] = [
        Send(b"MAIL FROM:<a@example.com>\r\n"),
        Send(b"HELO client.test\r\n"),
        Send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nRSET x\r\n", 3),
        Send(b"RSET\r\nRCPT TO:<b@example.org>\r\nDATA\r\n", 3),
        Send(b"MAIL FROM:<a@example.com>\r\nMAIL FROM:<a@example.com>\r\n", 2),
        Send(b"HELO\r\nEHLO\r\nQUIT x\r\nVRFY <a@example.com>\r\nVRFY\r\n", 5),
        Send(b"FOO\r\n\r\n\xffX\r\n", 3),
        Send(b"QUIT\r\n", -1),
    ]
    async with running_relay(_config(tmp_path)) as relay:
        got = await _both(relay, script)
        assert got[1].startswith(b"503 ")
        assert got[7].startswith(b"503 ")  # RCPT after RSET needs MAIL again
        assert relay.messages() == []


async def test_auth_plain_and_login_with_challenges(tmp_path: Path) -> None:
    login_user = base64.b64encode(b"alice")
    script: list[Step] = [
        Send(b"EHLO client.test\r\n"),
        Send(b"AUTH PLAIN\r\n"),
        Send(b"*\r\n"),  # cancelled
        Send(b"AUTH LOGIN\r\n"),
        Send(login_user + b"\r\n"),
        Send(b"not base64!\r\n"),
        Send(b"AUTH PLAIN\r\n"),
        Send(_plain("alice", PASSWORD) + b"\r\nNOOP\r\n", 2),
        Send(b"AUTH LOGIN " + login_user + b"\r\n"),
        Send(b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<b@example.org>\r\n", 2),
        Send(b"QUIT\r\n", -1),
    ]
    config = _config(tmp_path, plugins=("auth_flat_file",), relay_acl=[])
    async with running_relay(config) as relay:
        got = await _both(relay, script)
        assert got[2] == b"334 \r\n"
        assert got[8].startswith(b"235 ")
        assert got[9] == b"250 2.0.0 OK\r\n"
        assert got[11:13] == [b"250 2.1.0 Sender OK\r\n", b"250 2.1.5 Recipient OK\r\n"]


async def test_starttls_then_ehlo(tmp_path: Path) -> None:
    pki = certs.make_pki(tmp_path / "pki", "localhost", "127.0.0.1")
    script: list[Step] = [
        Send(b"EHLO client.test\r\nMAIL FROM:<a@example.com>\r\nRSET\r\n", 3),
        Send(b"STARTTLS\r\n"),
        StartTLS(),
        Send(b"MAIL FROM:<a@example.com>\r\n"),  # EHLO is needed again
        Send(b"EHLO client.test\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\n", 3),
        Send(b"DATA\r\n"),
        Send(_MESSAGE + b".\r\n"),
        Send(b"STARTTLS\r\nNOOP\r\n", 2),
        Send(b"QUIT\r\n", -1),
    ]
    async with running_relay(_config(tmp_path, pki=pki)) as relay:
        got = await _both(relay, script, pki)
        assert b"250 STARTTLS\r\n" in got[1]
        assert got[4].startswith(b"220 ")
        assert got[5].startswith(b"503 ")
        assert b"STARTTLS" not in got[6]
        assert got[10] == b"250 2.0.0 Ok: queued as ID\r\n"
        assert len(relay.messages()) == 2


async def test_inactivity_timeout_with_a_partial_line(tmp_path: Path) -> None:
    script: list[Step] = [
        Send(b"EHLO client.test\r\n"),
        Send(b"NOO", 0),
        Pause(0.6),
        Send(b"P\r\n", -1),
    ]
    async with running_relay(_config(tmp_path, inactivity_timeout=0.3)) as relay:
        got = await _both(relay, script)
        assert got[-1].endswith(_CLOSED)
        assert not got[-1].startswith(b"250")


async def test_end_of_stream_closes_the_session(tmp_path: Path) -> None:
    script: list[Step] = [
        Send(b"EHLO client.test\r\n"),
        Send(b"NOO", 0),
        HalfClose(),
        Send(b"", -1),
    ]
    async with running_relay(_config(tmp_path)) as relay:
        got = await _both(relay, script)
        assert got[-1] == _CLOSED


async def test_a_client_leaving_mid_data_leaves_nothing(tmp_path: Path) -> None:
    async with running_relay(_config(tmp_path)) as relay:
        for port in (relay.port(), None):
            async with contextlib.AsyncExitStack() as stack:
                if port is None:
                    port = await stack.enter_async_context(_library_server(relay.listeners.context))
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                await _read_reply(reader)
                writer.write(
                    b"EHLO c.test\r\nMAIL FROM:<a@example.com>\r\n"
                    b"RCPT TO:<b@example.org>\r\nDATA\r\n"
                )
                for _ in range(4):
                    await _read_reply(reader)
                writer.write(b"Subject: cut\r\n\r\nhalf a mess")
                await writer.drain()
                writer.close()
                await _sessions_end(relay)
        assert relay.messages() == [] and relay.body_files() == []


async def test_no_task_runs_between_commands_that_need_no_wait(tmp_path: Path) -> None:
    """The design itself: a session task exists only while something waits."""
    async with (
        running_relay(_config(tmp_path)) as relay,
        _greeted_session(relay) as (reader, writer, session),
    ):
        assert session._handler_coroutine is None
        writer.write(b"EHLO c.test\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\n")
        for _ in range(3):
            await _read_reply(reader)
        assert session._handler_coroutine is None
        writer.write(b"DATA\r\n")
        assert (await _read_reply(reader)).startswith(b"354 ")
        # The message is taken in data_received too; only queueing it waits.
        assert session.is_busy() and session._handler_coroutine is None
        writer.write(_MESSAGE + b".\r\n")
        assert (await _read_reply(reader)).startswith(b"250 2.0.0 Ok: queued as ")
        await asyncio.sleep(0.01)
        assert not session.is_busy() and session._handler_coroutine is None


async def test_a_flood_of_pipelined_commands_waits_for_the_reader(tmp_path: Path) -> None:
    """A client that sends faster than it reads: the session stops answering
    while its writes are paused, and no reply is lost or reordered."""
    count = 5000
    async with running_relay(_config(tmp_path)) as relay:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", relay.port()))
        async with _greeted_session(relay, sock) as (reader, writer, session):
            transport = session.transport
            assert transport is not None
            transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            transport.set_write_buffer_limits(high=256)  # type: ignore[attr-defined]
            group = b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nRSET\r\n"
            writer.write(b"EHLO c.test\r\n" + group * count + b"QUIT\r\n")
            paused = await _wait_paused(relay)
            await asyncio.sleep(0.2)
            # Paused, it takes no further command: its buffer stays near the
            # high-water mark instead of growing by the replies of the flood.
            assert paused.transport is not None
            assert paused.transport.get_write_buffer_size() < 1024  # type: ignore[attr-defined]
            assert (await _read_reply(reader)).startswith(b"250-")
            expected = [
                b"250 2.1.0 Sender OK\r\n",
                b"250 2.1.5 Recipient OK\r\n",
                b"250 2.0.0 OK\r\n",
            ] * count
            for want in expected:
                assert await _read_reply(reader) == want
            assert await _read_reply(reader) == b"221 2.0.0 Bye\r\n"
            assert await _read_reply(reader) == _CLOSED


async def test_refused_messages_pipelined_in_one_segment(tmp_path: Path) -> None:
    """Many messages refused at their end, one write: each answered, in order."""
    count = 1500
    group = (
        b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n"
        b"Subject: bare\r\n\r\nbare\nline\r\n.\r\n"
    )
    script: list[Step] = [
        Send(b"EHLO client.test\r\n"),
        Send(group * count + b"NOOP\r\n", 4 * count + 1),
        Send(b"QUIT\r\n", -1),
    ]
    async with running_relay(_config(tmp_path)) as relay:
        got = await _both(relay, script)
        refusal = got[5]
        assert refusal.startswith(b"554 5.5.2 Bare CR or LF")
        assert (
            got[2:-2]
            == [
                b"250 2.1.0 Sender OK\r\n",
                b"250 2.1.5 Recipient OK\r\n",
                b"354 End data with <CR><LF>.<CR><LF>\r\n",
                refusal,
            ]
            * count
        )
        assert got[-2] == b"250 2.0.0 OK\r\n"
        assert relay.messages() == []


async def test_size_and_line_limits_in_data(tmp_path: Path) -> None:
    start = b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n"
    script: list[Step] = [
        Send(b"EHLO client.test\r\n"),
        Send(start, 3),
        Send(b"Subject: big\r\n\r\n" + (b"x" * 70 + b"\r\n") * 100, 0),
        Pause(),
        Send(b"..\r\n.\r\n" + start, 4),
        Send(b"Subject: long\r\n\r\n" + b"y" * 1500 + b"\r\n.\r\nNOOP\r\n", 2),
        Send(b"QUIT\r\n", -1),
    ]
    config = _config(tmp_path, max_message_size=4000, max_line_length=1000)
    async with running_relay(config) as relay:
        got = await _both(relay, script)
        assert got[5].startswith(b"552 5.3.4 Message size exceeds")
        assert got[9] == b"554 5.6.0 Line too long (more than 1000 octets)\r\n"
        assert got[10] == b"250 2.0.0 OK\r\n"
        assert relay.messages() == []


async def test_a_slow_large_message_keeps_the_session_alive(tmp_path: Path) -> None:
    """DATA restarts the inactivity timer as octets come, not only on commands."""
    chunk = (b"z" * 998 + b"\r\n") * 70  # 70 KB: more than the timer's step
    script: list[Step] = [
        Send(b"EHLO client.test\r\n"),
        Send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n", 3),
        Send(b"Subject: slow\r\n\r\n", 0),
    ]
    for _ in range(5):
        script += [Pause(0.25), Send(chunk, 0)]
    script += [Send(b".\r\n"), Send(b"QUIT\r\n", -1)]
    async with running_relay(_config(tmp_path, inactivity_timeout=0.6)) as relay:
        got = await _both(relay, script)
        assert got[5] == b"250 2.0.0 Ok: queued as ID\r\n"
        assert len(relay.messages()) == 2


async def test_a_timeout_in_data_keeps_nothing(tmp_path: Path) -> None:
    script: list[Step] = [
        Send(b"EHLO client.test\r\n"),
        Send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n", 3),
        Send(b"Subject: stalled\r\n\r\nhalf\r\n.", 0),
        Pause(0.6),
        Send(b"\r\n", -1),
    ]
    async with running_relay(_config(tmp_path, inactivity_timeout=0.3)) as relay:
        got = await _both(relay, script)
        assert got[-1] == _CLOSED
        assert relay.messages() == [] and relay.body_files() == []


async def test_no_stream_reader_or_writer_until_a_command_waits(tmp_path: Path) -> None:
    """A session makes asyncio's stream reader and writer only when its task reads."""
    async with running_relay(_config(tmp_path)) as relay:
        async with _greeted_session(relay) as (reader, writer, session):
            writer.write(
                b"EHLO c.test\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n"
            )
            for _ in range(4):
                await _read_reply(reader)
            writer.write(_MESSAGE + b".\r\n")
            # Queueing the message ran in a task, which had nothing to read.
            assert (await _read_reply(reader)).startswith(b"250 2.0.0 Ok: queued as ")
            await asyncio.sleep(0.01)
            assert not session._streams and session._handler_coroutine is None
            writer.write(b"HELP\r\n")
            assert (await _read_reply(reader)).startswith(b"250 ")
            assert session._streams and isinstance(session._reader, asyncio.StreamReader)
            writer.write(b"NOOP\r\n")
            assert await _read_reply(reader) == b"250 2.0.0 OK\r\n"
        await _sessions_end(relay)


class _SlowSpool:
    """The relay's spool, each write held back ``seconds`` first."""

    def __init__(self, spool: SpoolSink, seconds: float) -> None:
        self.spool = spool
        self.seconds = seconds

    def new_queue_id(self) -> str:
        return self.spool.new_queue_id()

    async def accept(self, message: NewMessage, *, queue_id: str | None = None) -> str:
        await asyncio.sleep(self.seconds)
        return await self.spool.accept(message, queue_id=queue_id)

    def start_accept(
        self, message: NewMessage, *, queue_id: str | None = None
    ) -> asyncio.Future[str]:
        return asyncio.ensure_future(self.accept(message, queue_id=queue_id))


@contextlib.asynccontextmanager
async def _slow_relay(tmp_path: Path, seconds: float, slow: str) -> AsyncIterator[Relay]:
    """A relay whose queueing takes ``seconds``: in a hook (a task queues) or in the spool."""
    hooks = None
    if slow == "hook":

        async def pre_send_trans_email(txn: Transaction) -> None:
            await asyncio.sleep(seconds)

        hooks = HookRunner([])
        hooks.add("slow", "pre_send_trans_email", pre_send_trans_email)
    async with running_relay(_config(tmp_path), hooks) as relay:
        queuer = relay.listeners.context.queuer
        if slow == "spool":
            queuer.spool = _SlowSpool(queuer.spool, seconds)
        yield relay


@pytest.mark.parametrize("slow", ["hook", "spool"])
async def test_commands_sent_while_a_message_is_queued(tmp_path: Path, slow: str) -> None:
    """Lines that arrive while the message is being queued wait for its 250."""
    script: list[Step] = [
        Send(b"EHLO client.test\r\n"),
        Send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n", 3),
        Send(_MESSAGE + b".\r\n", 0),
        Pause(0.05),
        Send(b"NOOP\r\nMAIL FROM:<c@example.com>\r\n", 0),
        Pause(0.05),
        Send(b"RSET\r\n", 4),
        Send(b"QUIT\r\n", -1),
    ]
    async with _slow_relay(tmp_path, 0.3, slow) as relay:
        got = await _both(relay, script)
        assert got[5:9] == [
            b"250 2.0.0 Ok: queued as ID\r\n",
            b"250 2.0.0 OK\r\n",
            b"250 2.1.0 Sender OK\r\n",
            b"250 2.0.0 OK\r\n",
        ]
        assert len(relay.messages()) == 2


async def _send_message(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection whose message has been sent, its reply not read."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await _read_reply(reader)
    writer.write(b"EHLO c.test\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n")
    for _ in range(4):
        await _read_reply(reader)
    writer.write(_MESSAGE + b".\r\n")
    await writer.drain()
    return reader, writer


@pytest.mark.parametrize("slow", ["hook", "spool"])
async def test_a_client_leaving_while_its_message_is_queued(
    tmp_path: Path, slow: str, capsys: pytest.CaptureFixture[str]
) -> None:
    async with _slow_relay(tmp_path, 0.2, slow) as relay:
        _, writer = await _send_message(relay.port())
        (session,) = relay.listeners.context.sessions
        await asyncio.sleep(0.05)
        assert session.is_busy() and not session._streams
        writer.close()
        await _sessions_end(relay)
        await relay.listeners.context.queuer.drain(2.0)
        assert not session.is_busy() and session.transport is None
        if slow == "hook":  # gone before the hook returned: nothing was stored
            assert relay.messages() == [] and relay.body_files() == []
        else:  # the spool's write was under way: it completes, and the log says so
            assert len(relay.messages()) == 1
            assert "client gone while its message was being queued" in capsys.readouterr().out


@pytest.mark.parametrize("slow", ["hook", "spool"])
async def test_shutdown_while_a_message_is_queued(tmp_path: Path, slow: str) -> None:
    """The message in flight is answered, then the client is told 421 and let go."""
    async with _slow_relay(tmp_path, 0.3, slow) as relay:
        reader, writer = await _send_message(relay.port())
        await asyncio.sleep(0.05)
        closing = asyncio.create_task(relay.listeners.close(grace=5.0))
        try:
            assert (await _read_reply(reader)).startswith(b"250 2.0.0 Ok: queued as ")
            assert (await _read_reply(reader)).startswith(b"421 4.3.2 ")
            assert await _read_reply(reader) == _CLOSED
        finally:
            await closing
            writer.close()
        assert len(relay.messages()) == 1


class _Records(logging.Handler):
    """Keeps the messages logged to it."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.mark.parametrize("level", [logging.INFO, logging.DEBUG, logging.WARNING])
async def test_aiosmtpd_chatter_follows_its_loggers_level(tmp_path: Path, level: int) -> None:
    """Commands answered in data_received log aiosmtpd's lines for each
    command line (the line in at INFO, every reply out at DEBUG) exactly
    when its logger shows that level, as aiosmtpd's own loop does."""
    library_log = logging.getLogger("mail.log")
    records = _Records()
    async with running_relay(_config(tmp_path)) as relay:
        saved = library_log.level
        library_log.setLevel(level)
        library_log.addHandler(records)
        try:
            client = await LineClient.connect(relay.port())  # reads the greeting
            for line in ("EHLO client.test", "NOOP", "BOGUS", "QUIT"):
                await client.cmd(line)
            assert await client.closed()
            await client.close()
        finally:
            library_log.removeHandler(records)
            library_log.setLevel(saved)
    ins = [line for line in records.lines if " >> " in line]
    outs = [line for line in records.lines if " << " in line]
    if level > logging.INFO:
        assert ins == [] and outs == []
        assert not any("handling connection" in line for line in records.lines)
        return
    # (an unknown command's octets are not logged, only their count)
    assert [line.rsplit(" >> ", 1)[1] for line in ins] == [
        "'EHLO client.test'", "'NOOP'", "'<5 octets>'", "'QUIT'",
    ]  # fmt: skip
    assert sum("Peer: " in line for line in records.lines) == 1
    assert sum("handling connection" in line for line in records.lines) == 1
    # Replies: the greeting (written on its own), then one per command.
    assert len(outs) == (5 if level == logging.DEBUG else 0)
