"""Delivering new mail in the process that accepted it, without a claim.

:class:`LocalDelivery` is the spool as the SMTP listeners see it (a
``SpoolSink``) in a process that also delivers: when its scheduler has free
slots it reserves them, the message is accepted with its recipients already
leased to this process (``Spool.accept_leased``, the same commit), and the
deliveries start at once from the values in hand.  That saves, per
message, the claim transaction, the rows it reads back and the scheduler's
wake-up; a crash is covered by the lease exactly as for claimed work.  When
there is no free slot (or delivery is off or paused) the message is
accepted as usual and waits for a claim.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from outboundd.delivery.scheduler import Reservation, Scheduler
from outboundd.spool import NewMessage, Spool, domain_of


class LocalDelivery:
    """A ``SpoolSink`` that hands new mail to this process's own scheduler."""

    def __init__(self, spool: Spool, scheduler: Scheduler) -> None:
        self.spool = spool
        self.scheduler = scheduler
        self.new_queue_id: Callable[[], str] = spool.new_queue_id

    async def accept(self, message: NewMessage, *, queue_id: str | None = None) -> str:
        reservation = self._reserve(message)
        if reservation is None:
            return await self.spool.accept(message, queue_id=queue_id)
        return await self._accept_leased(message, reservation, queue_id)

    def start_accept(
        self, message: NewMessage, *, queue_id: str | None = None
    ) -> asyncio.Future[str]:
        """:meth:`accept` under way; without a task when the message is not leased."""
        reservation = self._reserve(message)
        if reservation is None:
            return self.spool.start_accept(message, queue_id=queue_id)
        return asyncio.ensure_future(self._accept_leased(message, reservation, queue_id))

    def _reserve(self, message: NewMessage) -> Reservation | None:
        split = self.scheduler.settings().always_split
        domains = [domain_of(r.address) for r in message.recipients]
        return self.scheduler.reserve(domains if split else sorted(set(domains)))

    async def _accept_leased(
        self, message: NewMessage, reservation: Reservation, queue_id: str | None
    ) -> str:
        try:
            qid, claims = await self.spool.accept_leased(
                message, reservation.lease, queue_id=queue_id
            )
        except BaseException:
            self.scheduler.cancel(reservation)
            raise
        self.scheduler.adopt(reservation, claims)
        return qid
