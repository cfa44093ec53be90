"""Delivering one claim: hooks, routing, the SMTP session, retries, DSNs, the record.

For one leased (queue_id, domain) group this module

1. runs ``send_email`` (a plugin may postpone the delivery without a failure);
2. finds the targets: a ``get_mx`` plugin's answer or DNS;
3. runs one SMTP/LMTP session over the targets;
4. turns each recipient's result into its next state — delivered, deferred
   until the next retry time, or bounced (also when the retry schedule is
   exhausted) — consulting the ``deferred`` and ``bounce`` hooks;
5. queues one DSN for the recipients that bounced, while the body exists;
6. writes every attempt row and state change in one ``record()``;
7. runs the ``delivered`` hook and logs one NOTICE line per outcome.

The per-recipient decisions are plain functions over values
(:func:`decide`), tested without sockets.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from outboundd import dsn, log
from outboundd.config import Config, OutboundConfig
from outboundd.delivery import retry
from outboundd.delivery.hmail import HMail
from outboundd.delivery.mx import MXResolutionError, MXResolver, MXTarget, normalize_mx_result
from outboundd.delivery.notices import (
    DOUBLE_BOUNCE_NOTE,
    NoticeOutcome,
    NoticeRecipient,
    OriginalMessage,
    notice_settings,
    queue_failure_notice,
    queue_notice,
)
from outboundd.delivery.pool import ConnectionPool, Limits
from outboundd.delivery.replies import Reply, Stage, to_exhausted
from outboundd.delivery.rounds import FailureRounds, Ticket
from outboundd.delivery.session import (
    ConnectionInfo,
    SessionResult,
    SessionSettings,
    deliver_job,
)
from outboundd.delivery.tlslookup import TlsPolicyOptions, TlsPolicySource
from outboundd.hooks import HookFailure, HookRunner, ResultCode
from outboundd.spool import (
    BODY_MISSING_REASON,
    BODY_MISSING_STATUS,
    AttemptRecord,
    Claim,
    ClaimedRecipient,
    Outcome,
    Spool,
    SpoolError,
    Status,
)

LOG = log.get_logger("delivery")

#: When a plugin fails (raises, times out), its recipients wait this long.
PLUGIN_FAILURE_RETRY = 60.0


@dataclass(slots=True)
class Connection:
    """Facts about the session, for the record, the log and the hooks.

    This and the other per-recipient values of a delivery (:class:`Verdict`,
    :class:`Decision`) are treated as immutable (changed only by
    ``dataclasses.replace``) but not ``frozen``: a frozen dataclass's
    ``__init__`` costs three to four times as much, once per recipient.
    """

    mx_host: str | None = None
    mx_ip: str | None = None
    port: int | None = None
    tls: str | None = None
    auth: str | None = None
    lmtp: bool = False
    dsn_passed_on: bool = False
    tls_policy: str | None = None
    tls_policy_met: bool | None = None


@dataclass(slots=True)
class Verdict:
    """What one attempt concluded for one recipient, before retry policy."""

    outcome: Outcome  # DELIVERED, DEFERRED (temporary) or BOUNCED (permanent)
    reply: Reply
    stage: str
    count_failure: bool = True
    reason: str | None = None
    conn: Connection | None = None  # where it was settled; None = no connection made


@dataclass(slots=True)
class Decision:
    """The recipient's new state after retry policy."""

    outcome: Outcome
    reply: Reply
    next_attempt_at: float | None
    count_failure: bool
    reason: str | None
    conn: Connection | None = None
    #: For a drop (our decision, not the reply's): the status the views show.
    final_status: str | None = None


def decide(
    recipient: ClaimedRecipient,
    verdict: Verdict,
    intervals: Sequence[float],
    *,
    received_at: float,
    now: float,
) -> Decision:
    """Apply the retry schedule to one recipient's verdict (pure).

    A temporary failure that counts is the recipient's ``failures + 1``-th;
    when the schedule has no interval for it the recipient bounces: the
    status turns permanent (ours), the code and text stay the last reply's
    (the remote's), and the reason says we gave up.
    """
    conn = verdict.conn
    if verdict.outcome is not Outcome.DEFERRED:
        return Decision(verdict.outcome, verdict.reply, None, False, verdict.reason, conn)
    if not verdict.count_failure:
        delay = retry.retry_delay(recipient.failures + 1, intervals) or PLUGIN_FAILURE_RETRY
        return Decision(Outcome.DEFERRED, verdict.reply, now + delay, False, verdict.reason, conn)
    failures = recipient.failures + 1
    when = retry.next_attempt_at(failures, intervals, now)
    if when is None:
        reason = dsn.reason_for_exhaustion(
            recipient.attempts + 1, received_at, str(verdict.reply), now
        )
        return Decision(Outcome.BOUNCED, to_exhausted(verdict.reply), None, True, reason, conn)
    return Decision(Outcome.DEFERRED, verdict.reply, when, True, verdict.reason, conn)


def all_recipients(claim: Claim, verdict: Verdict) -> dict[int, Verdict]:
    return {r.id: verdict for r in claim.recipients}


def local_reply(code: int, status: str, text: str) -> Reply:
    return Reply(code, status, text)


class DeliveryEngine:
    """Delivers claims.  One instance per process; safe for concurrent claims."""

    def __init__(
        self,
        config: Config,
        settings: Callable[[], OutboundConfig],
        spool: Spool,
        hooks: HookRunner,
        *,
        owner: str,
        resolver: MXResolver | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.clock = clock
        self.config = config
        self.settings = settings
        self.spool = spool
        self.hooks = hooks
        self.owner = owner
        outbound = settings()
        self.resolver = resolver or MXResolver(
            [(ns.host, ns.port) for ns in outbound.nameservers] or None,
            mx_port=outbound.mx_port,
            inet_prefer=outbound.inet_prefer,
            local_mx_ok=outbound.local_mx_ok,
        )
        self.tls_policies = TlsPolicySource(
            spool, [(ns.host, ns.port) for ns in outbound.nameservers] or None, clock=clock
        )
        self.pool = ConnectionPool(
            idle_timeout=outbound.pool_idle_timeout,
            max_idle_per_host=outbound.pool_max_per_host,
        )
        self.notice_settings = notice_settings(config)
        self._settings_cache: tuple[OutboundConfig, SessionSettings, Limits] | None = None
        #: Failures of one message's claims that end together share one DSN.
        self.rounds = FailureRounds()

    async def close(self) -> None:
        """Close the idle connections kept for reuse (QUIT) and the policy fetcher."""
        await self.pool.close()
        await self.tls_policies.close()

    # ------------------------------------------------------------------ main

    async def deliver(self, claim: Claim) -> None:
        outbound = self.settings()
        started = self.clock()
        hmail = HMail(
            queue_id=claim.queue_id,
            domain=claim.domain,
            mail_from=claim.mail_from,
            rcpt_to=[r.address for r in claim.recipients],
            num_failures=max(r.failures for r in claim.recipients),
            notes=dict(claim.notes),
            path=claim.body_path,
            size=claim.size,
            received_at=claim.received_at,
            body=claim.body,
        )
        ticket = self.rounds.enter(claim.queue_id)
        try:
            verdicts: dict[int, Verdict] | None = None
            postponed = await self._send_email_hook(claim, hmail)
            if postponed is True:
                return
            if postponed is not None:
                verdicts = postponed
            if verdicts is None:
                routed = await self._targets(claim, hmail, outbound)
                if isinstance(routed, dict):
                    verdicts = routed
                else:
                    verdicts = await self._session(claim, routed, outbound)
            await self._conclude(claim, hmail, verdicts, outbound, started, ticket)
        finally:
            await self.rounds.leave(ticket)

    # ----------------------------------------------------------------- hooks

    async def _send_email_hook(
        self, claim: Claim, hmail: HMail
    ) -> Literal[True] | dict[int, Verdict] | None:
        """True = postponed (leases released); verdicts = decided; None = go on."""
        if not self.hooks.has("send_email"):
            return None
        try:
            outcome = await self.hooks.run("send_email", hmail)
        except HookFailure as exc:
            LOG.error(
                "send_email hook failed", qid=claim.queue_id, plugin=exc.plugin, error=exc.reason
            )
            return all_recipients(claim, _plugin_failure(exc))
        result = outcome.result
        if result is None:
            return None
        if result.code is ResultCode.DELAY:
            seconds = result.delay_seconds or 0.0
            await self.spool.release(
                self.owner, [r.id for r in claim.recipients], next_attempt_at=self.clock() + seconds
            )
            LOG.info(
                "delivery postponed by plugin",
                qid=claim.queue_id,
                plugin=outcome.plugin,
                delay=seconds,
            )
            return True
        text = result.message or f"by plugin {outcome.plugin}"
        if result.code is ResultCode.OK:
            reply = local_reply(250, "2.0.0", f"handled by plugin {outcome.plugin}")
            return all_recipients(claim, Verdict(Outcome.DELIVERED, reply, "plugin"))
        if result.code is ResultCode.DENY:
            reply = local_reply(550, "5.0.0", f"refused by plugin {outcome.plugin}: {text}")
            return all_recipients(claim, Verdict(Outcome.BOUNCED, reply, "plugin"))
        reply = local_reply(451, "4.0.0", f"deferred by plugin {outcome.plugin}: {text}")
        return all_recipients(claim, Verdict(Outcome.DEFERRED, reply, "plugin"))

    async def _targets(
        self, claim: Claim, hmail: HMail, outbound: OutboundConfig
    ) -> list[MXTarget] | dict[int, Verdict]:
        try:
            if self.hooks.has("get_mx"):
                outcome = await self.hooks.run("get_mx", hmail, claim.domain)
                result = outcome.result
                if result is not None:
                    if result.code is ResultCode.OK:
                        mxs = normalize_mx_result(result.value, default_port=outbound.mx_port)
                        return await self.resolver.resolve_mxs(mxs, claim.domain)
                    if result.code is ResultCode.DENY:
                        reply = local_reply(
                            550,
                            "5.1.2",
                            f"no route to {claim.domain}: {result.message or 'denied'} "
                            f"(plugin {outcome.plugin})",
                        )
                        return all_recipients(claim, Verdict(Outcome.BOUNCED, reply, "get_mx"))
                    reply = local_reply(
                        451,
                        "4.1.2",
                        f"no route to {claim.domain} yet: {result.message or 'deferred'} "
                        f"(plugin {outcome.plugin})",
                    )
                    return all_recipients(claim, Verdict(Outcome.DEFERRED, reply, "get_mx"))
            targets = await self.resolver.resolve(claim.domain)
            if claim.domain.startswith("["):
                return targets  # a domain literal has no MTA-STS or DANE
            return await self._with_tls_policy(claim, targets, outbound)
        except HookFailure as exc:
            LOG.error("get_mx hook failed", qid=claim.queue_id, plugin=exc.plugin, error=exc.reason)
            return all_recipients(claim, _plugin_failure(exc))
        except ValueError as exc:  # a plugin's MX value we cannot use
            LOG.error("get_mx hook returned an unusable MX", qid=claim.queue_id, error=str(exc))
            reply = local_reply(451, "4.3.5", f"get_mx plugin returned an unusable MX: {exc}")
            verdict = Verdict(Outcome.DEFERRED, reply, "get_mx", count_failure=False)
            return all_recipients(claim, verdict)
        except MXResolutionError as exc:
            reply = local_reply(exc.code, exc.status, exc.message)
            outcome_kind = Outcome.BOUNCED if exc.permanent else Outcome.DEFERRED
            return all_recipients(claim, Verdict(outcome_kind, reply, "dns"))

    async def _with_tls_policy(
        self, claim: Claim, targets: list[MXTarget], outbound: OutboundConfig
    ) -> list[MXTarget] | dict[int, Verdict]:
        """DNS-routed targets with their DANE / MTA-STS policy (plugin routes get none)."""
        options = TlsPolicyOptions(
            mta_sts=outbound.mta_sts,
            dane=outbound.dane,
            fetch_timeout=outbound.mta_sts_timeout,
            https_port=outbound.mta_sts_port,
            ca_file=outbound.mta_sts_ca_file,
        )
        try:
            return await self.tls_policies.apply(claim.domain, targets, options)
        except Exception as exc:  # a bug must defer, never downgrade or lose, the mail
            LOG.error(
                "TLS policy lookup failed", qid=claim.queue_id, domain=claim.domain, error=str(exc)
            )
            reply = local_reply(451, "4.3.0", f"TLS policy lookup for {claim.domain} failed: {exc}")
            verdict = Verdict(Outcome.DEFERRED, reply, "tls_policy", count_failure=False)
            return all_recipients(claim, verdict)

    async def _session(
        self, claim: Claim, targets: list[MXTarget], outbound: OutboundConfig
    ) -> dict[int, Verdict]:
        settings, limits = self._session_settings(outbound)
        result: SessionResult = await deliver_job(
            claim,  # read as it is: a claim has every field of a job
            targets,
            settings,
            pool=self.pool.lane(claim.domain, limits),
        )
        # One Connection per connection used (usually one for all recipients).
        verdicts: dict[int, Verdict] = {}
        info: ConnectionInfo | None = None
        conn: Connection | None = None
        for rid, rr in result.recipients.items():
            if rr.connection is not info:
                info = rr.connection
                conn = _connection(info)
            # A Stage is a str (StrEnum): its .value would be a Python-level
            # property call per recipient.
            verdicts[rid] = Verdict(rr.outcome, rr.reply, rr.stage, conn=conn)
        return verdicts

    def _session_settings(self, outbound: OutboundConfig) -> tuple[SessionSettings, Limits]:
        # Made once per outbound.ini (a reload brings a new object), not per
        # message: both are frozen dataclasses, whose __init__ is dear.
        cached = self._settings_cache
        if cached is not None and cached[0] is outbound:
            return cached[1], cached[2]
        tls = self.config.tls.outbound
        made = SessionSettings(
            helo=self.config.me,
            connect_timeout=outbound.connect_timeout,
            greeting_timeout=outbound.greeting_timeout,
            ehlo_timeout=outbound.ehlo_timeout,
            starttls_timeout=outbound.starttls_timeout,
            auth_timeout=outbound.auth_timeout,
            mail_timeout=outbound.mail_timeout,
            rcpt_timeout=outbound.rcpt_timeout,
            data_timeout=outbound.data_timeout,
            data_block_timeout=outbound.data_block_timeout,
            data_end_timeout=outbound.data_end_timeout,
            rset_timeout=outbound.rset_timeout,
            quit_timeout=outbound.quit_timeout,
            enable_tls=outbound.enable_tls,
            tls_min_version=tls.min_version,
            tls_ciphers=tls.ciphers,
            tls_verify=tls.reject_unauthorized,
            force_tls=tls.force_tls,
            force_tls_hosts=tuple(tls.force_tls_hosts),
            no_tls_hosts=tuple(tls.no_tls_hosts),
            sts_cafile=outbound.mta_sts_ca_file,
        )
        # Connections count against concurrency_max and domain_concurrency_max
        # until they are closed, idle kept ones included (see pool.py).
        limits = Limits(outbound.concurrency_max, outbound.domain_concurrency_max)
        self._settings_cache = (outbound, made, limits)
        return made, limits

    # -------------------------------------------------------------- conclude

    async def _conclude(
        self,
        claim: Claim,
        hmail: HMail,
        verdicts: dict[int, Verdict],
        outbound: OutboundConfig,
        started: float,
        ticket: Ticket,
    ) -> None:
        now = self.clock()
        by_id = {r.id: r for r in claim.recipients}
        missing = [r.id for r in claim.recipients if r.id not in verdicts]
        for rid in missing:  # the session must answer for everyone; never lose one
            verdicts[rid] = Verdict(
                Outcome.DEFERRED,
                local_reply(451, "4.3.0", "no result for this recipient"),
                Stage.LOCAL,
                count_failure=False,
            )
        decisions: dict[int, Decision] = {}
        intervals, received_at = outbound.temp_fail_intervals, claim.received_at
        all_delivered = True
        local = False
        for rid, v in verdicts.items():
            d = decisions[rid] = decide(by_id[rid], v, intervals, received_at=received_at, now=now)
            if d.outcome is not Outcome.DELIVERED:
                all_delivered = False
            if v.stage == Stage.LOCAL:
                local = True
        if local and await _body_lost(claim):
            decisions = _drop_for_lost_body(decisions)
        delay_noticed: set[int] = set()
        if not all_delivered:  # else no hook, DSN or delay notice has anything to do
            decisions = await self._deferred_hook(claim, hmail, decisions)
            decisions = await self._bounces(claim, hmail, decisions, now, ticket)
            delay_noticed = await self._delay_notice(claim, decisions, outbound, now)
        if any(r.notify is not None for r in claim.recipients):
            # No NOTIFY means FAILURE,DELAY (dsn.notify_wants): never a success notice.
            await self._success_notice(claim, by_id, decisions, now)

        records = _attempt_records(decisions, delay_noticed, started, now)
        result = await self.spool.record(self.owner, claim, records, now=now)
        if any(d.final_status == BODY_MISSING_STATUS for d in decisions.values()):
            await self._drop_lost_message(claim, now)
        for rid in result.lease_lost:
            LOG.warn(
                "lost the lease before recording; state left to its new owner",
                qid=claim.queue_id,
                rcpt=by_id[rid].address,
            )
        self._log_outcomes(claim, by_id, decisions, now)
        if not self.hooks.has("delivered"):
            return
        delivered = [
            by_id[rid].address for rid, d in decisions.items() if d.outcome is Outcome.DELIVERED
        ]
        if delivered:
            hmail.rcpt_to = delivered
            info = self._delivered_info(claim, decisions, delivered, now)
            try:
                await self.hooks.run("delivered", hmail, info)
            except HookFailure as exc:
                LOG.error(
                    "delivered hook failed", qid=claim.queue_id, plugin=exc.plugin, error=exc.reason
                )

    def _failure_sender(self, claim: Claim) -> Callable[..., Awaitable[NoticeOutcome]]:
        """Queues the failure DSN of ``claim``'s message (for its delivery round)."""
        original = _original(claim)

        async def send(failed: Sequence[NoticeRecipient], reason: str) -> NoticeOutcome:
            return await queue_failure_notice(
                self.spool, self.notice_settings, original, failed, reason=reason, now=self.clock()
            )

        return send

    async def _drop_lost_message(self, claim: Claim, now: float) -> None:
        """The body is gone: the message's other unfinished recipients (other
        domains, other leases) are dropped too, with the same reason."""
        LOG.error(
            "message body file is gone; its recipients are dropped",
            qid=claim.queue_id,
            path=str(claim.body_path or "(queue database)"),
        )
        try:
            await self.spool.finalize_message(
                claim.queue_id,
                Status.DROPPED,
                reason=BODY_MISSING_REASON,
                status_code=BODY_MISSING_STATUS,
                now=now,
            )
        except SpoolError as exc:
            LOG.error(
                "cannot drop the message's other recipients", qid=claim.queue_id, error=str(exc)
            )

    async def _deferred_hook(
        self, claim: Claim, hmail: HMail, decisions: dict[int, Decision]
    ) -> dict[int, Decision]:
        deferred = [rid for rid, d in decisions.items() if d.outcome is Outcome.DEFERRED]
        if not deferred or not self.hooks.has("deferred"):
            return decisions
        by_id = {r.id: r for r in claim.recipients}
        first = decisions[deferred[0]]
        now = self.clock()
        hmail.rcpt_to = [by_id[rid].address for rid in deferred]
        info: dict[str, Any] = {
            "delay": (first.next_attempt_at or now) - now,
            "err": str(first.reply),
        }
        try:
            outcome = await self.hooks.run("deferred", hmail, info)
        except HookFailure as exc:
            LOG.error(
                "deferred hook failed; keeping the retry schedule",
                qid=claim.queue_id,
                plugin=exc.plugin,
                error=exc.reason,
            )
            return decisions
        result = outcome.result
        if result is None:
            return decisions
        updated = dict(decisions)
        if result.code is ResultCode.OK:
            for rid in deferred:
                updated[rid] = replace(
                    decisions[rid],
                    outcome=Outcome.DROPPED,
                    next_attempt_at=None,
                    reason=f"dropped by plugin {outcome.plugin} in the deferred hook",
                    final_status=dsn.STATUS_OPERATOR,
                )
        elif result.code is ResultCode.DENYSOFT and result.delay_seconds is not None:
            for rid in deferred:
                updated[rid] = replace(
                    decisions[rid],
                    next_attempt_at=now + result.delay_seconds,
                    reason=f"retry delay set by plugin {outcome.plugin}",
                )
        return updated

    async def _bounces(
        self,
        claim: Claim,
        hmail: HMail,
        decisions: dict[int, Decision],
        now: float,
        ticket: Ticket,
    ) -> dict[int, Decision]:
        bounced = [rid for rid, d in decisions.items() if d.outcome is Outcome.BOUNCED]
        if not bounced:
            return decisions
        by_id = {r.id: r for r in claim.recipients}
        reported_before = [rid for rid in bounced if by_id[rid].dsn_queue_id]
        if reported_before:
            # A DSN was queued for them and then the record was lost (a crash):
            # that DSN stands, a second one would report the failure twice.
            decisions = dict(decisions)
            for rid in reported_before:
                decisions[rid] = replace(
                    decisions[rid], reason=f"DSN {by_id[rid].dsn_queue_id} (queued earlier)"
                )
            bounced = [rid for rid in bounced if not by_id[rid].dsn_queue_id]
            if not bounced:
                return decisions
        first = decisions[bounced[0]]
        if self.hooks.has("bounce"):
            hmail.rcpt_to = [by_id[rid].address for rid in bounced]
            try:
                outcome = await self.hooks.run("bounce", hmail, str(first.reply))
            except HookFailure as exc:
                LOG.error(
                    "bounce hook failed; sending the DSN anyway",
                    qid=claim.queue_id,
                    plugin=exc.plugin,
                    error=exc.reason,
                )
            else:
                if outcome.result is not None and outcome.result.code is ResultCode.OK:
                    updated = dict(decisions)
                    for rid in bounced:
                        updated[rid] = replace(
                            decisions[rid],
                            reason=f"DSN suppressed by plugin {outcome.plugin}",
                        )
                    return updated
        failed = [
            NoticeRecipient(
                report=_report(by_id[rid], decisions[rid], "failed", now),
                notify=by_id[rid].notify,
            )
            for rid in bounced
        ]
        reason = first.reason or str(first.reply)
        try:
            notice = await self.rounds.report(ticket, failed, reason, self._failure_sender(claim))
        except SpoolError as exc:
            if await _body_lost(claim):
                # No body, no DSN, ever: waiting would only loop.  Dropped,
                # with the reason, as start-up recovery does.
                return {**decisions, **_drop_for_lost_body({r: decisions[r] for r in bounced})}
            # The DSN could not be queued: keep the recipients unfinished so
            # the failure (and its notice) is not lost; try again soon.
            LOG.error(
                "cannot queue the DSN; recipients stay deferred", qid=claim.queue_id, error=str(exc)
            )
            updated = dict(decisions)
            for rid in bounced:
                updated[rid] = replace(
                    decisions[rid],
                    outcome=Outcome.DEFERRED,
                    next_attempt_at=now + 60,
                    count_failure=False,
                    reason=f"DSN not queued: {exc}",
                )
            return updated
        updated = dict(decisions)
        reported = set(notice.reported)
        for rid in bounced:
            if notice.dsn_queue_id is not None and by_id[rid].address in reported:
                note = f"DSN {notice.dsn_queue_id}" + (
                    " (double bounce)" if notice.double_bounce else ""
                )
            else:
                note = notice.reason
            prefix = decisions[rid].reason
            updated[rid] = replace(decisions[rid], reason=f"{prefix}; {note}" if prefix else note)
        return updated

    async def _delay_notice(
        self, claim: Claim, decisions: dict[int, Decision], outbound: OutboundConfig, now: float
    ) -> set[int]:
        """One delay DSN for recipients still deferred after ``delay_warning_time``.

        Sent at most once per recipient; returns the recipients it covered.
        A delay notice that cannot be queued is only logged: the recipients
        stay deferred and the notice is tried again at their next attempt.
        """
        warn_after = outbound.delay_warning_time
        if warn_after <= 0 or now - claim.received_at < warn_after:
            return set()
        by_id = {r.id: r for r in claim.recipients}
        due = [
            rid
            for rid, d in decisions.items()
            if d.outcome is Outcome.DEFERRED
            and not by_id[rid].delay_notified
            and dsn.should_send_dsn(claim.mail_from, by_id[rid].notify, "delay")
        ]
        if not due:
            return set()
        intervals = outbound.temp_fail_intervals
        notices = [
            NoticeRecipient(
                report=_report(
                    by_id[rid],
                    decisions[rid],
                    "delayed",
                    now,
                    will_retry_until=now + sum(intervals[by_id[rid].failures :]),
                ),
                notify=by_id[rid].notify,
            )
            for rid in due
        ]
        reason = str(decisions[due[0]].reply)
        try:
            notice = await queue_notice(
                self.spool,
                self.notice_settings,
                _original(claim),
                notices,
                event="delay",
                reason=reason,
                now=now,
            )
        except SpoolError as exc:
            LOG.error("cannot queue the delay notice", qid=claim.queue_id, error=str(exc))
            return set()
        if notice.dsn_queue_id:
            LOG.info("delay notice queued", qid=claim.queue_id, dsn=notice.dsn_queue_id)
        reported = set(notice.reported)
        return {rid for rid in due if by_id[rid].address in reported}

    async def _success_notice(
        self,
        claim: Claim,
        by_id: dict[int, ClaimedRecipient],
        decisions: dict[int, Decision],
        now: float,
    ) -> None:
        """A success DSN for NOTIFY=SUCCESS recipients, unless the next hop took
        the DSN request over (RFC 3461 §5.2: it then reports success itself)."""
        notices: list[NoticeRecipient] = []
        for rid, d in decisions.items():
            # No NOTIFY means FAILURE,DELAY (dsn.notify_wants): never a success notice.
            if d.outcome is not Outcome.DELIVERED or by_id[rid].notify is None:
                continue
            if not dsn.should_send_dsn(claim.mail_from, by_id[rid].notify, "success"):
                continue
            conn = d.conn or Connection()
            action = dsn.success_action(conn.dsn_passed_on, final_delivery=conn.lmtp)
            if action is None:
                continue
            notices.append(
                NoticeRecipient(
                    report=_report(by_id[rid], d, action, now),
                    notify=by_id[rid].notify,
                )
            )
        if not notices:
            return
        try:
            notice = await queue_notice(
                self.spool,
                self.notice_settings,
                _original(claim),
                notices,
                event="success",
                reason=str(next(iter(decisions.values())).reply),
                now=now,
            )
        except SpoolError as exc:
            LOG.error("cannot queue the success notice", qid=claim.queue_id, error=str(exc))
            return
        if notice.dsn_queue_id:
            LOG.info("success notice queued", qid=claim.queue_id, dsn=notice.dsn_queue_id)

    # ------------------------------------------------------------------- log

    def _log_outcomes(
        self,
        claim: Claim,
        by_id: dict[int, ClaimedRecipient],
        decisions: dict[int, Decision],
        now: float,
    ) -> None:
        """One NOTICE line per recipient (its outcome), in recipient order.

        Consecutive recipients whose lines differ only in ``rcpt`` (all of a
        message's recipients taken by one server, the usual case) are
        written with :meth:`Logger.each`: the shared fields are formatted
        once, the lines stay one per recipient.
        """
        for rid, d in decisions.items():
            conn = d.conn
            if (
                conn is not None
                and conn.tls_policy_met is False
                and d.outcome is Outcome.DELIVERED
                and conn.tls_policy in ("mta-sts", "dane")
            ):
                # MTA-STS testing mode: the mail went, the operator should know.
                LOG.warn(
                    "delivered although the TLS policy was not met",
                    qid=claim.queue_id,
                    rcpt=by_id[rid].address,
                    host=conn.mx_host,
                    policy=conn.tls_policy,
                )
        if not LOG.enabled(log.Level.NOTICE):
            return
        delay = round(now - claim.received_at, 3)
        group: list[object] = []
        shared: tuple[Any, ...] | None = None
        for rid, d in decisions.items():
            rcpt = by_id[rid]
            conn = d.conn or _NO_CONNECTION
            fields = (
                d.outcome,
                conn.mx_host,
                conn.mx_ip,
                d.reply,
                rcpt.attempts,
                conn.tls,
                d.next_attempt_at,
                d.reason,
            )
            if fields != shared:
                if shared is not None:
                    self._log_group(claim, group, shared, delay, now)
                shared, group = fields, []
            group.append(rcpt.address)
        if shared is not None:
            self._log_group(claim, group, shared, delay, now)

    @staticmethod
    def _log_group(
        claim: Claim, addresses: list[object], shared: tuple[Any, ...], delay: float, now: float
    ) -> None:
        outcome, host, ip, reply, attempts, tls, next_attempt_at, reason = shared
        LOG.each(
            log.Level.NOTICE,
            outcome.value,
            "rcpt",
            addresses,
            qid=claim.queue_id,
            domain=claim.domain,
            host=host,
            ip=ip,
            code=reply.recorded_code,
            response=str(reply),
            delay=delay,
            attempt=attempts + 1,
            tls=tls,
            next_attempt=(round(next_attempt_at - now) if next_attempt_at else None),
            reason=reason,
        )

    def _delivered_info(
        self,
        claim: Claim,
        decisions: dict[int, Decision],
        delivered: list[str],
        now: float,
    ) -> dict[str, Any]:
        first = next(d for d in decisions.values() if d.outcome is Outcome.DELIVERED)
        reply = first.reply
        conn = first.conn or Connection()
        return {
            "host": conn.mx_host,
            "ip": conn.mx_ip,
            "port": conn.port,
            "response": str(reply),
            "delay": now - claim.received_at,
            "mode": "LMTP" if conn.lmtp else "SMTP",
            "ok_recips": delivered,
            "secured": conn.tls is not None,
            "authenticated": conn.auth is not None,
        }


_NO_CONNECTION = Connection()


def _attempt_records(
    decisions: dict[int, Decision], delay_noticed: set[int], started: float, now: float
) -> list[AttemptRecord]:
    """One attempt record per recipient (positional: made once per recipient).

    The connection's fields are read once per connection, not per
    recipient: the recipients of a delivery almost always share one.
    """
    records: list[AttemptRecord] = []
    seen: Connection | None = _NO_CONNECTION
    mx_host = mx_ip = tls = auth = tls_policy = None
    port: int | None = None
    tls_policy_met: bool | None = None
    for rid, d in decisions.items():
        conn = d.conn
        if conn is not seen:
            seen = conn
            if conn is None:
                mx_host = mx_ip = tls = auth = tls_policy = None
                port = tls_policy_met = None
            else:
                mx_host, mx_ip, port, tls = conn.mx_host, conn.mx_ip, conn.port, conn.tls
                auth, tls_policy, tls_policy_met = conn.auth, conn.tls_policy, conn.tls_policy_met
        reply = d.reply
        outcome = d.outcome
        dropped = outcome is Outcome.DROPPED
        records.append(
            AttemptRecord(
                rid,
                outcome,
                started,
                now,
                mx_host,
                mx_ip,
                port,
                tls,
                auth,
                reply.recorded_code,
                reply.status,
                reply.text,
                d.next_attempt_at,
                d.count_failure,
                d.reason or reply.context,
                rid in delay_noticed,
                # A drop is our decision, not a reply's: the views show its status.
                (d.final_status or dsn.STATUS_OPERATOR) if dropped else None,
                d.reason if dropped else None,
                tls_policy,
                tls_policy_met,
            )
        )
    return records


async def _body_lost(claim: Claim) -> bool:
    """Whether the claim's body is gone (asked only after a local failure): no file,
    or (PostgreSQL) no body row came with the claim."""
    if claim.body is not None:
        return False
    if claim.body_path is None:
        return True
    return not await asyncio.to_thread(claim.body_path.exists)


def _drop_for_lost_body(decisions: dict[int, Decision]) -> dict[int, Decision]:
    """Every recipient not delivered is dropped: without its body the
    message can neither be delivered nor returned in a DSN."""
    return {
        rid: d
        if d.outcome is Outcome.DELIVERED
        else replace(
            d,
            outcome=Outcome.DROPPED,
            next_attempt_at=None,
            count_failure=False,
            reason=BODY_MISSING_REASON,
            final_status=BODY_MISSING_STATUS,
        )
        for rid, d in decisions.items()
    }


def _original(claim: Claim) -> OriginalMessage:
    return OriginalMessage(
        queue_id=claim.queue_id,
        mail_from=claim.mail_from,
        body_path=claim.body_path,
        body=claim.body,
        received_at=claim.received_at,
        env_id=claim.env_id,
        ret=claim.ret,
        is_double_bounce_notice=bool(claim.notes.get(DOUBLE_BOUNCE_NOTE)),
    )


_CLASS_OF_ACTION = {"failed": "5", "delayed": "4", "delivered": "2", "relayed": "2"}


def _report(
    rcpt: ClaimedRecipient,
    decision: Decision,
    action: dsn.DsnAction,
    now: float,
    *,
    will_retry_until: float | None = None,
) -> dsn.DsnRecipient:
    """One recipient's line in a DSN, from its decision in this attempt.

    ``Status`` is ours: the reply's enhanced code moved into the action's
    class (a deferral that ran out reports ``5.x.y``).  ``Diagnostic-Code``
    is the server's own reply line, verbatim (RFC 3464 §2.3.6), and only
    when a server sent one; our own reasons are in the human part.
    """
    reply = decision.reply
    remote = _remote(decision)
    first = _CLASS_OF_ACTION.get(action, "5")
    status = reply.status or ""
    if status[:1] != first or status[1:2] != ".":
        status = f"{first}{status[1:]}" if status[:1] in ("2", "4", "5") else f"{first}.0.0"
    return dsn.DsnRecipient(
        address=rcpt.address,
        action=action,
        status=status,
        original_recipient=rcpt.orcpt,
        remote_mta=remote,
        diagnostic_code=reply.code if remote else None,
        diagnostic_text=reply.sent if remote else None,
        last_attempt_at=now,
        will_retry_until=will_retry_until,
        reason=decision.reason or (None if remote else str(reply)),
    )


def _remote(decision: Decision) -> str | None:
    """The remote host whose reply decided, if a remote's reply decided."""
    if decision.conn is None or not decision.reply.remote:
        return None
    return decision.conn.mx_host


def _connection(info: ConnectionInfo | None) -> Connection | None:
    if info is None:
        return None
    return Connection(
        mx_host=info.host,
        mx_ip=info.ip,
        port=info.port,
        tls=info.tls,
        # "PLAIN relayuser": the mechanism and user offered, accepted or not.
        auth=" ".join(p for p in (info.auth_mechanism, info.auth_user) if p) or None,
        lmtp=info.lmtp,
        dsn_passed_on=info.dsn,
        tls_policy=info.tls_policy,
        tls_policy_met=info.tls_policy_met,
    )


def _plugin_failure(exc: HookFailure) -> Verdict:
    reply = local_reply(451, "4.3.0", f"plugin {exc.plugin} failed in {exc.hook}: {exc.reason}")
    return Verdict(Outcome.DEFERRED, reply, "plugin", count_failure=False, reason=str(exc))
