"""The durable spool: envelopes, state and bodies, in SQLite (default) or PostgreSQL.

Everything that touches the queue's database goes through this package;
:func:`open` chooses the backend from ``outbound.ini queue_url``.
"""

from pathlib import Path

from outboundd.spool.base import Spool, describe_location, is_postgres_url
from outboundd.spool.core import SqliteSpool, domain_of, lease_owner_id
from outboundd.spool.errors import (
    SchemaTooNewError,
    SpoolError,
    SpoolFullError,
    SpoolUnavailableError,
    SpoolWriteError,
    UnknownMessageError,
)
from outboundd.spool.queueid import new_queue_id
from outboundd.spool.types import (
    BODY_MISSING_REASON,
    BODY_MISSING_STATUS,
    AttemptRecord,
    Claim,
    ClaimedRecipient,
    Lease,
    NewMessage,
    NewRecipient,
    Outcome,
    RecordResult,
    Status,
    StoredStsPolicy,
)


async def open(
    location: str | Path,
    *,
    recover: bool = True,
    recover_files: bool = True,
    create: bool = True,
    wait: bool = False,
) -> Spool:
    """Open the queue at ``location``: a queue directory, or a ``postgresql://`` URL."""
    return await Spool.open(
        location, recover=recover, recover_files=recover_files, create=create, wait=wait
    )


__all__ = [
    "BODY_MISSING_REASON",
    "BODY_MISSING_STATUS",
    "AttemptRecord",
    "Claim",
    "ClaimedRecipient",
    "Lease",
    "NewMessage",
    "NewRecipient",
    "Outcome",
    "RecordResult",
    "SchemaTooNewError",
    "Spool",
    "SpoolError",
    "SpoolFullError",
    "SpoolUnavailableError",
    "SpoolWriteError",
    "SqliteSpool",
    "Status",
    "StoredStsPolicy",
    "UnknownMessageError",
    "describe_location",
    "domain_of",
    "is_postgres_url",
    "lease_owner_id",
    "new_queue_id",
    "open",
]
