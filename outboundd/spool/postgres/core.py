"""The PostgreSQL spool backend: one queue for many outboundd hosts.

Envelopes, state and bodies all live in PostgreSQL (bodies in their own
table), so no message lives only on the disk of the host that accepted it.
Driver: asyncpg with its pool (docs/scaling.md says why).

- **Accept, group commit.**  Accepts are queued to one writer task, which
  sends every waiting accept as ONE statement (messages, bodies,
  recipients, DSN links and a NOTIFY, bound as arrays): one round trip and
  one commit for the batch, and each ``accept()`` returns only after that
  commit (``synchronous_commit`` on: the WAL is flushed).  A batch with
  ``accept_leased()`` jobs is one call of ``outboundd_accept``, which also
  leases each new group to its process while its domain has room on every
  host (counted as a claim counts).
- **Claims** lock due rows ``FOR UPDATE SKIP LOCKED`` (hosts claiming at the
  same moment take different rows instead of waiting), count the slots each
  domain holds on every host under a per-domain advisory lock, and lease
  what ``domain_concurrency_max`` allows, lease them and fetch their
  messages (bodies included): all of it one call of ``outboundd_claim``,
  one round trip and one commit.  It locks ``SCAN_FACTOR`` rows per group
  it may take: ``limit``, but no more than ``domain_room`` (one domain's
  most).  A claim that finds nothing due says
  when the next attempt is due; until work may have become due (a NOTIFY,
  this spool's own accept, release or deferral) or ``IDLE_HINT_SECONDS``
  pass, claims and ``next_due_at()`` answer from that without a round trip.
- **Leases** are owned by ``host:pid:token``; every state change is guarded
  by it.  Expired leases (a host that died or lost the database) are made
  due again by any host's claim, every ``EXPIRY_SWEEP_INTERVAL``; recovery
  treats a lease as a dead local process's only when its host is ours.
- **Wake-ups**: accepts, flushes, releases and resumes ``NOTIFY
  outboundd_work``; every host's listener sets ``new_work``.
- **Record, group commit.**  Records are queued to a second writer task,
  which writes every waiting delivery's attempts and new states with one
  call of the ``outboundd_record`` function: one round trip and one commit
  for the batch.  A batch's first record waits ``RECORD_GATHER_SECONDS``
  for others to join it, so that the deliveries ending close together
  share a call; and after a claim that took less than it could, the
  scheduler lets slots free up for up to ``claim_gather`` before the next
  (each call's fixed cost on the server is what the queue in PostgreSQL
  pays beyond SQLite's in-process transactions).
- **Unreachable server**: operations fail fast with
  :class:`SpoolUnavailableError` while :class:`Link` backs off (submission
  answers 451); ``record()`` instead waits for the server, holding the
  result in memory (each waiting delivery keeps its slot, so at most
  ``concurrency_max`` results wait), and writes it when the server is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias, TypeVar

import asyncpg

from outboundd.spool.base import Spool, WriterStop, describe_location, group_commit_loop
from outboundd.spool.core import _owner_is_dead_local, domain_of
from outboundd.spool.errors import (
    SpoolClosedError,
    SpoolError,
    SpoolUnavailableError,
    SpoolWriteError,
    UnknownMessageError,
)
from outboundd.spool.postgres.link import Link, describe, is_unreachable
from outboundd.spool.postgres.migrate import migrate, postgres_migrations
from outboundd.spool.postgres.sql import Statement, bind, pq
from outboundd.spool.queueid import new_queue_id
from outboundd.spool.types import (
    BODY_MISSING_REASON,
    BODY_MISSING_STATUS,
    AttemptEntry,
    AttemptRecord,
    Claim,
    Lease,
    MessageDetail,
    NewMessage,
    Outcome,
    QueueEntry,
    QueueStats,
    RecipientDetail,
    RecordResult,
    RecoveryReport,
    SpoolCounters,
    Status,
    StoredStsPolicy,
    ThrottleEntry,
    claimed_recipient,
)

T = TypeVar("T")
#: A pooled connection, as every operation gets one.
Conn: TypeAlias = "asyncpg.pool.PoolConnectionProxy[Any]"

#: Connections one process keeps (the writer, claims, records, admin reads).
POOL_MAX = 10
CONNECT_TIMEOUT = 10.0
#: A statement that takes longer means the server or the network is gone.
COMMAND_TIMEOUT = 30.0
#: Most accepts one group commit takes.
MAX_BATCH = 512
#: How often a claim first makes expired leases (of any host) due again.
EXPIRY_SWEEP_INTERVAL = 5.0
#: Rows a claim looks at (and locks) per group it may take (a group is all
#: due recipients of one message and domain): ``limit`` groups, but no more
#: than ``domain_room``, the most one domain may have.  So a claim for a
#: domain at its limit locks a few rows, not four times the scheduler's free
#: slots; work of many domains is taken by the claims that follow.
SCAN_FACTOR = 4
#: How long the first record of a batch waits for others to join it: one
#: ``outboundd_record`` call (a round trip and a commit, with a fixed cost on
#: the server) then carries the results of every delivery that ended in the
#: meantime.  The latency a record gains, at most.
RECORD_GATHER_SECONDS = 0.003
#: Spool.claim_gather: after a claim that took less than it could, the
#: scheduler waits up to this long for slots to free up before the next.
CLAIM_GATHER_SECONDS = 0.02
#: How long an empty claim's word that nothing is due (before its next_due)
#: is trusted without a NOTIFY: bounds how late this host notices work that
#: another host made due without one (its expiry sweep, a short deferral).
IDLE_HINT_SECONDS = 0.25
#: The NOTIFY channel that wakes idle schedulers on every host.
CHANNEL = "outboundd_work"
#: How often the listener checks that its connection is alive.
LISTEN_CHECK_INTERVAL = 10.0


@dataclass(eq=False)
class _AcceptJob:
    future: asyncio.Future[None]
    message: dict[str, Any]
    body: bytes
    recipients: list[dict[str, Any]]
    links: list[dict[str, Any]]
    #: accept_leased: who takes the recipients, and until when.
    lease: Lease | None = None
    expires: float = 0.0
    #: The rows of the recipients leased at commit (accept_leased).
    leased: list[Any] = field(default_factory=list)


@dataclass(eq=False)
class _RecordJob:
    future: asyncio.Future[tuple[set[int], bool]]
    queue_id: str
    now: float
    rows: list[dict[str, Any]]  # one per recipient, keys _RECORD_KEYS


@dataclass
class _Counters:
    accepts: int = 0
    accept_commits: int = 0
    records: int = 0
    round_trips: int = 0


class PostgresSpool(Spool):
    """The queue in a PostgreSQL database.  Create with :meth:`open`; always :meth:`close`."""

    claim_gather = CLAIM_GATHER_SECONDS

    def __init__(self, url: str, pool: asyncpg.Pool) -> None:
        self.url = url
        self._location = describe_location(url)
        self._pool = pool
        self._link = Link()
        self._counters = _Counters()
        self._queue: asyncio.Queue[_AcceptJob | WriterStop] = asyncio.Queue()
        self._records: asyncio.Queue[_RecordJob | WriterStop] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        self._record_writer: asyncio.Task[None] | None = None
        #: No new work is taken once closing; queued work still runs until closed.
        self._closing = False
        self._listener: asyncio.Task[None] | None = None
        self._closed = False
        self._swept_at = float("-inf")
        #: Bumped whenever work may have become due (see _more_work).
        self._generation = 0
        #: From the last empty claim: (next_due, generation, monotonic time).
        self._idle: tuple[float | None, int, float] | None = None
        self.new_work = asyncio.Event()
        self.recovery: RecoveryReport | None = None

    # ------------------------------------------------------------------ life

    @classmethod
    async def open(  # type: ignore[override]
        cls, url: str, *, recover: bool = True, wait: bool = False
    ) -> PostgresSpool:
        """Connect, migrate, and (``recover``) release expired leases and listen for work.

        ``recover=False`` (outboundctl) neither recovers nor listens.  With
        ``wait`` a server that cannot be reached is waited for (back-off, one
        log line per interval); otherwise, and for any other failure (bad
        credentials, no such database, a schema too new), raises
        :class:`SpoolError` at once.
        """
        location = describe_location(url)
        link = Link()
        while True:
            try:
                pool = await asyncpg.create_pool(
                    url,
                    min_size=1,
                    max_size=POOL_MAX,
                    timeout=CONNECT_TIMEOUT,
                    command_timeout=COMMAND_TIMEOUT,
                    reset=_keep_session,
                )
                break
            except Exception as exc:
                if not (wait and is_unreachable(exc)):
                    raise SpoolError(
                        f"cannot connect to the queue {location}: {describe(exc)}"
                    ) from exc
                link.failed(exc, location)
                await asyncio.sleep(link.wait_time())
        link.succeeded(location)
        try:
            async with pool.acquire() as conn:
                await migrate(conn, postgres_migrations())
        except SpoolError:
            await pool.close()
            raise
        except Exception as exc:
            await pool.close()
            raise SpoolError(f"cannot open the queue {location}: {describe(exc)}") from exc
        spool = cls(url, pool)
        spool._writer = asyncio.create_task(spool._write_loop(), name="spool-writer")
        spool._record_writer = asyncio.create_task(spool._record_loop(), name="spool-records")
        if recover:
            spool._listener = asyncio.create_task(spool._listen_loop(), name="spool-listener")
            try:
                spool.recovery = await spool.recover()
            except BaseException:
                await spool.close()
                raise
        return spool

    async def close(self) -> None:
        """Write what is queued (records waiting for an unreachable server give up),
        then close the connections."""
        if self._closing:
            return
        self._closing = True
        if self._writer is not None and not self._writer.done():
            stop = WriterStop()
            await self._queue.put(stop)
            await stop.done
            await self._writer
        if self._record_writer is not None and not self._record_writer.done():
            stop = WriterStop()
            await self._records.put(stop)
            await stop.done
            await self._record_writer
        self._closed = True
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        await self._pool.close()

    @property
    def location(self) -> str:
        return self._location

    @property
    def counters(self) -> SpoolCounters:
        c = self._counters
        return SpoolCounters(accepts=c.accepts, accept_commits=c.accept_commits, records=c.records)

    @property
    def round_trips(self) -> int:
        """Statements sent to the server so far (for the benchmark's per-message figures)."""
        return self._counters.round_trips

    # ------------------------------------------------------------ plumbing

    async def _run(
        self,
        op: Callable[[Conn], Awaitable[T]],
        *,
        transaction: bool = True,
        write_error: bool = False,
    ) -> T:
        """Run ``op`` on a pooled connection (in a transaction); map errors to the spool's."""
        if self._closed:
            raise SpoolClosedError("the spool is closed")
        if self._link.wait_time() > 0:
            raise SpoolUnavailableError(
                f"queue database {self._location} unreachable; retrying in "
                f"{self._link.wait_time():.1f}s"
            )
        try:
            async with self._pool.acquire(timeout=CONNECT_TIMEOUT) as conn:
                if transaction:
                    async with conn.transaction():
                        self._counters.round_trips += 2  # BEGIN, COMMIT
                        result = await op(conn)
                else:
                    result = await op(conn)
        except (SpoolError, ValueError):
            raise
        except Exception as exc:
            if is_unreachable(exc):
                self._link.failed(exc, self._location)
                raise SpoolUnavailableError(
                    f"queue database {self._location} unreachable: {describe(exc)}"
                ) from exc
            error = SpoolWriteError if write_error else SpoolError
            raise error(f"queue database error: {describe(exc)}") from exc
        self._link.succeeded(self._location)
        return result

    async def _fetch(self, conn: Conn, name: str, **params: Any) -> list[Any]:
        stmt = pq(name)
        self._counters.round_trips += 1
        rows: list[Any] = await conn.fetch(stmt.text, *bind(stmt, params))
        return rows

    async def _execute(self, conn: Conn, name: str, **params: Any) -> int:
        """Run a statement; the number of rows it changed."""
        stmt = pq(name)
        self._counters.round_trips += 1
        status: str = await conn.execute(stmt.text, *bind(stmt, params))
        return _rowcount(status)

    async def _notify(self, conn: Conn) -> None:
        await self._fetch(conn, "notify_work")

    # ---------------------------------------------------------------- accept

    async def accept(self, message: NewMessage, *, queue_id: str | None = None) -> str:
        job = self._accept_job(message, queue_id, None)
        await self._queue.put(job)
        # shield: a client that hangs up must not cancel a commit others share.
        await asyncio.shield(job.future)
        self._more_work()
        return str(job.message["queue_id"])

    async def accept_leased(
        self, message: NewMessage, lease: Lease, *, queue_id: str | None = None
    ) -> tuple[str, list[Claim]]:
        """:meth:`accept`, leasing to ``lease.owner`` in the same commit what the
        per-domain limit leaves room for on every host.

        The domains' slots are counted under the same advisory locks as
        :meth:`claim`'s (``outboundd_accept``), so ``lease.domain_room`` holds
        across hosts; a group without room is queued due, as a plain accept's,
        and wakes the schedulers.  When everything was leased nothing is
        woken: no host's scheduler claims for work that is already taken.
        """
        job = self._accept_job(message, queue_id, lease)
        await self._queue.put(job)
        await asyncio.shield(job.future)
        qid = str(job.message["queue_id"])
        if len(job.leased) < len(job.recipients):
            self._more_work()
        if not job.leased:
            return qid, []
        m = job.message
        stored = (
            qid, m["mail_from"], m["size"], m["received_at"], m["auth_user"], m["env_id"],
            m["ret"], m["smtputf8"], m["body_8bit"], m["notes"], m["dsn_of"], job.body,
        )  # fmt: skip
        return qid, _claims(
            job.leased, [stored], lease.owner, job.expires, always_split=lease.always_split
        )

    def _accept_job(
        self, message: NewMessage, queue_id: str | None, lease: Lease | None
    ) -> _AcceptJob:
        if not message.recipients:
            raise ValueError("a message needs at least one recipient")
        if message.ret not in (None, "FULL", "HDRS"):
            raise ValueError(f"RET must be FULL or HDRS, not {message.ret!r}")
        if self._closing:
            raise SpoolClosedError("the spool is closed")
        qid = queue_id or new_queue_id()
        now = time.time()
        job = _AcceptJob(
            future=asyncio.get_running_loop().create_future(),
            message={
                "queue_id": qid,
                "mail_from": message.mail_from,
                "size": len(message.body),
                "received_at": now,
                "auth_user": message.auth_user,
                "client_ip": message.client_ip,
                "env_id": message.env_id,
                "ret": message.ret,
                "smtputf8": int(message.smtputf8),
                "body_8bit": int(message.body_8bit),
                "notes": (
                    json.dumps(dict(message.notes), default=str, separators=(",", ":"))
                    if message.notes
                    else "{}"
                ),
                "dsn_of": message.dsn_of,
            },
            body=bytes(message.body),
            recipients=[
                {
                    "queue_id": qid,
                    "recipient": rcpt.address,
                    "domain": domain_of(rcpt.address),
                    "notify": rcpt.notify,
                    "orcpt": rcpt.orcpt,
                    "next_attempt_at": now,
                }
                for rcpt in message.recipients
            ],
            links=[
                {"queue_id": message.dsn_of, "recipient": address, "dsn_queue_id": qid}
                for address in (message.dsn_recipients if message.dsn_of is not None else ())
            ],
        )
        if lease is not None:
            job.lease = lease
            job.expires = now + lease.lease_seconds
        return job

    async def _write_loop(self) -> None:
        await group_commit_loop(self._queue, self._commit_accepts, MAX_BATCH)

    async def _commit_accepts(self, batch: list[_AcceptJob]) -> None:
        """One statement, one commit for ``batch``; a failing batch is retried one by one
        so one bad message (a duplicate queue ID) does not sink the others."""
        try:
            await self._accept_batch(batch)
        except SpoolUnavailableError as exc:
            for job in batch:
                _settle(job.future, exc)
            return
        except Exception as exc:
            if len(batch) == 1:
                _settle(batch[0].future, _write_error(exc))
                return
            for job in batch:
                try:
                    await self._accept_batch([job])
                except Exception as single:
                    _settle(job.future, _write_error(single))
                else:
                    _settle(job.future, None)
            return
        for job in batch:
            _settle(job.future, None)

    async def _accept_batch(self, batch: list[_AcceptJob]) -> None:
        params: dict[str, Any] = {}
        for key in _MESSAGE_KEYS:
            params[f"m_{key}"] = [job.message[key] for job in batch]
        params["b_body"] = [job.body for job in batch]
        rcpts = [row for job in batch for row in job.recipients]
        for key in _RECIPIENT_KEYS:
            params[f"r_{key}"] = [row[key] for row in rcpts]
        links = [row for job in batch for row in job.links]
        for key in ("queue_id", "recipient", "dsn_queue_id"):
            params[f"l_{key}"] = [row[key] for row in links]
        leasing = any(job.lease is not None for job in batch)
        if leasing:
            _lease_groups(batch, params)
            stmt = pq("accept_leased_batch")
        else:
            stmt = pq("accept_batch_links" if links else "accept_batch")

        async def op(conn: Conn) -> list[Any]:
            # One statement outside an explicit transaction: it is its own
            # transaction, committed (and the WAL flushed) when it returns.
            self._counters.round_trips += 1
            if leasing:
                rows: list[Any] = await conn.fetch(stmt.text, *bind(stmt, params))
                return rows
            await conn.fetchval(stmt.text, *bind(stmt, params))
            return []

        leased = await self._run(op, transaction=False, write_error=True)
        if leased:
            by_qid = {job.message["queue_id"]: job for job in batch}
            for row in leased:
                by_qid[row[1]].leased.append(tuple(row))
        self._counters.accepts += len(batch)
        self._counters.accept_commits += 1

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
        if limit <= 0:
            return []
        at = time.time() if now is None else now
        expires = at + lease_seconds
        if abs(at - self._swept_at) >= EXPIRY_SWEEP_INTERVAL:
            await self._sweep_expired(at)
        idle = self._idle_until()
        if idle is not None and (idle[0] is None or at < idle[0]):
            # The last claim found nothing due before idle[0], and nothing was
            # queued since: a claim now would find nothing either.
            return []
        generation = self._generation

        params = {
            "now": at,
            "owner": owner,
            "expires": expires,
            "limit": limit,
            "scan": SCAN_FACTOR * (limit if domain_room is None else min(limit, domain_room)),
            "exclude": list(exclude_domains),
            "always_split": always_split,
            "domain_room": domain_room,
            "room_domains": list(room) if room else [],
            "room_slots": list(room.values()) if room else [],
        }

        async def op(conn: Conn) -> list[Any]:
            # One function call outside an explicit transaction: it is its own
            # transaction, so the claim is one round trip and one commit.
            return await self._fetch(conn, "claim", **params)

        leased = await self._run(op, transaction=False)
        if len(leased) == 1 and leased[0][0] is None:
            # Nothing due was free; the row says when the next attempt is due.
            next_due = leased[0][-1]
            self._idle = (
                None if next_due is None else float(next_due),
                generation,
                time.monotonic(),
            )
            return []
        rows, msgs = _split_leased(leased)
        return _claims(rows, msgs, owner, expires, always_split=always_split)

    def _more_work(self) -> None:
        """Work may have become due: forget the last empty claim's word, wake the scheduler."""
        self._forget_idle()
        self.new_work.set()

    def _forget_idle(self) -> None:
        """Work may become due before the last empty claim's next_due."""
        self._generation += 1
        self._idle = None

    def _idle_until(self) -> tuple[float | None] | None:
        """``(next_due,)`` from the last empty claim while it still holds, else None."""
        idle = self._idle
        if idle is None:
            return None
        next_due, generation, seen = idle
        if generation != self._generation or time.monotonic() - seen >= IDLE_HINT_SECONDS:
            self._idle = None
            return None
        return (next_due,)

    async def _sweep_expired(self, at: float) -> None:
        """Expired leases of any host become due again (its own short transaction)."""
        self._swept_at = at

        async def op(conn: Conn) -> int:
            return await self._execute(conn, "release_expired", now=at)

        if await self._run(op, transaction=False):
            self._more_work()

    # ---------------------------------------------------------------- record

    async def record(
        self,
        owner: str,
        claim: Claim,
        records: Sequence[AttemptRecord],
        *,
        now: float | None = None,
    ) -> RecordResult:
        """Write the attempts and new states, guarded by the lease.

        Group commit: the records of every delivery waiting are written by one
        call of ``outboundd_record`` (one round trip, one commit).  While the
        server is unreachable this waits (with the link's back-off) and
        writes once it is back: the delivery happened, and its result is
        kept in memory until then.  Only closing the spool gives up; the
        lease then expires and the recipients are delivered again.
        """
        at = time.time() if now is None else now
        attempt_numbers = {r.id: r.attempts + 1 for r in claim.recipients}
        for rec in records:
            if rec.recipient_id not in attempt_numbers:
                raise ValueError(f"recipient {rec.recipient_id} is not part of this claim")
            if rec.outcome is Outcome.DEFERRED and rec.next_attempt_at is None:
                raise ValueError("a deferred outcome needs next_attempt_at")
        if self._closing:
            raise SpoolClosedError("the spool is closed")
        job = _RecordJob(
            future=asyncio.get_running_loop().create_future(),
            queue_id=claim.queue_id,
            now=at,
            rows=[_record_row(rec, owner, attempt_numbers[rec.recipient_id]) for rec in records],
        )
        await self._records.put(job)
        # shield: the delivery task may be cancelled; the batch it shares goes on.
        held, finished = await asyncio.shield(job.future)
        self._counters.records += 1
        if any(rec.outcome is Outcome.DEFERRED for rec in records):
            self._forget_idle()  # its retry may come before the last next_due
        ordered = [r.recipient_id for r in records]
        return RecordResult(
            updated=tuple(i for i in ordered if i in held),
            lease_lost=tuple(i for i in ordered if i not in held),
            finished_messages=(claim.queue_id,) if finished else (),
        )

    async def _record_loop(self) -> None:
        """Group commit for records: every record waiting goes in one call."""
        await group_commit_loop(
            self._records, self._commit_records, MAX_BATCH, gather=RECORD_GATHER_SECONDS
        )

    async def _commit_records(self, batch: list[_RecordJob]) -> None:
        """Write ``batch``; while the server is unreachable, wait and try again (the
        deliveries happened: their results are kept, in memory, until written).
        Any other failure is retried job by job, so one bad record fails alone."""
        while True:
            try:
                held, finished = await self._record_batch(batch)
                break
            except SpoolUnavailableError as exc:
                if self._closing:
                    for job in batch:
                        _fail(job.future, exc)
                    return
                await asyncio.sleep(max(self._link.wait_time(), 0.1))
            except Exception as exc:
                if len(batch) == 1:
                    _fail(batch[0].future, exc if isinstance(exc, SpoolError) else
                            SpoolError(f"queue database error: {describe(exc)}"))  # fmt: skip
                    return
                for job in batch:
                    await self._commit_records([job])
                return
        reported: set[str] = set()
        for job in batch:
            ids = {row["recipient_id"] for row in job.rows}
            done = job.queue_id in finished and job.queue_id not in reported
            reported.add(job.queue_id)
            if not job.future.done():
                job.future.set_result((held & ids, done))

    async def _record_batch(self, batch: list[_RecordJob]) -> tuple[set[int], set[str]]:
        rows = [row for job in batch for row in job.rows]
        params: dict[str, Any] = {
            "now": max(job.now for job in batch),
            "queue_ids": sorted({job.queue_id for job in batch}),
        }
        for key in _RECORD_KEYS:
            params[key] = [row[key] for row in rows]

        async def op(conn: Conn) -> list[Any]:
            return await self._fetch(conn, "record_batch", **params)

        result = await self._run(op, transaction=False)
        held = {int(row[1]) for row in result if row[0] == "updated"}
        finished = {row[1] for row in result if row[0] == "finished"}
        return held, finished

    async def release(
        self, owner: str, recipient_ids: Iterable[int], *, next_attempt_at: float | None = None
    ) -> int:
        ids = [int(i) for i in recipient_ids]

        async def op(conn: Conn) -> int:
            # One statement (its own transaction): the release and its NOTIFY.
            rows = await self._fetch(
                conn, "release", ids=ids, owner=owner, next_attempt_at=next_attempt_at
            )
            return int(rows[0][0])

        count = await self._run(op, transaction=False)
        if next_attempt_at is None:
            self._more_work()
        elif count:
            self._forget_idle()  # due later, but maybe before the last next_due
        return count

    async def release_owner(self, owner: str) -> int:
        async def op(conn: Conn) -> int:
            count = await self._execute(conn, "release_owner", owner=owner)
            if count:
                await self._notify(conn)
            return count

        count = await self._run(op)
        if count:
            self._more_work()
        return count

    async def renew_leases(self, owner: str, until: float) -> int:
        async def op(conn: Conn) -> int:
            return await self._execute(conn, "renew_leases", owner=owner, expires=until)

        return await self._run(op, transaction=False)

    async def next_due_at(self) -> float | None:
        idle = self._idle_until()
        if idle is not None:
            return idle[0]  # the last empty claim's answer, still true

        async def op(conn: Conn) -> Any:
            return (await self._fetch(conn, "next_due"))[0][0]

        value = await self._run(op, transaction=False)
        return None if value is None else float(value)

    async def read_body(self, queue_id: str) -> bytes:
        async def op(conn: Conn) -> list[Any]:
            return await self._fetch(conn, "body", queue_id=queue_id)

        rows = await self._run(op, transaction=False)
        if not rows:
            raise SpoolError(f"the body of {queue_id} is not in the queue")
        return bytes(rows[0][0])

    # ------------------------------------------------------------ wake-ups

    async def _listen_loop(self) -> None:
        """Keep one connection LISTENing on ``CHANNEL``; reconnect with back-off.

        Each (re)connection sets ``new_work``: notifications sent while we
        were away are lost, so the scheduler looks once for itself.
        """
        backoff = 0.5
        while True:
            try:
                conn = await asyncpg.connect(self.url, timeout=CONNECT_TIMEOUT)
            except Exception as exc:
                self._link.failed(exc, self._location)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            backoff = 0.5
            lost = asyncio.Event()
            try:
                conn.add_termination_listener(_setter(lost))
                await conn.add_listener(CHANNEL, self._woken)
                self._more_work()
                while not lost.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(lost.wait(), LISTEN_CHECK_INTERVAL)
                    if not lost.is_set():
                        # A cut network sends no FIN: ask, with a deadline.
                        await conn.fetchval("SELECT 1", timeout=CONNECT_TIMEOUT)
            except asyncio.CancelledError:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(conn.close(), 2.0)
                raise
            except Exception as exc:
                self._link.failed(exc, self._location)
            conn.terminate()

    def _woken(self, *_args: object) -> None:
        self._more_work()

    # -------------------------------------------------------------- control

    async def set_control(self, key: str, value: str) -> None:
        async def op(conn: Conn) -> None:
            await self._execute(conn, "control_set", key=key, value=value)
            if key == "paused" and value == "0":
                await self._notify(conn)

        await self._run(op)
        if key == "paused" and value == "0":
            self._more_work()

    async def get_control(self, key: str) -> str | None:
        async def op(conn: Conn) -> list[Any]:
            return await self._fetch(conn, "control_get", key=key)

        rows = await self._run(op, transaction=False)
        return str(rows[0][0]) if rows else None

    # ------------------------------------------------------ MTA-STS policies

    async def get_sts_policy(self, domain: str) -> StoredStsPolicy | None:
        async def op(conn: Conn) -> list[Any]:
            return await self._fetch(conn, "sts_policy_get", domain=domain)

        rows = await self._run(op, transaction=False)
        if not rows:
            return None
        policy_id, mode, mx, max_age, fetched_at, expires_at = tuple(rows[0])
        return StoredStsPolicy(
            domain,
            str(policy_id),
            str(mode),
            tuple(line for line in str(mx).split("\n") if line),
            int(max_age),
            float(fetched_at),
            float(expires_at),
        )

    async def put_sts_policy(self, policy: StoredStsPolicy) -> None:
        async def op(conn: Conn) -> None:
            await self._execute(
                conn,
                "sts_policy_put",
                domain=policy.domain,
                policy_id=policy.policy_id,
                mode=policy.mode,
                mx="\n".join(policy.mx),
                max_age=policy.max_age,
                fetched_at=policy.fetched_at,
                expires_at=policy.expires_at,
            )

        await self._run(op, transaction=False)

    # -------------------------------------------------------- AUTH throttle

    async def throttle_update(
        self,
        key: str,
        update: Callable[[ThrottleEntry | None], tuple[ThrottleEntry | None, T]],
        *,
        write: bool = True,
    ) -> T:
        """One transaction under a per-client advisory lock: every host's updates of one
        client are serialised, so a client spread over hosts is counted once."""

        async def op(conn: Conn) -> T:
            if write:
                await self._fetch(conn, "throttle_lock", client=key)
            rows = await self._fetch(conn, "throttle_get", client=key)
            current = (
                None
                if not rows
                else ThrottleEntry(
                    int(rows[0][0]),
                    int(rows[0][1]),
                    float(rows[0][2]),
                    None if rows[0][3] is None else float(rows[0][3]),
                )
            )
            new, result = update(current)
            if write and new != current:
                if new is None:
                    await self._execute(conn, "throttle_delete", client=key)
                else:
                    await self._execute(
                        conn,
                        "throttle_put",
                        client=key,
                        failures=new.failures,
                        in_flight=new.in_flight,
                        last_seen=new.last_seen,
                        blocked_until=new.blocked_until,
                    )
            return result

        return await self._run(op, transaction=write)

    async def throttle_prune(self, now: float, forget_before: float, keep: int) -> int:
        async def op(conn: Conn) -> int:
            stale = await self._execute(
                conn, "throttle_prune_stale", now=now, forget_before=forget_before
            )
            return stale + await self._execute(conn, "throttle_prune_excess", keep=keep)

        return await self._run(op)

    # ------------------------------------------------------------- recovery

    async def recover(self, now: float | None = None, *, files: bool = True) -> RecoveryReport:
        """Expired leases (any host's) and this host's dead processes' leases become due;
        unfinished messages without a body are dropped with a reason.  ``files`` is
        ignored: there are no body files."""
        at = time.time() if now is None else now
        host = socket.gethostname()

        async def leases(conn: Conn) -> tuple[int, list[str]]:
            released = await self._execute(conn, "release_expired", now=at)
            for (owner,) in await self._fetch(conn, "lease_owners"):
                if _owner_is_dead_local(owner, host):
                    released += await self._execute(
                        conn, "release_owner_crashed", owner=owner, now=at
                    )
            if released:
                await self._notify(conn)
            missing = [row[0] for row in await self._fetch(conn, "unfinished_without_body")]
            return released, missing

        released, missing = await self._run(leases)
        self._swept_at = at
        if released:
            self._more_work()
        for qid in missing:
            await self.finalize_message(
                qid,
                Status.DROPPED,
                reason=BODY_MISSING_REASON,
                status_code=BODY_MISSING_STATUS,
                now=at,
            )
        return RecoveryReport(released, 0, 0, 0, tuple(missing))

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
        if not status.is_final:
            raise ValueError(f"{status} is not a final status")
        at = time.time() if now is None else now

        async def op(conn: Conn) -> list[Any]:
            await self._fetch(conn, "lock_message", queue_id=queue_id)
            changed = await self._fetch(
                conn,
                "drop_message_recipients",
                status=status.value,
                now=at,
                reason=reason,
                status_code=status_code or "5.0.0",
                response=reason if response is None else response,
                queue_id=queue_id,
            )
            await self._fetch(conn, "finish_messages", ids=[queue_id], now=at)
            return changed

        changed = await self._run(op)
        keys = (
            "id", "recipient", "notify", "orcpt", "attempts", "last_code", "last_status",
            "last_response", "last_mx",
        )  # fmt: skip
        return [dict(zip(keys, tuple(row), strict=True)) for row in changed]

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
        async def op(conn: Conn) -> list[Any]:
            return await self._fetch(
                conn,
                "list_recipients",
                status=status,
                all_states=status is not None,
                domain=domain,
                sender=sender,
                received_before=received_before,
                limit=limit,
            )

        rows = await self._run(op, transaction=False)
        return [QueueEntry(*tuple(row)) for row in rows]

    async def show_message(self, queue_id: str) -> MessageDetail:
        async def op(conn: Conn) -> tuple[list[Any], list[Any], list[Any]]:
            msg = await self._fetch(conn, "show_message", queue_id=queue_id)
            rcpts = await self._fetch(conn, "show_recipients", queue_id=queue_id)
            attempts = await self._fetch(conn, "show_attempts", queue_id=queue_id)
            return msg, rcpts, attempts

        msg, rcpts, attempts = await self._run(op)
        if not msg:
            raise UnknownMessageError(queue_id)
        m = msg[0]
        history: dict[int, list[AttemptEntry]] = {}
        for row in attempts:
            history.setdefault(row[0], []).append(AttemptEntry(*tuple(row)))
        names = [f for f in RecipientDetail.__dataclass_fields__ if f != "history"]
        recipients = tuple(
            RecipientDetail(
                **dict(zip(names, tuple(row), strict=True)), history=tuple(history.get(row[0], ()))
            )
            for row in rcpts
        )
        return MessageDetail(
            queue_id=m[0],
            mail_from=m[1],
            body_path=None,
            size=m[2],
            received_at=m[3],
            auth_user=m[4],
            client_ip=m[5],
            env_id=m[6],
            ret=m[7],
            smtputf8=bool(m[8]),
            body_8bit=bool(m[9]),
            notes=json.loads(m[10]),
            dsn_of=m[11],
            finished_at=m[12],
            recipients=recipients,
        )

    async def flush(self, queue_ids: Sequence[str], domain: str | None, now: float) -> int:
        async def op(conn: Conn) -> int:
            for qid in queue_ids:
                if not await self._fetch(conn, "message_exists", queue_id=qid):
                    raise UnknownMessageError(qid)
            if queue_ids:
                total = 0
                for qid in queue_ids:
                    total += await self._execute(
                        conn, "flush_message", now=now, queue_id=qid, domain=domain
                    )
            elif domain is not None:
                total = await self._execute(conn, "flush_domain", now=now, domain=domain)
            else:
                total = await self._execute(conn, "flush_all", now=now)
            await self._notify(conn)
            return total

        count = await self._run(op)
        self._more_work()
        return count

    async def message_exists(self, queue_id: str) -> bool:
        async def op(conn: Conn) -> list[Any]:
            return await self._fetch(conn, "message_exists", queue_id=queue_id)

        return bool(await self._run(op, transaction=False))

    async def stats(self, now: float, top: int) -> QueueStats:
        async def op(conn: Conn) -> tuple[list[Any], ...]:
            return (
                await self._fetch(conn, "stats_by_status"),
                await self._fetch(conn, "stats_top_domains", limit=top),
                await self._fetch(conn, "stats_oldest_deferred"),
                await self._fetch(conn, "stats_recent_outcomes", since=now - 3600),
                await self._fetch(conn, "stats_queue_bytes"),
                await self._fetch(conn, "control_get", key="paused"),
            )

        by_status, domains, oldest, recent, size, paused = await self._run(op)
        counts = {s: 0 for s in ("queued", "sending", "deferred")}
        counts.update({row[0]: int(row[1]) for row in by_status})
        last_hour = {o: 0 for o in ("delivered", "deferred", "bounced", "dropped")}
        last_hour.update({row[0]: int(row[1]) for row in recent})
        return QueueStats(
            by_status=counts,
            top_domains=tuple((row[0], int(row[1])) for row in domains),
            oldest_deferred_received_at=oldest[0][0] if oldest else None,
            last_hour=last_hour,
            queue_bytes=int(size[0][0]),
            queued_messages=int(size[0][1]),
            paused=bool(paused) and paused[0][0] == "1",
        )


_MESSAGE_KEYS = (
    "queue_id", "mail_from", "size", "received_at", "auth_user", "client_ip", "env_id", "ret",
    "smtputf8", "body_8bit", "notes", "dsn_of",
)  # fmt: skip
#: Columns of a leased recipient in ``claim``'s rows (message columns follow).
_LEASED_COLUMNS = 15

_RECIPIENT_KEYS = ("queue_id", "recipient", "domain", "notify", "orcpt", "next_attempt_at")
_RECORD_KEYS = (
    "recipient_id", "owner", "attempt", "started_at", "finished_at", "mx_host", "mx_ip", "port",
    "tls", "auth", "code", "status", "response", "outcome", "reason", "tls_policy",
    "tls_policy_met", "new_status", "failure", "next_attempt_at", "last_code", "last_status",
    "last_response", "final_at", "delay_notified",
)  # fmt: skip


def _lease_groups(batch: Sequence[_AcceptJob], params: dict[str, Any]) -> None:
    """``outboundd_accept``'s lease arguments for ``batch``: each recipient's group
    (NULL: not leased) and each group's domain, limit, owner and expiry.  A group
    is what a claim would take as one: a (message, domain), or one recipient
    with ``always_split``; groups are numbered in the batch's order, which is
    the order in which they get a domain's last slots."""
    groups: list[str] = []
    caps: list[int | None] = []
    splits: list[bool] = []
    owners: list[str] = []
    expiries: list[float] = []
    member: list[int | None] = []
    for job in batch:
        lease = job.lease
        if lease is None:
            member.extend(None for _ in job.recipients)
            continue
        numbered: dict[str, int] = {}
        for row in job.recipients:
            domain = row["domain"]
            number = None if lease.always_split else numbered.get(domain)
            if number is None:
                groups.append(domain)
                caps.append(lease.domain_room)
                splits.append(lease.always_split)
                owners.append(lease.owner)
                expiries.append(job.expires)
                number = numbered[domain] = len(groups)  # 1-based, as SQL arrays
            member.append(number)
    params.update(
        r_group=member, g_domain=groups, g_cap=caps, g_split=splits, g_owner=owners,
        g_expires=expiries,
    )  # fmt: skip


def _record_row(rec: AttemptRecord, owner: str, attempt: int) -> dict[str, Any]:
    """One recipient's attempt row and new state, as ``outboundd_record`` takes them."""
    final = rec.outcome is not Outcome.DEFERRED
    code, status, response = rec.code, rec.status, rec.response
    if rec.final_response is not None:  # our decision, not the reply, is the row's last word
        code, status, response = None, rec.final_status, rec.final_response
    return {
        "recipient_id": rec.recipient_id,
        "owner": owner,
        "attempt": attempt,
        "started_at": rec.started_at,
        "finished_at": rec.finished_at,
        "mx_host": rec.mx_host,
        "mx_ip": rec.mx_ip,
        "port": rec.port,
        "tls": rec.tls,
        "auth": rec.auth,
        "code": rec.code,
        "status": rec.status,
        "response": rec.response,
        "outcome": rec.outcome.value,
        "reason": rec.reason,
        "tls_policy": rec.tls_policy,
        "tls_policy_met": None if rec.tls_policy_met is None else int(rec.tls_policy_met),
        "new_status": rec.outcome.status.value,
        "failure": int(rec.outcome is Outcome.DEFERRED and rec.count_failure),
        "next_attempt_at": rec.finished_at if final else rec.next_attempt_at,
        "last_code": code,
        "last_status": status,
        "last_response": response,
        "final_at": rec.finished_at if final else None,
        "delay_notified": int(rec.delay_notified),
    }


async def _keep_session(conn: asyncpg.Connection[Any]) -> None:
    """The pool's reset on release: nothing to send.

    asyncpg's default reset sends ``SELECT pg_advisory_unlock_all(); CLOSE
    ALL; UNLISTEN *; RESET ALL`` every time a connection goes back to the
    pool: one more round trip per accept batch, claim and record batch.
    The spool leaves no session state behind: its advisory locks are
    transaction-scoped (the migration lock is unlocked explicitly), it
    opens no cursors, sets no session settings, and LISTENs on its own
    connection outside the pool.  asyncpg still rolls back a transaction
    left open before calling this.
    """


def _split_leased(leased: Sequence[Any]) -> tuple[list[Any], list[Any]]:
    """``claim``'s rows split into recipient rows and one row per message.

    The message columns repeat on every leased row of a message; the body
    comes only on one of them (NULL on the others), so the message's row is
    taken from that one.
    """
    rows: list[Any] = []
    messages: dict[str, tuple[Any, ...]] = {}
    for row in leased:
        values = tuple(row)
        rows.append(values[:_LEASED_COLUMNS])
        message = values[_LEASED_COLUMNS:-1]  # the last column is next_due
        if message[-1] is not None or message[0] not in messages:
            messages[message[0]] = message
    return rows, list(messages.values())


def _claims(
    rows: Sequence[Any],
    messages: Sequence[Any],
    owner: str,
    expires: float,
    *,
    always_split: bool,
) -> list[Claim]:
    """Claims from leased recipient rows and their messages' rows (bodies included)."""
    by_id = {m[0]: m for m in messages}
    groups: dict[Any, list[Any]] = {}
    for row in rows:
        key = row[0] if always_split else (row[1], row[2])
        groups.setdefault(key, []).append(row)
    claims: list[Claim] = []
    for group in groups.values():
        group.sort(key=lambda r: r[0])
        m = by_id[group[0][1]]
        claims.append(
            Claim(
                queue_id=m[0],
                domain=group[0][2],
                mail_from=m[1],
                body_path=None,
                size=m[2],
                received_at=m[3],
                auth_user=m[4],
                env_id=m[5],
                ret=m[6],
                smtputf8=bool(m[7]),
                body_8bit=bool(m[8]),
                notes=json.loads(m[9]),
                dsn_of=m[10],
                recipients=tuple(claimed_recipient(r) for r in group),
                lease_owner=owner,
                lease_expires_at=expires,
                body=None if m[11] is None else bytes(m[11]),
            )
        )
    claims.sort(key=lambda c: (c.received_at, c.queue_id, c.domain))
    return claims


def _setter(event: asyncio.Event) -> Callable[[object], None]:
    """A termination callback that sets ``event``."""
    return lambda _conn: event.set()


def _rowcount(status: str) -> int:
    """The row count from a command tag ("UPDATE 3", "INSERT 0 1", "DELETE 0")."""
    last = status.rpartition(" ")[2]
    return int(last) if last.isdigit() else 0


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


def _fail(future: asyncio.Future[Any], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


def _write_error(exc: BaseException) -> BaseException:
    if isinstance(exc, SpoolWriteError):
        return exc
    return SpoolWriteError(f"cannot queue message: {describe(exc)}")


__all__ = ["PostgresSpool", "Statement"]
