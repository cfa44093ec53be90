"""The scheduler: claims due work from the spool and runs deliveries.

It runs at most ``concurrency_max`` deliveries at once and at most
``domain_concurrency_max`` to one domain, so one slow destination cannot take
every slot.  It does not poll for new mail: ``Spool.accept`` sets
``spool.new_work`` and the scheduler claims at once.  It does wake at least
every ``poll_interval`` seconds, which is how it notices work made due by
another process (``outboundctl flush``, a separate submission process) and
a change of ``disabled`` or ``outboundctl pause``.  On a spool whose claims
cost a server call (``spool.claim_gather``), a claim that took less than it
had room for makes the next one wait for a few slots to free up.

Leases are renewed while a delivery runs, so a lease only expires when its
holder died; then another scheduler (or this one after a restart) retries it.

A spool that cannot be written (a full disk, a database error, a PostgreSQL
queue that cannot be reached) is a state to wait out, not a reason to die:
the scheduler stops claiming, backs off
(1 s doubling to 30 s), logs once per minute while it lasts and once when it
is over, and the deliveries already running carry on and record their
results (the spool keeps space back for that, see ``spool/reserve.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from outboundd.spool import Claim, Lease, Spool, SpoolError, SpoolFullError


class SchedulerSettings(Protocol):
    """The part of ``OutboundConfig`` the scheduler reads (re-read every loop)."""

    @property
    def disabled(self) -> bool: ...
    @property
    def concurrency_max(self) -> int: ...
    @property
    def domain_concurrency_max(self) -> int: ...
    @property
    def always_split(self) -> bool: ...
    @property
    def lease_seconds(self) -> float: ...


class Reporter(Protocol):
    def error(self, message: str, /, **fields: object) -> None: ...
    def warn(self, message: str, /, **fields: object) -> None: ...
    def notice(self, message: str, /, **fields: object) -> None: ...
    def info(self, message: str, /, **fields: object) -> None: ...


DeliverFunction = Callable[[Claim], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Reservation:
    """Delivery slots promised to one message being accepted (see Scheduler.reserve)."""

    lease: Lease
    domains: Counter[str]


#: How long a failed delivery task's recipients wait before they are retried.
CRASH_RETRY_SECONDS = 60.0
#: Back-off while the spool cannot be written: the first wait, and the longest.
SPOOL_RETRY_FIRST = 1.0
SPOOL_RETRY_MAX = 30.0
#: While the spool stays unwritable, how often it is logged again.
SPOOL_TROUBLE_LOG_INTERVAL = 60.0
#: Once the earliest retry is due, a claim also takes work due up to this many
#: seconds later.  The groups of one message (one per domain) are recorded a
#: few milliseconds apart, so their next attempts fall that far apart too;
#: claimed together they run as one delivery round, and failures that end in
#: it share one DSN (rounds.py).  Work is at most this much early, which no
#: retry schedule notices.
ROUND_WINDOW = 1.0
#: After a claim that took less than it asked for, the next one waits (up to
#: ``spool.claim_gather``) until this share of ``domain_concurrency_max``'s
#: slots is free again: 4 is a quarter.
GATHER_SHARE = 4


class Scheduler:
    def __init__(
        self,
        spool: Spool,
        settings: Callable[[], SchedulerSettings],
        deliver: DeliverFunction,
        *,
        owner: str,
        log: Reporter,
        poll_interval: float = 0.5,
    ) -> None:
        self.spool = spool
        self.settings = settings
        self.deliver = deliver
        self.owner = owner
        self.log = log
        self.poll_interval = poll_interval
        self._active: set[asyncio.Task[None]] = set()
        self._per_domain: Counter[str] = Counter()
        #: Slots promised to messages being accepted in this process (see reserve()).
        self._reserved: Counter[str] = Counter()
        self._stopping = False
        self._stopped = asyncio.Event()
        #: Set while the claim loop is not inside a step (a claim in flight
        #: commits after it), so stop() gives back leases only after that.
        self._loop_idle = asyncio.Event()
        self._loop_idle.set()
        #: Spool trouble: when it began (monotonic, None: none), last logged, next wait.
        self._trouble_since: float | None = None
        self._trouble_logged = float("-inf")
        self._trouble_wait = SPOOL_RETRY_FIRST
        self._paused_cache: tuple[float, bool] = (0.0, False)
        #: When a claim that skipped busy domains last found nothing (monotonic).
        self._found_none_but_excluded = float("-inf")
        #: The earliest next attempt the last empty claim saw (None: unknown).
        self._due_at: float | None = None
        self.started = 0
        #: Deliveries ended so far, and (when, how many then) after a short claim.
        self._ended = 0
        self._short: tuple[float, int] | None = None

    @property
    def active(self) -> int:
        return len(self._active)

    # --------------------------------------------------- work from this process

    def reserve(self, domains: Sequence[str]) -> Reservation | None:
        """Promise slots to a message about to be accepted here, or None.

        ``domains`` has one entry per delivery the message will need (its
        domains, or each recipient's with ``always_split``).  With a
        reservation the message is accepted already leased to this
        scheduler (:meth:`Spool.accept_leased`) and :meth:`adopt` starts its
        deliveries at once, with no claim transaction.  None (delivery off,
        paused, or no free slot within ``concurrency_max`` and
        ``domain_concurrency_max``) leaves it to the usual claim.
        """
        if self._stopping or not domains:
            return None
        settings = self.settings()
        if settings.disabled or self._paused_cache[1]:
            return None
        wanted = Counter(domains)
        if self._in_use() + len(domains) > settings.concurrency_max:
            return None
        cap = settings.domain_concurrency_max
        # The wanted domains' counts only: _busy() would build a Counter of
        # every busy domain, once per message accepted.
        running, reserved = self._per_domain, self._reserved
        if any(running[d] + reserved[d] + n > cap for d, n in wanted.items()):
            return None
        reserved.update(wanted)
        lease = Lease(self.owner, settings.lease_seconds, settings.always_split, domain_room=cap)
        return Reservation(lease, wanted)

    def adopt(self, reservation: Reservation, claims: Sequence[Claim]) -> None:
        """Start the deliveries of a message accepted with ``reservation``."""
        self.cancel(reservation)
        for claim in claims:
            self._start(claim)

    def cancel(self, reservation: Reservation) -> None:
        """Give back a reservation whose message was not accepted."""
        # Only the reservation's domains change; no count is kept at zero
        # (a whole new Counter per message, as `+counter` makes, is not needed).
        reserved = self._reserved
        for domain, n in reservation.domains.items():
            left = reserved[domain] - n
            if left > 0:
                reserved[domain] = left
            else:
                reserved.pop(domain, None)

    def _in_use(self) -> int:
        """Delivery slots taken: running deliveries and reservations."""
        return len(self._active) + self._reserved.total()

    def _busy(self) -> Counter[str]:
        """Per domain, the slots taken by running deliveries and reservations."""
        return self._per_domain + self._reserved

    async def run(self) -> None:
        """Claim and start deliveries until :meth:`stop` is called."""
        if self._stopping:
            return
        self._loop_idle.clear()
        renewer = asyncio.create_task(self._renew_leases(), name="lease-renewer")
        try:
            while not self._stopping:
                try:
                    await self._step()
                except SpoolError as exc:
                    await self._spool_trouble(exc)
                else:
                    self._spool_recovered()
        finally:
            self._loop_idle.set()
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer

    async def _step(self) -> None:
        # Clear first, then look: whatever happens from here on (an accept, a
        # flush, a finished delivery) sets it again and ends the wait below.
        self.spool.new_work.clear()
        settings = self.settings()
        if settings.disabled or await self._paused():
            await self._wait(self.poll_interval)
            return
        free = settings.concurrency_max - self._in_use()
        if free <= 0:
            await self._wait(self.poll_interval)
            return
        cap = settings.domain_concurrency_max
        if await self._gathering(cap):
            return
        # Per domain, only what domain_concurrency_max leaves: no lease is taken
        # that would have to be given straight back.
        room = {d: cap - n for d, n in self._busy().items()}
        exclude = sorted(d for d, n in room.items() if n <= 0)
        if exclude and time.monotonic() - self._found_none_but_excluded < self.poll_interval:
            # A claim that must skip the rows of busy domains scans past all of
            # them (a backlog of 100,000 for one domain: every row).  When one
            # found nothing else lately, look again only after poll_interval.
            await self._wait(self.poll_interval)
            return
        at = time.time()
        if self._due_at is not None and at >= self._due_at:
            # A retry came due: take its siblings due a moment later with it.
            # (Not on every wake: a wake just before one sibling's window
            # would split the round it is meant to keep together.)
            at += ROUND_WINDOW
        claims = await self.spool.claim(
            self.owner,
            now=at,
            limit=free,
            lease_seconds=settings.lease_seconds,
            always_split=settings.always_split,
            exclude_domains=exclude,
            domain_room=cap,
            room=room,
        )
        if self._stopping and claims:
            # stop() began while the claim ran: start nothing, give it all back.
            await self.spool.release(self.owner, [r.id for c in claims for r in c.recipients])
            return
        if exclude and not claims:
            self._found_none_but_excluded = time.monotonic()
        excess: list[int] = []
        for claim in claims:
            # A reservation made while the claim ran may have taken the room.
            if self._busy()[claim.domain] >= cap:
                excess.extend(r.id for r in claim.recipients)
                continue
            self._start(claim)
        if excess:
            await self.spool.release(self.owner, excess)
        if claims:
            if len(claims) < min(free, cap) and self.spool.claim_gather > 0:
                self._short = (time.monotonic(), self._ended)
            return  # more may be due: claim again (straight away unless short)
        due = self._due_at = await self.spool.next_due_at()
        now = time.time()
        if due is None or due <= now:
            timeout = self.poll_interval
        else:
            timeout = min(due - now, self.poll_interval)
        await self._wait(timeout)

    async def _gathering(self, cap: int) -> bool:
        """After a short claim, wait for slots to free up before the next: True if it waited.

        A claim that leased fewer groups than it had room for (``free`` and
        ``domain_concurrency_max`` allowing) found the due work's domains full,
        or little due; claiming again as each delivery ends would lease one
        group a claim.  Instead the next claim waits until a share of a
        domain's slots (``GATHER_SHARE``) is free again, or
        ``spool.claim_gather`` seconds passed, whichever comes first.  New
        work meanwhile waits as long, at most.
        """
        if self._short is None:
            return False
        since, ended = self._short
        left = self.spool.claim_gather - (time.monotonic() - since)
        if self._ended - ended >= max(1, cap // GATHER_SHARE) or left <= 0:
            self._short = None
            return False
        await self._wait(left)
        return True

    async def _spool_trouble(self, exc: SpoolError) -> None:
        """Log (once per interval) that the spool cannot be written; back off."""
        now = time.monotonic()
        if self._trouble_since is None:
            self._trouble_since = now
        if now - self._trouble_logged >= SPOOL_TROUBLE_LOG_INTERVAL:
            self._trouble_logged = now
            what = "queue disk full" if isinstance(exc, SpoolFullError) else "queue unwritable"
            self.log.warn(
                f"{what}; not claiming new work, running deliveries go on",
                error=str(exc),
                retry_in=self._trouble_wait,
                running=len(self._active),
            )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopped.wait(), self._trouble_wait)
        self._trouble_wait = min(self._trouble_wait * 2, SPOOL_RETRY_MAX)

    def _spool_recovered(self) -> None:
        if self._trouble_since is None:
            return
        self.log.notice(
            "queue writable again; claiming", after=round(time.monotonic() - self._trouble_since)
        )
        self._trouble_since = None
        self._trouble_logged = float("-inf")
        self._trouble_wait = SPOOL_RETRY_FIRST

    def _start(self, claim: Claim) -> None:
        self._per_domain[claim.domain] += 1
        self.started += 1
        task = asyncio.create_task(self._run_one(claim), name=f"deliver-{claim.queue_id}")
        self._active.add(task)

    async def _run_one(self, claim: Claim) -> None:
        try:
            await self.deliver(claim)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # A bug in delivery must not strand or lose the recipients: give
            # them back, due again in a minute, and say what happened.
            self.log.error(
                "delivery failed unexpectedly; recipients will be retried",
                qid=claim.queue_id,
                domain=claim.domain,
                error=f"{type(exc).__name__}: {exc}",
            )
            with contextlib.suppress(Exception):
                await self.spool.release(
                    self.owner,
                    [r.id for r in claim.recipients],
                    next_attempt_at=time.time() + CRASH_RETRY_SECONDS,
                )
        finally:
            task = asyncio.current_task()
            if task is not None:
                self._active.discard(task)
            self._per_domain[claim.domain] -= 1
            self._ended += 1
            if self._per_domain[claim.domain] <= 0:
                del self._per_domain[claim.domain]
            self.spool.new_work.set()

    async def _wait(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.spool.new_work.wait(), timeout)

    async def _paused(self) -> bool:
        checked_at, paused = self._paused_cache
        now = time.monotonic()
        if now - checked_at >= self.poll_interval:
            paused = await self.spool.is_paused()
            self._paused_cache = (now, paused)
        return paused

    async def _renew_leases(self) -> None:
        while True:
            lease = self.settings().lease_seconds
            await asyncio.sleep(max(lease / 3, 0.05))
            if self._active:
                # A failed renewal is tried again next round; the lease still
                # runs for two more rounds (the run loop reports the trouble).
                with contextlib.suppress(SpoolError):
                    await self.spool.renew_leases(self.owner, time.time() + lease)

    async def stop(self, grace: float) -> None:
        """Stop claiming, let running deliveries finish for up to ``grace``
        seconds, cancel the rest, and give back every lease still held."""
        self._stopping = True
        self._stopped.set()
        self.spool.new_work.set()
        # A step in progress may be awaiting a claim that commits later:
        # its leases must be given back (by it, or below), never left behind.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._loop_idle.wait(), grace)
        if self._active:
            _, pending = await asyncio.wait(set(self._active), timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
        try:
            released = await self.spool.release_owner(self.owner)
        except SpoolError as exc:
            self.log.warn(
                "cannot release leases at shutdown; they expire after lease_seconds",
                error=str(exc),
            )
            return
        if released:
            self.log.info("released leases at shutdown", count=released)
