"""From a finished transaction to a durable spool entry: hooks, then ``accept``.

Shared by the SMTP session and the ``send_email`` API so both follow the
same rules:

1. ``queue_outbound`` (SMTP only): ``ok()`` — a plugin took the message, it
   is not spooled; ``deny`` → 550; ``denysoft`` → 451.
2. ``pre_send_trans_email``: may edit the transaction; ``deny`` → 550,
   ``denysoft`` → 451; ``ok()`` or ``None`` go on to the spool (this hook
   prepares, it cannot take a message — that is ``queue_outbound``'s job).
3. DKIM signing (``dkim.ini``), once, of what the plugins left: a domain
   with a key whose message cannot be signed gets ``451 4.3.0``, never an
   unsigned copy.
4. ``spool.accept()``; only when it returned is the answer 250.

A plugin that raises, times out or returns a result the hook does not take
gives ``451 4.3.0`` and an ERROR log line naming it.  A spool failure gives
``451 4.3.0`` (``451 4.3.1``, mail system full, when the queue's disk is
full); the spool guarantees nothing of the message remains.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Protocol

from outboundd.hooks import HookFailure, HookRunner, ResultCode
from outboundd.log import Logger
from outboundd.spool.errors import SpoolError, SpoolFullError, SpoolUnavailableError
from outboundd.spool.types import NewMessage
from outboundd.submission import replies
from outboundd.submission.dkim import DkimSigner, DkimSignError
from outboundd.submission.replies import Reply, clean_text
from outboundd.submission.transaction import Transaction

__all__ = ["Queuer", "SpoolSink", "Write"]

#: What a plugin must not leave in an address (it would break the envelope).
_UNSAFE_IN_ADDRESS: Final = re.compile("[\r\n\0<>]")


class SpoolSink(Protocol):
    """The two spool operations submission needs (``outboundd.spool.Spool`` has them)."""

    def new_queue_id(self) -> str: ...

    async def accept(self, message: NewMessage, *, queue_id: str | None = None) -> str: ...

    def start_accept(
        self, message: NewMessage, *, queue_id: str | None = None
    ) -> asyncio.Future[str]: ...


@dataclass(slots=True, eq=False)
class Write:
    """A spool write under way: the transaction, the message it stores, its queue ID to come."""

    txn: Transaction
    message: NewMessage
    future: asyncio.Future[str]


def queued_reply(queue_id: str) -> Reply:
    return Reply(250, "2.0.0", f"Ok: queued as {queue_id}")


class Queuer:
    """Runs the hooks and the spool write for one process; tracks writes in flight.

    A client that disconnects while its message is being written does not
    interrupt the write (the spool either commits it or removes it); the
    daemon waits for such writes in :meth:`drain` before closing the spool.
    """

    def __init__(
        self,
        spool: SpoolSink,
        hooks: HookRunner,
        log: Logger,
        *,
        signer: DkimSigner | None = None,
    ) -> None:
        self.spool = spool
        self.hooks = hooks
        self.log = log
        self.signer = signer
        self._inflight: set[asyncio.Future[str]] = set()
        #: The spool's own: the session calls it for every message.
        self.new_queue_id: Callable[[], str] = spool.new_queue_id

    async def _hook(self, hook: str, txn: Transaction) -> Reply | None:
        """Run ``hook``; a reply when the chain ended the transaction, else None."""
        if not self.hooks.has(hook):
            return None
        try:
            outcome = await self.hooks.run(hook, txn)
        except HookFailure as exc:
            self.log.error(
                "plugin failed; message refused temporarily",
                qid=txn.queue_id,
                hook=exc.hook,
                plugin=exc.plugin,
                error=exc.reason,
            )
            return replies.LOCAL_ERROR
        result = outcome.result
        if result is None:
            return None
        message = clean_text(result.message) if result.message else None
        if result.code is ResultCode.DENY:
            reply = replies.PLUGIN_DENY
            self.log.info("message refused by plugin", qid=txn.queue_id, hook=hook,
                          plugin=outcome.plugin, reason=message)  # fmt: skip
            return reply.with_text(message) if message else reply
        if result.code is ResultCode.DENYSOFT:
            reply = replies.PLUGIN_DENYSOFT
            self.log.info("message deferred by plugin", qid=txn.queue_id, hook=hook,
                          plugin=outcome.plugin, reason=message)  # fmt: skip
            return reply.with_text(message) if message else reply
        if result.code is ResultCode.OK:
            if hook == "queue_outbound":
                self.log.info("message taken by plugin", qid=txn.queue_id, plugin=outcome.plugin,
                              recipients=len(txn.rcpt_to), size=txn.size)  # fmt: skip
                return Reply(250, "2.0.0", f"Ok: accepted as {txn.queue_id}")
            return None
        self.log.error(
            "plugin returned a result this hook does not take; message refused temporarily",
            qid=txn.queue_id,
            hook=hook,
            plugin=outcome.plugin,
            result=str(result.code),
        )
        return replies.LOCAL_ERROR

    def _check(self, txn: Transaction) -> Reply | None:
        """After the hooks: is the transaction still something we can store?"""
        if not txn.rcpt_to:
            self.log.info("no recipients left after plugins", qid=txn.queue_id)
            return replies.NO_RECIPIENTS_LEFT
        addresses = [txn.mail_from, *txn.rcpt_to]
        bad = [
            a
            for a in addresses
            if not isinstance(a, str) or _UNSAFE_IN_ADDRESS.search(a) is not None or a.isspace()
        ]
        if bad or not isinstance(txn.body, bytes | bytearray) or not all(txn.rcpt_to):
            self.log.error("plugins left an invalid transaction", qid=txn.queue_id)
            return replies.LOCAL_ERROR
        if isinstance(txn.body, bytearray):
            txn.body = bytes(txn.body)
        return None

    async def queue(self, txn: Transaction, *, run_queue_outbound: bool = True) -> Reply:
        """Hooks, then the spool; the reply for the client (never raises for bad input)."""
        if run_queue_outbound:
            reply = await self._hook("queue_outbound", txn)
            if reply is not None:
                return reply
        reply = await self._hook("pre_send_trans_email", txn)
        if reply is not None:
            return reply
        reply = self._check(txn)
        if reply is not None:
            return reply
        if self.signer is not None:
            reply = self._sign(txn, self.signer)
            if reply is not None:
                return reply
        return await self._accept(txn)

    def _sign(self, txn: Transaction, signer: DkimSigner) -> Reply | None:
        """Sign ``txn.body`` in place; the 451 reply when it cannot be signed."""
        assert isinstance(txn.body, bytes)
        try:
            txn.body = signer.sign(txn.body, auth_user=txn.auth_user, queue_id=txn.queue_id)
        except DkimSignError as exc:
            self.log.error(
                "DKIM signing failed; message refused temporarily",
                qid=txn.queue_id,
                domain=signer.domain_for(txn.body, txn.auth_user),
                error=str(exc),
            )
            return replies.LOCAL_ERROR
        return None

    def hooks_wait(self) -> bool:
        """True when :meth:`queue` runs hooks (which may wait); else :meth:`start` does it all."""
        return self.hooks.has("queue_outbound") or self.hooks.has("pre_send_trans_email")

    def start(self, txn: Transaction) -> Reply | Write:
        """What :meth:`queue` does when no hook is there (:meth:`hooks_wait`), without waiting.

        The reply when the transaction is refused, else the spool write,
        already under way, for :meth:`outcome` once its task is done.  The
        SMTP session calls it from its protocol's ``data_received``, so an
        accepted message needs no task of its own.
        """
        reply = self._check(txn)
        if reply is None and self.signer is not None:
            reply = self._sign(txn, self.signer)
        return reply if reply is not None else self._write(txn)

    def _write(self, txn: Transaction) -> Write:
        message = txn.to_new_message()
        try:
            future = self.spool.start_accept(message, queue_id=txn.queue_id)
        except Exception as refused:  # as accept() would raise it: outcome() answers
            future = asyncio.get_running_loop().create_future()
            future.set_exception(refused)
        self._inflight.add(future)
        future.add_done_callback(self._finished)
        return Write(txn, message, future)

    def client_gone(self, txn: Transaction) -> None:
        self.log.notice("client gone while its message was being queued; the write "
                        "completes and the client will likely send it again",
                        qid=txn.queue_id)  # fmt: skip

    async def _accept(self, txn: Transaction) -> Reply:
        write = self._write(txn)
        try:
            await asyncio.shield(write.future)
        except asyncio.CancelledError:
            self.client_gone(txn)
            raise
        except Exception:
            pass  # outcome() answers it
        return self.outcome(write)

    def outcome(self, write: Write) -> Reply:
        """The reply for a finished spool write, logged as queued or refused."""
        txn, message = write.txn, write.message
        try:
            queue_id = write.future.result()
        except SpoolUnavailableError as exc:
            # The spool logs the outage itself, once per interval: a line per
            # refused message would flood the log while the database is away.
            self.log.info("queue unreachable; message refused temporarily",
                          qid=txn.queue_id, error=str(exc))  # fmt: skip
            return replies.LOCAL_ERROR
        except SpoolFullError as exc:
            self.log.warn("queue disk full; message refused temporarily",
                          qid=txn.queue_id, error=str(exc))  # fmt: skip
            return replies.SYSTEM_FULL
        except (SpoolError, OSError, ValueError) as exc:
            self.log.error("queue write failed; message refused temporarily",
                           qid=txn.queue_id, error=f"{type(exc).__name__}: {exc}")  # fmt: skip
            return replies.LOCAL_ERROR
        self.log.info(
            "queued",
            qid=queue_id,
            mail_from=txn.mail_from,
            recipients=len(message.recipients),
            size=len(message.body),
            auth_user=txn.auth_user,
            client_ip=txn.remote_ip,
            tls=txn.tls,
        )
        return queued_reply(queue_id)

    def _finished(self, future: asyncio.Future[str]) -> None:
        self._inflight.discard(future)
        if not future.cancelled():
            # Retrieve the exception: the session, if still there, answered 451
            # and logged it; a gone session has nobody left to tell.
            future.exception()

    async def drain(self, timeout: float) -> None:
        """Wait (at most ``timeout`` s) for spool writes whose client has gone."""
        if not self._inflight:
            return
        pending = list(self._inflight)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                asyncio.gather(*pending, return_exceptions=True), timeout=timeout
            )
