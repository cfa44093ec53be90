"""The SMTP session: aiosmtpd's protocol with our commands, AUTH and DATA.

We subclass :class:`aiosmtpd.smtp.SMTP` because the behaviour we need is
not reachable through handler hooks alone:

* MAIL and RCPT take RFC 3461 DSN parameters, which aiosmtpd refuses, and
  upper-cases (ENVID and ORCPT are case-sensitive): ``smtp_MAIL`` and
  ``smtp_RCPT`` are ours, built on the pure parsers in :mod:`.policy`.
* DATA must refuse bare CR/LF (SMTP smuggling), answer size overruns with
  ``552 5.3.4`` and never buffer more than the limit: ``smtp_DATA`` is ours.
* AUTH must be offered on loopback even when ``auth_require_tls`` is on,
  verify passwords off the event loop and throttle failing clients:
  ``smtp_AUTH`` wraps aiosmtpd's, and ``auth_PLAIN``/``auth_LOGIN`` replace
  the built-in mechanisms.
* Every reply carries an enhanced status code: :meth:`push` adds one to the
  few replies aiosmtpd still writes itself.

The places that touch aiosmtpd and asyncio internals (the stream reader
and its limit, the inactivity timer, the envelope factory, the flow-control
flags) are small methods marked as such.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import functools
import logging
import random
import ssl
import time
import weakref
from asyncio.streams import FlowControlMixin
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, AnyStr, cast

import aiosmtpd.smtp as aiosmtpd_smtp
from aiosmtpd.smtp import (
    BOGUS_LIMIT,
    MISSING,
    SMTP,
    AuthResult,
    Envelope,
    Session,
    TLSSetupException,
    _AuthMechAttr,
    _Missing,
    login_always_fail,
)

from outboundd.config import Config
from outboundd.log import Logger
from outboundd.plugins.auth_flat_file import Admission, AuthThrottle, ThrottleVerdict, UserStore
from outboundd.spool.errors import SpoolError
from outboundd.submission import (
    fastinit,  # also speeds up aiosmtpd on import
    policy,
    prepare,
    replies,
)
from outboundd.submission.data import DataCollector, DataProblem
from outboundd.submission.policy import Address, MailParams, PolicyError, RcptParams, RelayVerdict
from outboundd.submission.queueing import Queuer, Write
from outboundd.submission.replies import Reply
from outboundd.submission.template import MethodTable, SessionTemplate, command_functions
from outboundd.submission.transaction import Transaction

__all__ = ["SubmissionContext", "SubmissionEnvelope", "SubmissionHandler", "SubmissionSMTP"]

#: The banner after our host name: ``220 me outboundd ESMTP``.
IDENT = "outboundd ESMTP"
#: Reset the inactivity timer after this many octets of DATA, so a large
#: message on a slow link is not cut off by ``inactivity_timeout``.
_DATA_TIMER_STEP = 65536
#: The stream reader's limit while DATA is read: the longest piece without
#: an end marker it hands over at once (it buffers up to twice this before
#: it stops reading the socket).
_DATA_READ_LIMIT = 65536
#: aiosmtpd's own limit for command lines other than MAIL/RCPT/AUTH.
_COMMAND_LINE = 512
#: Longest an AUTH waits for its turn while the client's other attempts are
#: being checked, and the pause between two looks (seconds).
_ADMISSION_WAIT = 30.0
_ADMISSION_POLL = 0.05
#: aiosmtpd's logger (its chatter is shown only at PROTOCOL level).
_LIBRARY_LOG = logging.getLogger("mail.log")
#: DATA's go-ahead (RFC 2034: no enhanced code on 354) and QUIT's answer.
_START_DATA = replies.wire(replies.START_DATA, raw=True)
_BYE = replies.LIBRARY_WIRE["221 Bye"]
_OK = replies.LIBRARY_WIRE["250 OK"]
_SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, closing connection")
#: Replies gathered from one segment's pipelined commands are written once
#: they reach this many octets: a client that stops reading is then sent
#: about as much as it would have been with a write per reply (the
#: transport pauses the session once its buffer is above the high-water mark).
_BATCH_BYTES = 512


def _command_line_limit() -> int:
    return _COMMAND_LINE


def _status_wire(status: str) -> bytes:
    """The octets :meth:`SubmissionSMTP.push` writes for aiosmtpd's reply ``status``."""
    data = replies.LIBRARY_WIRE.get(status)
    return replies.wire(status) if data is None else data


def _reply_wire(reply: Reply) -> bytes:
    """The octets of one of our replies (the named ones are encoded at import)."""
    data = replies.WIRE_BY_ID.get(id(reply))
    return replies.wire(str(reply)) if data is None else data


_BAD_SYNTAX = _status_wire("500 Error: bad syntax")
_LINE_TOO_LONG = _status_wire("500 Command line too long")


@dataclass(eq=False)
class SubmissionContext:
    """Everything the sessions of one daemon share."""

    config: Config
    queuer: Queuer
    users: UserStore
    throttle: AuthThrottle
    log: Logger
    starttls_context: ssl.SSLContext | None = None
    clock: Callable[[], float] = time.time
    sessions: set[SubmissionSMTP] = field(default_factory=set)
    closing: bool = False
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def auth_enabled(self) -> bool:
        """AUTH exists at all: the ``auth_flat_file`` plugin is listed (as in Haraka)."""
        return "auth_flat_file" in self.config.plugins

    def session_started(self, session: SubmissionSMTP) -> None:
        self.sessions.add(session)
        self.idle.clear()

    def session_ended(self, session: SubmissionSMTP) -> None:
        self.sessions.discard(session)
        if not self.sessions:
            self.idle.set()


class SubmissionEnvelope(Envelope):
    """aiosmtpd's envelope plus the parsed, typed transaction state.

    ``sender`` is None until MAIL succeeded; the null sender is an
    :class:`Address` whose ``is_null`` is true (aiosmtpd's own
    ``mail_from`` cannot tell "no MAIL yet" from ``<>``).
    """

    # One envelope a message (and one per EHLO): what every new one holds
    # that is immutable is a class attribute, set on an envelope only when
    # it changes; __init__ makes only the containers.  aiosmtpd's own
    # Envelope.__init__ is not called: the attributes it sets are all here
    # (tests/test_submission_smtp.py compares them with a new Envelope()).
    mail_from: str | None = None
    smtp_utf8: bool = False
    content: bytes | str | None = None
    original_content: bytes | None = None
    sender: Address | None = None
    mail_params: MailParams = MailParams()

    def __init__(self) -> None:
        self.mail_options: list[str] = []
        self.rcpt_tos: list[str] = []
        self.rcpt_options: list[str] = []
        self.recipients: list[Address] = []
        self.rcpt_params: dict[str, RcptParams] = {}
        self.recipient_keys: set[str] = set()


class SubmissionHandler:
    """The aiosmtpd handler object: it has no hooks; everything lives in the session.

    aiosmtpd requires one; the session's own ``smtp_*`` methods do the work.
    """


class SubmissionSMTP(SMTP):
    """One client connection."""

    # asyncio's FlowControlMixin sets these in its __init__ (typeshed does
    # not declare them); _write reads them instead of awaiting drain().
    _paused: bool
    _connection_lost: bool
    # StreamReaderProtocol's, set by _open_streams (typeshed does not declare it).
    _strong_reader: asyncio.StreamReader | None

    # What every session starts with, the same in all of them: class
    # attributes, until a session sets its own.  __init__ set them all, with
    # the per-listener ones some fifty-five attributes in each session's
    # dict; this way a session costs some 8,000 instructions less
    # (tools/listener-cost under callgrind; docs/performance.md, "Per
    # connection, sixth pass").  Only immutable values here.

    # StreamReaderProtocol.__init__'s, without its stream reader: the reader,
    # the writer and the close future are made by _open_streams when the
    # first command must wait (most connections never do).
    _stream_reader_wr: weakref.ref[asyncio.StreamReader] | None = None
    _reject_connection = False
    _stream_writer: asyncio.StreamWriter | None = None
    _task = None
    _transport = None
    _client_connected_cb: Callable[..., object] | None = None
    _over_ssl = False
    # aiosmtpd's SMTP.__init__'s, for our arguments.
    data_size_limit = None  # our smtp_DATA enforces max_message_size
    enable_SMTPUTF8 = True
    _decode_data = False
    _timeout_handle = None
    _tls_handshake_okay = True
    _tls_protocol = None
    _original_transport = None
    session = None
    envelope = None
    transport = None
    _handler_coroutine = None
    _auth_require_tls = False  # our smtp_AUTH applies the policy (loopback allowed)
    _proxy_timeout = None
    _authenticator = None
    _auth_required = False
    _enforce_call_limit = False
    # Ours.
    #: True once _open_streams made the stream reader and writer.
    _streams = False
    _auth_table: dict[str, _AuthMechAttr] | None = None
    _quit = False
    _busy = False
    _registered = False
    _bogus_budget = BOGUS_LIMIT
    #: True while no session task runs: data_received answers commands.
    _fast = False
    #: The start of a command line whose end has not arrived yet (in
    #: DATA: the last octets, which may begin the end marker).
    _pending = b""
    #: The message being received in data_received (None: commands).
    _collector: DataCollector | None = None
    _next_touch = 0
    _deadline = 0.0  # inactivity deadline (loop time); see _reset_timeout

    def __init__(
        self,
        ctx: SubmissionContext,
        *,
        implicit_tls: bool = False,
        template: SessionTemplate | None = None,
    ) -> None:
        # aiosmtpd's SMTP.__init__ is not called: it rebuilds, for every
        # connection, tables that depend only on the listener (see
        # template.py).  This and the class attributes set every attribute
        # it sets, to the values it would compute for our arguments
        # (tests/test_submission_template.py).
        t = template or session_template(ctx, implicit_tls=implicit_tls)
        loop = asyncio.get_running_loop()
        self.loop = loop
        self.line_length_limit = t.line_length_limit
        # StreamReaderProtocol.__init__ without its stream reader (the class
        # attributes hold the rest of what it sets).
        FlowControlMixin.__init__(self, loop=loop)
        self.__ident__ = t.ident
        self.event_handler = t.handler
        self.hostname = t.hostname
        self.tls_context = t.tls_context
        self.require_starttls = t.tls_context and False  # as aiosmtpd computes it
        self._timeout_duration = t.timeout
        self._auth_callback = login_always_fail
        self._auth_excluded = t.auth_exclude
        self._handle_hooks = t.handle_hooks
        self._ehlo_hook_ver = "new" if "EHLO" in t.handle_hooks else None
        # aiosmtpd declares a dict; it only calls .get() and .items() on it.
        functions = command_functions(type(self))
        self._smtp_methods = MethodTable(self, functions)  # type: ignore[assignment]
        #: Every command this class has a coroutine for (data_received's table).
        self._command_functions = functions
        self.ctx = ctx
        self.log = ctx.log
        # RFC 3461 parameters make MAIL/RCPT longer than 512 octets, and RFC
        # 4954 allows long AUTH lines; per instance so sessions don't share it.
        self.command_size_limits = collections.defaultdict(
            _command_line_limit, t.command_size_limits
        )
        #: Commands answered in data_received, without a task (None: every
        #: command goes through the task, as when the handler has hooks).
        self._fast_commands = None if t.handle_hooks else fast_commands(type(self))
        self._template = t
        if _LIBRARY_LOG.isEnabledFor(logging.INFO):
            _LIBRARY_LOG.info(
                "Available AUTH mechanisms: "
                + " ".join(
                    m + "(builtin)" if impl.is_builtin else m
                    for m, impl in sorted(self._auth_methods.items())
                )
            )

    @property
    def _auth_methods(self) -> dict[str, _AuthMechAttr]:  # type: ignore[override]
        # aiosmtpd's table of AUTH mechanisms, built the first time AUTH (or
        # EHLO's keyword list) needs it: most connections never ask.
        table = self._auth_table
        if table is None:
            table = self._auth_table = {
                getattr(
                    method, "__auth_mechanism_name__", name.replace("auth_", "").replace("__", "-")
                ): _AuthMechAttr(method, owner is self)
                for owner in (self, self.event_handler)
                for name, method in fastinit.cached_getmembers(owner)
            }
            for mechanism in self._auth_excluded:
                table.pop(mechanism, None)
        return table

    # ----------------------------------------------------- aiosmtpd internals

    def _new_reader(self) -> None:
        # What StreamReaderProtocol.__init__ does with its stream reader.
        reader = asyncio.StreamReader(loop=self.loop, limit=self.line_length_limit)
        self._stream_reader_wr = weakref.ref(reader)
        self._source_traceback = reader._source_traceback  # type: ignore[attr-defined]
        self._strong_reader = reader
        self._client_connected_cb = self._cb_client_connected
        self._closed = self.loop.create_future()

    def _open_streams(self) -> None:
        """The stream reader and writer, made when the first command must wait.

        asyncio's StreamReaderProtocol makes them (a reader and its buffer,
        a writer, two futures, a weak reference) for every connection, at
        its start; only aiosmtpd's command loop (our session task) uses
        them, and most connections never need that task.  They are made
        here as its ``__init__`` and ``connection_made`` make them, on the
        transport the connection started with (the task is never handed
        the connection back after STARTTLS, so it is still the one).
        """
        if self._streams:
            return
        self._streams = True
        self._new_reader()
        assert self.transport is not None
        asyncio.StreamReaderProtocol.connection_made(self, self.transport)

    def _create_envelope(self) -> SubmissionEnvelope:
        # aiosmtpd's envelope factory (called on RSET, HELO/EHLO and after
        # DATA); overriding it keeps our typed state in step with aiosmtpd's.
        return SubmissionEnvelope()

    def _reset_envelope(self) -> None:
        """A fresh transaction for HELO/EHLO: the current one if nothing was put in it.

        Only a successful MAIL puts anything into an envelope (and RCPT
        needs MAIL), so one without a sender is as new as a new one.
        """
        envelope = self.envelope
        if not isinstance(envelope, SubmissionEnvelope) or envelope.sender is not None:
            self.envelope = self._create_envelope()

    async def _read_data_piece(self) -> bytes:
        # aiosmtpd keeps the connection's StreamReader in ``_reader``; DATA
        # has to read from it directly, as aiosmtpd's own smtp_DATA does.
        piece: bytes = await self._reader.readuntil(b".\r\n")
        return piece

    def _set_read_limit(self, limit: int) -> int:
        # asyncio's StreamReader keeps its limit in ``_limit`` (the line
        # limit aiosmtpd gave it); DATA widens it while it reads.  Returns
        # the limit it replaced.
        reader = self._reader
        old: int = reader._limit  # type: ignore[attr-defined]
        reader._limit = limit  # type: ignore[attr-defined]
        return old

    async def _drain_overlong(self, consumed: int) -> bytes:
        chunk: bytes = await self._reader.read(consumed)
        return chunk

    async def _handle_client(
        self,
        error: Exception | None = None,
        drain: bool = False,
        received: tuple[SubmissionEnvelope, bytes] | None = None,
    ) -> None:
        # aiosmtpd's command loop, minus what never applies to our sessions
        # (PROXY protocol, per-command call limits: neither is configured)
        # and minus its per-command overhead: two log calls per line, a bound
        # method and a defaultdict entry per command.  Replies, limits and
        # error handling are aiosmtpd's, reply for reply.  It runs only while
        # a command must wait (see data_received): it starts with the error,
        # the paused write or the message to queue the protocol handed over
        # (each a step of aiosmtpd's loop or of DATA), and it ends, handing
        # the connection back, once nothing it read is left unanswered.
        session = self.session
        assert session is not None
        functions = command_functions(type(self))
        library_log = _LIBRARY_LOG
        while self.transport is not None and not self._quit:
            try:
                if error is not None:
                    handed_over: Exception = error
                    error = None
                    await self._report_exception(handed_over)
                    continue
                if drain:
                    drain = False
                    await self._drain()
                if received is not None:
                    envelope, body = received
                    received = None
                    await self._finish_message(envelope, body)
                    continue
                if self._may_go_fast():
                    self._fast = True
                    self._handler_coroutine = None
                    return
                self._open_streams()
                reader = self._reader
                try:
                    line: bytes = await reader.readuntil()
                except asyncio.LimitOverrunError as overrun:
                    # Line too long: read to its end before answering.
                    await reader.read(overrun.consumed)
                    while True:
                        try:
                            await reader.readuntil()
                            break
                        except asyncio.LimitOverrunError as more:
                            await reader.read(more.consumed)
                    await self.push("500 Command line too long")
                    continue
                parsed = self._parse_line(line)
                if isinstance(parsed, bytes):
                    await self._send(parsed)
                    continue
                command, arg = parsed
                function = functions.get(command)
                if function is None:
                    reply, hang_up = self._unrecognised(command)
                    await self._send(reply)
                    if hang_up:
                        self.transport.close()
                    continue
                self._reset_timeout()
                await function(self, arg)
            except (asyncio.CancelledError, ConnectionResetError):
                # The connection went away (during DATA, say).
                if library_log.isEnabledFor(logging.INFO):
                    library_log.info("%r Connection lost during _handle_client()", session.peer)
                self._close_writer()
                raise
            except Exception as raised:
                await self._report_exception(raised)

    def _chatter(self, line: bytes) -> None:
        """aiosmtpd's two log lines for a command line (shown at PROTOCOL level only)."""
        library_log = _LIBRARY_LOG
        if library_log.isEnabledFor(logging.INFO):
            session = self.session
            chatter = aiosmtpd_smtp.sanitized_log
            chatter(library_log.debug, "_handle_client readline: %r", line)
            peer = session.peer if session is not None else None
            chatter(library_log.info, "%r >> %r", peer, line.rstrip(b"\r\n"))

    def _parse_line(self, line: bytes, *, chatter: bool = True) -> tuple[str, str | None] | bytes:
        """A command line (its line end included): ``(COMMAND, argument)``, or the error reply.

        aiosmtpd's checks, in its order: empty line, command not ASCII,
        line over the command's limit, TLS handshake not accepted.  Without
        ``chatter`` the caller logs the line (it may hand it to the task).
        """
        session = self.session
        assert session is not None
        if chatter:
            self._chatter(line)
        line = line.rstrip(b"\r\n")
        if not line:
            return _BAD_SYNTAX
        command_bytes, _, arg_bytes = line.partition(b" ")
        try:
            command = command_bytes.upper().decode("ascii")
        except UnicodeDecodeError:
            return _BAD_SYNTAX
        # enable_SMTPUTF8 is always on: the argument keeps any octets.
        arg = str(arg_bytes.strip(), "utf-8", "surrogateescape") if arg_bytes else None
        limit = (
            self.command_size_limits.get(command, _COMMAND_LINE)
            if session.extended_smtp
            else self.command_size_limit
        )
        if len(line) > limit:
            return _LINE_TOO_LONG
        if not self._tls_handshake_okay and command != "QUIT":
            return _status_wire("554 Command refused due to lack of security")
        return command, arg

    def _unrecognised(self, command: str) -> tuple[bytes, bool]:
        """aiosmtpd's reply to an unknown command; True when it also hangs up.

        The budget of unknown commands is the connection's, whichever of
        the protocol or the task counts them.
        """
        session = self.session
        peer = session.peer if session is not None else None
        _LIBRARY_LOG.warning("%r unrecognised: %s", peer, command)
        self._bogus_budget -= 1
        if self._bogus_budget < 1:
            _LIBRARY_LOG.warning("%r too many bogus commands", peer)
            return _status_wire("502 5.5.1 Too many unrecognized commands, goodbye."), True
        return _status_wire(f'500 Error: command "{command}" not recognized'), False

    # ------------------------------------------------- commands in the protocol

    def data_received(self, data: bytes) -> None:
        # asyncio's StreamReaderProtocol feeds every segment to the stream
        # reader, whose waiter wakes the session task (a future and a task
        # step per command).  Between commands that must wait there is no
        # task: the segment's lines are answered here.
        if not self._fast:
            # A message being queued (its task needs no stream reader) may
            # be followed by the client's next commands: they wait in it.
            self._open_streams()
            super().data_received(data)
            return
        pending = self._pending
        rest: bytes | None = pending + data if pending else data
        # Commands until DATA's go-ahead, the message until its end, then
        # commands again (a refused message): each part returns the rest.
        while rest is not None:
            rest = self._take_lines(rest) if self._collector is None else self._take_data(rest)

    def _take_lines(self, buffer: bytes) -> bytes | None:
        """Answer the command lines of ``buffer`` that need no waiting, in order.

        Replies are gathered and written together (RFC 2920: one write for
        a pipelined group), at most about ``_BATCH_BYTES`` at a time so that
        a client that stops reading is not sent more than one reply would
        have been.  A partial line is kept for the next segment.  The first
        line that must wait (DATA, AUTH, STARTTLS, HELP ...), or that the
        stream reader would refuse as over-long, and everything after it, go
        to the stream reader and a session task, as do the lines after a
        write the transport paused.  After DATA's go-ahead, the rest of
        ``buffer`` is returned: it is the message.
        """
        commands = self._fast_commands
        assert commands is not None
        functions = self._command_functions
        limit = self.line_length_limit
        # aiosmtpd's chatter is at its logger's INFO and DEBUG levels; a
        # logger that shows DEBUG shows INFO: one check a segment, not two a line.
        chatty = _LIBRARY_LOG.isEnabledFor(logging.INFO)
        debug = chatty and _LIBRARY_LOG.isEnabledFor(logging.DEBUG)
        out: list[bytes] = []
        size = 0
        start = 0
        while True:
            end = buffer.find(b"\n", start)
            if end < 0 and len(buffer) - start <= limit:
                self._pending = buffer[start:]
                self._flush(out)
                return None
            if end < 0 or end - start > limit:
                self._hand_over(out, buffer[start:])
                return None
            line = buffer[start : end + 1]
            parsed = self._parse_line(line, chatter=False)
            hang_up = False
            if isinstance(parsed, bytes):
                if chatty:
                    self._chatter(line)
                reply = parsed
            elif (handler := commands.get(parsed[0])) is not None:
                if chatty:
                    self._chatter(line)
                self._reset_timeout()
                try:
                    reply = handler(self, parsed[1])
                except Exception as error:
                    self._hand_over(out, buffer[end + 1 :], error=error)
                    return None
                hang_up = self._quit
            elif parsed[0] in functions:
                self._hand_over(out, buffer[start:])
                return None
            else:
                if chatty:
                    self._chatter(line)
                reply, hang_up = self._unrecognised(parsed[0])
            start = end + 1
            if debug:
                _LIBRARY_LOG.debug("%r << %r", self.session.peer if self.session else None, reply)
            out.append(reply)
            if hang_up:
                self._hang_up_now(out)
                return None
            if self._collector is not None:  # DATA said 354: the message follows
                self._flush(out)
                return buffer[start:]
            size += len(reply)
            if size >= _BATCH_BYTES:
                if self._flush(out):
                    self._hand_over([], buffer[start:], drain=True)
                    return None
                out = []
                size = 0

    def _start_data(self, arg: str | None) -> bytes:
        # smtp_DATA's checks and go-ahead; the message is then taken in
        # data_received (_take_data) instead of read by a task.
        if self._helo_missing():
            return _status_wire("503 Error: send HELO first")  # aiosmtpd's check_helo_needed
        envelope = self.envelope_state()
        if envelope.sender is None:
            return _reply_wire(replies.NEED_MAIL)
        if not envelope.recipients:
            return _reply_wire(replies.NEED_RCPT)
        if arg:
            return _reply_wire(replies.DATA_SYNTAX)
        smtp = self.ctx.config.smtp
        self._busy = True
        self._collector = DataCollector(
            max_size=smtp.max_message_size, max_line=smtp.max_line_length
        )
        self._next_touch = _DATA_TIMER_STEP
        return _START_DATA

    def _take_data(self, buffer: bytes) -> bytes | None:
        """Feed the message's octets in ``buffer`` to the collector, up to its end.

        The collector is fed pieces that end after every ``.<CRLF>``, as
        the stream reader cut them; octets that may begin an end marker
        (the last two) wait for the next segment.  At the end the message
        is judged here; queueing it waits, so that goes to a session task.
        What follows a refused message is returned: commands again.
        """
        collector = self._collector
        assert collector is not None
        start = 0
        while True:
            end = buffer.find(b".\r\n", start)
            if end < 0:
                keep = len(buffer) - 2
                if keep > start:
                    collector.feed(buffer[start:keep])
                    start = keep
                self._pending = buffer[start:]
                if collector.size > self._next_touch:
                    self._next_touch = collector.size + _DATA_TIMER_STEP
                    self._touch_timer()
                return None
            end += 3
            if collector.feed(buffer[start:end]):
                return self._end_data(collector, buffer[end:])
            start = end

    def _end_data(self, collector: DataCollector, rest: bytes) -> bytes | None:
        """The message has ended: refuse it here (``rest`` is returned), or queue it.

        Queueing waits for the spool's write; with hooks to run first (they
        may wait too) a task does it all, else the write is started here and
        its end answered by :meth:`_queued`.
        """
        self._collector = None
        self._pending = b""
        envelope = self.envelope_state()
        body, error = self._judge(collector)
        # The transaction is over whatever happens next (RFC 5321 §4.1.1.4).
        self.envelope = self._create_envelope()
        if error is not None:
            self.log.info("message refused", client_ip=self.client_ip(), reply=str(error))
            return self._answer(error, rest)
        assert body is not None
        queuer = self.ctx.queuer
        started = None if queuer.hooks_wait() else queuer.start(self._transaction(envelope, body))
        if isinstance(started, Reply):  # refused by the checks or signing, which logged why
            if self.ctx.closing:
                self._hang_up_now([_reply_wire(started), _reply_wire(_SHUTTING_DOWN)])
                return None
            return self._answer(started, rest)
        self._fast = False
        if rest:
            self._open_streams()
            super().data_received(rest)
        if started is None:
            self._handler_coroutine = self.loop.create_task(
                self._handle_client(received=(envelope, body))
            )
        else:
            started.future.add_done_callback(functools.partial(self._queued, started))
        return None

    def _answer(self, error: Reply, rest: bytes) -> bytes | None:
        """Refuse the message just received; ``rest`` is returned unless writing must wait."""
        self._busy = False
        reply = _reply_wire(error)
        if _LIBRARY_LOG.isEnabledFor(logging.DEBUG):
            _LIBRARY_LOG.debug("%r << %r", self.session.peer if self.session else None, reply)
        if self._flush([reply]):
            self._hand_over([], rest, drain=True)
            return None
        return rest

    def _queued(self, write: Write, _: object) -> None:
        """The spool write of an accepted message is done: say so, then take commands again.

        ``_finish_message`` for a message queued without a task: the reply,
        the shutdown's 421, and the connection handed back to
        ``data_received`` unless lines came meanwhile (they wait in the
        stream reader: a task answers them) or writing is paused.
        """
        self._busy = False
        if write.future.cancelled() or self.transport is None:
            self.ctx.queuer.client_gone(write.txn)
            if self.transport is not None:
                self._close_writer()
            return
        try:
            reply = self.ctx.queuer.outcome(write)
        except Exception as raised:  # what the session task would report
            self._handler_coroutine = self.loop.create_task(self._handle_client(raised))
            return
        drain = self._write(_reply_wire(reply))
        if self.ctx.closing:
            self._hang_up_now([_reply_wire(_SHUTTING_DOWN)])
            return
        if drain or not self._may_go_fast():
            self._handler_coroutine = self.loop.create_task(self._handle_client(drain=drain))
            return
        self._fast = True

    def _flush(self, out: list[bytes]) -> bool:
        """Write the gathered replies at once; True when the writer must be drained."""
        if not out:
            return False
        # Until the streams are made (_open_streams) the replies go to the
        # transport itself: StreamWriter.write() only passes them on to it.
        # Any: uvloop's transports are not asyncio ABC subclasses.  Read here,
        # not through a helper: a method call per reply, seven a session.
        transport: Any = self._writer.transport if self._streams else self.transport
        transport.write(out[0] if len(out) == 1 else b"".join(out))
        return self._paused or self._connection_lost or transport.is_closing()

    def _hang_up_now(self, out: list[bytes]) -> None:
        """Send the last replies (QUIT's, or the one for too many bogus commands) and close."""
        self._pending = b""
        self._flush(out)
        if self.transport is not None:
            self.transport.close()

    def _hand_over(
        self, out: list[bytes], rest: bytes, *, error: Exception | None = None, drain: bool = False
    ) -> None:
        """Write ``out``, feed ``rest`` to the stream reader and start the session task."""
        if self._flush(out):
            drain = True
        self._fast = False
        self._pending = b""
        self._open_streams()
        if rest:
            super().data_received(rest)
        self._handler_coroutine = self.loop.create_task(self._handle_client(error, drain))

    def _may_go_fast(self) -> bool:
        # asyncio's StreamReader keeps what it has not handed out in
        # ``_buffer``: the task hands the connection back to the protocol
        # only with nothing read and unanswered, writing not paused, and
        # never after STARTTLS (aiosmtpd's own path for that transport).
        if self._fast_commands is None or self._original_transport is not None or self._paused:
            return False
        if not self._streams:
            # Nothing came while the task queued a message (it would be in
            # the stream reader), and no EOF or loss (either cancels the task).
            return True
        reader = self._reader
        return (
            not reader._buffer  # type: ignore[attr-defined]
            and not reader.at_eof()
            and reader.exception() is None
        )

    async def _report_exception(self, error: Exception) -> None:
        # aiosmtpd's answer to an exception a command raised.
        status = None
        try:
            status = await self.handle_exception(error)
        except Exception as inner_error:
            try:
                peer = self.session.peer if self.session is not None else None
                _LIBRARY_LOG.exception("%r Exception in handle_exception()", peer)
                status = f"500 Error: ({inner_error.__class__.__name__}) {inner_error}"
            except Exception:
                status = "500 Error: Cannot describe error"
        finally:
            if isinstance(error, TLSSetupException):
                if self.transport is not None:
                    self.transport.close()
                self.connection_lost(error)
            else:
                await self.push(status or "500 Error: Cannot describe error")

    def _touch_timer(self) -> None:
        # aiosmtpd's inactivity timer only restarts on commands.
        self._reset_timeout()

    def _reset_timeout(self, duration: float | None = None) -> None:
        # aiosmtpd cancels and re-creates its timer on every command (a
        # timer handle, a heap entry and a cancelled one left behind, seven
        # times per message).  We keep one timer and move a deadline; the
        # timer re-arms itself when it fires before the deadline.
        self._deadline = self.loop.time() + (duration or self._timeout_duration)
        handle = self._timeout_handle
        if handle is None or handle.cancelled() or self._deadline < handle.when():
            if handle is not None:
                handle.cancel()
            self._arm_timer()

    def _arm_timer(self) -> None:
        self._timeout_handle = self.loop.call_at(self._deadline, self._check_deadline)

    def _check_deadline(self) -> None:
        if self._deadline > self.loop.time():
            self._arm_timer()
            return
        self._timeout_cb()  # type: ignore[no-untyped-call]

    # ------------------------------------------------------------ session state

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._registered:  # called again after STARTTLS: aiosmtpd's own path
            super().connection_made(transport)
            return
        self._registered = True
        self.ctx.session_started(self)
        # aiosmtpd's connection_made for a new connection, in its order,
        # without formatting its "Peer" line unless its logger shows it.
        self.envelope = self._create_envelope()
        session = self.session = Session(self.loop)
        session.peer = transport.get_extra_info("peername")
        self._reset_timeout()
        self.transport = transport
        # What StreamReaderProtocol.connection_made finds asking the
        # transport: only an implicit-TLS listener's are over TLS at first.
        self._over_ssl = self._template.implicit_tls
        chatty = _LIBRARY_LOG.isEnabledFor(logging.INFO)
        if chatty:
            _LIBRARY_LOG.info("Peer: %r", session.peer)
        # The greeting goes out now rather than on the session task's first
        # step, a loop turn later, when a short inactivity_timeout may have
        # closed the connection already.  A new transport's buffer is empty:
        # there is nothing to wait for.
        self._write(self._template.greeting_wire)
        if chatty:
            _LIBRARY_LOG.info("%r handling connection", session.peer)
        # No task until a command must wait: data_received answers the rest.
        if self._fast_commands is None:
            self._open_streams()
            self._handler_coroutine = self.loop.create_task(self._handle_client())
        else:
            self._fast = True

    def connection_lost(self, error: Exception | None) -> None:
        try:
            task = self._handler_coroutine
            if task is not None and self._streams:
                super().connection_lost(error)
            else:
                self._lost_without_streams(error)
                if task is not None:
                    task.cancel()  # a message's queueing, which needed no streams
        finally:
            self.ctx.session_ended(self)

    def _lost_without_streams(self, error: Exception | None) -> None:
        # aiosmtpd's connection_lost, for a connection with no task to cancel
        # or no stream reader and writer (StreamReaderProtocol's part).
        self._fast = False
        self._pending = b""
        self._stop_data()
        if _LIBRARY_LOG.isEnabledFor(logging.INFO):
            _LIBRARY_LOG.info("%r connection lost", self.session.peer if self.session else None)
        if self._timeout_handle is not None:
            self._timeout_handle.cancel()
        if self._original_transport is not None:
            self._original_transport.close()
        if self._streams:
            asyncio.StreamReaderProtocol.connection_lost(self, error)
        else:
            # StreamReaderProtocol.connection_lost with no streams: no reader
            # to end, no close future to settle, no drain() to wake.
            self._connection_lost = True
            self._transport = None
        self.transport = None

    def _stop_data(self) -> None:
        # A message cut off by the client: nothing of it is kept.
        if self._collector is not None:
            self._collector = None
            self._busy = False

    def eof_received(self) -> bool | None:
        if self._handler_coroutine is not None:
            return super().eof_received()
        # aiosmtpd cancels the session task here, and the task closes the
        # writer as it ends; with no task, the writer is closed at once.
        # Whatever arrived before the end was answered in data_received.
        session = self.session
        assert session is not None
        if _LIBRARY_LOG.isEnabledFor(logging.INFO):
            _LIBRARY_LOG.info("%r EOF received", session.peer)
            _LIBRARY_LOG.info("%r Connection lost during _handle_client()", session.peer)
        self._fast = False
        self._pending = b""
        self._stop_data()
        self._close_writer()
        if session.ssl is not None:
            return False
        return asyncio.StreamReaderProtocol.eof_received(self)

    def client_ip(self) -> str | None:
        peer = self.session.peer if self.session is not None else None
        if isinstance(peer, tuple) and peer:
            return str(peer[0])
        return None

    def tls_version(self) -> str | None:
        """The TLS version in use (``TLSv1.3``), or None in clear."""
        if self.transport is None:
            return None
        ssl_object = self.transport.get_extra_info("ssl_object")
        if ssl_object is None:
            return None
        version = ssl_object.version()
        return str(version) if version else "TLS"

    def auth_user(self) -> str | None:
        session = self.session
        if session is None or not session.authenticated:
            return None
        user = session.auth_data
        return user if isinstance(user, str) else None

    def auth_allowed_now(self) -> bool:
        return self.ctx.auth_enabled and policy.auth_allowed(
            encrypted=self.tls_version() is not None,
            client_ip=self.client_ip(),
            require_tls=self.ctx.config.smtp.auth_require_tls,
        )

    def starttls_offered(self) -> bool:
        return self.tls_context is not None and self.tls_version() is None

    def envelope_state(self) -> SubmissionEnvelope:
        envelope = self.envelope
        assert isinstance(envelope, SubmissionEnvelope)
        return envelope

    def _helo_missing(self) -> bool:
        # aiosmtpd's check_helo_needed is a coroutine awaited by MAIL, RCPT
        # and DATA on every message; this plain test lets them skip it once
        # the client has said HELO/EHLO (it still writes the 503 otherwise).
        session = self.session
        return session is None or not session.host_name

    def is_busy(self) -> bool:
        """True while a message is being received or queued."""
        return self._busy

    # -------------------------------------------------------------- replies

    async def push(self, status: AnyStr) -> None:
        # Every reply line passes here, aiosmtpd's own included (which echo
        # the client's unknown command): RFC 5321 §4.2 reply text is
        # printable ASCII, so nothing a client sent can put a control
        # character, a bare CR or raw UTF-8 into a reply.
        if isinstance(status, str):
            data = replies.LIBRARY_WIRE.get(status)
            if data is None:
                data = replies.wire(status)
        else:
            data = status + b"\r\n"
        if self._write(data):
            await self._drain()

    async def reply(self, reply: Reply) -> None:
        # Our named replies are encoded once, at import (replies.WIRE_BY_ID).
        data = replies.WIRE_BY_ID.get(id(reply))
        if self._write(replies.wire(str(reply)) if data is None else data):
            await self._drain()

    async def _send(self, data: bytes) -> None:
        """Write one reply (one or more complete lines); wait if the buffer is full."""
        if self._write(data):
            await self._drain()

    async def _drain(self) -> None:
        """The writer's ``drain()``: wait while writing is paused; raise if the client is gone."""
        if not self._streams:
            if self.transport is None:
                raise ConnectionResetError("Connection lost")  # as drain() would
            self._open_streams()
        await self._writer.drain()

    def _close_writer(self) -> None:
        # StreamWriter.close() closes its transport: the same without streams.
        if self._streams:
            self._writer.close()
        elif self.transport is not None:
            self.transport.close()

    def _write(self, data: bytes) -> bool:
        """Write one reply; True when the caller must await the writer's ``drain()``.

        What aiosmtpd's ``push`` does with its encoded line, for octets
        prepared before: one ``write`` per reply.  ``drain()`` is two
        coroutines per reply that return at once unless the transport paused
        writing (its buffer above the high-water mark) or the connection is
        closing or gone; only then is it awaited, and it does what it always
        did (waits, or raises ``ConnectionResetError``).
        """
        transport: Any = self._writer.transport if self._streams else self.transport  # as _flush
        transport.write(data)
        if _LIBRARY_LOG.isEnabledFor(logging.DEBUG):
            _LIBRARY_LOG.debug("%r << %r", self.session.peer if self.session else None, data)
        return self._paused or self._connection_lost or transport.is_closing()

    # Each command answered without waiting is a plain method returning the
    # reply's octets (data_received calls it), and its smtp_* coroutine,
    # which aiosmtpd's tables and the session task use, writes them.

    def _ehlo(self, hostname: str | None) -> bytes:
        # aiosmtpd's EHLO builds its keyword list, then lets a hook replace
        # it and writes each line on its own; ours are prepared once per
        # listener (template.py) and go out in one write.  The state changes
        # are aiosmtpd's: a reset transaction, ESMTP on, and the MAIL line
        # limit widened for SMTPUTF8 (it adds 10 octets on every EHLO).
        session = self.session
        assert session is not None
        if not hostname:
            return b"501 Syntax: EHLO hostname\r\n"  # RFC 2034: no enhanced code
        self._reset_envelope()  # aiosmtpd's _set_rset_state
        session.extended_smtp = True
        self.command_size_limits["MAIL"] += 10
        session.host_name = hostname
        return self._template.ehlo_reply(
            starttls=self.starttls_offered(), auth=self.auth_allowed_now()
        )

    async def smtp_EHLO(self, hostname: str) -> None:
        await self._send(self._ehlo(hostname))

    def _helo(self, hostname: str | None) -> bytes:
        # aiosmtpd's HELO (our handler has no HELO hook), with its reply
        # prepared once per listener.  RFC 2034: no enhanced code.
        session = self.session
        assert session is not None
        if not hostname:
            return b"501 Syntax: HELO hostname\r\n"
        self._reset_envelope()
        session.extended_smtp = False
        session.host_name = hostname
        return self._template.helo_wire

    async def smtp_HELO(self, hostname: str) -> None:
        await self._send(self._helo(hostname))

    def _noop(self, arg: str | None) -> bytes:
        # aiosmtpd's NOOP with no NOOP hook: the argument is ignored.
        return _OK

    def _rset(self, arg: str | None) -> bytes:
        # aiosmtpd's RSET with no RSET hook.
        if arg:
            return _status_wire("501 Syntax: RSET")
        self.envelope = self._create_envelope()  # aiosmtpd's _set_rset_state
        return _OK

    def _quit_now(self, arg: str | None) -> bytes:
        # QUIT's reply; the caller closes the connection once it is written.
        if arg:
            return _status_wire("501 Syntax: QUIT")
        self._quit = True
        return _BYE

    async def smtp_QUIT(self, arg: str) -> None:
        # aiosmtpd's QUIT cancels the session's own task to leave its command
        # loop (an exception through every frame); ours ends the loop.
        await self._send(self._quit_now(arg))
        if self._quit and self.transport is not None:
            self.transport.close()

    async def smtp_STARTTLS(self, arg: str) -> None:
        if self.tls_version() is not None:
            await self.reply(replies.ALREADY_TLS)
            return
        await super().smtp_STARTTLS(arg)

    # ----------------------------------------------------------------- AUTH

    async def smtp_AUTH(self, arg: str) -> None:
        if not self.ctx.auth_enabled:
            await self.reply(replies.AUTH_NOT_AVAILABLE)
            return
        if await self.check_helo_needed("EHLO"):
            return
        if not self.auth_allowed_now():
            await self.reply(replies.AUTH_NEEDS_TLS)
            return
        if self.envelope_state().sender is not None:
            await self.reply(replies.AUTH_IN_TRANSACTION)
            return
        ip = self.client_ip() or "unknown"
        try:
            blocked = await self.ctx.throttle.is_blocked(ip)
        except SpoolError as exc:
            self.log.error("AUTH unavailable: cannot read the AUTH throttle", error=str(exc))
            await self.reply(replies.AUTH_TEMPORARY)
            return
        if blocked:
            self.log.notice("AUTH refused: client is blocked after repeated failures", client_ip=ip)
            await self._hang_up(replies.AUTH_BLOCKED)
            return
        # RFC 4954: mechanism names are case-insensitive; aiosmtpd compares as sent.
        mechanism, _, rest = (arg or "").strip().partition(" ")
        await super().smtp_AUTH(f"{mechanism.upper()} {rest}".strip() if mechanism else arg)

    async def auth_PLAIN(self, _: SMTP, args: list[str]) -> AuthResult:
        """RFC 4616 PLAIN: ``authzid NUL authcid NUL passwd`` (authzid ignored)."""
        if len(args) == 1:
            blob = await self.challenge_auth("")
            if not isinstance(blob, bytes):
                return AuthResult(success=False, handled=True)
        else:
            try:
                blob = _b64decode(args[1])
            except ValueError:
                await self.reply(replies.AUTH_BAD_BASE64)
                return AuthResult(success=False, handled=True)
        parts = blob.split(b"\x00")
        if len(parts) != 3:
            await self.reply(Reply(501, "5.5.2", "Cannot split PLAIN credentials"))
            return AuthResult(success=False, handled=True)
        return await self._verify(parts[1], parts[2])

    async def auth_LOGIN(self, _: SMTP, args: list[str]) -> AuthResult:
        """The LOGIN mechanism: user name and password in two base64 challenges."""
        if len(args) == 1:
            login = await self.challenge_auth(self.AuthLoginUsernameChallenge)
            if not isinstance(login, bytes):
                return AuthResult(success=False, handled=True)
        else:
            try:
                login = _b64decode(args[1])
            except ValueError:
                await self.reply(replies.AUTH_BAD_BASE64)
                return AuthResult(success=False, handled=True)
        password = await self.challenge_auth(self.AuthLoginPasswordChallenge)
        if not isinstance(password, bytes):
            return AuthResult(success=False, handled=True)
        return await self._verify(login, password)

    async def challenge_auth(
        self,
        challenge: str | bytes,
        encode_to_b64: bool = True,
        log_client_response: bool = False,
    ) -> _Missing | bytes:
        """Send a ``334`` challenge and read the client's base64 answer.

        Replaces aiosmtpd's version, which logs an undecodable answer (often
        the raw password) and lets an over-long line escape as a
        ``ValueError`` (a 500 with Python's text and an ERROR log).  Here:
        ``*`` cancels (``501 5.7.0``), a line over ``max_line_length`` gets
        ``500 5.5.2``, bad base64 ``501 5.5.2``; the answer is never logged
        (``log_client_response`` is ignored).  Returns the decoded octets,
        or ``MISSING`` after such a reply.
        """
        data = challenge.encode() if isinstance(challenge, str) else challenge
        await self.push(b"334 " + (base64.b64encode(data) if encode_to_b64 else data))
        try:
            line = await self._read_line()
        except asyncio.IncompleteReadError:
            return MISSING  # the client hung up mid-answer: nobody to reply to
        if line is None:
            await self.reply(self._line_too_long_reply())
            return MISSING
        blob = line.strip()
        if blob == b"*":
            await self.reply(replies.AUTH_CANCELLED)
            return MISSING
        try:
            return base64.b64decode(blob, validate=True)
        except (binascii.Error, ValueError):
            await self.reply(replies.AUTH_BAD_BASE64)
            return MISSING

    async def _read_line(self) -> bytes | None:
        """One line from the client, or None (all of it read and dropped) when over-long.

        Raises ``asyncio.IncompleteReadError`` when the client hangs up mid-line.
        """
        limit = self.ctx.config.smtp.max_line_length
        too_long = False
        while True:
            try:
                line: bytes = await self._reader.readuntil(b"\n")
            except asyncio.LimitOverrunError as exc:
                await self._drain_overlong(exc.consumed)
                too_long = True
                continue
            if too_long or len(line.rstrip(b"\r\n")) > limit:
                return None
            return line

    def _line_too_long_reply(self) -> Reply:
        limit = self.ctx.config.smtp.max_line_length
        return replies.LINE_TOO_LONG_COMMAND.with_text(f"Line too long (more than {limit} octets)")

    async def _verify(self, login: bytes, password: bytes) -> AuthResult:
        """Admit the attempt, check the credentials, wait and maybe hang up.

        The throttle admits the attempt *before* the password is checked,
        in the spool every process shares: failures plus attempts still
        being checked never exceed ``auth_disconnect_after``, so a burst of
        parallel attempts waits its turn instead of being checked at once,
        and once the client is blocked nothing more is checked.  The
        password is never logged; the user name is (it is what an operator
        needs to see who is failing).
        """
        ip = self.client_ip() or "unknown"
        try:
            user = login.decode("utf-8")
            secret = password.decode("utf-8")
        except UnicodeDecodeError:
            user, secret = "", ""
        try:
            admission = await self._admit(ip)
        except SpoolError as exc:
            self.log.error("AUTH unavailable: cannot count the attempt", error=str(exc))
            await self.reply(replies.AUTH_TEMPORARY)
            return AuthResult(success=False, handled=True)
        if admission is not Admission.CHECK:
            self.log.notice(
                "AUTH refused unchecked: client is blocked after repeated failures"
                if admission is Admission.REFUSE
                else "AUTH refused unchecked: attempts from this client still being checked",
                user=replies.clean_text(user, 100),
                client_ip=ip,
            )
            if admission is Admission.REFUSE:
                await self._hang_up(replies.AUTH_BLOCKED)
            else:
                await self.reply(replies.AUTH_TEMPORARY)
            return AuthResult(success=False, handled=True)
        ok = False
        try:
            ok = bool(user) and bool(secret) and await self.ctx.users.averify(user, secret)
        finally:
            # Always settle the attempt in flight, even if the session was cut.
            verdict = await self._settle(ip, ok)
        if ok:
            self.log.info("AUTH succeeded", user=user, client_ip=ip, tls=self.tls_version())
            return AuthResult(success=True, auth_data=user, message=replies.AUTH_OK)
        self.log.notice(
            "AUTH failed",
            user=replies.clean_text(user, 100),
            client_ip=ip,
            failures=verdict.failures,
            delay=verdict.delay,
            disconnect=verdict.disconnect,
        )
        if verdict.delay > 0:
            await asyncio.sleep(verdict.delay)
        if verdict.disconnect:
            await self._hang_up(replies.AUTH_BLOCKED)
            return AuthResult(success=False, handled=True)
        return AuthResult(success=False, handled=False, message=str(replies.AUTH_INVALID))

    async def _admit(self, ip: str) -> Admission:
        """The throttle's admission, waiting (bounded) while the allowance is in use."""
        deadline = self.loop.time() + _ADMISSION_WAIT
        while True:
            admission = await self.ctx.throttle.admit(ip)
            if admission is not Admission.WAIT or self.loop.time() >= deadline:
                return admission
            await asyncio.sleep(_ADMISSION_POLL * (0.5 + random.random()))

    async def _settle(self, ip: str, ok: bool) -> ThrottleVerdict:
        """Record the outcome of an admitted attempt; the verdict for a failure."""
        throttle = self.ctx.throttle
        try:
            if ok:
                await throttle.succeeded(ip)
                return ThrottleVerdict(0, 0.0, False)
            return await throttle.failed(ip)
        except SpoolError as exc:
            # Counted in flight already; it stops counting after stale_after.
            self.log.error("cannot record the AUTH outcome in the throttle", error=str(exc))
            return ThrottleVerdict(0, 0.0, False)

    async def _hang_up(self, reply: Reply) -> None:
        await self.reply(reply)
        if self.transport is not None:
            self.transport.close()

    # ------------------------------------------------------------ MAIL / RCPT

    def _mail(self, arg: str | None) -> bytes:
        if self._helo_missing():
            return _status_wire("503 Error: send HELO first")  # aiosmtpd's check_helo_needed
        assert self.session is not None
        envelope = self.envelope_state()
        if envelope.sender is not None:
            return _reply_wire(replies.NESTED_MAIL)
        try:
            sender, params = policy.parse_mail(
                arg,
                extended=self.session.extended_smtp,
                max_size=self.ctx.config.smtp.max_message_size,
            )
        except PolicyError as exc:
            return _reply_wire(exc.reply)
        if self.ctx.config.smtp.constrain_sender and not policy.sender_matches_auth(
            self.auth_user(), sender
        ):
            self.log.notice("sender refused by constrain_sender", user=self.auth_user(),
                            mail_from=str(sender), client_ip=self.client_ip())  # fmt: skip
            return _reply_wire(replies.SENDER_NOT_OWNED)
        envelope.sender = sender
        envelope.mail_params = params
        envelope.mail_from = str(sender)
        envelope.smtp_utf8 = params.smtputf8
        return _reply_wire(replies.OK_SENDER)

    async def smtp_MAIL(self, arg: str | None) -> None:
        await self._send(self._mail(arg))

    def _relay_verdict(self) -> RelayVerdict:
        def verdict(auth_possible: bool) -> RelayVerdict:
            return policy.relay_verdict(
                authenticated=self.auth_user() is not None,
                client_ip=self.client_ip(),
                relay_acl=self.ctx.config.relay_acl_allow,
                auth_possible=auth_possible,
            )

        # Whether AUTH could still follow matters only when relaying is refused.
        if (allowed := verdict(False)) is RelayVerdict.ALLOW:
            return allowed
        return verdict(
            self.ctx.auth_enabled and (self.auth_allowed_now() or self.starttls_offered())
        )

    def _rcpt(self, arg: str | None) -> bytes:
        if self._helo_missing():
            return _status_wire("503 Error: send HELO first")  # aiosmtpd's check_helo_needed
        assert self.session is not None
        envelope = self.envelope_state()
        if envelope.sender is None:
            return _reply_wire(replies.NEED_MAIL)
        try:
            recipient, params = policy.parse_rcpt(
                arg, extended=self.session.extended_smtp, utf8=envelope.mail_params.smtputf8
            )
        except PolicyError as exc:
            return _reply_wire(exc.reply)
        verdict = self._relay_verdict()
        if verdict is not RelayVerdict.ALLOW:
            self.log.notice("relaying refused", client_ip=self.client_ip(),
                            recipient=str(recipient), verdict=str(verdict))  # fmt: skip
            return _reply_wire(
                replies.AUTH_REQUIRED
                if verdict is RelayVerdict.AUTH_REQUIRED
                else replies.RELAY_DENIED
            )
        key = recipient.key()
        if key in envelope.recipient_keys:
            return _reply_wire(replies.OK_RECIPIENT.with_text("Recipient OK (duplicate ignored)"))
        if len(envelope.recipients) >= self.ctx.config.smtp.max_recipients:
            return _reply_wire(replies.TOO_MANY_RECIPIENTS)
        envelope.recipients.append(recipient)
        envelope.recipient_keys.add(key)
        envelope.rcpt_params[str(recipient)] = params
        envelope.rcpt_tos.append(str(recipient))
        return _reply_wire(replies.OK_RECIPIENT)

    async def smtp_RCPT(self, arg: str | None) -> None:
        await self._send(self._rcpt(arg))

    # ----------------------------------------------------------------- DATA

    async def smtp_DATA(self, arg: str) -> None:
        if self._helo_missing() and await self.check_helo_needed():
            return
        envelope = self.envelope_state()
        if envelope.sender is None:
            await self.reply(replies.NEED_MAIL)
            return
        if not envelope.recipients:
            await self.reply(replies.NEED_RCPT)
            return
        if arg:
            await self.reply(replies.DATA_SYNTAX)
            return
        self._busy = True
        body: bytes | None = None
        try:
            if self._write(_START_DATA):
                await self._writer.drain()
            body, error = await self._receive_data()
            # The transaction is over whatever happens next (RFC 5321 §4.1.1.4).
            self.envelope = self._create_envelope()
            if error is not None:
                self.log.info("message refused", client_ip=self.client_ip(), reply=str(error))
                await self.reply(error)
                return
        finally:
            if body is None:  # refused, or the connection went away
                self._busy = False
        assert body is not None
        await self._finish_message(envelope, body)

    async def _finish_message(self, envelope: SubmissionEnvelope, body: bytes) -> None:
        """Queue a received message and say so; DATA's end, in the task or handed to it."""
        try:
            reply = await self._queue(envelope, body)
            await self.reply(reply)
        finally:
            self._busy = False
        if self.ctx.closing:
            await self._hang_up(_SHUTTING_DOWN)

    async def _receive_data(self) -> tuple[bytes | None, Reply | None]:
        """Read up to ``<CRLF>.<CRLF>``: the unstuffed message, or the refusal.

        The data is always read to its end, so the session stays in step
        with a pipelining client.  It is read in pieces that end at the next
        ``.<CRLF>`` (or where the reader's line limit cuts a piece without
        one); :class:`DataCollector` judges them.  Past the size limit
        nothing more is kept.
        """
        smtp = self.ctx.config.smtp
        collector = DataCollector(max_size=smtp.max_message_size, max_line=smtp.max_line_length)
        next_touch = _DATA_TIMER_STEP
        # The reader's limit is the command line limit, so a message of a
        # few KB overran it (an exception and a second read per message)
        # and paused and resumed the socket (two epoll_ctl calls): DATA
        # reads with a limit of _DATA_READ_LIMIT, and gives the old one back.
        line_limit = self._set_read_limit(_DATA_READ_LIMIT)
        try:
            while True:
                try:
                    piece = await self._read_data_piece()
                except asyncio.LimitOverrunError as exc:
                    # No end marker within the reader's limit: take what
                    # cannot be part of one, and look again.
                    piece = await self._drain_overlong(exc.consumed)
                if collector.feed(piece):
                    break
                if collector.size > next_touch:
                    next_touch = collector.size + _DATA_TIMER_STEP
                    self._touch_timer()
        finally:
            self._set_read_limit(line_limit)
        return self._judge(collector)

    def _judge(self, collector: DataCollector) -> tuple[bytes | None, Reply | None]:
        """The message a complete DATA transfer carried, or the reply refusing it."""
        smtp = self.ctx.config.smtp
        body, problem = collector.result()
        if problem is DataProblem.TOO_BIG:
            return None, replies.TOO_BIG.with_text(
                f"Message size exceeds fixed maximum message size ({smtp.max_message_size} octets)"
            )
        if problem is DataProblem.LINE_TOO_LONG:
            return None, replies.LINE_TOO_LONG.with_text(
                f"Line too long (more than {smtp.max_line_length} octets)"
            )
        if problem is DataProblem.BARE_LINE_END:
            return None, replies.BARE_LINE_END
        return body, None

    async def _queue(self, envelope: SubmissionEnvelope, body: bytes) -> Reply:
        return await self.ctx.queuer.queue(self._transaction(envelope, body))

    def _transaction(self, envelope: SubmissionEnvelope, body: bytes) -> Transaction:
        """The transaction a received message makes: its headers added, its envelope's facts."""
        assert envelope.sender is not None and self.session is not None
        queue_id = self.ctx.queuer.new_queue_id()
        now = self.ctx.clock()
        params = envelope.mail_params
        tls = self.tls_version()
        user = self.auth_user()
        body = prepare.add_missing_headers(body, queue_id=queue_id, me=self.hostname, now=now)
        text = self.ctx.config.outbound.received_header
        if text is not None:
            rcpts = envelope.recipients
            body = (
                prepare.received_header(
                    me=self.hostname,
                    text=text,
                    queue_id=queue_id,
                    now=now,
                    helo=self.session.host_name or "unknown",
                    client_ip=self.client_ip(),
                    protocol=prepare.protocol_word(
                        esmtp=self.session.extended_smtp,
                        tls=tls is not None,
                        authenticated=user is not None,
                        smtputf8=params.smtputf8,
                    ),
                    recipient=str(rcpts[0]) if len(rcpts) == 1 else None,
                )
                + body
            )
        return Transaction(
            queue_id=queue_id,
            mail_from=str(envelope.sender),
            rcpt_to=[str(r) for r in envelope.recipients],
            body=body,
            rcpt_params=dict(envelope.rcpt_params),
            auth_user=user,
            remote_ip=self.client_ip(),
            helo=self.session.host_name,
            tls=tls,
            smtputf8=params.smtputf8,
            env_id=params.env_id,
            ret=params.ret,
        )

    def close_if_idle(self, reply: Reply) -> bool:
        """Shutdown: say 421 and close unless a message is in flight."""
        if self._busy or self.transport is None:
            return False
        transport = self.transport
        # Duck-typed: uvloop's transports are not asyncio ABC subclasses.
        if not transport.is_closing() and callable(getattr(transport, "write", None)):
            cast(asyncio.WriteTransport, transport).write(str(reply).encode("ascii") + b"\r\n")
        transport.close()
        return True


#: The commands data_received answers, with the plain method that does it
#: (taken only where a class keeps our smtp_* coroutine for the command).
_FAST_METHODS: dict[str, str] = {
    "EHLO": "_ehlo",
    "HELO": "_helo",
    "MAIL": "_mail",
    "RCPT": "_rcpt",
    "RSET": "_rset",
    "NOOP": "_noop",
    "QUIT": "_quit_now",
    "DATA": "_start_data",
}
_fast_by_class: dict[type, dict[str, Callable[[SubmissionSMTP, str | None], bytes]]] = {}


def fast_commands(
    cls: type[SubmissionSMTP],
) -> dict[str, Callable[[SubmissionSMTP, str | None], bytes]]:
    """``{command: plain method}`` of the commands a session of ``cls`` answers in data_received.

    A subclass that replaces a command's ``smtp_*`` coroutine (a test's
    reference session does, with aiosmtpd's) gets that command through
    the task, where its own coroutine runs.
    """
    table = _fast_by_class.get(cls)
    if table is None:
        table = {
            command: getattr(cls, method)
            for command, method in _FAST_METHODS.items()
            if getattr(cls, f"smtp_{command}") is getattr(SubmissionSMTP, f"smtp_{command}")
        }
        _fast_by_class[cls] = table
    return table


def _b64decode(text: str) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise ValueError("not base64") from exc


#: The handler holds no state, so every session shares one.
_HANDLER = SubmissionHandler()


def session_template(ctx: SubmissionContext, *, implicit_tls: bool) -> SessionTemplate:
    """What every session of a listener starts from (see :mod:`.template`)."""
    smtp = ctx.config.smtp
    limits = {command: smtp.max_line_length for command in ("MAIL", "RCPT", "AUTH")}
    return SessionTemplate.build(
        _HANDLER,
        hostname=ctx.config.me,
        ident=IDENT,
        tls_context=None if implicit_tls else ctx.starttls_context,
        implicit_tls=implicit_tls,
        timeout=smtp.inactivity_timeout,
        # +1 leaves room for the transparency dot of a maximal line.
        line_length_limit=smtp.max_line_length + 1,
        command_size_limits=limits,
        auth_exclude=frozenset() if ctx.auth_enabled else frozenset({"PLAIN", "LOGIN"}),
        ehlo_keywords=(
            "PIPELINING",
            f"SIZE {smtp.max_message_size}" if smtp.max_message_size else "SIZE",
            "8BITMIME",
            "SMTPUTF8",
            "ENHANCEDSTATUSCODES",
            "DSN",
        ),
    )


def make_session_factory(
    ctx: SubmissionContext, *, implicit_tls: bool
) -> Callable[[], SubmissionSMTP]:
    """The protocol factory for ``loop.create_server``; the template is built once here."""
    template = session_template(ctx, implicit_tls=implicit_tls)

    def factory() -> SubmissionSMTP:
        return SubmissionSMTP(ctx, implicit_tls=implicit_tls, template=template)

    return factory
