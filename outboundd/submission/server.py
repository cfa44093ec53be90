"""Listeners: plaintext+STARTTLS on ``smtp.listen``, implicit TLS on ``smtp.listen_tls``.

:func:`start_listeners` binds every configured address (or none: an error
on any address closes the ones already bound and raises ``OSError``, so
the daemon never runs half-listening) and returns :class:`Listeners`,
whose :meth:`Listeners.close` stops accepting and lets sessions finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass

from outboundd.config import Config, HostPort
from outboundd.hooks import HookRunner
from outboundd.log import Level, Logger, get_logger
from outboundd.plugins.auth_flat_file import (
    AuthThrottle,
    MemoryThrottleStore,
    ThrottleStore,
    UserStore,
)
from outboundd.submission import liblog
from outboundd.submission.acceptor import LISTEN_BACKLOG, Acceptor, SessionBoard
from outboundd.submission.dkim import signer_for
from outboundd.submission.handler import SubmissionContext, make_session_factory
from outboundd.submission.queueing import Queuer, SpoolSink
from outboundd.submission.replies import Reply

__all__ = ["ListenerError", "Listeners", "server_tls_context", "start_listeners"]

#: Default seconds :meth:`Listeners.close` lets messages in flight finish.
CLOSE_GRACE = 10.0
#: Seconds between looks at the session board while the SMTP processes start.
NODES_POLL_INTERVAL = 0.01

_TLS_VERSIONS = {
    "TLSv1": ssl.TLSVersion.TLSv1,
    "TLSv1.1": ssl.TLSVersion.TLSv1_1,
    "TLSv1.2": ssl.TLSVersion.TLSv1_2,
    "TLSv1.3": ssl.TLSVersion.TLSv1_3,
}

_SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, closing connection")


class ListenerError(OSError):
    """A listener cannot be set up (missing certificate for ``listen_tls`` ...)."""


def server_tls_context(config: Config) -> ssl.SSLContext | None:
    """The server-side TLS context from ``tls.ini [main]``, or None without a key pair.

    Raises ``ssl.SSLError``/``OSError`` (both ``OSError``) when the files
    cannot be loaded: a broken certificate is a start-up error, not a
    silently missing STARTTLS.
    """
    tls = config.tls
    if tls.key is None or tls.cert is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(str(tls.cert), str(tls.key))
    except (OSError, ValueError) as exc:
        raise ListenerError(f"cannot load TLS key pair {tls.cert} / {tls.key}: {exc}") from exc
    if tls.main.min_version:
        context.minimum_version = _TLS_VERSIONS[tls.main.min_version]
    if tls.main.ciphers:
        context.set_ciphers(tls.main.ciphers)
    return context


def _quiet_aiosmtpd(log: Logger) -> None:
    """aiosmtpd logs every command (and a deprecation warning per AUTH) on its
    ``mail.log`` logger; show that chatter only when we log at PROTOCOL."""
    level = logging.DEBUG if log.enabled(Level.PROTOCOL) else logging.ERROR
    library_log = logging.getLogger("mail.log")
    library_log.setLevel(level)
    liblog.install(library_log)  # never a client's AUTH data, at any level


@dataclass(eq=False)
class Listeners:
    """The running listeners of one daemon."""

    servers: list[tuple[asyncio.Server, bool]]  # (server, implicit TLS)
    context: SubmissionContext
    acceptors: list[Acceptor]
    #: The SMTP nodes' session counts (None with one process).
    board: SessionBoard | None = None

    def start_accepting(self) -> None:
        """Accept connections from now on (see ``start_listeners(accept_now=...)``)."""
        for acceptor in self.acceptors:
            acceptor.start()

    async def accept_together(self, timeout: float, give_up: asyncio.Event) -> bool:
        """Say this process can accept, wait until every SMTP process can, then
        accept; whether they all could before ``timeout`` s (or ``give_up``).

        Sessions a client keeps open stay where they landed: a process that
        accepted while the others still started would keep every session
        of a burst that came meanwhile (all 20 of ``tools/bench
        --reuse-sessions``).  Until all can, connections wait in the
        kernel's queue.
        """
        board = self.board
        together = True
        if board is not None:
            board.publish(0)
            deadline = asyncio.get_running_loop().time() + timeout
            while min(board.counts()) < 0:
                if give_up.is_set() or asyncio.get_running_loop().time() >= deadline:
                    together = False
                    break
                await asyncio.sleep(NODES_POLL_INTERVAL)
        self.start_accepting()
        return together

    def retire_node(self, node: int) -> None:
        """SMTP node ``node`` (1..) exited: no other process leaves it a connection."""
        if self.board is not None:
            self.board.retire(node)

    def node_board(self, node: int) -> tuple[int, int] | None:
        """``(file descriptor, slot)`` of the session board for SMTP node ``node`` (1..)."""
        return None if self.board is None else (self.board.fd, node)

    def listen_fds(self) -> list[tuple[int, bool]]:
        """``(file descriptor, implicit TLS)`` of every listening socket, for SMTP nodes."""
        return [
            (sock.fileno(), implicit)
            for server, implicit in self.servers
            for sock in server.sockets
        ]

    def addresses(self) -> list[tuple[str, int, bool]]:
        """``(host, port, implicit_tls)`` of every bound socket (tests use port 0)."""
        found: list[tuple[str, int, bool]] = []
        for server, implicit in self.servers:
            for sock in server.sockets:
                name = sock.getsockname()
                found.append((str(name[0]), int(name[1]), implicit))
        return found

    async def close(self, grace: float = CLOSE_GRACE) -> None:
        """Stop accepting, then let sessions end (bounded by ``grace`` seconds).

        Idle sessions are told ``421 4.3.2`` and closed at once; a session
        receiving or queueing a message finishes that message first.  After
        ``grace`` the rest are cut off (their messages are not queued, the
        clients retry).  Spool writes whose client went away are awaited, so
        the spool can be closed safely afterwards.
        """
        ctx = self.context
        ctx.closing = True
        for acceptor in self.acceptors:
            acceptor.close()
        for server, _ in self.servers:
            server.close()
        for session in list(ctx.sessions):
            session.close_if_idle(_SHUTTING_DOWN)
        if ctx.sessions:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ctx.idle.wait(), grace)
        for session in list(ctx.sessions):
            if session.transport is not None:
                session.transport.close()
        # Give the transports a loop turn to run connection_lost.
        for _ in range(3):
            if not ctx.sessions:
                break
            await asyncio.sleep(0)
        for server, _ in self.servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1.0)
        await ctx.queuer.drain(grace)
        if self.board is not None:
            self.board.close()
            self.board = None


def _default_store(spool: SpoolSink) -> ThrottleStore:
    return spool if isinstance(spool, ThrottleStore) else MemoryThrottleStore()


async def start_listeners(
    config: Config,
    spool: SpoolSink,
    hooks: HookRunner,
    logger: Logger | None = None,
    *,
    inherited: Sequence[tuple[int, bool]] | None = None,
    throttle_store: ThrottleStore | None = None,
    nodes: int = 1,
    board: SessionBoard | None = None,
    accept_now: bool = True,
) -> Listeners:
    """Bind every ``listen`` and ``listen_tls`` address and start serving.

    ``inherited`` — ``(fd, implicit TLS)`` of sockets the first process
    bound — makes an SMTP node serve those instead of binding its own.
    ``nodes`` — the SMTP processes the first process will run on these
    sockets — makes it create the board they share their session counts on
    (``board``: the one a node inherited).  ``throttle_store`` keeps the
    AUTH failure counts; the daemon passes its
    :class:`~outboundd.spool.Spool`, which every process shares.  Without
    it, ``spool`` is used when it is such a store, else this process's memory.
    Raises ``OSError`` (a :class:`ListenerError` for configuration problems)
    when any address cannot be used; nothing is left listening then.
    ``accept_now=False``: the sockets listen (connections wait in the
    kernel's queue) but nothing is accepted until
    :meth:`Listeners.start_accepting`.
    """
    log = logger or get_logger("submission")
    _quiet_aiosmtpd(log)
    tls_context = server_tls_context(config)
    if config.smtp.listen_tls and tls_context is None:
        raise ListenerError(
            "smtp.ini listen_tls is set but there is no TLS key pair "
            "(tls_key.pem/tls_cert.pem or tls.ini [main] key/cert)"
        )
    ctx = SubmissionContext(
        config=config,
        queuer=Queuer(spool, hooks, log, signer=signer_for(config, log)),
        users=UserStore(config.auth_users, path=config.config_dir / "auth_flat_file.ini"),
        throttle=AuthThrottle(
            max_failures=config.smtp.auth_max_failures,
            failure_delay=config.smtp.auth_failure_delay,
            disconnect_after=config.smtp.auth_disconnect_after,
            block_seconds=config.smtp.auth_block_seconds,
            store=throttle_store or _default_store(spool),
        ),
        log=log,
        starttls_context=tls_context,
    )
    ctx.idle.set()
    loop = asyncio.get_running_loop()
    servers: list[tuple[asyncio.Server, bool]] = []

    # The servers bind and own the sockets but never accept: an Acceptor per
    # socket does, one connection per wake-up, so that SMTP nodes share the
    # clients that keep their sessions open (see acceptor.py).
    async def bind(address: HostPort, implicit_tls: bool) -> None:
        server = await loop.create_server(
            asyncio.Protocol,
            host=address.host,
            port=address.port,
            reuse_address=True,
            start_serving=False,
        )
        servers.append((server, implicit_tls))

    async def adopt(fd: int, implicit_tls: bool) -> None:
        server = await loop.create_server(
            asyncio.Protocol, sock=socket.socket(fileno=fd), start_serving=False
        )
        servers.append((server, implicit_tls))

    acceptors: list[Acceptor] = []
    if board is None and inherited is None and nodes > 1:
        board = SessionBoard.create(nodes)
    try:
        if inherited is not None:
            for fd, implicit_tls in inherited:
                await adopt(fd, implicit_tls)
        else:
            for address in config.smtp.listen:
                await bind(address, False)
            for address in config.smtp.listen_tls:
                await bind(address, True)
        for server, implicit_tls in servers:
            for sock in server.sockets:
                acceptor = Acceptor(
                    sock.fileno(),
                    make_session_factory(ctx, implicit_tls=implicit_tls),
                    tls_context if implicit_tls else None,
                    log,
                    sessions=ctx.sessions.__len__,
                    board=board,
                )
                acceptors.append(acceptor)
                acceptor.listen(LISTEN_BACKLOG)
    except OSError:
        for acceptor in acceptors:
            acceptor.close()
        for server, _ in servers:
            server.close()
        if board is not None:
            board.close()
        raise
    listeners = Listeners(servers, ctx, acceptors, board)
    if accept_now:
        listeners.start_accepting()
    for host, port, implicit in [] if inherited is not None else listeners.addresses():
        log.info(
            "listening",
            address=f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
            tls="implicit" if implicit else ("starttls" if tls_context else "none"),
            auth="on" if ctx.auth_enabled else "off",
        )
    return listeners
