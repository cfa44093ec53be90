"""Reusing open SMTP connections across messages to the same host.

Opening a connection costs a TCP handshake, the greeting, EHLO and often a
TLS handshake; a queue full of mail for one provider pays that once per
connection instead of once per message.  A connection goes back to the pool
only when its last transaction ended cleanly (:attr:`Connection.usable`);
the next transaction on it starts with RSET if the server needs one.  Idle
connections are closed after ``idle_timeout`` seconds, and at most
``max_idle_per_host`` are kept per target; ``idle_timeout`` 0 keeps none.
Every connection the pool closes is closed politely, with QUIT (RFC 5321
§4.1.1.10), bounded by the session's ``quit_timeout``.

The limits on connections.  ``concurrency_max`` and
``domain_concurrency_max`` are limits on SMTP connections, and providers
that cap connections per client answer the extras with 421, so a kept
idle connection counts against them until it is closed.  The scheduler
runs at most that many deliveries, each using at most one connection at a
time; a delivery that must open a new connection while the connections
already open would reach a limit first closes idle ones (the oldest of its
domain, or any for ``concurrency_max``), and when none is idle, waits for
one being closed.  A delivery works through a :class:`Lane`
(:meth:`ConnectionPool.lane`), which names its domain and the limits;
a connection counts against the domain of the delivery that last used it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass

from outboundd.delivery.session import Connection, SessionSettings, Target

PoolKey = tuple[object, ...]


def pool_key(target: Target, settings: SessionSettings) -> PoolKey:
    """Connections are interchangeable only when everything that shaped them matches."""
    mx = target.mx
    return (
        target.address,
        target.port,
        target.hostname,
        mx.bind,
        mx.bind_helo,
        mx.auth_user,
        mx.auth_pass,
        mx.using_lmtp,
        settings.helo,
        settings.enable_tls,
        target.tls_policy,
    )


@dataclass(frozen=True, slots=True)
class Limits:
    """Connections open at once: in all (``concurrency_max``) and to one domain."""

    total: int
    per_domain: int


@dataclass(slots=True)
class _Idle:
    conn: Connection
    since: float


class ConnectionPool:
    """Idle connections by target, and the count of every open connection.

    Used directly (tests, tools) it has no domain and no limits; the
    delivery engine uses one :meth:`lane` per delivery.
    """

    def __init__(
        self,
        *,
        idle_timeout: float = 10.0,
        max_idle_per_host: int = 4,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.idle_timeout = idle_timeout
        self.max_idle_per_host = max_idle_per_host
        self.clock = clock
        self._idle: dict[PoolKey, list[_Idle]] = defaultdict(list)
        self._reaper: asyncio.Task[None] | None = None
        #: Connections open or being opened, per domain they count against.
        self._open: Counter[str] = Counter()
        self._open_total = 0
        self._domain_of: dict[Connection, str] = {}
        #: Set (and replaced) whenever a connection closes: wakes waiters for room.
        self._closed = asyncio.Event()
        self.opened = 0
        self.reused = 0

    def lane(self, domain: str, limits: Limits | None) -> Lane:
        """The pool as one delivery to ``domain`` uses it."""
        return Lane(self, domain, limits)

    # -- the ConnectionSource interface, without a domain or limits ------------

    async def take(self, target: Target, settings: SessionSettings) -> Connection | None:
        return await self._take(target, settings, "")

    async def open(self, target: Target, settings: SessionSettings) -> Connection:
        return await self._open_new(target, settings, "", None)

    async def give_back(self, conn: Connection, settings: SessionSettings) -> None:
        """Keep ``conn`` for the next message to its host, or close it (QUIT)."""
        if self.idle_timeout <= 0 or self.max_idle_per_host <= 0 or not conn.usable:
            await conn.close()
            return
        entries = self._idle[pool_key(conn.target, settings)]
        if len(entries) >= self.max_idle_per_host:
            await conn.close()
            return
        entries.append(_Idle(conn, self.clock()))
        self._ensure_reaper()

    # -- taking and opening ------------------------------------------------------

    async def _take(
        self, target: Target, settings: SessionSettings, domain: str
    ) -> Connection | None:
        """An idle, still-usable connection to ``target``, or None.

        Kept connections found expired on the way (the reaper had not come
        round yet) are closed with QUIT.
        """
        key = pool_key(target, settings)
        # Looked up again after every await: the reaper may have replaced the list.
        while entries := self._idle.get(key):
            entry = entries.pop()
            if entry.conn.usable and self.clock() - entry.since < self.idle_timeout:
                self._count_against(entry.conn, domain)
                self.reused += 1
                return entry.conn
            await entry.conn.close()
        return None

    async def _open_new(
        self, target: Target, settings: SessionSettings, domain: str, limits: Limits | None
    ) -> Connection:
        if limits is not None:
            await self._make_room(domain, limits, settings.quit_timeout)
        # Counted from before the connect: a connection being opened is one
        # the remote already sees.
        self._open[domain] += 1
        self._open_total += 1
        try:
            conn = await Connection.open(target, settings)
        except BaseException:
            self._uncount(domain)
            raise
        self._domain_of[conn] = domain
        conn.on_closed(self._on_closed)
        self.opened += 1
        return conn

    def _count_against(self, conn: Connection, domain: str) -> None:
        old = self._domain_of.get(conn)
        if old is None or old == domain:
            return
        self._domain_of[conn] = domain
        self._open[old] -= 1
        if self._open[old] <= 0:
            del self._open[old]
        self._open[domain] += 1

    def _on_closed(self, conn: Connection) -> None:
        domain = self._domain_of.pop(conn, None)
        if domain is not None:
            self._uncount(domain)

    def _uncount(self, domain: str) -> None:
        self._open[domain] -= 1
        if self._open[domain] <= 0:
            del self._open[domain]
        self._open_total -= 1
        self._closed.set()
        self._closed = asyncio.Event()

    async def _make_room(self, domain: str, limits: Limits, wait: float) -> None:
        """Close idle connections until one more fits within ``limits``.

        With none idle, the connections over the limit are being closed
        (their QUIT is bounded by ``quit_timeout``): wait for them, at
        most ``wait`` seconds each time, then go on regardless — a wait
        here must never hold a delivery for long.
        """
        while True:
            over_domain = self._open[domain] >= limits.per_domain
            if not over_domain and self._open_total < limits.total:
                return
            victim = self._oldest_idle(domain if over_domain else None)
            if victim is not None:
                await victim.close()
                continue
            closed = self._closed
            try:
                async with asyncio.timeout(wait):
                    await closed.wait()
            except TimeoutError:
                return

    def _oldest_idle(self, domain: str | None) -> Connection | None:
        """Remove and return the longest-idle connection (of ``domain``, if given)."""
        best: tuple[float, PoolKey, _Idle] | None = None
        for key, entries in self._idle.items():
            for entry in entries:
                if domain is not None and self._domain_of.get(entry.conn) != domain:
                    continue
                if best is None or entry.since < best[0]:
                    best = (entry.since, key, entry)
        if best is None:
            return None
        self._idle[best[1]].remove(best[2])
        return best[2].conn

    # -- expiry --------------------------------------------------------------------

    def _ensure_reaper(self) -> None:
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.create_task(self._reap(), name="smtp-pool-reaper")

    async def _reap(self) -> None:
        while any(self._idle.values()):
            await asyncio.sleep(max(self.idle_timeout / 2, 0.05))
            now = self.clock()
            expired: list[Connection] = []
            for key, entries in list(self._idle.items()):
                keep = []
                for entry in entries:
                    if now - entry.since >= self.idle_timeout or not entry.conn.usable:
                        expired.append(entry.conn)
                    else:
                        keep.append(entry)
                if keep:
                    self._idle[key] = keep
                else:
                    del self._idle[key]
            # Out of the idle lists first, so nobody takes one while its QUIT runs.
            await asyncio.gather(*(conn.close() for conn in expired), return_exceptions=True)

    @property
    def idle(self) -> int:
        return sum(len(v) for v in self._idle.values())

    @property
    def open_connections(self) -> int:
        """Connections open now: in use, idle, or being opened or closed."""
        return self._open_total

    async def close(self) -> None:
        """QUIT every idle connection (shutdown)."""
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        entries = [e for v in self._idle.values() for e in v]
        self._idle.clear()
        await asyncio.gather(*(e.conn.close() for e in entries), return_exceptions=True)


class Lane:
    """One delivery's view of the pool: its domain and the limits it must keep."""

    __slots__ = ("domain", "limits", "pool")

    def __init__(self, pool: ConnectionPool, domain: str, limits: Limits | None) -> None:
        self.pool = pool
        self.domain = domain
        self.limits = limits

    async def take(self, target: Target, settings: SessionSettings) -> Connection | None:
        return await self.pool._take(target, settings, self.domain)

    async def open(self, target: Target, settings: SessionSettings) -> Connection:
        return await self.pool._open_new(target, settings, self.domain, self.limits)

    async def give_back(self, conn: Connection, settings: SessionSettings) -> None:
        await self.pool.give_back(conn, settings)
