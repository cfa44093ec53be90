"""The ``txn`` object handed to the ``queue_outbound`` and ``pre_send_trans_email`` hooks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from outboundd.spool.types import NewMessage, NewRecipient
from outboundd.submission import prepare
from outboundd.submission.policy import RcptParams

__all__ = ["Transaction"]


@dataclass(eq=False, slots=True)
class Transaction:
    """One message on its way into the spool.

    What plugins may rely on:

    * ``queue_id`` is already allocated (it is in ``Message-ID``) and is the
      ID the client is told, whether or not the message is spooled.
    * ``body`` is the whole message (headers and body) with CRLF line ends,
      not dot-stuffed, after our ``Received:``/``Message-ID:``/``Date:``
      were added.  Hooks may replace it (or use the header helpers below);
      what it holds after ``pre_send_trans_email`` is what gets spooled.
    * ``mail_from`` and ``rcpt_to`` may be changed; a recipient keeps its
      DSN parameters (``rcpt_params``) when its address stays the same.
      A plugin that removes every recipient gets the message refused.
    * ``notes`` is stored with the message and reaches delivery hooks as
      ``hmail.notes``, so keep it JSON-serialisable.
    * ``auth_user``, ``remote_ip``, ``helo``, ``tls`` (the TLS version, or
      None in clear), ``smtputf8``, ``env_id``, ``ret`` describe the session
      and are informational: changing them changes nothing but what is stored.
    """

    queue_id: str
    mail_from: str
    rcpt_to: list[str]
    body: bytes
    notes: dict[str, Any] = field(default_factory=dict)
    rcpt_params: dict[str, RcptParams] = field(default_factory=dict)
    auth_user: str | None = None
    remote_ip: str | None = None
    helo: str | None = None
    tls: str | None = None
    smtputf8: bool = False
    env_id: str | None = None
    ret: str | None = None

    # ------------------------------------------------------------- headers

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive, unfolded), or None."""
        return prepare.find_header(self.body, name)

    def headers(self, name: str) -> list[str]:
        """Every value of header ``name``, in order."""
        return prepare.header_values(self.body, name)

    def add_header(self, name: str, value: str) -> None:
        """Append ``name: value`` to the header section.

        Raises ValueError for a name that is not a field name or a value with
        a line break (which would let the value forge further headers).
        """
        if not name or not all(33 <= ord(ch) <= 126 and ch != ":" for ch in name):
            raise ValueError(f"invalid header name {name!r}")
        if "\r" in value or "\n" in value:
            raise ValueError("a header value must not contain CR or LF")
        line = f"{name}: {value}\r\n".encode()
        self.body = prepare.insert_header_fields(self.body, line)

    def remove_header(self, name: str) -> None:
        """Remove every ``name`` header field."""
        self.body = prepare.remove_headers(self.body, name)

    # --------------------------------------------------------------- spool

    @property
    def size(self) -> int:
        return len(self.body)

    def to_new_message(self) -> NewMessage:
        """The spool's view of this transaction (recipients deduplicated, order kept)."""
        seen: set[str] = set()
        recipients: list[NewRecipient] = []
        for address in self.rcpt_to:
            if address in seen:
                continue
            seen.add(address)
            params = self.rcpt_params.get(address, RcptParams())
            recipients.append(NewRecipient(address, notify=params.notify, orcpt=params.orcpt))
        return NewMessage(
            mail_from=self.mail_from,
            recipients=recipients,
            body=self.body,
            auth_user=self.auth_user,
            client_ip=self.remote_ip,
            env_id=self.env_id,
            ret=self.ret,
            smtputf8=self.smtputf8,
            body_8bit=not self.body.isascii(),
            notes=dict(self.notes),
        )
