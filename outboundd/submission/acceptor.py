"""Accepting connections so that SMTP nodes share the sessions evenly.

Every SMTP node polls the same listening sockets (``smtp.ini nodes``).  The
event loop's own accept loop (asyncio's and uvloop's alike) takes every
connection waiting in the kernel's queue at each wake-up, and the kernel
wakes the waiting processes in a fixed order, so a burst of connections all
lands on one process.  With a new connection per message that evens out
over time, but clients that keep their sessions open (submitters sending
many messages per connection, ``smtp-source -d``) stay where they landed:
measured with 20 reused sessions and ``nodes=2``, all 20 were served by the
first process while the other only delivered.

An :class:`Acceptor` therefore takes one connection per wake-up, and every
node publishes its number of open sessions on a :class:`SessionBoard`
(a few integers in shared memory the first process creates and hands to
its nodes).  A node with two or more sessions more than the least busy one
lets that node take the waiting connection, and takes it itself if it is still
waiting two milliseconds later (a node that is busy or gone never holds
connections up for longer).  The server object still owns the socket
(binding, addresses, closing); the acceptor polls a duplicate descriptor.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import mmap
import os
import socket
import ssl
import struct
import time
from collections.abc import Callable, Coroutine
from typing import Any

from outboundd.log import Logger

__all__ = ["LISTEN_BACKLOG", "NOT_ACCEPTING", "Acceptor", "SessionBoard"]

#: The listen queue length (asyncio's ``create_server`` default).
LISTEN_BACKLOG = 100

#: Seconds a busier node leaves a waiting connection to a less busy one
#: (woken for the same socket, it needs a moment to be scheduled).
YIELD_SECONDS = 0.002

#: Seconds between publications of a node's session count (sessions also
#: end while nothing is accepted).
PUBLISH_INTERVAL = 0.2

#: Seconds to stop accepting after the process ran out of file descriptors
#: (or the kernel of buffers), so a full table does not spin the loop.
_OUT_OF_RESOURCES_PAUSE = 0.5

#: Seconds a replaced duplicate of the listening socket stays open.
_RETIRE_SECONDS = 1.0

_OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}

#: How many more open sessions than another node a node must have before it
#: leaves a waiting connection to it: with one, nodes at par would hand
#: connections back and forth (each hand-off a wait) on every small swing.
MARGIN = 2

_SLOT = struct.Struct("=i")

#: A slot's value while its node does not accept (not yet started, or
#: stopped or dead): no other node leaves it a connection.
NOT_ACCEPTING = -1


class SessionBoard:
    """Open sessions per SMTP node, in memory every node maps.

    One 32-bit slot per node; each node writes only its own, so no lock is
    needed, and a count read while it changes is merely a moment old.
    """

    def __init__(self, fd: int, slots: int, slot: int) -> None:
        if not 0 <= slot < slots:
            raise ValueError(f"session board slot {slot} is not in 0..{slots - 1}")
        self.fd = fd
        self.slots = slots
        self.slot = slot
        self._map = mmap.mmap(fd, slots * _SLOT.size)

    @classmethod
    def create(cls, slots: int) -> SessionBoard:
        """A new board of ``slots`` slots, each :data:`NOT_ACCEPTING`; this process takes slot 0."""
        fd = os.memfd_create("outboundd-sessions")
        os.ftruncate(fd, slots * _SLOT.size)
        board = cls(fd, slots, 0)
        for slot in range(slots):
            board.retire(slot)
        return board

    @classmethod
    def attach(cls, fd: int, slot: int) -> SessionBoard:
        """The board a node inherited as ``fd``, writing ``slot``."""
        return cls(fd, os.fstat(fd).st_size // _SLOT.size, slot)

    def publish(self, sessions: int) -> None:
        _SLOT.pack_into(self._map, self.slot * _SLOT.size, sessions)

    def retire(self, slot: int) -> None:
        """Mark node ``slot`` as not accepting (the first process, for a node that exited)."""
        _SLOT.pack_into(self._map, slot * _SLOT.size, NOT_ACCEPTING)

    def counts(self) -> list[int]:
        return [value for (value,) in _SLOT.iter_unpack(self._map)]

    def busier_than_another(self, sessions: int) -> bool:
        """Whether another accepting node has ``MARGIN`` fewer sessions open than ``sessions``."""
        return any(
            0 <= value <= sessions - MARGIN
            for index, (value,) in enumerate(_SLOT.iter_unpack(self._map))
            if index != self.slot
        )

    def close(self) -> None:
        self._map.close()
        os.close(self.fd)


class _AcceptedSocket(socket.socket):
    """An accepted connection's socket, its ``family`` and ``type`` plain attributes.

    ``socket.socket``'s ``family`` and ``type`` properties ask the descriptor
    and look the number up in an enum on every read (some 0.5 µs each):
    ``socket.accept()`` reads the listening socket's twice and uvloop's
    ``connect_accepted_socket`` the new socket's three times, five per
    connection.  Here they hold the listening socket's, read once, which is
    what ``accept()`` gives the new socket.
    """

    __slots__ = ("family", "type")
    family: socket.AddressFamily
    type: socket.SocketKind


class Acceptor:
    """Serves one listening socket: at most one ``accept()`` per wake-up."""

    def __init__(
        self,
        listening_fd: int,
        protocol_factory: Callable[[], asyncio.Protocol],
        tls: ssl.SSLContext | None,
        log: Logger,
        *,
        sessions: Callable[[], int],
        board: SessionBoard | None = None,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._socket = socket.socket(fileno=os.dup(listening_fd))
        self._socket.setblocking(False)
        #: The listening socket's family, type and protocol (its duplicates' too).
        self._kind = (self._socket.family, self._socket.type, self._socket.proto)
        self._factory = protocol_factory
        self._tls = tls
        self._log = log
        self._sessions = sessions
        self._board = board
        #: Sessions being set up (accepted, connection_made not yet called).
        self._connecting = 0
        self._polling = False
        self._closed = False
        self._yielded = False
        self._yield_until = 0.0
        self._publisher: asyncio.TimerHandle | None = None

    def listen(self, backlog: int = LISTEN_BACKLOG) -> None:
        """Make the socket listen (a socket inherited from the first process already does)."""
        self._socket.listen(backlog)

    def start(self) -> None:
        """Start (or resume) polling; the socket must be listening."""
        if self._closed:
            return
        if not self._polling:
            self._loop.add_reader(self._socket.fileno(), self._accept_one)
            self._polling = True
        if self._board is not None and self._publisher is None:
            self._publish()

    def close(self) -> None:
        """Stop accepting; sessions already accepted go on."""
        self._closed = True
        self._stop_polling()
        if self._publisher is not None:
            self._publisher.cancel()
            self._publisher = None
        if self._board is not None:
            self._board.publish(NOT_ACCEPTING)  # leave no connection to this node
        self._socket.close()

    def _stop_polling(self) -> None:
        if not self._polling:
            return
        self._loop.remove_reader(self._socket.fileno())
        self._polling = False
        if self._closed:
            return
        # Polling resumes on a fresh duplicate: uvloop drops a descriptor
        # from its poller when the old watcher's close completes, which can
        # come after a new watcher for the same number was added (measured:
        # the node never accepted again).  The old one is closed once that
        # is long done.
        retired = self._socket
        self._socket = socket.socket(fileno=os.dup(retired.fileno()))
        self._socket.setblocking(False)
        self._loop.call_later(_RETIRE_SECONDS, retired.close)

    def open_sessions(self) -> int:
        """Sessions of this process, counting those still being set up."""
        return self._sessions() + self._connecting

    def _publish(self) -> None:
        assert self._board is not None
        self._board.publish(self.open_sessions())
        self._publisher = self._loop.call_later(PUBLISH_INTERVAL, self._publish)

    def _take_after_yield(self) -> None:
        # Checked on the clock: the loop's timers may fire early by up to a
        # millisecond (its time is read once per iteration).
        left = self._yield_until - time.monotonic()
        if left > 0:
            self._loop.call_later(left, self._take_after_yield)
            return
        self._yielded = True
        self.start()

    def _accept_one(self) -> None:
        board = self._board
        if board is not None and not self._yielded:
            sessions = self.open_sessions()
            board.publish(sessions)
            if board.busier_than_another(sessions):
                # Leave it to the less busy node (woken for the same socket).
                self._stop_polling()
                self._yield_until = time.monotonic() + YIELD_SECONDS
                self._loop.call_later(YIELD_SECONDS, self._take_after_yield)
                return
        self._yielded = False
        try:
            conn = self._accept_socket()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return  # another node took it, or the client gave up first
        except OSError as exc:
            if exc.errno not in _OUT_OF_RESOURCES:
                self._log.warn("accept failed", reason=exc.strerror or str(exc))
                return
            self._log.error(
                "accept failed; pausing new connections",
                reason=exc.strerror or str(exc),
                seconds=_OUT_OF_RESOURCES_PAUSE,
            )
            self._stop_polling()
            self._loop.call_later(_OUT_OF_RESOURCES_PAUSE, self.start)
            return
        # Not made non-blocking here: connect_accepted_socket does that
        # (uvloop's uv_tcp_open, asyncio's transport set-up).
        self._connecting += 1
        self._set_up(self._loop.connect_accepted_socket(self._factory, conn, ssl=self._tls), conn)
        if board is not None:
            board.publish(self.open_sessions())

    def _accept_socket(self) -> socket.socket:
        """``self._socket.accept()``'s socket, without its enum look-ups (:class:`_AcceptedSocket`).

        ``accept()`` would also make the new socket blocking when the
        listening one has a timeout and there is no default timeout; the
        listening socket is non-blocking, so it never does.
        """
        fd, _ = self._socket._accept()  # type: ignore[attr-defined]
        family, kind, proto = self._kind
        conn = _AcceptedSocket(family, kind, proto, fileno=fd)
        conn.family = family
        conn.type = kind
        return conn

    def _set_up(
        self,
        setup: Coroutine[Any, Any, object],
        conn: socket.socket,
        _waited: object = None,
    ) -> None:
        """Run the loop's ``connect_accepted_socket`` for ``conn`` to its end.

        It only waits for the transport's ``connection_made`` (and, with
        implicit TLS, the handshake); a task per connection for that (its
        registration, its first scheduled step, its done callback) cost
        some 24,000 instructions a connection (callgrind).  The coroutine
        is stepped here as a task would step it: resumed when the future it
        waits on is done, or on the next loop turn after a bare ``yield``.
        Whatever it raises ends here, logged, with the socket closed.
        """
        try:
            waiting = setup.send(None)
        except StopIteration:
            self._connecting -= 1
            return
        except (OSError, ssl.SSLError, TimeoutError, EOFError) as exc:
            # A client that fails its implicit-TLS handshake or vanishes
            # before it: nothing was received, nothing is lost.
            self._connecting -= 1
            self._log.debug("connection dropped before its session", reason=str(exc))
            conn.close()
            return
        except Exception as exc:
            self._connecting -= 1
            self._log.error("cannot set up a session", error=f"{type(exc).__name__}: {exc}")
            conn.close()
            return
        if isinstance(waiting, asyncio.Future):
            waiting.add_done_callback(functools.partial(self._set_up, setup, conn))
        else:
            self._loop.call_soon(self._set_up, setup, conn)
