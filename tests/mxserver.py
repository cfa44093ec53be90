"""A scripted MX server for tests: a real aiosmtpd SMTP/LMTP server on loopback.

It plays a remote mail exchanger whose every answer the test chooses: reply
per stage and per recipient, slow replies, a connection dropped at any
stage, STARTTLS offered (working or broken), AUTH, SIZE, SMTPUTF8, DSN and
LMTP.  It records what it received so tests can assert on the wire.

Quick start::

    from tests.mxserver import DROP, MXScript, mx_server

    async def test_something(pki):
        script = MXScript(rcpt={"gone@example.test": "550 5.1.1 no such user"})
        async with mx_server(script, host="127.0.0.2") as mx:
            target = mx.target()                    # an outboundd MXTarget
            ...deliver to [target]...
        assert mx.transactions[0].rcpt_tos == ["ok@example.test"]
        assert mx.connections == 1

or, with the fixture (synchronous tests work too: the server has its own
thread and event loop)::

    from tests.mxserver import mx_factory  # noqa: F401  (pytest fixture)

    def test_other(mx_factory):
        mx = mx_factory(MXScript(dsn=True), host="127.0.0.3")

(``pytest_plugins = ["tests.mxserver"]`` in ``conftest.py`` makes the
fixture available everywhere without the import.)

:class:`MXScript` fields (all optional; a reply is the full reply text, e.g.
``"451 4.3.0 try later"`` or a multi-line ``"250-a\\r\\n250 b"``; the
special value :data:`DROP` closes the connection instead of answering, and
:data:`SILENT` never answers — the server keeps the connection open and
says nothing, as a hung remote does):

* ``banner`` — greeting (default ``220 <hostname> ESMTP scripted``)
* ``ehlo``, ``helo``, ``lhlo`` — replace the answer (e.g. ``"502 5.5.1 no"``
  to make the client fall back to HELO); ``ehlo_tls`` replaces only the
  answer to the EHLO after STARTTLS
* ``starttls`` — answer to STARTTLS instead of starting TLS
* ``auth`` — answer to AUTH instead of checking credentials
* ``mail`` — answer to MAIL FROM
* ``rcpt`` — ``{address: reply}`` per recipient (case-insensitive);
  ``rcpt_default`` for the others (default ``250 2.1.5 OK``)
* ``data`` — answer to DATA instead of 354
* ``data_end`` — answer after the final dot (SMTP), or every recipient's
  answer (LMTP) unless ``lmtp_replies`` ``{address: reply}`` names it
* ``rset`` — answer to RSET; ``quit`` — answer to QUIT (default ``221``,
  then the server closes)
* ``max_messages`` — per connection: the next MAIL after that many
  messages gets ``421 4.7.0`` and the connection is closed (a server's
  per-connection limit, or one that timed the idle connection out)
* ``tls_silent`` — answer 220 to STARTTLS, then never take part in the
  TLS handshake; ``body_silent`` — answer 354 to DATA, then stop reading
  (the client's writes of the body block once the buffers are full)
* ``delays`` — ``{stage: seconds}`` to wait before answering; stages are
  ``banner ehlo helo lhlo starttls auth mail rcpt data data_end rset quit``
* ``tls`` — a :class:`tests.certs.TestPKI` (or server ``SSLContext``):
  STARTTLS is advertised and works; ``tls_broken=True`` answers 220 to
  STARTTLS and then sends garbage, so the client's handshake fails
* ``size_limit`` — advertise (and enforce) ``SIZE n``; ``None`` hides SIZE
* ``smtputf8``, ``dsn``, ``eightbitmime`` — advertise those extensions
  (DSN parameters are accepted only when ``dsn`` is on, as a real server)
* ``credentials`` — ``{user: password}``: advertise AUTH PLAIN LOGIN and
  check logins; ``auth_require_tls`` (default true) offers AUTH only
  after STARTTLS
* ``lmtp`` — speak LMTP: LHLO, and one reply per recipient after the dot
* ``pipelining`` — advertise PIPELINING (default :data:`PIPELINING_DEFAULT`)

What is recorded (read it from the test; appends happen on the server's
thread): ``connections`` (TCP connections accepted), ``open_connections``
and ``max_open_connections`` (open now, and the most open at once; pass
one :class:`ConnectionGauge` as ``gauge=`` to several servers to count
them together), ``commands`` (every
command verb in order, e.g. ``["EHLO", "STARTTLS", "EHLO", "MAIL", ...]``)
``pipelined`` (per MAIL: whether the commands after it came in the same
segment), and ``transactions`` — a :class:`ReceivedTransaction` per message body
received: ``mail_from``, ``mail_params`` and ``rcpt_params`` (raw, as sent),
``rcpt_tos``, ``body`` (bytes, dot-unstuffed), ``tls`` (version or None),
``auth_user``, ``helo``, ``peer`` (the client's IP).  ``script`` may be changed between connections.

Only loopback addresses are accepted (Linux routes all of 127/8 to ``lo``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import ssl
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

from outboundd.delivery.mx import MXTarget
from outboundd.hooks import MX
from tests.certs import TestPKI

__all__ = [
    "DROP",
    "SILENT",
    "ConnectionGauge",
    "MXScript",
    "MXServer",
    "ReceivedTransaction",
    "mx_factory",
    "mx_server",
    "refusing_address",
]

#: Use as a scripted reply to close the connection instead of answering.
DROP = "DROP"
#: Use as a scripted reply to never answer (the connection stays open).
SILENT = "SILENT"

_STARTUP_TIMEOUT = 5.0
_DSN_MAIL = ("RET", "ENVID")
_DSN_RCPT = ("NOTIFY", "ORCPT")


#: Whether scripts that do not say advertise PIPELINING (RFC 2920), as most
#: real servers do; a test module may switch it to run the unpipelined path.
PIPELINING_DEFAULT = True


@dataclass
class MXScript:
    """What the server answers; see the module docstring."""

    hostname: str = "mx.test"
    banner: str | None = None
    ehlo: str | None = None
    ehlo_tls: str | None = None
    helo: str | None = None
    lhlo: str | None = None
    starttls: str | None = None
    auth: str | None = None
    mail: str | None = None
    rcpt: Mapping[str, str] = field(default_factory=dict)
    rcpt_default: str = "250 2.1.5 OK"
    data: str | None = None
    data_end: str | None = None
    lmtp_replies: Mapping[str, str] = field(default_factory=dict)
    rset: str | None = None
    quit: str | None = None
    delays: Mapping[str, float] = field(default_factory=dict)
    tls: TestPKI | ssl.SSLContext | None = None
    tls_broken: bool = False
    tls_silent: bool = False
    body_silent: bool = False
    max_messages: int | None = None
    size_limit: int | None = None
    smtputf8: bool = False
    dsn: bool = False
    eightbitmime: bool = True
    credentials: Mapping[str, str] | None = None
    auth_require_tls: bool = True
    lmtp: bool = False
    pipelining: bool | None = None  # None: PIPELINING_DEFAULT


class ConnectionGauge:
    """Connections open now and the most open at once, over one or more servers."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.open = 0
        self.max_open = 0

    def opened(self) -> None:
        with self._lock:
            self.open += 1
            self.max_open = max(self.max_open, self.open)

    def closed(self) -> None:
        with self._lock:
            self.open -= 1


@dataclass
class ReceivedTransaction:
    """One message as the server received it."""

    mail_from: str
    mail_params: list[str]
    rcpt_tos: list[str]
    rcpt_params: dict[str, list[str]]
    body: bytes
    tls: str | None
    auth_user: str | None
    helo: str | None
    peer: str | None


def _split_params(arg: str) -> tuple[str, list[str]]:
    """``"FROM:<a@b> SIZE=1 RET=FULL"`` → ``("FROM:<a@b>", ["SIZE=1", "RET=FULL"])``."""
    end = arg.find(">")
    if end == -1:
        head, _, rest = arg.partition(" ")
        return head, rest.split()
    return arg[: end + 1], arg[end + 1 :].split()


def _without(params: list[str], names: tuple[str, ...]) -> list[str]:
    return [p for p in params if p.partition("=")[0].upper() not in names]


class _Handler:
    """aiosmtpd handler hooks: EHLO extensions, MAIL/RCPT replies, DATA recording."""

    def __init__(self, mx: MXServer) -> None:
        self.mx = mx

    async def handle_EHLO(
        self,
        server: _ScriptedSMTP,
        session: Any,
        envelope: Any,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        script = self.mx.script
        session.host_name = hostname
        server.helo_name = hostname
        keep = []
        for line in responses:
            word = line[4:].split(" ")[0].upper()
            if word == "AUTH" and script.credentials is None:
                continue
            if word == "8BITMIME" and not script.eightbitmime:
                continue
            keep.append(line)
        if script.dsn:
            keep.insert(len(keep) - 1, "250-DSN")
        # aiosmtpd reads commands one by one, so it serves pipelined
        # clients, but does not say so itself.
        if PIPELINING_DEFAULT if script.pipelining is None else script.pipelining:
            keep.insert(len(keep) - 1, "250-PIPELINING")
        return keep

    async def handle_MAIL(
        self, server: _ScriptedSMTP, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        reply = self.mx.script.mail or "250 2.1.0 OK"
        # Pipelined: the commands after MAIL were already here when it was read.
        self.mx.pipelined.append(bool(server._reader._buffer))
        await server.pause_or_drop("mail", reply)
        if reply.startswith("2"):
            envelope.mail_from = address
            envelope.mail_options.extend(options)
            server.mail_params = server.pending_params
        return reply

    async def handle_RCPT(
        self, server: _ScriptedSMTP, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        script = self.mx.script
        rcpt = {k.lower(): v for k, v in script.rcpt.items()}
        reply = rcpt.get(address.lower(), script.rcpt_default)
        await server.pause_or_drop("rcpt", reply)
        if reply.startswith("2"):
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(options)
            server.rcpt_params[address] = server.pending_params
        return reply

    async def handle_DATA(self, server: _ScriptedSMTP, session: Any, envelope: Any) -> str:
        script = self.mx.script
        body = envelope.original_content
        self.mx.transactions.append(
            ReceivedTransaction(
                mail_from=envelope.mail_from,
                mail_params=list(server.mail_params),
                rcpt_tos=list(envelope.rcpt_tos),
                rcpt_params={k: list(v) for k, v in server.rcpt_params.items()},
                body=bytes(body) if body is not None else b"",
                tls=server.tls_version(),
                auth_user=server.auth_user(),
                helo=server.helo_name,
                peer=server.peer_ip(),
            )
        )
        server.rcpt_params = {}
        server.messages += 1
        if not script.lmtp:
            reply = script.data_end or "250 2.0.0 Ok: queued"
            await server.pause_or_drop("data_end", reply)
            return reply
        per = {k.lower(): v for k, v in script.lmtp_replies.items()}
        replies = [
            per.get(r.lower(), script.data_end or f"250 2.1.5 <{r}> delivered")
            for r in envelope.rcpt_tos
        ]
        await server.pause_or_drop("data_end", None)
        for reply in replies[:-1]:
            if reply == DROP:
                await server.drop()
            await server.push(reply)
        if replies[-1] == DROP:
            await server.drop()
        return replies[-1]


class _ScriptedSMTP(SMTP):
    """aiosmtpd's SMTP with scripted answers at the stages it has no hook for."""

    def __init__(self, mx: MXServer, **kwargs: Any) -> None:
        self.mx = mx
        self.helo_name: str | None = None
        self.pending_params: list[str] = []
        self.mail_params: list[str] = []
        self.rcpt_params: dict[str, list[str]] = {}
        self.messages = 0  # bodies received on this connection
        self._greeted = False
        super().__init__(_Handler(mx), **kwargs)

    # -- helpers used by the handler ---------------------------------------

    async def drop(self) -> None:
        """Close the connection without a word; the session task ends here."""
        if self.transport is not None:
            self.transport.abort()
        await asyncio.get_running_loop().create_future()  # cancelled by connection_lost

    async def pause_or_drop(self, stage: str, reply: str | None) -> None:
        delay = self.mx.script.delays.get(stage)
        if delay:
            await asyncio.sleep(delay)
        if reply == DROP:
            await self.drop()
        if reply == SILENT:
            await self.silence()

    async def silence(self) -> None:
        """Say nothing more; the session task waits here until the connection ends."""
        await asyncio.get_running_loop().create_future()  # cancelled by connection_lost

    def tls_version(self) -> str | None:
        if self._tls_protocol is None or self.transport is None:
            return None
        ssl_object = self.transport.get_extra_info("ssl_object")
        return ssl_object.version() if ssl_object is not None else None

    def auth_user(self) -> str | None:
        data = getattr(self.session, "auth_data", None)
        if isinstance(data, LoginPassword):
            return data.login.decode("utf-8", "replace")
        return None

    def peer_ip(self) -> str | None:
        peer = getattr(self.session, "peer", None)
        return str(peer[0]) if isinstance(peer, tuple) and peer else None

    async def _scripted(self, stage: str, reply: str | None) -> bool:
        """Delay, drop or answer as scripted; False lets aiosmtpd answer."""
        self.mx.commands.append(stage.upper())
        await self.pause_or_drop(stage, reply)
        if reply is not None:
            await self.push(reply)
            return True
        return False

    # -- connection ----------------------------------------------------------

    #: Counted in the gauge as open (from connect until QUIT or loss).
    _gauged = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._original_transport is None:  # a new TCP connection, not STARTTLS
            self.mx.connections += 1
            self.mx._protocols.add(self)
            self._gauged = True
            self.mx.gauge.opened()
        super().connection_made(transport)

    def _ungauge(self) -> None:
        if self._gauged:
            self._gauged = False
            self.mx.gauge.closed()

    def connection_lost(self, error: Exception | None) -> None:
        self.mx._protocols.discard(self)
        self._ungauge()
        super().connection_lost(error)

    async def push(self, status: Any) -> None:
        if not self._greeted:
            self._greeted = True
            script = self.mx.script
            await self.pause_or_drop("banner", script.banner)
            status = script.banner or f"220 {script.hostname} ESMTP scripted"
        await super().push(status)

    # -- commands ------------------------------------------------------------

    async def smtp_EHLO(self, hostname: str) -> None:
        if self.mx.script.lmtp:
            self.mx.commands.append("EHLO")
            await self.push('500 Error: command "EHLO" not recognized')
            return
        script = self.mx.script
        reply = script.ehlo_tls if self._tls_protocol is not None else None
        if not await self._scripted("ehlo", reply or script.ehlo):
            await super().smtp_EHLO(hostname)

    async def smtp_LHLO(self, hostname: str) -> None:
        if not self.mx.script.lmtp:
            self.mx.commands.append("LHLO")
            await self.push('500 Error: command "LHLO" not recognized')
            return
        if not await self._scripted("lhlo", self.mx.script.lhlo):
            await super().smtp_EHLO(hostname)

    async def smtp_HELO(self, hostname: str) -> None:
        if self.mx.script.lmtp:
            self.mx.commands.append("HELO")
            await self.push('500 Error: command "HELO" not recognized')
            return
        if not await self._scripted("helo", self.mx.script.helo):
            self.helo_name = hostname
            await super().smtp_HELO(hostname)

    async def smtp_STARTTLS(self, arg: str) -> None:
        if await self._scripted("starttls", self.mx.script.starttls):
            return
        if self.mx.script.tls_silent:
            await self.push("220 2.0.0 Ready to start TLS")
            await self.silence()
        if self.mx.script.tls_broken and self.tls_context is not None:
            await self.push("220 2.0.0 Ready to start TLS")
            await super().push(b"this is not a TLS handshake\r\n" * 4)
            await self.drop()
        await super().smtp_STARTTLS(arg)

    async def smtp_AUTH(self, arg: str) -> None:
        if not await self._scripted("auth", self.mx.script.auth):
            await super().smtp_AUTH(arg)

    async def smtp_MAIL(self, arg: str | None) -> None:
        self.mx.commands.append("MAIL")
        limit = self.mx.script.max_messages
        if limit is not None and self.messages >= limit and self.transport is not None:
            await self.push("421 4.7.0 too many messages on this connection, closing")
            self.transport.close()  # after the reply is written
            await self.silence()
        if arg is not None:
            head, params = _split_params(arg)
            self.pending_params = params
            if self.mx.script.dsn:
                arg = " ".join([head, *_without(params, _DSN_MAIL)])
        await super().smtp_MAIL(arg)

    async def smtp_RCPT(self, arg: str | None) -> None:
        self.mx.commands.append("RCPT")
        if arg is not None:
            head, params = _split_params(arg)
            self.pending_params = params
            if self.mx.script.dsn:
                arg = " ".join([head, *_without(params, _DSN_RCPT)])
        await super().smtp_RCPT(arg)

    async def smtp_DATA(self, arg: str) -> None:
        if await self._scripted("data", self.mx.script.data):
            return
        if self.mx.script.body_silent and self.envelope.rcpt_tos:
            await self.push("354 End data with <CR><LF>.<CR><LF>")
            await self.silence()  # nothing read: the client's writes fill the buffers
        await super().smtp_DATA(arg)

    async def smtp_RSET(self, arg: str) -> None:
        self.mail_params, self.rcpt_params = [], {}
        if not await self._scripted("rset", self.mx.script.rset):
            await super().smtp_RSET(arg)

    async def smtp_QUIT(self, arg: str) -> None:
        self.mx.commands.append("QUIT")
        await self.pause_or_drop("quit", self.mx.script.quit)
        # Closed from here on, before the client can read our 221: under
        # load this thread may run connection_lost only after the client,
        # having read the 221, has opened its next connection, and the
        # gauge would count both.
        self._ungauge()
        await super().smtp_QUIT(arg)


def _authenticator(mx: MXServer) -> Callable[..., AuthResult]:
    def check(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
        creds = mx.script.credentials or {}
        if isinstance(data, LoginPassword):
            user = data.login.decode("utf-8", "replace")
            if creds.get(user) == data.password.decode("utf-8", "replace"):
                return AuthResult(success=True, auth_data=data)
        return AuthResult(success=False, handled=False)

    return check


def _check_loopback(host: str) -> None:
    if not ipaddress.ip_address(host).is_loopback:
        raise ValueError(f"the scripted MX only listens on loopback addresses, not {host}")


class MXServer:
    """A scripted MX on ``host:port`` running in its own thread and event loop.

    ``start()`` returns once it listens (``port`` 0 picks a free port, read
    it back from ``.port``); ``stop()`` closes every connection, ends the
    loop and joins the thread.  Both are idempotent.
    """

    def __init__(
        self,
        script: MXScript | None = None,
        *,
        host: str = "127.0.0.2",
        port: int = 0,
        gauge: ConnectionGauge | None = None,
    ) -> None:
        _check_loopback(host)
        self.script = script or MXScript()
        self.host = host
        self.port = port
        self.connections = 0
        self.gauge = gauge or ConnectionGauge()
        self.commands: list[str] = []
        self.transactions: list[ReceivedTransaction] = []
        #: Per MAIL: did more commands arrive with it (the client pipelined)?
        self.pipelined: list[bool] = []
        self._protocols: set[_ScriptedSMTP] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._error: BaseException | None = None

    # -- for tests -------------------------------------------------------------

    @property
    def open_connections(self) -> int:
        return self.gauge.open

    @property
    def max_open_connections(self) -> int:
        return self.gauge.max_open

    def target(self, **mx_options: Any) -> MXTarget:
        """An :class:`MXTarget` pointing here; ``mx_options`` go to :class:`MX`."""
        mx = MX(self.host, port=self.port, using_lmtp=self.script.lmtp, **mx_options)
        return MXTarget(mx=mx, address=self.host, port=self.port, hostname=self.script.hostname)

    # -- lifecycle ------------------------------------------------------------

    def _tls_context(self) -> ssl.SSLContext | None:
        tls = self.script.tls
        if isinstance(tls, TestPKI):
            return tls.server_context()
        return tls

    def _factory(self) -> _ScriptedSMTP:
        script = self.script
        assert self._loop is not None
        return _ScriptedSMTP(
            self,
            loop=self._loop,
            hostname=script.hostname,
            data_size_limit=script.size_limit,
            enable_SMTPUTF8=script.smtputf8,
            tls_context=self._tls_context(),
            auth_require_tls=script.auth_require_tls,
            authenticator=_authenticator(self),
            timeout=30,
        )

    def _run(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            try:
                self._server = loop.run_until_complete(
                    loop.create_server(self._factory, self.host, self.port)
                )
            except BaseException as exc:
                self._error = exc
                return
            self.port = self._server.sockets[0].getsockname()[1]
            loop.call_soon(ready.set)
            loop.run_forever()
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            ready.set()
            loop.close()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for proto in list(self._protocols):
            if proto.transport is not None:
                proto.transport.abort()
            if proto._original_transport is not None:
                proto._original_transport.abort()
        if self._server is not None:
            await self._server.wait_closed()
        current = asyncio.current_task()
        tasks = [t for t in asyncio.all_tasks() if t is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def drop_connections(self) -> None:
        """Close every open client connection now, as a server's idle timeout does."""
        loop = self._loop
        if loop is None or not loop.is_running():
            return

        def drop() -> None:
            for proto in list(self._protocols):
                if proto.transport is not None:
                    proto.transport.abort()
                if proto._original_transport is not None:
                    proto._original_transport.abort()

        done = threading.Event()
        loop.call_soon_threadsafe(lambda: (drop(), done.set()))
        done.wait(_STARTUP_TIMEOUT)

    def start(self) -> MXServer:
        if self._thread is not None:
            return self
        ready = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(ready,), name=f"mxserver-{self.host}", daemon=True
        )
        self._thread.start()
        if not ready.wait(_STARTUP_TIMEOUT) or self._error is not None:
            self._thread.join(_STARTUP_TIMEOUT)
            self._thread = None
            raise RuntimeError(f"scripted MX on {self.host}:{self.port} did not start") from (
                self._error
            )
        return self

    def stop(self) -> None:
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        if loop.is_running():
            future = asyncio.run_coroutine_threadsafe(self._shutdown(), loop)
            with contextlib.suppress(Exception):
                future.result(_STARTUP_TIMEOUT)
            loop.call_soon_threadsafe(loop.stop)
        thread.join(_STARTUP_TIMEOUT)
        self._thread = None
        if thread.is_alive():
            raise RuntimeError(f"scripted MX on {self.host}:{self.port} did not stop")

    def __enter__(self) -> MXServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.asynccontextmanager
async def mx_server(
    script: MXScript | None = None,
    *,
    host: str = "127.0.0.2",
    port: int = 0,
    gauge: ConnectionGauge | None = None,
) -> AsyncIterator[MXServer]:
    """Run a scripted MX for the duration of an ``async with`` block."""
    server = MXServer(script, host=host, port=port, gauge=gauge)
    await asyncio.to_thread(server.start)
    try:
        yield server
    finally:
        await asyncio.to_thread(server.stop)


@pytest.fixture
def mx_factory() -> Iterator[Callable[..., MXServer]]:
    """``mx_factory(script=None, *, host="127.0.0.2", port=0)`` → a started
    :class:`MXServer`, stopped at teardown."""
    servers: list[MXServer] = []

    def make(script: MXScript | None = None, *, host: str = "127.0.0.2", port: int = 0) -> MXServer:
        server = MXServer(script, host=host, port=port).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


def refusing_address(host: str = "127.0.0.9") -> tuple[str, int]:
    """A loopback ``(host, port)`` where nothing listens: connecting is refused."""
    _check_loopback(host)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
    return host, port
