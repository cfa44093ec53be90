"""The per-recipient decision after an attempt: retry schedule and exhaustion."""

from __future__ import annotations

from outboundd.delivery.engine import Verdict, decide
from outboundd.delivery.replies import Reply
from outboundd.spool import ClaimedRecipient, Outcome, Status

NOW = 1_800_000_000.0
INTERVALS = (10.0, 60.0)


def rcpt(failures: int = 0, attempts: int = 0) -> ClaimedRecipient:
    return ClaimedRecipient(1, "b@example.test", None, None, attempts, failures, Status.QUEUED)


def test_delivered_and_bounced_are_final() -> None:
    ok = decide(rcpt(), Verdict(Outcome.DELIVERED, Reply(250, "2.0.0", "ok"), "data_end"),
                INTERVALS, received_at=NOW, now=NOW)  # fmt: skip
    assert (ok.outcome, ok.next_attempt_at) == (Outcome.DELIVERED, None)
    no = decide(rcpt(), Verdict(Outcome.BOUNCED, Reply(550, "5.1.1", "unknown"), "rcpt"),
                INTERVALS, received_at=NOW, now=NOW)  # fmt: skip
    assert (no.outcome, no.reply.status) == (Outcome.BOUNCED, "5.1.1")


def test_temporary_failures_follow_the_schedule() -> None:
    reply = Reply(451, "4.7.1", "try later")
    first = decide(rcpt(failures=0), Verdict(Outcome.DEFERRED, reply, "rcpt"), INTERVALS,
                   received_at=NOW, now=NOW)  # fmt: skip
    assert (first.outcome, first.next_attempt_at, first.count_failure) == (
        Outcome.DEFERRED, NOW + 10, True,
    )  # fmt: skip
    second = decide(rcpt(failures=1), Verdict(Outcome.DEFERRED, reply, "rcpt"), INTERVALS,
                    received_at=NOW, now=NOW)  # fmt: skip
    assert second.next_attempt_at == NOW + 60


def test_exhausted_schedule_bounces_with_permanent_status_and_reason() -> None:
    reply = Reply(451, "4.4.1", "mailbox busy")
    gave_up = decide(rcpt(failures=2, attempts=2), Verdict(Outcome.DEFERRED, reply, "rcpt"),
                     INTERVALS, received_at=NOW - 3 * 86400, now=NOW)  # fmt: skip
    assert gave_up.outcome is Outcome.BOUNCED
    assert gave_up.reply.status is not None and gave_up.reply.status.startswith("5.")
    assert gave_up.reason is not None and "gave up after 3 attempts" in gave_up.reason
    assert "mailbox busy" in gave_up.reason
    # "none": the very first temporary failure bounces
    at_once = decide(rcpt(), Verdict(Outcome.DEFERRED, reply, "rcpt"), (),
                     received_at=NOW, now=NOW)  # fmt: skip
    assert at_once.outcome is Outcome.BOUNCED


def test_uncounted_deferral_keeps_failure_count_and_never_bounces() -> None:
    reply = Reply(451, "4.3.0", "plugin failed")
    verdict = Verdict(Outcome.DEFERRED, reply, "plugin", count_failure=False)
    d = decide(rcpt(failures=2), verdict, INTERVALS, received_at=NOW, now=NOW)
    assert (d.outcome, d.count_failure) == (Outcome.DEFERRED, False)
    assert d.next_attempt_at is not None and d.next_attempt_at > NOW
