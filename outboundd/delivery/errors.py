"""Delivery failures by category.

aiosmtplib, ``ssl`` and the socket layer raise a zoo of exceptions; the
session maps every one of them, at the boundary, to one of the two classes
here, so the rest of outboundd only ever decides between "try again" and
"give up".  Both carry the :class:`~outboundd.delivery.replies.Reply` to
record (code, enhanced status, text) and the :class:`Stage` it happened at.
"""

from __future__ import annotations

from outboundd.delivery.replies import Reply, Stage

__all__ = ["DeliveryError", "PermanentFailure", "TransientFailure"]


class DeliveryError(Exception):
    """Base class: a failure with the reply that describes it."""

    def __init__(self, reply: Reply, stage: Stage) -> None:
        super().__init__(str(reply))
        self.reply = reply
        self.stage = stage

    @property
    def code(self) -> int:
        return self.reply.code

    @property
    def status(self) -> str | None:
        return self.reply.status

    @property
    def text(self) -> str:
        return self.reply.text


class TransientFailure(DeliveryError):
    """Try again later.

    ``retry_elsewhere`` says whether the next MX address may be tried now:
    true for failures that prove the message was not taken (refused
    connection, 421, a drop before the final dot), false when trying another
    host at once could deliver twice (no reply after the final dot) or could
    not help (our own body file is unreadable).
    """

    def __init__(self, reply: Reply, stage: Stage, *, retry_elsewhere: bool = True) -> None:
        super().__init__(reply, stage)
        self.retry_elsewhere = retry_elsewhere


class PermanentFailure(DeliveryError):
    """Never going to work for these recipients (e.g. message too big for the host)."""
