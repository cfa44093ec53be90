"""The durable spool: message bodies on disk, envelopes and state in SQLite.

Everything that touches SQLite goes through this package.
"""

from outboundd.spool.core import Spool, domain_of, lease_owner_id, new_queue_id
from outboundd.spool.errors import (
    SchemaTooNewError,
    SpoolError,
    SpoolFullError,
    SpoolWriteError,
    UnknownMessageError,
)
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
    "SpoolWriteError",
    "Status",
    "StoredStsPolicy",
    "UnknownMessageError",
    "domain_of",
    "lease_owner_id",
    "new_queue_id",
]
