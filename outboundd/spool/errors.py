"""The spool's errors, by what the caller should do about them."""

from __future__ import annotations


class SpoolError(Exception):
    """Base class: something in the spool went wrong."""


class SpoolWriteError(SpoolError):
    """A message could not be made durable; nothing of it was kept.

    Submission answers ``451 4.3.0`` and the client retries later."""


class SpoolFullError(SpoolWriteError):
    """The disk holding the queue is full."""


class SchemaTooNewError(SpoolError):
    """The database was written by a newer outboundd; refuse to touch it."""


class MigrationError(SpoolError):
    """A migration file is malformed or failed to apply."""


class UnknownMessageError(SpoolError):
    """No message with that queue ID."""

    def __init__(self, queue_id: str) -> None:
        super().__init__(f"no message with queue ID {queue_id}")
        self.queue_id = queue_id


class SpoolClosedError(SpoolError):
    """The spool was closed while work was still being submitted."""


class SpoolUnavailableError(SpoolWriteError):
    """The queue's database cannot be reached right now (PostgreSQL down, network cut).

    Nothing was kept; submission answers ``451 4.3.0``; the spool retries
    the connection with back-off on its own.
    """
