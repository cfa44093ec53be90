"""One failure DSN per message per delivery round.

The recipients of one message in different domains are delivered by
separate claims — separate sessions that finish at different moments.  A
message to ``bob@dest.test`` and ``erin@other.test`` refused at once would
otherwise produce two DSNs, where Postfix (and docs/bounces.md's sample)
sends one.  So a claim that ends with failures to report does not queue its
DSN at once: it waits until every other claim of the same message that this
process is delivering right now has concluded, and the last one to conclude
queues ONE DSN for all of them.  Every waiting claim then records its own
recipients, linked to that DSN, exactly as before.

Durability does not change: the DSN is still queued (and linked to the
recipients it reports) before any of those recipients is recorded final,
and the message's body is still there, because its bounced recipients are
not final yet.  A crash before the DSN is queued leaves the recipients
leased, so they are retried (never lost); a crash after it leaves them
linked to it, and the retry does not report them again (never twice).

The wait is bounded by the other claims' sessions, which are bounded by the
delivery timeouts.  Claims of one message in different delivery processes
are not collected (they share no memory); each process sends its own DSN.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from outboundd import log
from outboundd.delivery.notices import NoticeOutcome, NoticeRecipient

LOG = log.get_logger("delivery")

__all__ = ["FailureRounds", "Send", "Ticket"]

#: Queues one DSN for the recipients given, with the human reason.
Send = Callable[[Sequence[NoticeRecipient], str], Awaitable[NoticeOutcome]]


@dataclass(slots=True)
class _Waiting:
    failed: list[NoticeRecipient]
    reason: str
    send: Send
    result: asyncio.Future[NoticeOutcome]


@dataclass(slots=True)
class _Round:
    active: int = 0
    waiting: list[_Waiting] = field(default_factory=list)


@dataclass(slots=True)
class Ticket:
    """One claim's place in its message's round; it leaves exactly once."""

    queue_id: str
    round: _Round
    left: bool = False


class FailureRounds:
    """The rounds of the messages this process is delivering now."""

    def __init__(self) -> None:
        self._rounds: dict[str, _Round] = {}

    def __len__(self) -> int:
        return len(self._rounds)

    def enter(self, queue_id: str) -> Ticket:
        """A claim of ``queue_id`` starts: its failures join this round."""
        current = self._rounds.get(queue_id)
        if current is None:
            current = self._rounds[queue_id] = _Round()
        current.active += 1
        return Ticket(queue_id, current)

    async def leave(self, ticket: Ticket) -> None:
        """The claim is done without failures to report (a no-op after :meth:`report`).

        When it was the last one in the round, the round's DSN is queued now.
        """
        if ticket.left:
            return
        ticket.left = True
        ticket.round.active -= 1
        await self._flush_if_last(ticket)

    async def report(
        self, ticket: Ticket, failed: Sequence[NoticeRecipient], reason: str, send: Send
    ) -> NoticeOutcome:
        """The claim's failures; returns once the round's one DSN is queued.

        ``send`` queues the DSN (the first claim's is used for the round).
        Raises what ``send`` raised (:class:`~outboundd.spool.SpoolError`)
        when the DSN could not be queued.
        """
        if ticket.left:
            raise RuntimeError("a claim reports its failures once, before it leaves")
        future = asyncio.get_running_loop().create_future()
        waiting = _Waiting(list(failed), reason, send, future)
        ticket.round.waiting.append(waiting)
        ticket.left = True
        ticket.round.active -= 1
        await self._flush_if_last(ticket)
        try:
            return await waiting.result
        except asyncio.CancelledError:
            if waiting in ticket.round.waiting:  # not sent yet: not reported by anyone
                ticket.round.waiting.remove(waiting)
            else:  # being sent: its outcome is nobody's to read now
                waiting.result.add_done_callback(_consume)
            raise

    async def _flush_if_last(self, ticket: Ticket) -> None:
        current = ticket.round
        if current.active > 0:
            return
        if self._rounds.get(ticket.queue_id) is current:
            del self._rounds[ticket.queue_id]
        waiting, current.waiting = current.waiting, []
        if not waiting:
            return
        failed = [f for w in waiting for f in w.failed]
        try:
            outcome = await waiting[0].send(failed, waiting[0].reason)
        except Exception as exc:  # SpoolError: every waiting claim decides what to do
            for w in waiting:
                if not w.result.done():
                    w.result.set_exception(exc)
            return
        if outcome.dsn_queue_id:
            # Logged here, once per DSN: every claim of the round shares it.
            LOG.info(
                "DSN queued",
                qid=ticket.queue_id,
                dsn=outcome.dsn_queue_id,
                recipients=len(outcome.reported),
            )
        for w in waiting:
            if not w.result.done():
                w.result.set_result(outcome)


def _consume(future: asyncio.Future[NoticeOutcome]) -> None:
    """Read a result no one waits for any more (no "never retrieved" warning)."""
    if not future.cancelled():
        future.exception()
