"""Reusing open SMTP connections across messages to the same host.

Opening a connection costs a TCP handshake, the greeting, EHLO and often a
TLS handshake; a queue full of mail for one provider pays that once per
connection instead of once per message.  A connection goes back to the pool
only when its last transaction ended cleanly (:attr:`Connection.usable`);
the next transaction on it starts with RSET if the server needs one.  Idle
connections are closed after ``idle_timeout`` seconds, and at most
``max_idle_per_host`` are kept per target.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict
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
    )


@dataclass(slots=True)
class _Idle:
    conn: Connection
    since: float


class ConnectionPool:
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
        self.opened = 0
        self.reused = 0

    def take(self, target: Target, settings: SessionSettings) -> Connection | None:
        """An idle, still-usable connection to ``target``, or None."""
        entries = self._idle.get(pool_key(target, settings))
        now = self.clock()
        while entries:
            entry = entries.pop()
            if entry.conn.usable and now - entry.since < self.idle_timeout:
                self.reused += 1
                return entry.conn
            entry.conn.abort()
        return None

    async def open(self, target: Target, settings: SessionSettings) -> Connection:
        conn = await Connection.open(target, settings)
        self.opened += 1
        return conn

    async def give_back(self, conn: Connection, settings: SessionSettings) -> None:
        """Keep ``conn`` for the next message to its host, or close it."""
        if self.max_idle_per_host <= 0 or not conn.usable:
            await conn.close()
            return
        entries = self._idle[pool_key(conn.target, settings)]
        if len(entries) >= self.max_idle_per_host:
            await conn.close()
            return
        entries.append(_Idle(conn, self.clock()))
        self._ensure_reaper()

    def _ensure_reaper(self) -> None:
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.create_task(self._reap(), name="smtp-pool-reaper")

    async def _reap(self) -> None:
        while any(self._idle.values()):
            await asyncio.sleep(max(self.idle_timeout / 2, 0.05))
            now = self.clock()
            for key, entries in list(self._idle.items()):
                keep = []
                for entry in entries:
                    if now - entry.since >= self.idle_timeout or not entry.conn.usable:
                        await entry.conn.close()
                    else:
                        keep.append(entry)
                if keep:
                    self._idle[key] = keep
                else:
                    del self._idle[key]

    @property
    def idle(self) -> int:
        return sum(len(v) for v in self._idle.values())

    async def close(self) -> None:
        """QUIT every idle connection (shutdown)."""
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        entries = [e for v in self._idle.values() for e in v]
        self._idle.clear()
        await asyncio.gather(*(e.conn.close() for e in entries), return_exceptions=True)
