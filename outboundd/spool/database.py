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
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import sqlite3
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Concatenate, ParamSpec, TypeVar

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


class Database:
    """A sqlite3 connection used only from its own thread.  Create with :meth:`open`."""

    def __init__(self, executor: ThreadPoolExecutor, conn: sqlite3.Connection, lock_fd: int):
        self._executor = executor
        self._conn = conn
        self._lock_fd = lock_fd

    @classmethod
    async def open(cls, path: Path) -> Database:
        """Connect (WAL, ``synchronous=FULL``) on a new database thread.

        Raises ``sqlite3.Error`` or ``OSError`` when the file cannot be used.
        """
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spool-db")

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
            conn, lock_fd = await asyncio.get_running_loop().run_in_executor(executor, connect)
        except BaseException:
            executor.shutdown(wait=False)
            raise
        return cls(executor, conn, lock_fd)

    async def call(
        self, fn: Callable[Concatenate[sqlite3.Connection, P], T], *args: P.args, **kw: P.kwargs
    ) -> T:
        """Run ``fn(conn, ...)`` on the database thread; its result or its exception."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(self._conn, *args, **kw))

    @contextlib.contextmanager
    def write_lock(self) -> Iterator[None]:
        """Hold the cross-process writer lock (database thread only)."""
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    async def close(self) -> None:
        """Checkpoint the WAL (best effort), close the connection, end the thread."""

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
            self._executor.shutdown(wait=True)


def rollback_quietly(conn: sqlite3.Connection) -> None:
    """End a failed transaction, if one is still open."""
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
