"""``HMail``: what delivery hooks see of a message being delivered."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(slots=True)
class HMail:
    """The message and the recipients of one delivery (one claim).

    Mirrors Haraka's ``hmail`` as far as a plugin can rely on it:
    ``queue_id``, ``domain``, ``mail_from``, ``rcpt_to`` (the recipients the
    current hook is about), ``num_failures`` (the highest failure count among
    them), ``notes`` (a dict plugins may use to pass values between hooks of
    this delivery; its starting value was given at submission) and ``path``
    (the body file, CRLF, read-only; None when the queue is in PostgreSQL,
    whose bodies live in the database: read them with ``hmail.body``).
    """

    queue_id: str
    domain: str
    mail_from: str
    rcpt_to: list[str]
    num_failures: int
    notes: dict[str, Any] = field(default_factory=dict)
    path: Path | None = field(default_factory=Path)
    size: int = 0
    received_at: float = 0.0
    body: bytes | None = None  # the body (PostgreSQL queue); None on SQLite: read ``path``
