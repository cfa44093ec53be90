"""``send_email``: queue a message from a plugin or a script inside the daemon.

The daemon calls :func:`install` once its spool is open and
:func:`uninstall` before closing it; ``await outboundd.send_email(...)``
then queues into that spool, through the same ``pre_send_trans_email`` hook
and the same durability rule as SMTP submission (the queue ID is returned
only once the message is durable).  It does not run ``queue_outbound``: that
hook belongs to SMTP sessions, as in Haraka.

A process without a running daemon (a plain script) can install its own
spool the same way: ``api.install(await Spool.open(dir), config, hooks)``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from outboundd.config import Config
from outboundd.hooks import HookRunner
from outboundd.log import Logger, get_logger
from outboundd.submission import policy, prepare, replies
from outboundd.submission.dkim import signer_for
from outboundd.submission.policy import PolicyError
from outboundd.submission.queueing import Queuer, SpoolSink
from outboundd.submission.replies import Reply
from outboundd.submission.transaction import Transaction

__all__ = ["NotInstalledError", "SendEmailError", "install", "send_email", "uninstall"]


class NotInstalledError(RuntimeError):
    """``send_email`` was called in a process with no installed spool."""


class SendEmailError(Exception):
    """The message was not queued; ``reply`` says why, as SMTP would.

    ``temporary`` is true for 4xx outcomes (a plugin's ``denysoft``, a spool
    write failure): trying again later may succeed.
    """

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply

    @property
    def temporary(self) -> bool:
        return self.reply.is_temporary


@dataclass(frozen=True, slots=True)
class _Installed:
    queuer: Queuer
    config: Config


_installed: _Installed | None = None


def install(
    spool: SpoolSink, config: Config, hooks: HookRunner, *, logger: Logger | None = None
) -> None:
    """Make ``send_email`` queue into ``spool`` (the daemon calls this at start-up)."""
    global _installed
    log = logger or get_logger("send_email")
    _installed = _Installed(Queuer(spool, hooks, log, signer=signer_for(config, log)), config)


def uninstall() -> None:
    """Forget the installed spool; ``send_email`` raises :class:`NotInstalledError` after."""
    global _installed
    _installed = None


def _address(text: str, *, utf8: bool, bad: Reply, null_ok: bool) -> str:
    stripped = text.strip()
    if stripped.startswith("<") and stripped.endswith(">"):
        stripped = stripped[1:-1]
    if not stripped:
        if null_ok:
            return ""
        raise ValueError("a recipient address must not be empty")
    try:
        return str(policy.parse_address(stripped, utf8=utf8, bad=bad))
    except PolicyError as exc:
        raise ValueError(f"{text!r}: {exc.reply.text}") from None


async def send_email(
    mail_from: str,
    rcpt_to: str | Iterable[str],
    contents: str | bytes,
    *,
    notes: Mapping[str, Any] | None = None,
    dot_stuffed: bool = False,
    remove_msgid: bool = False,
    remove_date: bool = False,
) -> str:
    """Queue a message and return its queue ID once it is durable.

    ``mail_from`` may be ``""`` (or ``"<>"``) for the null sender;
    ``rcpt_to`` is one address or several.  ``contents`` is the whole
    message; line ends become CRLF and a last line without a newline is
    kept.  ``dot_stuffed`` says the text is already dot-stuffed (leading
    dots are removed).  ``remove_msgid``/``remove_date`` drop the message's
    own ``Message-ID``/``Date`` so fresh ones are made; missing ones are
    always added (``<queue-id@me>``, now).  ``notes`` is stored with the
    message and reaches the delivery hooks.

    Raises :class:`ValueError` for a malformed address, :class:`SendEmailError`
    when a plugin refused the message or the spool could not store it, and
    :class:`NotInstalledError` outside a daemon.
    """
    installed = _installed
    if installed is None:
        raise NotInstalledError(
            "send_email needs a running outboundd in this process "
            "(or outboundd.submission.api.install(spool, config, hooks))"
        )
    recipients_in = [rcpt_to] if isinstance(rcpt_to, str) else list(rcpt_to)
    utf8 = not (mail_from.isascii() and all(r.isascii() for r in recipients_in))
    sender = _address(mail_from, utf8=utf8, bad=replies.BAD_SENDER_SYNTAX, null_ok=True)
    recipients = [
        _address(r, utf8=utf8, bad=replies.BAD_RECIPIENT_SYNTAX, null_ok=False)
        for r in recipients_in
    ]
    if not recipients:
        raise ValueError("send_email needs at least one recipient")
    config = installed.config
    queuer = installed.queuer
    queue_id = queuer.new_queue_id()
    now = time.time()
    body = prepare.normalize_contents(contents, dot_stuffed=dot_stuffed)
    if remove_msgid:
        body = prepare.remove_headers(body, "Message-ID")
    if remove_date:
        body = prepare.remove_headers(body, "Date")
    body = prepare.add_missing_headers(body, queue_id=queue_id, me=config.me, now=now)
    text = config.outbound.received_header
    if text is not None:
        body = prepare.received_header(me=config.me, text=text, queue_id=queue_id, now=now) + body
    txn = Transaction(
        queue_id=queue_id,
        mail_from=sender,
        rcpt_to=recipients,
        body=body,
        notes=dict(notes or {}),
        smtputf8=utf8,
    )
    reply = await queuer.queue(txn, run_queue_outbound=False)
    if not reply.is_success:
        raise SendEmailError(reply)
    return queue_id
