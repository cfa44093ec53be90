"""What a spool backend must do: the operations, not the SQL.

Two backends implement :class:`Spool`: SQLite with body files
(:mod:`outboundd.spool.core`, the embedded default) and PostgreSQL with
bodies in the database (:mod:`outboundd.spool.postgres`, for many hosts on
one queue).  :func:`open` is the one place that chooses between them, from
``outbound.ini queue_url``; nothing outside ``spool/`` knows which runs.
The contract tests (``tests/test_spool_contract.py``) run against both and
are the definition of what a backend must do.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from outboundd.spool.queueid import new_queue_id as _new_queue_id
from outboundd.spool.types import (
    AttemptRecord,
    Claim,
    Lease,
    MessageDetail,
    NewMessage,
    QueueEntry,
    QueueStats,
    RecordResult,
    RecoveryReport,
    SpoolCounters,
    Status,
    StoredStsPolicy,
    ThrottleEntry,
)

T = TypeVar("T")
J = TypeVar("J")


@dataclass
class WriterStop:
    """Put on a writer's queue to stop it once the jobs before it are committed."""

    done: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


async def group_commit_loop(
    queue: asyncio.Queue[J | WriterStop],
    commit: Callable[[list[J]], Awaitable[None]],
    max_batch: int,
    *,
    gather: float = 0.0,
) -> None:
    """Group commit: every job waiting (up to ``max_batch``) goes to one ``commit``.

    With ``gather`` the first job of a batch waits that many seconds for
    others to join it (unless a full batch is already waiting): fewer,
    larger commits where each costs a fixed price, for that much more
    latency.  A stop queued meanwhile is seen after the wait, so stopping
    takes at most ``gather`` longer.

    Runs until a :class:`WriterStop` comes; the jobs queued before it are
    committed first, then its ``done`` is set.
    """
    while True:
        item = await queue.get()
        if isinstance(item, WriterStop):
            item.done.set_result(None)
            return
        if gather > 0 and queue.qsize() < max_batch - 1:
            await asyncio.sleep(gather)
        batch = [item]
        stop: WriterStop | None = None
        while len(batch) < max_batch:
            try:
                nxt = queue.get_nowait()
            except asyncio.QueueEmpty:
                break
            if isinstance(nxt, WriterStop):
                stop = nxt
                break
            batch.append(nxt)
        await commit(batch)
        if stop is not None:
            stop.done.set_result(None)
            return


#: ``queue_url`` schemes that select the PostgreSQL backend.
POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def describe_location(location: str | Path) -> str:
    """``location`` fit for a log line: a URL's password is never shown."""
    text = str(location)
    if not is_postgres_url(location):
        return text
    scheme, _, rest = text.partition("://")
    userinfo, at, hostpart = rest.rpartition("@")
    if at and ":" in userinfo:
        rest = userinfo.partition(":")[0] + ":***@" + hostpart
    return f"{scheme}://{rest}"


def is_postgres_url(location: str | Path | None) -> bool:
    """True when ``location`` names a PostgreSQL queue rather than a queue directory."""
    return isinstance(location, str) and location.startswith(POSTGRES_SCHEMES)


class Spool(abc.ABC):
    """The durable queue, whichever backend holds it.  Create with :func:`open`.

    ``new_work`` is set whenever new work may be due (an accept, a flush, a
    release, or, on PostgreSQL, another host's NOTIFY): the scheduler waits
    on it instead of polling.
    """

    new_work: asyncio.Event
    recovery: RecoveryReport | None
    #: How long the scheduler may hold back a claim, after one that took less
    #: than it asked for, to let more slots free up (0: claim at once).  A
    #: backend whose every claim costs a fixed price (a server call) sets it,
    #: so that a domain at its limit is refilled a few slots a claim instead
    #: of one.
    claim_gather: float = 0.0

    @staticmethod
    async def open(
        location: str | Path,
        *,
        recover: bool = True,
        recover_files: bool = True,
        create: bool = True,
        wait: bool = False,
    ) -> Spool:
        """Open the queue at ``location``: a directory (SQLite) or a ``postgresql://`` URL.

        ``create=False`` refuses, in words, a SQLite queue that does not exist
        yet (``outboundctl`` must not make a second queue from a typo).
        ``wait=True`` waits, with back-off, for a database server that cannot
        be reached yet (the daemon); otherwise that is an error at once.
        """
        if is_postgres_url(location):
            from outboundd.spool.postgres import PostgresSpool

            return await PostgresSpool.open(str(location), recover=recover, wait=wait)
        from outboundd.spool.core import SqliteSpool

        return await SqliteSpool.open(
            Path(location), recover=recover, recover_files=recover_files, create=create
        )

    # ------------------------------------------------------------------ life

    @property
    @abc.abstractmethod
    def location(self) -> str:
        """Where the queue lives, for logs (a directory, or the URL without a password)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Finish queued work and release the connection(s)."""

    async def __aenter__(self) -> Spool:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    @abc.abstractmethod
    def counters(self) -> SpoolCounters: ...

    #: A new queue ID (:func:`outboundd.spool.queueid.new_queue_id`), the
    #: function itself: no method call around it, one per accepted message.
    new_queue_id = staticmethod(_new_queue_id)

    # ------------------------------------------------------- the hot paths

    @abc.abstractmethod
    async def accept(self, message: NewMessage, *, queue_id: str | None = None) -> str:
        """Store ``message`` durably (body and rows committed) and return its queue ID.

        Raises :class:`~outboundd.spool.errors.SpoolWriteError` (nothing kept)
        when it cannot; submission then answers ``451 4.3.0``.
        """

    def start_accept(
        self, message: NewMessage, *, queue_id: str | None = None
    ) -> asyncio.Future[str]:
        """:meth:`accept` under way: a future of the queue ID (or of its error).

        For callers that answer from a callback rather than await (the SMTP
        session).  This default runs :meth:`accept` in a task; a backend
        may do without one.  Must be called on the running event loop.
        """
        return asyncio.ensure_future(self.accept(message, queue_id=queue_id))

    @abc.abstractmethod
    async def accept_leased(
        self, message: NewMessage, lease: Lease, *, queue_id: str | None = None
    ) -> tuple[str, list[Claim]]:
        """:meth:`accept`, leasing recipients to ``lease.owner`` in the same commit.

        Returns the claims it leased.  A backend may lease none (PostgreSQL
        does, so that per-domain limits are counted across hosts by
        :meth:`claim`); recipients not returned are due and wake ``new_work``.
        """

    @abc.abstractmethod
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
        """Lease up to ``limit`` due (queue_id, domain) groups for ``owner``.

        ``domain_room`` caps the groups of one domain leased at once
        (``room`` lowers it for some domains).  A shared backend counts the
        groups every host holds against ``domain_room``.
        """

    @abc.abstractmethod
    async def record(
        self,
        owner: str,
        claim: Claim,
        records: Sequence[AttemptRecord],
        *,
        now: float | None = None,
    ) -> RecordResult:
        """Write attempt rows and new states; a state changes only under ``owner``'s lease.

        A message the record finishes has its body deleted: PostgreSQL in the
        record's own transaction; SQLite's body file is unlinked moments after
        the commit on the spool's removal thread (an unlink can wait for the
        journal, and the batch's results should not), and by ``close()`` at
        the latest; a crash in between leaves a file recovery removes.
        """

    @abc.abstractmethod
    async def release(
        self, owner: str, recipient_ids: Iterable[int], *, next_attempt_at: float | None = None
    ) -> int:
        """Give leases back without an attempt; optionally postpone them."""

    @abc.abstractmethod
    async def release_owner(self, owner: str) -> int:
        """Give back every lease ``owner`` holds (shutdown)."""

    @abc.abstractmethod
    async def renew_leases(self, owner: str, until: float) -> int: ...

    @abc.abstractmethod
    async def next_due_at(self) -> float | None:
        """The earliest ``next_attempt_at`` among waiting recipients, if any."""

    @abc.abstractmethod
    async def read_body(self, queue_id: str) -> bytes:
        """The message body as stored (CRLF, not dot-stuffed).

        Raises :class:`~outboundd.spool.errors.SpoolError` when it is gone.
        """

    # -------------------------------------------------------------- control

    @abc.abstractmethod
    async def set_control(self, key: str, value: str) -> None: ...

    @abc.abstractmethod
    async def get_control(self, key: str) -> str | None: ...

    async def set_paused(self, paused: bool) -> None:
        await self.set_control("paused", "1" if paused else "0")
        if not paused:
            self.new_work.set()

    async def is_paused(self) -> bool:
        return await self.get_control("paused") == "1"

    # ------------------------------------------------------ MTA-STS policies

    @abc.abstractmethod
    async def get_sts_policy(self, domain: str) -> StoredStsPolicy | None:
        """The cached MTA-STS policy of ``domain`` (lower-case), if any."""

    @abc.abstractmethod
    async def put_sts_policy(self, policy: StoredStsPolicy) -> None:
        """Store (or replace) ``policy.domain``'s cached MTA-STS policy (shared by every
        process, and on a shared backend every host)."""

    # -------------------------------------------------------- AUTH throttle

    @abc.abstractmethod
    async def throttle_update(
        self,
        key: str,
        update: Callable[[ThrottleEntry | None], tuple[ThrottleEntry | None, T]],
        *,
        write: bool = True,
    ) -> T:
        """Read ``key``'s AUTH throttle entry and store what ``update`` makes of it.

        Every process (every host, on a shared backend) sees one entry per
        key: updates of one key are serialised.  ``update`` must be pure.
        """

    @abc.abstractmethod
    async def throttle_prune(self, now: float, forget_before: float, keep: int) -> int: ...

    # ------------------------------------------------------------- recovery

    @abc.abstractmethod
    async def recover(self, now: float | None = None, *, files: bool = True) -> RecoveryReport:
        """Make expired leases (and those of dead local processes) due again."""

    @abc.abstractmethod
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
        """Put every unfinished recipient of ``queue_id`` into the final ``status``."""

    # ---------------------------------------------------------- admin reads

    @abc.abstractmethod
    async def list_queue(
        self,
        *,
        status: str | None,
        domain: str | None,
        sender: str | None,
        received_before: float | None,
        limit: int | None,
    ) -> list[QueueEntry]: ...

    @abc.abstractmethod
    async def show_message(self, queue_id: str) -> MessageDetail: ...

    @abc.abstractmethod
    async def flush(self, queue_ids: Sequence[str], domain: str | None, now: float) -> int: ...

    @abc.abstractmethod
    async def message_exists(self, queue_id: str) -> bool: ...

    @abc.abstractmethod
    async def stats(self, now: float, top: int) -> QueueStats: ...
