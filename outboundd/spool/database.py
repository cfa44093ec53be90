"""The spool's SQLite connection: one thread owns it, one hop runs a whole batch.

Why not aiosqlite: it hops to its thread and back for every statement
(110 to 330 µs each, DESIGN.md), so a group-commit batch of ``BEGIN``, three
inserts, a claim and ``COMMIT`` paid that six times, and the profile showed
the hops as the largest part of the spool's cost.  Here a batch is a plain
function that runs on the database thread from ``BEGIN`` to ``COMMIT``, so
it costs one hop however many statements it holds.

Writers in several processes (SMTP nodes, delivery processes, outboundctl)
share the database.  SQLite makes a writer that finds the lock taken sleep
and poll (1, 2, 5, 10 ms ...), which stalls every accept waiting in that
batch; so each write transaction first takes an ``flock`` on
``outbound.db.lock``, which wakes the next writer the moment the last one
commits.  The lock only orders our own writers; SQLite's own locking still
guards the data, so a client that ignores the file (the sqlite3 shell) is
still safe.

The hop itself is one dedicated thread fed through a ``queue.SimpleQueue``
(C), answering by one ``loop.call_soon_threadsafe`` per call.  A one-worker
``ThreadPoolExecutor`` did the same job with Python on both sides of each
hand-off (``submit``, its work item and future, the idle semaphore, the
chained asyncio future), all while holding the GIL the event loop wants.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import queue
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

T = TypeVar("T")
P = ParamSpec("P")

#: How long another process may hold the write lock before we give up.
BUSY_TIMEOUT_MS = 10_000

_PRAGMAS = (
    "PRAGMA journal_mode = WAL",
    "PRAGMA synchronous = FULL",
    f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}",
    "PRAGMA foreign_keys = ON",
    "PRAGMA journal_size_limit = 67108864",
)

#: A call waiting for the thread: what to run, and the future its caller awaits.
_Call = tuple[Callable[[], Any], asyncio.AbstractEventLoop, asyncio.Future[Any]]


class DatabaseThreadError(RuntimeError):
    """The database thread has ended: the call did not run."""


class _Worker:
    """The database thread: runs calls one at a time, in the order they came.

    A daemon, so that a database never closed cannot keep the interpreter
    from exiting; a transaction cut short there never committed, SQLite's
    WAL rolls it back, and nobody was told it had.  When the thread ends
    for any reason, every call still queued (and every later one) fails
    with :class:`DatabaseThreadError` instead of waiting forever.
    """

    def __init__(self) -> None:
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self.ended = False
        self._thread = threading.Thread(target=self._run, name="spool-db", daemon=True)
        self._thread.start()

    def submit(
        self, work: Callable[[], Any], loop: asyncio.AbstractEventLoop
    ) -> asyncio.Future[Any]:
        """Queue ``work``; the future the thread settles with its result or exception."""
        fut = loop.create_future()
        self._calls.put((work, loop, fut))
        if self.ended:  # the thread may have drained the queue before our put
            _settle(fut, False, DatabaseThreadError("the database thread has ended"))
        return fut

    def stop(self) -> None:
        """End the thread after the calls queued before this; wait for it."""
        self._calls.put(None)
        self._thread.join()

    def _run(self) -> None:
        calls = self._calls
        try:
            while (call := calls.get()) is not None:
                work, loop, fut = call
                if fut.cancelled():  # its caller went away before it started
                    continue
                try:
                    result = work()
                except BaseException as exc:  # the caller's to handle, not the thread's
                    _answer(loop, fut, False, exc)
                else:
                    _answer(loop, fut, True, result)
        finally:
            self.ended = True
            ended = DatabaseThreadError("the database thread has ended")
            while True:
                try:
                    left = calls.get_nowait()
                except queue.Empty:
                    break
                if left is not None:
                    _answer(left[1], left[2], False, ended)


def _answer(
    loop: asyncio.AbstractEventLoop, fut: asyncio.Future[Any], ok: bool, value: Any
) -> None:
    """Hand a call's outcome to its loop (database thread); a closed loop has nobody waiting."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(_settle, fut, ok, value)


def _settle(fut: asyncio.Future[Any], ok: bool, value: Any) -> None:
    """Settle a call's future (event loop); a cancelled caller's is left alone."""
    if fut.done():
        return
    if ok:
        fut.set_result(value)
    else:
        fut.set_exception(value)


class Database:
    """A sqlite3 connection used only from its own thread.  Create with :meth:`open`."""

    def __init__(self, worker: _Worker, conn: sqlite3.Connection, lock_fd: int):
        self._worker = worker
        self._conn = conn
        self._lock_fd = lock_fd

    @classmethod
    async def open(cls, path: Path) -> Database:
        """Connect (WAL, ``synchronous=FULL``) on a new database thread.

        Raises ``sqlite3.Error`` or ``OSError`` when the file cannot be used.
        """
        worker = _Worker()

        def connect() -> tuple[sqlite3.Connection, int]:
            lock_fd = os.open(
                path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640
            )
            try:
                conn = sqlite3.connect(
                    path,
                    isolation_level=None,
                    timeout=BUSY_TIMEOUT_MS / 1000,
                    check_same_thread=False,  # only ever used from the database thread
                )
                try:
                    for pragma in _PRAGMAS:
                        conn.execute(pragma)
                except BaseException:
                    conn.close()
                    raise
            except BaseException:
                os.close(lock_fd)
                raise
            return conn, lock_fd

        try:
            conn, lock_fd = await worker.submit(connect, asyncio.get_running_loop())
        except BaseException:
            worker.stop()
            raise
        return cls(worker, conn, lock_fd)

    async def call(
        self, fn: Callable[Concatenate[sqlite3.Connection, P], T], *args: P.args, **kw: P.kwargs
    ) -> T:
        """Run ``fn(conn, ...)`` on the database thread; its result or its exception.

        Raises :class:`DatabaseThreadError` when the thread has ended.
        A caller cancelled before its call started leaves it unrun.
        """
        conn = self._conn
        result: T = await self._worker.submit(
            lambda: fn(conn, *args, **kw), asyncio.get_running_loop()
        )
        return result

    @contextlib.contextmanager
    def write_lock(self) -> Iterator[None]:
        """Hold the cross-process writer lock (database thread only)."""
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    async def close(self) -> None:
        """Finish the queued calls, checkpoint the WAL (best effort), close, end the thread."""

        def finish(conn: sqlite3.Connection) -> None:
            try:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                conn.close()
            finally:
                os.close(self._lock_fd)

        try:
            await self.call(finish)
        finally:
            self._worker.stop()


def rollback_quietly(conn: sqlite3.Connection) -> None:
    """End a failed transaction, if one is still open."""
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
