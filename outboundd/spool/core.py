"""The SQLite spool backend: SQLite (WAL) for envelopes and state, files for bodies.

One :class:`Spool` owns one SQLite connection (on its own thread, see
:mod:`.database`), and one writer task feeds that connection.  Every
database operation is a job handed to the writer, which runs whatever jobs
are waiting as ONE transaction and ONE commit, in one hop to the database
thread: this is group commit.  Accepts that arrive while a commit is in
progress share the next one, so a burst of N accepts costs far fewer than
N WAL fsyncs, while each ``accept()`` still returns only after its own rows
are committed.

Durability order for ``accept()`` (DESIGN.md rule 1): the body file is
written and fsynced (by the database thread as the first step of its batch,
or in a worker thread when large); the directories of the batch's bodies
are fsynced once, then the rows are committed with ``synchronous=FULL``;
only then does ``accept()`` return the queue ID.  A failure anywhere
removes the body and raises
:class:`SpoolWriteError`.

A batch without an accept or an operator's op (only the deliveries'
records, claims, releases and lease renewals) commits with
``synchronous=NORMAL``: no WAL fsync of its own.  Losing such a commit to a
power cut loses only work that is redone (the recipient is delivered again:
at-least-once, DESIGN.md rule 3).  What must not run ahead of it is the
removal of a body its records finished: those wait until a later commit of
this connection fsynced the WAL (the next accept's, within milliseconds
under load) or, when none comes, :data:`UNSYNCED_REMOVAL_DELAY` later an
explicit fsync of the WAL file (:meth:`SqliteSpool._sync_unsynced`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import socket
import sqlite3
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from outboundd.spool import bodies, sqlite_admin
from outboundd.spool.base import Spool, WriterStop, group_commit_loop
from outboundd.spool.database import Database, rollback_quietly
from outboundd.spool.errors import (
    SpoolClosedError,
    SpoolError,
    SpoolFullError,
    SpoolWriteError,
)
from outboundd.spool.migrations import discover, migrate
from outboundd.spool.queueid import new_queue_id
from outboundd.spool.reserve import SpaceReserve, is_disk_full
from outboundd.spool.sql import q
from outboundd.spool.types import (
    BODY_MISSING_REASON,
    BODY_MISSING_STATUS,
    AttemptRecord,
    Claim,
    Lease,
    MessageDetail,
    NewMessage,
    Outcome,
    QueueEntry,
    QueueStats,
    RecordResult,
    RecoveryReport,
    SpoolCounters,
    Status,
    StoredStsPolicy,
    ThrottleEntry,
    claimed_recipient,
)

T = TypeVar("T")

#: JSON for the record batch's lookups (recipient ids with their lease owners,
#: finished messages).  ``ensure_ascii=False``: faster, and a string sqlite3
#: could not bind (a lone surrogate) still fails the same way.
_DUMPS = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode

DB_NAME = "outbound.db"
#: Most jobs one transaction takes; bounds commit latency under load.
MAX_BATCH = 512
#: Bodies up to this size are written (and fsynced) by the database thread as
#: part of their batch: a hop to a worker thread per message cost more, in
#: thread switches, than the write itself.  Larger ones use a worker thread.
INLINE_BODY_MAX = 256 * 1024
#: A body (or temp) file without rows is an orphan only when older than this:
#: another process's accept writes the file before it commits the rows, and
#: recovery must never delete a body whose rows are about to be committed.
ORPHAN_MIN_AGE = 600.0
#: The longest a finished message's body waits for the ``synchronous=NORMAL``
#: commit that finished it to be made durable when no accept commits
#: meanwhile (then the WAL file is fsynced explicitly).
UNSYNCED_REMOVAL_DELAY = 0.2
#: The commit's durability: FULL (the WAL fsynced) for batches holding an
#: accept or an operator's op, NORMAL for the deliveries' own work.
_SYNC_PRAGMA = {True: "PRAGMA synchronous = FULL", False: "PRAGMA synchronous = NORMAL"}

#: A piece of a transaction: runs on the database thread, inside the
#: writer's transaction (``write=True``) or in autocommit mode.
DbOp = Callable[[sqlite3.Connection], Any]

#: The message columns a claim is built from, in ``messages_by_ids`` order.
_MESSAGE_COLUMNS = (
    "queue_id", "mail_from", "body_file", "size", "received_at", "auth_user", "env_id", "ret",
    "smtputf8", "body_8bit", "notes", "dsn_of",
)  # fmt: skip


def lease_owner_id() -> str:
    """A lease owner name that says which host and process holds a lease."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def domain_of(address: str) -> str:
    """The routing domain of an address, lower-cased (``[IP]`` literals kept)."""
    return address.rpartition("@")[2].lower()


@dataclass(eq=False)
class _Job:
    future: asyncio.Future[Any]
    write: bool


@dataclass(eq=False)
class _AcceptJob(_Job):
    message_row: tuple[Any, ...]  # insert_message's parameters, in order
    recipient_rows: list[tuple[Any, ...]]  # insert_recipient(_leased)'s, without the id
    body_path: str
    link_rows: list[dict[str, Any]]
    leased: bool = False  # recipient_rows carry a lease; the job's result is their rows
    body: bytes | None = None  # still to be written, by the database thread
    written: bool = False  # the body file is ours and exists

    @property
    def queue_id(self) -> str:
        return str(self.message_row[0])


@dataclass(eq=False)
class _OpJob(_Job):
    op: DbOp
    #: Work redone if lost (claims, releases, renewals): a batch of only these
    #: and records commits without a WAL fsync of its own.
    relaxed: bool = False


@dataclass(eq=False)
class _RecordJob(_Job):
    """One ``record()``: written together with the batch's other records."""

    queue_id: str
    owner: str
    now: float
    ids: list[int]  # the records' recipients, in order
    attempt_rows: list[tuple[Any, ...]]  # insert_attempt's parameters
    update_rows: list[tuple[Any, ...]]  # update_after_attempt's, one per recipient


@dataclass
class _Counters:
    accepts: int = 0
    accept_commits: int = 0
    records: int = 0
    commits: int = 0


class SqliteSpool(Spool):
    """The durable queue in one directory.  Create with :meth:`open`; always :meth:`close`."""

    def __init__(self, queue_dir: Path, db: Database) -> None:
        self.queue_dir = queue_dir
        self._queue_dir_text = str(queue_dir)
        self.db_path = queue_dir / DB_NAME
        self._db = db
        self._queue: asyncio.Queue[_Job | WriterStop] = asyncio.Queue()
        self._counters = _Counters()
        self._writer: asyncio.Task[None] | None = None
        self._closed = False
        #: Work an op leaves for after its transaction commits (database thread only).
        self._after_commit: list[Callable[[], None]] = []
        #: Set whenever new work may be due (an accept, a flush); the scheduler
        #: waits on it instead of polling.
        self.new_work = asyncio.Event()
        self.recovery: RecoveryReport | None = None
        #: Space held back for claims and records on a full disk (database thread only).
        self._reserve = SpaceReserve(queue_dir)
        #: Body directories' descriptors kept open for their fsyncs (database thread only).
        self._directories = bodies.DirectorySync()
        #: Fsyncs a batch's bodies and directories at once (database thread only).
        self._fsyncs = bodies.ParallelFsync()
        #: Removes the bodies of messages records finished (database thread only).
        self._removals = bodies.BackgroundRemoval()
        #: The connection's ``synchronous`` now: True FULL, False NORMAL (database thread only).
        self._sync_full = True
        #: Bodies the running batch's records finished (database thread only).
        self._finished_bodies: list[str] = []
        #: Bodies finished by commits not yet known durable (database thread only).
        self._unsynced_bodies: list[str] = []
        #: Arms the explicit WAL fsync for ``_unsynced_bodies`` (event loop only).
        self._sync_timer: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------------ life

    @classmethod
    async def open(  # type: ignore[override]
        cls,
        queue_dir: Path,
        *,
        recover: bool = True,
        recover_files: bool = True,
        create: bool = True,
    ) -> SqliteSpool:
        """Open (creating if needed) the spool in ``queue_dir``: migrate, then recover.

        ``create=False``: refuse, in words, a directory without a queue.
        """
        queue_dir = await asyncio.to_thread(queue_dir.resolve)
        if not create:
            await asyncio.to_thread(_check_exists, queue_dir)
        try:
            await asyncio.to_thread(bodies.prepare_tree, queue_dir)
        except OSError as exc:
            raise SpoolError(f"cannot create queue directory {queue_dir}: {exc.strerror}") from exc
        try:
            db = await Database.open(queue_dir / DB_NAME)
        except (sqlite3.Error, OSError) as exc:
            raise SpoolError(f"cannot open the queue {queue_dir / DB_NAME}: {exc}") from exc
        try:
            await db.call(migrate, discover())
        except sqlite3.Error as exc:
            await db.close()
            raise SpoolError(f"cannot open the queue {queue_dir / DB_NAME}: {exc}") from exc
        except BaseException:
            await db.close()
            raise
        spool = cls(queue_dir, db)
        await db.call(lambda _conn: spool._reserve.ensure())
        spool._writer = asyncio.create_task(spool._write_loop(), name="spool-writer")
        if recover:
            spool.recovery = await spool.recover(files=recover_files)
        return spool

    async def close(self) -> None:
        """Finish queued jobs, checkpoint the WAL, close the connection."""
        if self._closed:
            return
        self._closed = True
        if self._writer is not None and not self._writer.done():
            stop = WriterStop()
            await self._queue.put(stop)
            await stop.done
            await self._writer
        if self._sync_timer is not None:
            self._sync_timer.cancel()
        with contextlib.suppress(Exception):
            await self._db.call(self._close_files)
        await self._db.close()

    def _close_files(self, conn: sqlite3.Connection) -> None:
        """Remove the bodies still waiting for a WAL fsync, close the kept directory
        descriptors and end the fsync threads."""
        try:
            with contextlib.suppress(OSError):
                self._sync_unsynced(conn)
            self._directories.close()
        finally:
            try:
                self._fsyncs.close()
            finally:
                self._removals.close()

    @property
    def location(self) -> str:
        return self._queue_dir_text

    @property
    def counters(self) -> SpoolCounters:
        c = self._counters
        return SpoolCounters(accepts=c.accepts, accept_commits=c.accept_commits, records=c.records)

    def body_path(self, queue_id: str) -> Path:
        return self.queue_dir / bodies.relative_body_path(queue_id)

    async def read_body(self, queue_id: str) -> bytes:
        try:
            return await asyncio.to_thread(self.body_path(queue_id).read_bytes)
        except OSError as exc:
            raise SpoolError(f"cannot read the body of {queue_id}: {exc.strerror or exc}") from exc

    # ---------------------------------------------------------------- writer

    async def _submit(self, job: _Job) -> Any:
        if self._closed:
            raise SpoolClosedError("the spool is closed")
        await self._queue.put(job)
        # Not shielded: a caller that goes away (client hung up) cancels only
        # its own future; the job stays in its batch and commits (or fails)
        # with the others, and settling skips a future already done.  A
        # shield would cost every call one more turn of the event loop
        # between the commit and the caller.
        return await job.future

    async def run(self, op: DbOp, *, write: bool = True) -> Any:
        """Run ``op(conn)`` inside the writer's next transaction; return its result."""
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        return await self._submit(_OpJob(fut, write, op))

    async def _run_relaxed(self, op: DbOp) -> Any:
        """:meth:`run` for delivery work that is redone if a power cut loses it.

        Claims, releases and lease renewals: a lost lease is work leased
        again, never work lost.  A batch of only these and records commits
        with ``synchronous=NORMAL`` (see the module's docstring).
        """
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        return await self._submit(_OpJob(fut, True, op, relaxed=True))

    async def _write_loop(self) -> None:
        await group_commit_loop(self._queue, self._run_batch, MAX_BATCH)

    async def _run_batch(self, batch: list[_Job]) -> None:
        """Run ``batch`` on the database thread (one hop); its futures are settled from there.

        The database thread hands the outcomes straight to the loop
        (:meth:`_execute_and_settle`), so the callers resume one turn of the
        event loop after the commit, not two (through this task's own
        wake-up first).
        """
        loop = asyncio.get_running_loop()
        try:
            await self._db.call(self._execute_and_settle, batch, loop)
        except BaseException as exc:  # the thread itself failed: nobody may hang
            for job in batch:
                _fail(job, _map_db_error(exc, job))
            if not isinstance(exc, Exception):
                raise
        if self._unsynced_bodies and self._sync_timer is None:
            self._sync_timer = loop.call_later(UNSYNCED_REMOVAL_DELAY, self._sync_due)

    def _sync_due(self) -> None:
        """Queue the explicit WAL fsync if bodies still wait for one (event loop)."""
        self._sync_timer = None
        if self._closed or not self._unsynced_bodies:
            return
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        fut.add_done_callback(_consume)  # nobody awaits it; a failure is retried next batch
        self._queue.put_nowait(_OpJob(fut, False, self._sync_unsynced))

    def _sync_unsynced(self, _conn: sqlite3.Connection) -> None:
        """Fsync the WAL file, then remove the bodies waiting for it (database thread).

        Every commit before this one is in the WAL file (fsynced here) or
        was checkpointed into the database file, which SQLite fsyncs before
        it reuses the WAL; so their records are durable and their bodies
        may go (DESIGN.md rule 3).  A failed fsync keeps them waiting.
        """
        if not self._unsynced_bodies:
            return
        fd = os.open(f"{self.db_path}-wal", os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        paths, self._unsynced_bodies = self._unsynced_bodies, []
        self._removals.remove(paths)

    def _execute_and_settle(
        self, conn: sqlite3.Connection, batch: list[_Job], loop: asyncio.AbstractEventLoop
    ) -> None:
        """:meth:`_execute_batch`, then its outcomes to the loop (database thread)."""
        settled = self._execute_batch(conn, batch, True)
        # New work is due once an accept whose recipients nobody leased commits.
        due = any(
            ok and isinstance(job, _AcceptJob) and not job.leased
            for job, (ok, _) in zip(batch, settled, strict=True)
        )
        loop.call_soon_threadsafe(_settle, batch, settled, self.new_work if due else None)

    def _execute_batch(
        self, conn: sqlite3.Connection, batch: list[_Job], isolate: bool
    ) -> list[tuple[bool, Any]]:
        """One transaction for every job of ``batch``; ``(ok, result or error)`` per job.

        Database thread only.  Accepted bodies not yet on disk are written
        and fsynced first, then their directories; the commit is
        ``synchronous=FULL``; work the ops left for after the commit
        (removing finished bodies) runs once it succeeded.
        """
        settled: dict[int, tuple[bool, Any]] = {}
        accepts = [j for j in batch if isinstance(j, _AcceptJob)]
        if accepts and not self._reserve.held():
            # The disk is full and its reserve was given to delivery: a new
            # message would take the space results need (see reserve.py).
            full = SpoolFullError("queue disk is full; new mail waits until delivery frees space")
            for refused in accepts:
                settled[id(refused)] = (False, full)
            accepts = []
        if accepts:
            accepts = self._make_durable(accepts, settled)
        live = [j for j in batch if id(j) not in settled]
        if not live:
            return self._settle_accepts(batch, settled)
        results: dict[int, Any] = {}
        in_tx = any(j.write for j in live)
        durable = bool(accepts) or any(
            isinstance(j, _OpJob) and j.write and not j.relaxed for j in live
        )
        self._after_commit.clear()
        self._finished_bodies.clear()
        changes = conn.total_changes
        try:
            with self._db.write_lock() if in_tx else contextlib.nullcontext():
                if in_tx:
                    self._set_sync(conn, durable)
                    conn.execute("BEGIN IMMEDIATE")
                if accepts:
                    self._insert_accepts(conn, accepts, results)
                records = [j for j in live if isinstance(j, _RecordJob)]
                if records:
                    self._record_all(conn, records, results)
                for job in live:
                    if isinstance(job, _OpJob):
                        results[id(job)] = job.op(conn)
                if in_tx:
                    conn.execute("COMMIT")
        except Exception as exc:
            rollback_quietly(conn)
            self._after_commit.clear()
            self._finished_bodies.clear()
            if is_disk_full(exc) and self._reserve.release():
                # Disk full: free the reserve and run the batch again in that
                # space; its accepts are now refused up front, its claims and
                # records go through.
                return self._execute_batch(conn, batch, isolate)
            if isolate and len(live) > 1:
                # One bad job must not sink the others: retry each alone.
                for single in live:
                    settled[id(single)] = self._execute_batch(conn, [single], False)[0]
            else:
                for failed in live:
                    settled[id(failed)] = (False, _map_db_error(exc, failed))
            return self._settle_accepts(batch, settled)
        for action in self._after_commit:
            with contextlib.suppress(OSError):
                action()
        self._after_commit.clear()
        # A FULL commit that wrote fsynced the WAL: every earlier commit is durable too.
        self._remove_finished(in_tx and durable and conn.total_changes != changes)
        self._counters.commits += 1
        if accepts:
            self._counters.accepts += len(accepts)
            self._counters.accept_commits += 1
        for job in live:
            settled[id(job)] = (True, results.get(id(job)))
        return [settled[id(j)] for j in batch]

    def _set_sync(self, conn: sqlite3.Connection, full: bool) -> None:
        """The next commit with ``synchronous=FULL`` or ``NORMAL`` (database thread)."""
        if full != self._sync_full:
            conn.execute(_SYNC_PRAGMA[full])
            self._sync_full = full

    def _remove_finished(self, synced: bool) -> None:
        """Hand the bodies of finished messages to removal once their commit is durable.

        ``synced``: this commit fsynced the WAL, so it and every commit
        before it are durable.  Otherwise the bodies this batch finished
        wait for a later one (or :meth:`_sync_unsynced`).
        """
        finished, self._finished_bodies = self._finished_bodies, []
        if not synced:
            self._unsynced_bodies.extend(finished)
            return
        paths = self._unsynced_bodies + finished
        self._unsynced_bodies = []
        if paths:
            self._removals.remove(paths)

    def _make_durable(
        self, accepts: list[_AcceptJob], settled: dict[int, tuple[bool, Any]]
    ) -> list[_AcceptJob]:
        """Write the bodies not yet on disk, fsync them and their directories; the accepts left.

        Every body's ``fsync`` and its directory's have returned before
        this does (DESIGN.md rule 1), all issued at once through
        :class:`bodies.ParallelFsync` so the filesystem can join them; a
        failed accept is put in ``settled``.  As before, a body's own
        error comes first, and a directory that fails to open or fsync
        fails every other accept of the batch.
        """
        dirs: list[tuple[str, int]] = []
        open_error: OSError | None = None
        try:
            dirs = self._directories.descriptors(os.path.dirname(j.body_path) for j in accepts)
        except OSError as exc:
            open_error = exc  # the bodies still go first, so their own errors come first
        dir_fds = [fd for _, fd in dirs]
        unwritten = [j for j in accepts if j.body is not None and not j.written]
        if unwritten:
            items = [(j.body_path, j.body or b"") for j in unwritten]
            errors, dir_errors = bodies.write_bodies(items, self._fsyncs, dir_fds)
            for new, error in zip(unwritten, errors, strict=True):
                if error is not None:
                    settled[id(new)] = (False, error)
                else:
                    new.written, new.body = True, None
        else:
            dir_errors = self._fsyncs.fsync(dir_fds)
        accepts = [j for j in accepts if id(j) not in settled]
        try:
            if open_error is not None:
                raise open_error
            self._directories.check(dirs, dir_errors)
        except OSError as exc:
            return self._fail_unsynced(accepts, settled, exc)
        return accepts

    @staticmethod
    def _fail_unsynced(
        accepts: list[_AcceptJob], settled: dict[int, tuple[bool, Any]], exc: OSError
    ) -> list[_AcceptJob]:
        err = SpoolWriteError(f"cannot fsync the body directory: {exc.strerror}")
        for unsynced in accepts:
            settled[id(unsynced)] = (False, err)
        return []

    @staticmethod
    def _insert_accepts(
        conn: sqlite3.Connection, accepts: list[_AcceptJob], results: dict[int, Any]
    ) -> None:
        """The rows of every accept of a batch: one ``executemany`` per table.

        Leased recipients get their ids from here (``max_recipient_id`` + 1
        on), so their claims are built from the values in hand: no
        ``RETURNING`` row read back per recipient, which cost a statement
        and two steps each (every step releases the database thread's GIL,
        under load a thread switch with the event loop).
        """
        conn.executemany(q("insert_message"), [j.message_row for j in accepts])
        plain = [row for j in accepts if not j.leased for row in j.recipient_rows]
        if plain:
            conn.executemany(q("insert_recipient"), plain)
        for job in accepts:
            if not job.leased:
                results[id(job)] = job.queue_id
        leased = [j for j in accepts if j.leased]
        if leased:
            next_id = int(conn.execute(q("max_recipient_id")).fetchone()[0]) + 1
            rows = []
            for job in leased:
                claimed = []
                for row in job.recipient_rows:
                    claimed.append(_new_leased_row(next_id, row))
                    rows.append((next_id, *row))
                    next_id += 1
                results[id(job)] = claimed
            conn.executemany(q("insert_recipient_leased"), rows)
        links = [row for j in accepts for row in j.link_rows]
        if links:
            conn.executemany(q("link_dsn"), links)

    def _record_all(
        self, conn: sqlite3.Connection, records: list[_RecordJob], results: dict[int, Any]
    ) -> None:
        """The attempt rows and new states of every ``record()`` of a batch.

        Five statements however many records the batch holds: the lease
        check, one ``executemany`` of the attempt rows, one of the state
        updates, which messages are now finished, marking them (per record
        this was four statements, two of them ``executemany``).  The lease
        check and the finished messages each come back as one row holding a
        JSON array, not a row per recipient.  Each job's result is what
        :meth:`record` reports: the recipients whose lease was still held,
        and the messages it finished.
        """
        ids = [rid for job in records for rid in job.ids]
        if len(records) > 1 and len(set(ids)) != len(ids):
            # A recipient in two records of one batch: the second must see
            # the first's effect, as one after the other.
            for job in records:
                self._record_all(conn, [job], results)
            return
        dumps = _DUMPS
        pairs = [(rid, job.owner) for job in records for rid in job.ids]
        held = set(json.loads(conn.execute(q("record_held"), (dumps(pairs),)).fetchone()[0]))
        conn.executemany(q("insert_attempt"), [row for job in records for row in job.attempt_rows])
        updates = [row for job in records for row in job.update_rows if row[0] in held]
        if updates:
            conn.executemany(q("update_after_attempt"), updates)
        # A message is reported finished by the last of the batch's records of it.
        last: dict[str, _RecordJob] = {job.queue_id: job for job in records}
        finishing = json.loads(
            conn.execute(q("record_finishing"), (_json_strs(list(last)),)).fetchone()[0]
        )
        if finishing:
            conn.execute(
                q("record_finish"), (dumps([(qid, last[qid].now) for qid, _ in finishing]),)
            )
            # Removed once this commit is durable (see _remove_finished).
            self._finished_bodies.extend(
                f"{self._queue_dir_text}/{body_file}" for _, body_file in finishing
            )
        finished = {qid for qid, _ in finishing}
        for job in records:
            mine = job.queue_id in finished and last[job.queue_id] is job
            results[id(job)] = (held, (job.queue_id,) if mine else ())

    @staticmethod
    def _settle_accepts(
        batch: list[_Job], settled: dict[int, tuple[bool, Any]]
    ) -> list[tuple[bool, Any]]:
        """The batch's outcomes, after removing the bodies of accepts that failed."""
        for job in batch:
            if isinstance(job, _AcceptJob) and job.written and not settled[id(job)][0]:
                bodies.remove_bodies([job.body_path])
                job.written = False
        return [settled[id(j)] for j in batch]

    def _finish_messages(
        self, conn: sqlite3.Connection, queue_ids: list[str], now: float
    ) -> list[Any]:
        """Mark messages whose every recipient is final; their bodies go after the commit."""
        finished = conn.execute(
            q("finish_messages"), {"ids": _json_strs(queue_ids), "now": now}
        ).fetchall()
        if finished:
            paths = [f"{self._queue_dir_text}/{row[1]}" for row in finished]
            self.after_commit(lambda: bodies.remove_bodies(paths))
        return finished

    def after_commit(self, action: Callable[[], None]) -> None:
        """From inside an op: run ``action`` once its transaction has committed.

        It runs on the database thread; ``OSError`` from it is ignored (the
        work it does, such as removing a finished body, is redone by recovery).
        """
        self._after_commit.append(action)

    # ---------------------------------------------------------------- accept

    async def accept(self, message: NewMessage, *, queue_id: str | None = None) -> str:
        """Store ``message`` durably and return its queue ID.

        Returns only once the body is written and fsynced, its directory
        fsynced and the rows committed.  Raises :class:`SpoolWriteError`
        (nothing kept) otherwise.
        """
        qid, _ = await self._accept(message, queue_id, None)
        return qid

    async def accept_leased(
        self, message: NewMessage, lease: Lease, *, queue_id: str | None = None
    ) -> tuple[str, list[Claim]]:
        """:meth:`accept`, with every recipient leased to ``lease.owner`` in the same commit.

        The claims come back with the queue ID, so the accepting process can
        deliver the new message at once without a claim transaction; the
        lease protects them exactly as :meth:`claim`'s do (a crash leaves
        them to recovery).  Never sets ``new_work``: the work is taken.
        """
        return await self._accept(message, queue_id, lease)

    def start_accept(
        self, message: NewMessage, *, queue_id: str | None = None
    ) -> asyncio.Future[str]:
        """:meth:`accept` under way, as a future of the queue ID, without a task.

        The SMTP session starts a message's write from its protocol's
        ``data_received`` and answers from the future's callback: with no
        task, an accepted message costs no coroutine frames, no task step
        and no extra turn of the event loop (:meth:`accept` in a task did,
        for every message).  The job goes to the writer's queue at once;
        the database thread settles the future after the commit, exactly
        as it settles an awaited accept.  A body too large to hand to the
        database thread, or a closed spool, takes :meth:`accept`'s path.
        """
        if self._closed or len(message.body) > INLINE_BODY_MAX:
            return super().start_accept(message, queue_id=queue_id)
        job, _ = self._accept_job(message, queue_id, None)
        job.body = message.body
        self._queue.put_nowait(job)
        return job.future

    def _accept_job(
        self, message: NewMessage, queue_id: str | None, lease: Lease | None
    ) -> tuple[_AcceptJob, float]:
        """The job that stores ``message`` (its rows and body path), and the lease's expiry.

        The job's result is its queue ID, or with a lease the claimed rows.
        """
        if not message.recipients:
            raise ValueError("a message needs at least one recipient")
        if message.ret not in (None, "FULL", "HDRS"):
            raise ValueError(f"RET must be FULL or HDRS, not {message.ret!r}")
        qid = queue_id or new_queue_id()
        relative = bodies.relative_body_path(qid)
        path = f"{self._queue_dir_text}/{relative}"  # str: pathlib was 5% of an accept
        now = time.time()
        notes = (
            json.dumps(dict(message.notes), default=str, separators=(",", ":"))
            if message.notes
            else "{}"
        )
        size = len(message.body)
        # insert_message's order; _MESSAGE_COLUMNS is this without client_ip.
        message_row = (
            qid, message.mail_from, relative, size, now, message.auth_user, message.client_ip,
            message.env_id, message.ret, int(message.smtputf8), int(message.body_8bit), notes,
            message.dsn_of,
        )  # fmt: skip
        recipient_rows: list[tuple[Any, ...]] = [
            (qid, rcpt.address, domain_of(rcpt.address), rcpt.notify, rcpt.orcpt, now)
            for rcpt in message.recipients
        ]
        expires = 0.0
        if lease is not None:
            expires = now + lease.lease_seconds
            held_by = (lease.owner, expires)
            recipient_rows = [row + held_by for row in recipient_rows]
        # A DSN's link to the recipients it reports commits with its own rows.
        link_rows = [
            {"queue_id": message.dsn_of, "recipient": address, "dsn_queue_id": qid}
            for address in (message.dsn_recipients if message.dsn_of is not None else ())
        ]
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        job = _AcceptJob(
            fut, True, message_row, recipient_rows, path, link_rows, leased=lease is not None
        )
        return job, expires

    async def _accept(
        self, message: NewMessage, queue_id: str | None, lease: Lease | None
    ) -> tuple[str, list[Claim]]:
        job, expires = self._accept_job(message, queue_id, lease)
        if len(message.body) > INLINE_BODY_MAX:
            # Large: written here, in a worker thread, not holding up the database thread.
            await asyncio.to_thread(bodies.write_body, job.body_path, message.body)
            job.written = True
        else:
            job.body = message.body
        try:
            result = await self._submit(job)  # the queue ID, or the leased rows
        except asyncio.CancelledError:
            raise  # the job still commits (or fails and cleans up) on its own
        except BaseException:
            if job.written:  # the database thread never got to it
                await asyncio.to_thread(bodies.remove_bodies, [job.body_path])
            raise
        if lease is None:
            return result, []  # new_work was set when it committed
        stored = job.message_row[:6] + job.message_row[7:]  # _MESSAGE_COLUMNS: without client_ip
        in_hand = message.body if len(message.body) <= INLINE_BODY_MAX else None
        claims = self._claims(
            result, [stored], lease.owner, expires, always_split=lease.always_split, body=in_hand
        )
        return job.queue_id, claims

    # ----------------------------------------------------------------- claim

    async def claim(
        self,
        owner: str,
        *,
        limit: int,
        lease_seconds: float,
        now: float | None = None,
        always_split: bool = False,
        exclude_domains: Sequence[str] = (),
        domain_room: int | None = None,
        room: Mapping[str, int] | None = None,
    ) -> list[Claim]:
        """Lease up to ``limit`` due groups for ``owner``.

        A group is every due recipient of one (queue_id, domain), or one
        recipient with ``always_split``.  Leased recipients are ``sending``
        until :meth:`record` or :meth:`release`, or until the lease expires.

        With ``domain_room`` at most that many groups of any one domain are
        leased (``room`` gives other numbers for some domains): a scheduler
        passes what its per-domain limit leaves, so it never leases work it
        would have to give straight back.  The groups are chosen and leased
        in one transaction.
        """
        if limit <= 0:
            return []
        at = time.time() if now is None else now
        expires = at + lease_seconds
        params = {
            "owner": owner,
            "expires": expires,
            "now": at,
            "limit": limit,
            "exclude": json.dumps(list(exclude_domains)),
        }

        def op(conn: sqlite3.Connection) -> tuple[list[Any], list[Any]]:
            # Choose, then lease just the chosen: one transaction, so no other
            # process can take a chosen group in between.
            due = conn.execute(
                q("due_recipients" if always_split else "due_groups"), params
            ).fetchall()
            chosen = due if domain_room is None else _within_room(due, domain_room, room or {})
            if not chosen:
                return [], []
            if always_split:
                leased = {**params, "ids": _json_ints(row[0] for row in chosen)}
                rows = conn.execute(q("claim_chosen_recipients"), leased).fetchall()
            else:
                leased = {**params, "groups": json.dumps([[row[0], row[1]] for row in chosen])}
                rows = conn.execute(q("claim_chosen_groups"), leased).fetchall()
            if not rows:
                return [], []
            ids = json.dumps(sorted({r[1] for r in rows}))
            return rows, conn.execute(q("messages_by_ids"), {"ids": ids}).fetchall()

        rows, msgs = await self._run_relaxed(op)
        return self._claims(rows, msgs, owner, expires, always_split=always_split)

    def _claims(
        self,
        rows: Sequence[Any],
        messages: Sequence[Any],
        owner: str,
        expires: float,
        *,
        always_split: bool,
        body: bytes | None = None,
    ) -> list[Claim]:
        """Claims from leased recipient rows (the columns every leasing statement
        returns, see queries.sql) and their messages' rows (``_MESSAGE_COLUMNS``).

        ``body``: the one message's body, when it is in hand (a small body
        just accepted and leased to this process): the delivery then sends
        it from memory instead of reading back the file written a moment
        ago (an open, two reads and a close per message).  The file stays
        the durable copy every later attempt reads."""
        by_id = {m[0]: m for m in messages}
        groups: dict[tuple[str, str] | int, list[Any]] = defaultdict(list)
        for row in rows:
            key: tuple[str, str] | int = row[0] if always_split else (row[1], row[2])
            groups[key].append(row)
        claims: list[Claim] = []
        for group in groups.values():
            group.sort(key=lambda r: r[0])
            m = by_id[group[0][1]]
            claims.append(
                Claim(
                    queue_id=m[0],
                    domain=group[0][2],
                    mail_from=m[1],
                    body_path=self.queue_dir / m[2],
                    size=m[3],
                    received_at=m[4],
                    auth_user=m[5],
                    env_id=m[6],
                    ret=m[7],
                    smtputf8=bool(m[8]),
                    body_8bit=bool(m[9]),
                    notes=json.loads(m[10]) if m[10] != "{}" else {},  # "{}": most mail
                    dsn_of=m[11],
                    recipients=tuple(claimed_recipient(r) for r in group),
                    lease_owner=owner,
                    lease_expires_at=expires,
                    body=body,
                )
            )
        claims.sort(key=lambda c: (c.received_at, c.queue_id, c.domain))
        return claims

    # ---------------------------------------------------------------- record

    async def record(
        self,
        owner: str,
        claim: Claim,
        records: Sequence[AttemptRecord],
        *,
        now: float | None = None,
    ) -> RecordResult:
        """Write attempt rows and the new state of each recipient, atomically.

        The state of a recipient changes only while ``owner`` still holds its
        lease; otherwise (an operator deleted it, the lease expired and another
        worker took it) the attempt row is still written — it happened — and
        the recipient is reported in ``lease_lost``.  Bodies of messages whose
        every recipient is now final are removed after the commit, on the
        spool's removal thread (:class:`bodies.BackgroundRemoval`).
        """
        at = time.time() if now is None else now
        attempt_numbers = {r.id: r.attempts + 1 for r in claim.recipients}
        for rec in records:
            if rec.recipient_id not in attempt_numbers:
                raise ValueError(f"recipient {rec.recipient_id} is not part of this claim")
            if rec.outcome is Outcome.DEFERRED and rec.next_attempt_at is None:
                raise ValueError("a deferred outcome needs next_attempt_at")
        ordered = [r.recipient_id for r in records]
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        job = _RecordJob(
            fut,
            True,
            claim.queue_id,
            owner,
            at,
            ordered,
            [_attempt_row(rec, attempt_numbers[rec.recipient_id]) for rec in records],
            [_update_row(rec, owner) for rec in records],
        )
        held, finished = await self._submit(job)
        self._counters.records += 1
        return RecordResult(
            updated=tuple(i for i in ordered if i in held),
            lease_lost=tuple(i for i in ordered if i not in held),
            finished_messages=finished,
        )

    async def release(
        self, owner: str, recipient_ids: Iterable[int], *, next_attempt_at: float | None = None
    ) -> int:
        """Give leases back without an attempt; optionally postpone them."""
        params = {
            "ids": json.dumps(list(recipient_ids)),
            "owner": owner,
            "next_attempt_at": next_attempt_at,
        }

        def op(conn: sqlite3.Connection) -> int:
            cursor = conn.execute(q("release"), params)
            return cursor.rowcount

        count: int = await self._run_relaxed(op)
        if next_attempt_at is None:
            self.new_work.set()
        return count

    async def release_owner(self, owner: str) -> int:
        """Give back every lease ``owner`` holds (shutdown)."""

        def op(conn: sqlite3.Connection) -> int:
            cursor = conn.execute(q("release_owner"), {"owner": owner})
            return cursor.rowcount

        count: int = await self.run(op)
        return count

    async def renew_leases(self, owner: str, until: float) -> int:
        def op(conn: sqlite3.Connection) -> int:
            cursor = conn.execute(q("renew_leases"), {"owner": owner, "expires": until})
            return cursor.rowcount

        count: int = await self._run_relaxed(op)
        return count

    async def next_due_at(self) -> float | None:
        """The earliest ``next_attempt_at`` among waiting recipients, if any."""

        def op(conn: sqlite3.Connection) -> float | None:
            rows = conn.execute(q("next_due")).fetchall()
            value = rows[0][0] if rows else None
            return None if value is None else float(value)

        result: float | None = await self.run(op, write=False)
        return result

    # -------------------------------------------------------------- control

    async def set_control(self, key: str, value: str) -> None:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute(q("control_set"), {"key": key, "value": value})

        await self.run(op)

    async def get_control(self, key: str) -> str | None:
        def op(conn: sqlite3.Connection) -> str | None:
            rows = conn.execute(q("control_get"), {"key": key}).fetchall()
            return str(rows[0][0]) if rows else None

        result: str | None = await self.run(op, write=False)
        return result

    # ------------------------------------------------------ MTA-STS policies

    async def get_sts_policy(self, domain: str) -> StoredStsPolicy | None:
        """The cached MTA-STS policy of ``domain`` (lower-case), if any."""

        def op(conn: sqlite3.Connection) -> StoredStsPolicy | None:
            row = conn.execute(q("sts_policy_get"), {"domain": domain}).fetchone()
            if row is None:
                return None
            policy_id, mode, mx, max_age, fetched_at, expires_at = row
            return StoredStsPolicy(
                domain,
                str(policy_id),
                str(mode),
                tuple(line for line in str(mx).split("\n") if line),
                int(max_age),
                float(fetched_at),
                float(expires_at),
            )

        result: StoredStsPolicy | None = await self.run(op, write=False)
        return result

    async def put_sts_policy(self, policy: StoredStsPolicy) -> None:
        """Store (or replace) ``policy.domain``'s cached MTA-STS policy."""
        row = {
            "domain": policy.domain,
            "policy_id": policy.policy_id,
            "mode": policy.mode,
            "mx": "\n".join(policy.mx),
            "max_age": policy.max_age,
            "fetched_at": policy.fetched_at,
            "expires_at": policy.expires_at,
        }

        def op(conn: sqlite3.Connection) -> None:
            conn.execute(q("sts_policy_put"), row)

        await self.run(op)

    # -------------------------------------------------------- AUTH throttle

    async def throttle_update(
        self,
        key: str,
        update: Callable[[ThrottleEntry | None], tuple[ThrottleEntry | None, T]],
        *,
        write: bool = True,
    ) -> T:
        """Read ``key``'s AUTH throttle entry, store what ``update`` makes of it.

        One transaction (``BEGIN IMMEDIATE``, behind the cross-process write
        lock), so every process's updates of one client are serialised.
        ``update`` runs on the database thread; it must be a pure function.
        ``write=False`` only reads.  Returns ``update``'s second value.
        """

        def op(conn: sqlite3.Connection) -> T:
            row = conn.execute(q("throttle_get"), {"client": key}).fetchone()
            current = (
                None
                if row is None
                else ThrottleEntry(
                    int(row[0]),
                    int(row[1]),
                    float(row[2]),
                    None if row[3] is None else float(row[3]),
                )
            )
            new, result = update(current)
            if write and new != current:
                if new is None:
                    conn.execute(q("throttle_delete"), {"client": key})
                else:
                    conn.execute(
                        q("throttle_put"),
                        {
                            "client": key,
                            "failures": new.failures,
                            "in_flight": new.in_flight,
                            "last_seen": new.last_seen,
                            "blocked_until": new.blocked_until,
                        },
                    )
            return result

        result: T = await self.run(op, write=write)
        return result

    async def throttle_prune(self, now: float, forget_before: float, keep: int) -> int:
        """Drop ended blocks, clients last seen before ``forget_before``, all but ``keep``."""

        def op(conn: sqlite3.Connection) -> int:
            stale = conn.execute(
                q("throttle_prune_stale"), {"now": now, "forget_before": forget_before}
            ).rowcount
            excess = conn.execute(q("throttle_prune_excess"), {"keep": keep}).rowcount
            return int(stale) + int(excess)

        result: int = await self.run(op)
        return result

    # ------------------------------------------------------------- recovery

    async def recover(self, now: float | None = None, *, files: bool = True) -> RecoveryReport:
        """Start-up recovery; safe while other processes use the spool.

        ``files=False`` does only the lease part (a second process on the
        same spool leaves the file scan to the first).

        - leases that expired, or whose owner is a dead process on this host,
          become due again;
        - temp body files, bodies without rows and bodies of finished
          messages are removed once older than ``ORPHAN_MIN_AGE`` (a younger
          one may be an accept in progress in another process);
        - unfinished messages whose body file is gone are marked ``dropped``
          with a reason, never left to crash the scheduler.
        """
        at = time.time() if now is None else now
        host = socket.gethostname()

        def leases(conn: sqlite3.Connection) -> int:
            released = (conn.execute(q("release_expired"), {"now": at})).rowcount
            for (owner,) in conn.execute(q("lease_owners")).fetchall():
                if _owner_is_dead_local(owner, host):
                    cursor = conn.execute(q("release_owner_crashed"), {"owner": owner, "now": at})
                    released += cursor.rowcount
            return released

        released: int = await self.run(leases)
        if released:
            self.new_work.set()
        if not files:
            return RecoveryReport(released, 0, 0, 0, ())

        def unfinished(conn: sqlite3.Connection) -> set[str]:
            return {row[0] for row in conn.execute(q("unfinished_messages")).fetchall()}

        live: set[str] = await self.run(unfinished, write=False)
        # Files younger than ORPHAN_MIN_AGE may belong to an accept still in
        # progress in another process (body written, rows not yet committed).
        scan = await asyncio.to_thread(
            bodies.find_leftovers, self.queue_dir, live, at - ORPHAN_MIN_AGE
        )
        del live
        stray_ids = json.dumps([qid for qid, _ in scan.strays])

        def finished_strays(conn: sqlite3.Connection) -> set[str]:
            rows = conn.execute(q("finished_body_names"), {"ids": stray_ids}).fetchall()
            return {row[0] for row in rows}

        finished_ids = await self.run(finished_strays, write=False) if scan.strays else set()
        await asyncio.to_thread(
            bodies.remove_bodies, scan.temps + [path for _, path in scan.strays]
        )
        for qid in scan.missing:
            await self.finalize_message(
                qid,
                Status.DROPPED,
                reason=BODY_MISSING_REASON,
                status_code=BODY_MISSING_STATUS,
                now=at,
            )
        return RecoveryReport(
            leases_released=released,
            temp_files_removed=len(scan.temps),
            orphan_bodies_removed=sum(1 for qid, _ in scan.strays if qid not in finished_ids),
            finished_bodies_removed=sum(1 for qid, _ in scan.strays if qid in finished_ids),
            missing_bodies=scan.missing,
        )

    async def finalize_message(
        self,
        queue_id: str,
        status: Status,
        *,
        reason: str,
        status_code: str | None = None,
        response: str | None = None,
        now: float | None = None,
    ) -> list[dict[str, Any]]:
        """Put every unfinished recipient of ``queue_id`` into a final state.

        Used for operator ``delete`` (dropped) and ``bounce`` (bounced) and
        for a lost body.  The decision is ours, so each changed row's
        ``last_code`` becomes NULL, ``last_status`` ``status_code`` (default
        ``5.0.0``) and ``last_response`` ``response`` (default ``reason``):
        the accounting views show why.  Returns the recipients it changed
        (as they were before); the message is marked finished and its body
        removed when nothing is left.
        """
        if not status.is_final:
            raise ValueError(f"{status} is not a final status")
        at = time.time() if now is None else now
        params = {
            "status": status.value,
            "now": at,
            "reason": reason,
            "status_code": status_code or "5.0.0",
            "response": reason if response is None else response,
            "queue_id": queue_id,
        }

        def op(conn: sqlite3.Connection) -> list[Any]:
            changed = conn.execute(q("drop_message_recipients"), params).fetchall()
            self._finish_messages(conn, [queue_id], at)
            return changed

        changed = await self.run(op)
        keys = (
            "id",
            "recipient",
            "notify",
            "orcpt",
            "attempts",
            "last_code",
            "last_status",
            "last_response",
            "last_mx",
        )
        return [dict(zip(keys, row, strict=True)) for row in changed]

    # ---------------------------------------------------------- admin reads

    async def list_queue(
        self,
        *,
        status: str | None,
        domain: str | None,
        sender: str | None,
        received_before: float | None,
        limit: int | None,
    ) -> list[QueueEntry]:
        return await sqlite_admin.list_queue(
            self,
            status=status,
            domain=domain,
            sender=sender,
            received_before=received_before,
            limit=limit,
        )

    async def show_message(self, queue_id: str) -> MessageDetail:
        return await sqlite_admin.show_message(self, queue_id)

    async def flush(self, queue_ids: Sequence[str], domain: str | None, now: float) -> int:
        return await sqlite_admin.flush(self, queue_ids, domain, now)

    async def message_exists(self, queue_id: str) -> bool:
        return await sqlite_admin.message_exists(self, queue_id)

    async def stats(self, now: float, top: int) -> QueueStats:
        return await sqlite_admin.stats(self, now, top)


def _check_exists(queue_dir: Path) -> None:
    """Refuse a directory that holds no queue, or one we may not write."""
    db = queue_dir / DB_NAME
    if not db.is_file():
        raise SpoolError(f"no queue at {queue_dir} (has outboundd run with this config?)")
    if not os.access(db, os.R_OK | os.W_OK) or not os.access(queue_dir, os.R_OK | os.W_OK):
        raise SpoolError(
            f"cannot open the queue {db}: permission denied (run as the user outboundd runs as)"
        )


def _within_room(due: list[Any], domain_room: int, room: Mapping[str, int]) -> list[Any]:
    """The due groups (rows ending in their domain) that per-domain room allows, in order."""
    left = dict(room)
    chosen = []
    for row in due:
        domain = row[-1]
        if left.setdefault(domain, domain_room) > 0:
            left[domain] -= 1
            chosen.append(row)
    return chosen


def _owner_is_dead_local(owner: str, host: str) -> bool:
    owner_host, _, rest = owner.partition(":")
    pid_text = rest.partition(":")[0]
    if owner_host != host or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return False  # our own, still alive
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    """A killed process nobody has reaped yet still answers kill(pid, 0)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # The state follows the parenthesised command name, which may hold spaces.
    state = stat.rpartition(")")[2].split()[:1]
    return state in (["Z"], ["X"])


def _new_leased_row(recipient_id: int, row: tuple[Any, ...]) -> tuple[Any, ...]:
    """A new leased recipient as the leasing statements return it (see queries.sql),
    from its ``insert_recipient_leased`` parameters: no attempts, nothing last."""
    queue_id, recipient, domain, notify, orcpt = row[:5]
    return (recipient_id, queue_id, domain, recipient, notify, orcpt, 0, 0, "queued",
            None, None, None, None, 0, None)  # fmt: skip


def _attempt_row(rec: AttemptRecord, attempt: int) -> tuple[Any, ...]:
    """The parameters of ``insert_attempt``, in its numbered order."""
    return (
        rec.recipient_id,
        attempt,
        rec.started_at,
        rec.finished_at,
        rec.mx_host,
        rec.mx_ip,
        rec.port,
        rec.tls,
        rec.auth,
        rec.code,
        rec.status,
        rec.response,
        rec.outcome._value_,  # .value is a Python-level property call; _value_ is the attribute
        rec.reason,
        rec.tls_policy,
        None if rec.tls_policy_met is None else int(rec.tls_policy_met),
    )


def _update_row(rec: AttemptRecord, owner: str) -> tuple[Any, ...]:
    """The parameters of ``update_after_attempt``, in its numbered order."""
    final = rec.outcome is not Outcome.DEFERRED
    code, status, response = rec.code, rec.status, rec.response
    if rec.final_response is not None:  # our decision, not the reply, is the row's last word
        code, status, response = None, rec.final_status, rec.final_response
    return (
        rec.recipient_id,
        owner,
        rec.outcome._value_,  # an Outcome's value is the Status it leads to
        int(rec.outcome is Outcome.DEFERRED and rec.count_failure),
        rec.finished_at if final else rec.next_attempt_at,
        rec.finished_at,
        code,
        status,
        response,
        rec.mx_host,
        rec.finished_at if final else None,
        rec.reason,
        int(rec.delay_notified),
    )


def _json_strs(values: list[str]) -> str:
    """A JSON array of strings, for ``json_each``; queue IDs (``[A-Za-z0-9._-]``)
    need no escaping, anything else goes through ``json.dumps``."""
    probe = "".join(values)
    if not values or not probe.isascii() or not probe.isprintable():
        return json.dumps(values)
    if '"' in probe or "\\" in probe:
        return json.dumps(values)
    return '["' + '","'.join(values) + '"]'


def _json_ints(values: Iterable[int]) -> str:
    """A JSON array of integers, for ``json_each``; a fifth of ``json.dumps``'s cost."""
    return "[" + ",".join(str(int(v)) for v in values) + "]"


def _settle(
    batch: list[_Job], settled: list[tuple[bool, Any]], new_work: asyncio.Event | None = None
) -> None:
    """Every job's result or error, on the event loop; ``new_work`` set first if given."""
    if new_work is not None:
        new_work.set()
    for job, (ok, value) in zip(batch, settled, strict=True):
        if ok:
            _resolve(job, value)
        else:
            _fail(job, value)


def _consume(fut: asyncio.Future[Any]) -> None:
    """Retrieve a future nobody awaits, so its failure is not logged as lost."""
    if not fut.cancelled():
        fut.exception()


def _resolve(job: _Job, value: Any) -> None:
    if not job.future.done():
        job.future.set_result(value)


def _fail(job: _Job, exc: BaseException) -> None:
    if not job.future.done():
        job.future.set_exception(exc)


def _map_db_error(exc: BaseException, job: _Job) -> BaseException:
    """sqlite3 errors become spool errors a caller can act on."""
    if isinstance(exc, SpoolError):
        return exc
    text = str(exc)
    if isinstance(exc, sqlite3.Error):
        if "full" in text.lower():
            return SpoolFullError(f"queue database is full: {text}")
        if isinstance(job, _AcceptJob):
            return SpoolWriteError(f"queue database error: {text}")
        return SpoolError(f"queue database error: {text}")
    if isinstance(job, _AcceptJob):
        return SpoolWriteError(f"cannot queue message: {type(exc).__name__}: {text}")
    return exc
