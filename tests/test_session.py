"""The SMTP/LMTP delivery session against scripted MX servers on loopback,
and the pure reply/envelope functions it decides with."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from aiosmtplib import SMTPResponse, SMTPResponseException

from outboundd.delivery.errors import PermanentFailure, TransientFailure
from outboundd.delivery.mx import MXTarget
from outboundd.delivery.replies import (
    Reply,
    ReplyClass,
    Stage,
    classify,
    outcome_of,
    parse_reply,
    to_exhausted,
    to_transient,
)
from outboundd.delivery.session import (
    Connection,
    DeliveryJob,
    JobRecipient,
    SessionResult,
    SessionSettings,
    _DataPhase,
    _take_responses,
    deliver_job,
    dot_stuff,
    host_listed,
    orcpt_param,
    plan_envelope,
    xtext,
)
from outboundd.hooks import MX
from outboundd.spool.types import Outcome
from tests import certs, mxserver
from tests.mxserver import DROP, MXScript, MXServer, mx_factory, refusing_address

__all__ = ["mx_factory"]  # the fixture is used by name below

MakeMX = Callable[..., MXServer]
DELIVERED, DEFERRED, BOUNCED = Outcome.DELIVERED, Outcome.DEFERRED, Outcome.BOUNCED
BODY = b"From: a@sender.test\r\nSubject: test\r\n\r\n.leading dot\r\n..two dots\r\nend\r\n"


@pytest.fixture(autouse=True, params=[True, False], ids=["pipelined", "unpipelined"])
def mx_pipelining(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Every session test runs against an MX with PIPELINING and one without:
    the client sends the envelope in one write or command by command."""
    monkeypatch.setattr(mxserver, "PIPELINING_DEFAULT", request.param)
    return bool(request.param)


def settings(**overrides: object) -> SessionSettings:
    """Short timeouts: every test stays well under two seconds."""
    values: dict[str, object] = {
        "helo": "outboundd.test",
        "connect_timeout": 1.0,
        "greeting_timeout": 1.0,
        "ehlo_timeout": 1.0,
        "starttls_timeout": 1.0,
        "auth_timeout": 1.0,
        "mail_timeout": 1.0,
        "rcpt_timeout": 1.0,
        "data_timeout": 1.0,
        "data_block_timeout": 1.0,
        "data_end_timeout": 1.0,
        "rset_timeout": 1.0,
        "quit_timeout": 0.5,
    }
    values.update(overrides)
    return SessionSettings(**values)  # type: ignore[arg-type]


@pytest.fixture
def job_factory(tmp_path: Path) -> Callable[..., DeliveryJob]:
    """``job_factory(*recipients, body=..., size=..., **DeliveryJob fields)``."""
    counter = iter(range(1_000_000))

    def make(*rcpts: str | JobRecipient, body: bytes = BODY, **kw: object) -> DeliveryJob:
        path = tmp_path / f"body{next(counter)}.eml"
        path.write_bytes(body)
        recipients = tuple(
            r if isinstance(r, JobRecipient) else JobRecipient(i + 1, r)
            for i, r in enumerate(rcpts or ("rcpt@dest.test",))
        )
        size = kw.pop("size", len(body))
        return DeliveryJob("sender@origin.test", recipients, path, size, **kw)  # type: ignore[arg-type]

    return make


def refusing_target(host: str = "127.0.0.9") -> MXTarget:
    ip, port = refusing_address(host)
    return MXTarget(MX(ip, port=port), ip, port, "refuser.test")


def outcomes(result: SessionResult) -> dict[int, Outcome]:
    return {rid: r.outcome for rid, r in result.recipients.items()}


# ---------------------------------------------------------------- replies (pure)


def shape(reply: Reply) -> tuple[int, str | None, str]:
    """A reply's code, status and text (what the record carries)."""
    return (reply.code, reply.status, reply.text)


def test_parse_reply_takes_enhanced_status_with_multi_digit_parts() -> None:
    reply = parse_reply(550, "5.7.26 Unauthenticated email is not accepted\n5.7.26 see docs")
    assert shape(reply) == (550, "5.7.26", "Unauthenticated email is not accepted see docs")
    # The line as sent, for Diagnostic-Code: nothing taken out, nothing added.
    assert str(reply) == "550 5.7.26 Unauthenticated email is not accepted 5.7.26 see docs"


def test_parse_reply_defaults_and_mismatched_class() -> None:
    assert shape(parse_reply(550, "no such user")) == (550, "5.0.0", "no such user")
    assert shape(parse_reply(451, "")) == (451, "4.0.0", "")
    # RFC 3463: the status class must match the reply code; otherwise it is text.
    assert shape(parse_reply(450, "5.1.1 odd")) == (450, "4.0.0", "5.1.1 odd")
    assert shape(parse_reply(250, "2.1.5ok")) == (250, "2.0.0", "2.1.5ok")
    assert parse_reply(-1, "garbage").status == "4.5.0"
    long = parse_reply(250, "x" * 5000 + "\x00\x07")
    assert len(long.text) == 2000 and "\x00" not in long.text


def test_classify_and_outcome() -> None:
    assert classify(250) is ReplyClass.POSITIVE
    assert classify(451) is ReplyClass.TEMPORARY
    assert classify(554) is ReplyClass.PERMANENT
    assert classify(354) is ReplyClass.TEMPORARY  # protocol error where a final reply was due
    assert classify(-1) is ReplyClass.TEMPORARY
    assert outcome_of(Reply(250, "2.0.0", "")) is DELIVERED
    assert outcome_of(Reply(452, "4.2.2", "")) is DEFERRED
    assert outcome_of(Reply(550, "5.1.1", "")) is BOUNCED
    assert outcome_of(Reply(600, "4.5.0", "")) is DEFERRED


def test_to_exhausted_turns_only_the_status_and_keeps_the_remote_reply() -> None:
    last = parse_reply(451, "4.7.1 greylisted, try later")
    final = to_exhausted(last)
    assert (final.code, final.status, final.text) == (451, "5.7.1", "greylisted, try later")
    assert final.line == "451 4.7.1 greylisted, try later"  # the remote's words
    assert final.recorded_code == 451
    assert to_exhausted(parse_reply(452, "full")).status == "5.0.0"
    local = to_exhausted(Reply(421, "4.4.1", "connection to [192.0.2.1]:25 failed: refused"))
    assert (local.status, local.recorded_code, local.line) == ("5.4.1", None, None)
    bounced = parse_reply(550, "5.1.1 gone")
    assert to_exhausted(bounced) is bounced


def test_to_transient_keeps_the_remote_code_and_words() -> None:
    moved = to_transient(parse_reply(554, "5.7.1 go away"), "mx [1.2.3.4]:25 greeted")
    assert (moved.code, moved.status, moved.text) == (554, "4.7.1", "go away")
    assert moved.recorded_code == 554 and moved.line == "554 5.7.1 go away"
    assert moved.context == "mx [1.2.3.4]:25 greeted"
    assert str(moved) == "mx [1.2.3.4]:25 greeted: 554 5.7.1 go away"
    kept = to_transient(parse_reply(421, "4.3.2 bye"), "ctx")
    assert (kept.code, kept.status, kept.text, str(kept)) == (
        421,
        "4.3.2",
        "bye",
        "ctx: 421 4.3.2 bye",
    )
    ours = to_transient(Reply(550, "5.0.0", "made up here"), "ctx")
    assert (ours.status, ours.text, ours.recorded_code) == ("4.0.0", "ctx: made up here", None)


def test_only_a_server_reply_has_a_recorded_code_and_line() -> None:
    plain = parse_reply(550, "mailbox unavailable")
    assert plain.status == "5.0.0"  # derived for the record ...
    assert plain.line == "550 mailbox unavailable"  # ... never put into the remote's words
    assert plain.recorded_code == 550
    local = Reply(421, "4.4.1", "connection refused")
    assert local.recorded_code is None and local.line is None
    assert str(local) == "connection refused"


def test_failures_carry_the_reply() -> None:
    exc = TransientFailure(Reply(421, "4.4.2", "lost"), Stage.RCPT, retry_elsewhere=False)
    assert (exc.code, exc.status, exc.text, exc.stage) == (421, "4.4.2", "lost", Stage.RCPT)
    assert not exc.retry_elsewhere
    assert PermanentFailure(Reply(552, "5.3.4", "big"), Stage.MAIL).code == 552


# ---------------------------------------------------------------- envelope (pure)


def test_xtext() -> None:
    assert xtext("a+b=c d@é.test") == "a+2Bb+3Dc+20d@+C3+A9.test"
    assert xtext("plain@example.test") == "plain@example.test"


def test_dot_stuff_across_chunks() -> None:
    out1, start = dot_stuff(b".a\r\nb\r\n", True)
    out2, start = dot_stuff(b".c\r\n.", start)
    out3, start = dot_stuff(b"d\r\n", start)
    assert out1 + out2 + out3 == b"..a\r\nb\r\n..c\r\n..d\r\n"
    assert dot_stuff(b"x.y", False) == (b"x.y", False)


def test_take_responses_parses_several_replies_in_one_buffer() -> None:
    data = b"250-first\r\n250 2.0.0 ok\r\n550 5.1.1 no\r\n452 4.2"
    found: collections.deque[SMTPResponse] = collections.deque()
    taken = _take_responses(data, found)
    assert [(r.code, r.message) for r in found] == [(250, "first\n2.0.0 ok"), (550, "5.1.1 no")]
    assert data[taken:] == b"452 4.2"
    assert _take_responses(b"452 4.2", found) == 0 and len(found) == 2


def test_take_responses_keeps_the_replies_before_a_bad_line() -> None:
    found: collections.deque[SMTPResponse] = collections.deque()
    with pytest.raises(SMTPResponseException, match="malformed reply line"):
        _take_responses(b"250 ok\r\n25x nonsense\r\n", found)
    assert [(r.code, r.message) for r in found] == [(250, "ok")]
    with pytest.raises(SMTPResponseException, match="too long"):
        _take_responses(b"250-" + b"x" * 9000, found)
    with pytest.raises(SMTPResponseException, match="too long"):
        _take_responses(b"250 " + b"x" * 9000 + b"\r\n", found)
    assert _take_responses(b"250 " + b"x" * 8000 + b"\r\n", found) == 8006


async def test_data_phase_reads_replies_split_across_segments() -> None:
    """A reply cut anywhere (even inside a line of a multi-line reply) is joined."""
    reply = b"250-first\r\n250 2.0.0 ok\r\n550 5.1.1 no\r\n"
    for cut in range(1, len(reply)):
        phase = _DataPhase(asyncio.Protocol())
        phase.data_received(reply[:cut])
        phase.data_received(reply[cut:])
        replies = [phase.take(), phase.take(), phase.take()]
        assert [(r.code, r.message) for r in replies if r is not None] == [
            (250, "first\n2.0.0 ok"),
            (550, "5.1.1 no"),
        ], cut


def test_host_listed() -> None:
    assert host_listed("MX.Example.test.", "192.0.2.1", ["mx.example.test"])
    assert host_listed("mx", "192.0.2.1", ["192.0.2.1"])
    assert host_listed("mx", "192.0.2.1", ["192.0.2.0/24"])
    assert not host_listed("mx", "192.0.2.1", ["other", "198.51.100.0/24", "bad/cidr", ""])


def test_plan_envelope_parameters(job_factory: Callable[..., DeliveryJob]) -> None:
    job = job_factory(
        JobRecipient(1, "a@dest.test", notify="success,failure", orcpt="rfc822;A+1@orig.test"),
        JobRecipient(2, "b@dest.test", notify="bogus"),
        env_id="id=42",
        ret="hdrs",
        body_8bit=True,
    )
    ext = {"size": "1000000", "8bitmime": "", "dsn": ""}
    plan = plan_envelope(job, job.recipients, ext, peer="mx")
    assert plan.refusal is None and plan.dsn and not plan.utf8
    assert plan.mail_params == (f"SIZE={job.size}", "BODY=8BITMIME", "RET=HDRS", "ENVID=id+3D42")
    assert plan.rcpt_params[1] == ("NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;A+2B1@orig.test")
    assert plan.rcpt_params[2] == ()
    bare = plan_envelope(job, job.recipients, {}, peer="mx")
    assert bare.mail_params == () and bare.rcpt_params == {} and not bare.dsn


def test_orcpt_goes_on_in_its_own_type_and_rfc_6533_encoding() -> None:
    # rfc822 keeps xtext of the UTF-8 octets: the parameter goes on as it came.
    assert orcpt_param("rfc822;jänedoe@dest.test", utf8=False) == (
        "ORCPT=rfc822;j+C3+A4nedoe@dest.test"
    )
    assert orcpt_param("rfc822;jänedoe@dest.test", utf8=True) == (
        "ORCPT=rfc822;j+C3+A4nedoe@dest.test"
    )
    # utf-8: utf-8-addr-xtext without SMTPUTF8, utf-8-addr-unitext with it.
    assert orcpt_param("utf-8;jürgen@dest.test", utf8=False) == "ORCPT=utf-8;j\\x{FC}rgen@dest.test"
    assert orcpt_param("utf-8;jürgen@dest.test", utf8=True) == "ORCPT=utf-8;jürgen@dest.test"
    assert orcpt_param("utf-8;a+b=c@dest.test", utf8=True) == (
        "ORCPT=utf-8;a\\x{2B}b\\x{3D}c@dest.test"
    )
    assert orcpt_param(None, utf8=False) is None
    assert orcpt_param("rfc822; ", utf8=False) is None


def test_plan_envelope_refusals(job_factory: Callable[..., DeliveryJob]) -> None:
    big = job_factory(size=2000)
    refusal = plan_envelope(big, big.recipients, {"size": "1000"}, peer="mx").refusal
    assert refusal is not None and (refusal.code, refusal.status) == (552, "5.3.4")
    assert plan_envelope(big, big.recipients, {"size": "0"}, peer="mx").refusal is None
    utf8 = job_factory(smtputf8=True)
    refusal = plan_envelope(utf8, utf8.recipients, {}, peer="mx").refusal
    assert refusal is not None and refusal.status == "5.6.7"
    mixed = job_factory("ascii@dest.test", "jösé@dest.test", "bad<x>@dest.test")
    plan = plan_envelope(mixed, mixed.recipients, {}, peer="mx")
    assert plan.refusal is None and set(plan.refused) == {2, 3}
    assert plan.refused[2].status == "5.6.7" and plan.refused[3].status == "5.1.3"
    plan = plan_envelope(mixed, mixed.recipients, {"smtputf8": "", "8bitmime": ""}, peer="mx")
    assert set(plan.refused) == {3} and plan.utf8
    assert plan.mail_params == ("BODY=8BITMIME", "SMTPUTF8")


# ---------------------------------------------------------------- delivery basics


async def test_delivers_body_exactly_with_helo_and_bind(
    mx_factory: MakeMX, job_factory: Callable[..., DeliveryJob]
) -> None:
    mx = mx_factory()
    body = b"Subject: dots\r\n\r\n.\r\n..\r\n.x\r\nno final newline"
    job = job_factory("one@dest.test", body=body)
    result = await deliver_job(
        job, [mx.target(bind="127.0.0.1", bind_helo="bound.test")], settings()
    )
    assert outcomes(result) == {1: DELIVERED}
    [tx] = mx.transactions
    assert tx.body == body + b"\r\n"  # the dot needs a line of its own
    assert (tx.mail_from, tx.rcpt_tos, tx.helo, tx.peer) == (
        "sender@origin.test",
        ["one@dest.test"],
        "bound.test",
        "127.0.0.1",
    )
    assert mx.commands == ["EHLO", "MAIL", "RCPT", "DATA", "QUIT"]
    assert result.mx_ip == mx.host and result.port == mx.port and result.tls is None
    assert result.errors == () and result.duration >= 0
    res = result.recipients[1]
    assert (res.reply.code, res.stage, res.connection) == (250, Stage.DATA_END, result.connection)


async def test_helo_name_from_settings_and_large_body_streams_over_tls(
    mx_factory: MakeMX, job_factory: Callable[..., DeliveryJob], pki: certs.TestPKI
) -> None:
    mx = mx_factory(MXScript(tls=pki))
    line = b"." + b"x" * 75 + b"\r\n"
    body = b"Subject: big\r\n\r\n" + line * 40_000  # ~3 MB: several chunks, flow control
    result = await deliver_job(job_factory(body=body), [mx.target()], settings())
    assert outcomes(result) == {1: DELIVERED}
    assert mx.transactions[0].body == body and mx.transactions[0].helo == "outboundd.test"
    assert result.tls is not None and mx.transactions[0].tls == result.tls


async def test_ehlo_refused_falls_back_to_helo(
    mx_factory: MakeMX, job_factory: Callable[..., DeliveryJob]
) -> None:
    mx = mx_factory(MXScript(ehlo="502 5.5.1 EHLO not implemented", dsn=True, size_limit=9999))
    job = job_factory(JobRecipient(1, "r@dest.test", notify="NEVER"))
    result = await deliver_job(job, [mx.target()], settings())
    assert outcomes(result) == {1: DELIVERED}
    assert mx.commands[:2] == ["EHLO", "HELO"]
    # No extensions after HELO: no SIZE bounce, no DSN parameters.
    assert mx.transactions[0].mail_params == [] and not result.dsn_passed_on


async def test_no_targets_defers() -> None:
    job = DeliveryJob("s@o.test", (JobRecipient(7, "r@d.test"),), Path("/nonexistent"), 1)
    result = await deliver_job(job, [], settings())
    res = result.recipients[7]
    assert (res.outcome, res.reply.status, res.connection) == (DEFERRED, "4.4.4", None)


async def test_missing_body_defers_without_trying_other_hosts(
    mx_factory: MakeMX, job_factory: Callable[..., DeliveryJob]
) -> None:
    first, second = mx_factory(host="127.0.0.2"), mx_factory(host="127.0.0.3")
    job = job_factory()
    job.body_path.unlink()
    result = await deliver_job(job, [first.target(), second.target()], settings())
    res = result.recipients[1]
    assert (res.outcome, res.reply.code, res.reply.status, res.stage) == (
        DEFERRED,
        451,
        "4.3.0",
        Stage.LOCAL,
    )
    assert second.connections == 0 and "MAIL" not in first.commands


# ---------------------------------------------------------------- per-recipient outcomes


async def test_mixed_rcpt_replies_and_251_252_are_accepted(
    mx_factory: MakeMX, job_factory: Callable[..., DeliveryJob]
) -> None:
    mx = mx_factory(
        MXScript(
            rcpt={
                "fwd@dest.test": "251 2.1.5 will forward",
                "cannot@dest.test": "252 2.1.5 cannot verify, will try",
                "later@dest.test": "450 4.2.1 mailbox busy",
                "gone@dest.test": "550 5.1.1 no such user",
            }
        )
    )
    job = job_factory(
        "ok@dest.test", "fwd@dest.test", "later@dest.test", "cannot@dest.test", "gone@dest.test"
    )
    result = await deliver_job(job, [mx.target()], settings())
    assert outcomes(result) == {1: DELIVERED, 2: DELIVERED, 3: DEFERRED, 4: DELIVERED, 5: BOUNCED}
    assert mx.transactions[0].rcpt_tos == ["ok@dest.test", "fwd@dest.test", "cannot@dest.test"]
    assert shape(result.recipients[3].reply) == (450, "4.2.1", "mailbox busy")
    assert result.recipients[3].stage is Stage.RCPT
    assert shape(result.recipients[5].reply) == (550, "5.1.1", "no such user")
    assert result.ids(DELIVERED) == (1, 2, 4)


async def test_no_accepted_recipient_means_no_data(
    mx_factory: MakeMX, job_factory: Callable[..., DeliveryJob], mx_pipelining: bool
) -> None:
    mx = mx_factory(MXScript(rcpt_default="550 5.1.1 nobody here"))
    result = await deliver_job(job_factory("a@dest.test", "b@dest.test"), [mx.target()], settings())
    assert outcomes(result) == {1: BOUNCED, 2: BOUNCED}
    # Pipelined, DATA went with the RCPTs (and was refused); otherwise it is not sent.
    assert ("DATA" in mx.commands) is mx_pipelining and mx.commands[-1] == "QUIT"
    assert mx.transactions == []


@pytest.mark.parametrize(
    ("data_reply", "expected"), [("451 4.3.0 queue full", DEFERRED), ("554 5.6.0 no", BOUNCED)]
)
async def test_data_refusal_touches_only_pending_recipients(
    mx_factory: MakeMX,
    job_factory: Callable[..., DeliveryJob],
    data_reply: str,
    expected: Outcome,
) -> None:
    mx = mx_factory(
        MXScript(
            data=data_reply,
            rcpt={"busy@dest.test": "452 4.2.2 over quota", "gone@dest.test": "550 5.1.1 gone"},
        )
    )
    job = job_factory("ok@dest.test", "busy@dest.test", "gone@dest.test")
    result = await deliver_job(job, [mx.target()], settings())
    assert outcomes(result) == {1: expected, 2: DEFERRED, 3: BOUNCED}
    assert result.recipients[1].stage is Stage.DATA
    assert result.recipients[2].reply.code == 452 and result.recipients[3].reply.code == 550


@pytest.mark.parametrize(
    ("end_reply", "expected"),
    [("452 4.3.1 insufficient storage", DEFERRED), ("550 5.7.1 content rejected", BOUNCED)],
)
async def test_final_dot_refusal_touches_only_pending_recipients(
    mx_factory: MakeMX,
    job_factory: Callable[..., DeliveryJob],
    end_reply: str,
    expected: Outcome,
) -> None:
    mx = mx_factory(
        MXScript(
            data_end=end_reply,
            rcpt={"later@dest.test": "451 4.4.3 later", "gone@dest.test": "550 5.1.1 gone"},
        )
    )
    job = job_factory("gone@dest.test", "ok@dest.test", "later@dest.test", "ok2@dest.test")
    result = await deliver_job(job, [mx.target()], settings())
    assert outcomes(result) == {1: BOUNCED, 2: expected, 3: DEFERRED, 4: expected}
    assert result.recipients[2].stage is Stage.DATA_END
    assert result.recipients[1].reply.text == "gone" and result.recipients[3].reply.text == "later"


@pytest.mark.parametrize(
    ("mail_reply", "expected"),
    [("451 4.7.1 greylisted", DEFERRED), ("553 5.7.1 sender rejected", BOUNCED)],
)
async def test_mail_refusal(
    mx_factory: MakeMX,
    job_factory: Callable[..., DeliveryJob],
    mail_reply: str,
    expected: Outcome,
    mx_pipelining: bool,
) -> None:
    mx = mx_factory(MXScript(mail=mail_reply))
    result = await deliver_job(job_factory("a@dest.test", "b@dest.test"), [mx.target()], settings())
    assert outcomes(result) == {1: expected, 2: expected}
    assert {r.stage for r in result.recipients.values()} == {Stage.MAIL}
    # Pipelined, the RCPTs were already sent with MAIL (and refused for want of it).
    assert ("RCPT" in mx.commands) is mx_pipelining
    assert mx.transactions == []


# ---------------------------------------------------------------- failover


async def test_refused_connection_fails_over_to_next_target(
    mx_factory: MakeMX, job_factory: Callable[..., DeliveryJob]
) -> None:
    mx = mx_factory(host="127.0.0.3")
    result = await deliver_job(job_factory(), [refusing_target(), mx.target()], settings())
    assert outcomes(result) == {1: DELIVERED}
    [error] = result.errors
    assert error.ip == "127.0.0.9" and error.stage is Stage.CONNECT
    assert error.reply.status == "4.4.1" and "refused" in error.reply.text.lower()
    assert result.mx_ip == "127.0.0.3"


@pytest.mark.parametrize("banner", ["554 5.7.1 go away", "421 4.3.2 too busy", DROP])
async def test_bad_banner_fails_over_and_all_failing_defers_with_host_named(
    mx_factory: MakeMX, job_factory: Callable[..., DeliveryJob], banner: str
) -> None:
    bad = mx_factory(MXScript(banner=banner), host="127.0.0.2")
    good = mx_factory(host="127.0.0.3")
    result = await deliver_job(job_factory(), [bad.target(), good.target()], settings())
    assert outcomes(result) == {1: DELIVERED} and bad.transactions == []
    result = await deliver_job(job_factory(), [bad.target(), refusing_target()], settings())
    res = result.recipients[1]
    assert res.outcome is DEFERRED and res.reply.code // 100 == 4
    assert "127.0.0.9" in res.reply.text and res.connection is not None
    assert [e.ip for e in result.errors] == ["127.0.0.2", "127.0.0.9"]
    assert result.errors[0].stage is Stage.GREETING


async def test_421_at_rcpt_moves_every_pending_recipient_to_the_next_target(
    mx_factory: MakeMX, job_factory: Callable[..., DeliveryJob]
) -> None:
    first = mx_factory(
        MXScript(rcpt={"gone@dest.test": "550 5.1.1 gone", "b@dest.test": "421 4.7.0 bye"}),
        host="127.0.0.2",
    )
    second = mx_factory(host="127.0.0.3")
    job = job_factory("a@dest.test", "gone@dest.test", "b@dest.test", "c@dest.test")
    result = await deliver_job(job, [first.target(), second.target()], settings())
    assert outcomes(result) == {1: DELIVERED, 2: BOUNCED, 3: DELIVERED, 4: DELIVERED}
    assert second.transactions[0].rcpt_tos == ["a@dest.test", "b@dest.test", "c@dest.test"]
    assert result.recipients[2].connection is not None
    assert result.recipients[2].connection.ip == "127.0.0.2"
    assert result.recipients[1].connection is not None
    assert result.recipients[1].connection.ip == "127.0.0.3"


async def test_421_after_the_dot_fails_over(
    mx_factory: MakeMX, job_factory: Callable[..., DeliveryJob]
) -> None:
    first = mx_factory(MXScript(data_end="421 4.3.2 shutting down"), host="127.0.0.2")
    second = mx_factory(host="127.0.0.3")
    result = await deliver_job(job_factory(), [first.target(), second.target()], settings())
    assert outcomes(result) == {1: DELIVERED} and len(second.transactions) == 1


async def test_drop_at_rcpt_fails_over(
    mx_factory: MakeMX, job_factory: Callable[..., DeliveryJob]
) -> None:
    first = mx_factory(MXScript(rcpt={"b@dest.test": DROP}), host="127.0.0.2")
    second = mx_factory(host="127.0.0.3")
    job = job_factory("a@dest.test", "b@dest.test")
    result = await deliver_job(job, [first.target(), second.target()], settings())
    assert outcomes(result) == {1: DELIVERED, 2: DELIVERED}
    assert result.errors[0].stage is Stage.RCPT and result.errors[0].reply.status == "4.4.2"


async def test_no_reply_after_the_dot_defers_without_failover(
    mx_factory: MakeMX, job_factory: Callable[..., DeliveryJob]
) -> None:
    dropping = mx_factory(MXScript(data_end=DROP), host="127.0.0.2")
    slow = mx_factory(MXScript(delays={"data_end": 0.8}), host="127.0.0.4")
    second = mx_factory(host="127.0.0.3")
    for first in (dropping, slow):
        result = await deliver_job(
            job_factory(), [first.target(), second.target()], settings(data_end_timeout=0.3)
        )
        res = result.recipients[1]
        assert (res.outcome, res.stage, res.reply.status) == (DEFERRED, Stage.DATA_END, "4.4.2")
        assert len(first.transactions) == 1  # the remote may well have it
    assert second.connections == 0


async def test_slow_replies_time_out_per_command(
    mx_factory: MakeMX, job_factory: Callable[..., DeliveryJob]
) -> None:
    slow_banner = mx_factory(MXScript(delays={"banner": 0.8}), host="127.0.0.2")
    slow_rcpt = mx_factory(MXScript(delays={"rcpt": 0.6}), host="127.0.0.3")
    result = await deliver_job(
        job_factory(), [slow_banner.target()], settings(greeting_timeout=0.2)
    )
    res = result.recipients[1]
    assert (res.outcome, res.stage, res.reply.status) == (DEFERRED, Stage.GREETING, "4.4.1")
    assert "0.2s" in res.reply.text
    result = await deliver_job(job_factory(), [slow_rcpt.target()], settings(rcpt_timeout=0.2))
    res = result.recipients[1]
    assert (res.outcome, res.stage, res.reply.code) == (DEFERRED, Stage.RCPT, 421)
    # The other timeouts are not consumed by the slow command: MAIL was quick.
    result = await deliver_job(
        job_factory(), [slow_rcpt.target()], settings(rcpt_timeout=1.0, mail_timeout=0.2)
    )
    assert outcomes(result) == {1: DELIVERED}


@pytest.fixture
def unanswered() -> Iterator[tuple[str, int]]:
    """A listener whose accept queue is full: new connections hang in SYN_SENT."""
    listener = socket.socket()
    listener.bind(("127.0.0.5", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(3):
        s = socket.socket()
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):  # non-blocking connect in progress
            s.connect(("127.0.0.5", port))
        fillers.append(s)
    yield "127.0.0.5", port
    for s in fillers:
        s.close()
    listener.close()


async def test_connect_timeout(
    unanswered: tuple[str, int], job_factory: Callable[..., DeliveryJob]
) -> None:
    ip, port = unanswered
    target = MXTarget(MX(ip, port=port), ip, port, "hang.test")
    started = asyncio.get_running_loop().time()
    result = await deliver_job(job_factory(), [target], settings(connect_timeout=0.3))
    res = result.recipients[1]
    assert res.outcome is DEFERRED and res.stage in (Stage.CONNECT, Stage.GREETING)
    assert res.reply.status == "4.4.1"
    assert asyncio.get_running_loop().time() - started < 1.5


async def test_malformed_reply_is_a_protocol_error(
    mx_factory: MakeMX, job_factory: Callable[..., DeliveryJob]
) -> None:
    mx = mx_factory(MXScript(rcpt_default="hello there"))
    result = await deliver_job(job_factory(), [mx.target()], settings())
    res = result.recipients[1]
    assert (res.outcome, res.reply.status, res.stage) == (DEFERRED, "4.5.0", Stage.RCPT)


# ---------------------------------------------------------------- TLS


async def test_starttls_when_offered(
    mx_factory: MakeMX, job_factory: Callable[..., DeliveryJob], pki: certs.TestPKI
) -> None:
    mx = mx_factory(MXScript(tls=pki))
    result = await deliver_job(job_factory(), [mx.target()], settings())
    assert outcomes(result) == {1: DELIVERED}
    assert result.tls is not None and result.tls.startswith("TLSv1")
    assert mx.transactions[0].tls == result.tls
    assert mx.commands[:3] == ["EHLO", "STARTTLS", "EHLO"]


async def test_starttls_verified_with_the_ca(
    mx_factory: MakeMX, job_factory: Callable[..., DeliveryJob], pki: certs.TestPKI
) -> None:
    mx = mx_factory(MXScript(tls=pki, hostname="mx.test"))
    ok = settings(tls_verify=True, tls_cafile=pki.ca_pem, tls_min_version="TLSv1.2")
    result = await deliver_job(job_factory(), [mx.target()], ok)
    assert result.tls is not None and mx.connections == 1
    # Without our CA the chain does not verify: the handshake fails, and the
    # same host is retried in plaintext (TLS is not required).
    result = await deliver_job(job_factory(), [mx.target()], settings(tls_verify=True))
    assert outcomes(result) == {1: DELIVERED} and result.tls is None
    assert result.connection is not None and result.connection.tls_error is not None
    assert mx.connections == 3


async def test_broken_tls_handshake_retries_same_host_in_plaintext(
    mx_factory: MakeMX, job_factory: Callable[..., DeliveryJob], pki: certs.TestPKI
) -> None:
    mx = mx_factory(MXScript(tls=pki, tls_broken=True))
    result = await deliver_job(job_factory(), [mx.target()], settings())
    assert outcomes(result) == {1: DELIVERED}
    assert mx.connections == 2 and mx.transactions[0].tls is None
    assert mx.commands.count("STARTTLS") == 1
    assert result.connection is not None
    assert "handshake" in (result.connection.tls_error or "")


async def test_broken_tls_with_tls_required_defers(
    mx_factory: MakeMX, job_factory: Callable[..., DeliveryJob], pki: certs.TestPKI
) -> None:
    mx = mx_factory(MXScript(tls=pki, tls_broken=True))
    for policy in (settings(force_tls=True), settings(force_tls_hosts=("MX.test",))):
        result = await deliver_job(job_factory(), [mx.target()], policy)
        res = result.recipients[1]
        assert (res.outcome, res.reply.status, res.stage) == (DEFERRED, "4.7.10", Stage.STARTTLS)
    assert mx.transactions == [] and "MAIL" not in mx.commands


async def test_tls_required_but_not_offered_defers(
    mx_factory: MakeMX, job_factory: Callable[..., DeliveryJob]
) -> None:
    mx = mx_factory()
    result = await deliver_job(job_factory(), [mx.target()], settings(force_tls=True))
    res = result.recipients[1]
    assert (res.outcome, res.reply.status) == (DEFERRED, "4.7.10")
    assert "does not offer STARTTLS" in res.reply.text and "MAIL" not in mx.commands


async def test_no_tls_hosts_and_enable_tls_off_skip_starttls(
    mx_factory: MakeMX, job_factory: Callable[..., DeliveryJob], pki: certs.TestPKI
) -> None:
    mx = mx_factory(MXScript(tls=pki))
    for policy in (settings(no_tls_hosts=("127.0.0.0/8",)), settings(enable_tls=False)):
        result = await deliver_job(job_factory(), [mx.target()], policy)
        assert outcomes(result) == {1: DELIVERED} and result.tls is None
    assert "STARTTLS" not in mx.commands


async def test_starttls_refused_continues_in_plaintext(
    mx_factory: MakeMX, job_factory: Callable[..., DeliveryJob], pki: certs.TestPKI
) -> None:
    mx = mx_factory(MXScript(tls=pki, starttls="454 4.7.0 TLS not available now"))
    result = await deliver_job(job_factory(), [mx.target()], settings())
    assert outcomes(result) == {1: DELIVERED} and mx.connections == 1
    assert result.connection is not None and "454" in (result.connection.tls_error or "")


# ---------------------------------------------------------------- AUTH


@pytest.mark.parametrize("auth_type", [None, "login"])
async def test_auth_over_tls(
    mx_factory: MakeMX,
    job_factory: Callable[..., DeliveryJob],
    pki: certs.TestPKI,
    auth_type: str | None,
) -> None:
    mx = mx_factory(MXScript(tls=pki, credentials={"relayuser": "s3cret"}))
    target = mx.target(auth_user="relayuser", auth_pass="s3cret", auth_type=auth_type)
    result = await deliver_job(job_factory(), [target], settings())
    assert outcomes(result) == {1: DELIVERED}
    assert result.auth_user == "relayuser" and mx.transactions[0].auth_user == "relayuser"


async def test_auth_failure_defers_not_bounces(
    mx_factory: MakeMX, job_factory: Callable[..., DeliveryJob], pki: certs.TestPKI
) -> None:
    mx = mx_factory(MXScript(tls=pki, credentials={"relayuser": "s3cret"}))
    target = mx.target(auth_user="relayuser", auth_pass="wrong")
    result = await deliver_job(job_factory(), [target], settings())
    res = result.recipients[1]
    assert (res.outcome, res.stage, res.reply.code, res.reply.status) == (
        DEFERRED,
        Stage.AUTH,
        535,  # the code the server sent; deferring is our decision (status 4.x.x)
        "4.7.8",
    )
    assert res.reply.context is not None and "relayuser" in res.reply.context
    assert res.reply.line is not None and res.reply.line.startswith("535 ")
    assert "MAIL" not in mx.commands
    # What the connection did before the refusal stays on the record (item 19).
    assert res.connection is not None and res.connection.tls is not None
    assert (res.connection.auth_user, res.connection.auth_mechanism) == ("relayuser", "PLAIN")
    assert result.tls == res.connection.tls and result.auth_user == "relayuser"


async def test_auth_needs_tls_unless_the_mx_allows_plaintext(
    mx_factory: MakeMX, job_factory: Callable[..., DeliveryJob]
) -> None:
    mx = mx_factory(MXScript(credentials={"u": "p"}, auth_require_tls=False))
    result = await deliver_job(job_factory(), [mx.target(auth_user="u", auth_pass="p")], settings())
    res = result.recipients[1]
    assert (res.outcome, res.reply.status, res.stage) == (DEFERRED, "4.7.10", Stage.AUTH)
    assert "AUTH" not in mx.commands
    target = mx.target(auth_user="u", auth_pass="p", auth_without_tls=True)
    result = await deliver_job(job_factory(), [target], settings())
    assert outcomes(result) == {1: DELIVERED} and mx.transactions[0].auth_user == "u"


async def test_auth_not_offered_defers(
    mx_factory: MakeMX, job_factory: Callable[..., DeliveryJob]
) -> None:
    mx = mx_factory()
    target = mx.target(auth_user="u", auth_pass="p", auth_without_tls=True)
    result = await deliver_job(job_factory(), [target], settings())
    res = result.recipients[1]
    assert (res.outcome, res.stage) == (DEFERRED, Stage.AUTH) and "(nothing)" in res.reply.text


# ---------------------------------------------------------------- extensions


async def test_size_is_declared_and_oversized_mail_bounces_unsent(
    mx_factory: MakeMX, job_factory: Callable[..., DeliveryJob]
) -> None:
    mx = mx_factory(MXScript(size_limit=1000))
    result = await deliver_job(job_factory(), [mx.target()], settings())
    assert outcomes(result) == {1: DELIVERED}
    assert mx.transactions[0].mail_params == [f"SIZE={len(BODY)}"]
    result = await deliver_job(
        job_factory("a@d.test", "b@d.test", size=5000), [mx.target()], settings()
    )
    assert outcomes(result) == {1: BOUNCED, 2: BOUNCED}
    assert result.recipients[1].reply.status == "5.3.4"
    assert mx.commands.count("MAIL") == 1  # the oversized one never reached MAIL


async def test_smtputf8(mx_factory: MakeMX, job_factory: Callable[..., DeliveryJob]) -> None:
    plain = mx_factory(host="127.0.0.2")
    utf8 = mx_factory(MXScript(smtputf8=True), host="127.0.0.3")
    job = job_factory("ascii@dest.test", "jösé@dest.test", smtputf8=True, body_8bit=True)
    result = await deliver_job(job, [plain.target()], settings())
    assert outcomes(result) == {1: BOUNCED, 2: BOUNCED}
    assert result.recipients[1].reply.status == "5.6.7" and "MAIL" not in plain.commands
    result = await deliver_job(job, [utf8.target()], settings())
    assert outcomes(result) == {1: DELIVERED, 2: DELIVERED}
    assert utf8.transactions[0].mail_params == ["BODY=8BITMIME", "SMTPUTF8"]
    assert utf8.transactions[0].rcpt_tos == ["ascii@dest.test", "jösé@dest.test"]
    # Without the flag, only the non-ASCII recipient is undeliverable there.
    job = job_factory("ascii@dest.test", "jösé@dest.test")
    result = await deliver_job(job, [plain.target()], settings())
    assert outcomes(result) == {1: DELIVERED, 2: BOUNCED}


async def test_8bit_body_with_and_without_8bitmime(
    mx_factory: MakeMX, job_factory: Callable[..., DeliveryJob]
) -> None:
    with_8bit = mx_factory(host="127.0.0.2")
    without = mx_factory(MXScript(eightbitmime=False), host="127.0.0.3")
    body = "Subject: ü\r\n\r\nGrüße\r\n".encode()
    for mx, params in ((with_8bit, ["BODY=8BITMIME"]), (without, [])):
        result = await deliver_job(
            job_factory(body=body, body_8bit=True), [mx.target()], settings()
        )
        assert outcomes(result) == {1: DELIVERED}
        assert mx.transactions[0].mail_params == params and mx.transactions[0].body == body


async def test_dsn_parameters_passed_on_only_when_offered(
    mx_factory: MakeMX, job_factory: Callable[..., DeliveryJob]
) -> None:
    dsn = mx_factory(MXScript(dsn=True), host="127.0.0.2")
    plain = mx_factory(host="127.0.0.3")
    rcpt = JobRecipient(1, "r@dest.test", notify="SUCCESS,DELAY", orcpt="rfc822;Orig+x@a.test")
    job = job_factory(rcpt, env_id="QID 1", ret="FULL")
    result = await deliver_job(job, [dsn.target()], settings())
    assert outcomes(result) == {1: DELIVERED} and result.dsn_passed_on
    assert result.recipients[1].dsn_passed_on
    tx = dsn.transactions[0]
    assert tx.mail_params == ["RET=FULL", "ENVID=QID+201"]
    assert tx.rcpt_params == {
        "r@dest.test": ["NOTIFY=SUCCESS,DELAY", "ORCPT=rfc822;Orig+2Bx@a.test"]
    }
    result = await deliver_job(job, [plain.target()], settings())
    assert outcomes(result) == {1: DELIVERED} and not result.dsn_passed_on
    assert plain.transactions[0].mail_params == [] and plain.transactions[0].rcpt_params == {
        "r@dest.test": []
    }


# ---------------------------------------------------------------- LMTP


async def test_lmtp_replies_are_attributed_per_recipient_in_rcpt_order(
    mx_factory: MakeMX, job_factory: Callable[..., DeliveryJob]
) -> None:
    mx = mx_factory(
        MXScript(
            lmtp=True,
            rcpt={"unknown@dest.test": "550 5.1.1 unknown"},
            lmtp_replies={
                "full@dest.test": "452 4.2.2 mailbox full",
                "bad@dest.test": "554 5.6.0 rejected",
            },
        )
    )
    job = job_factory(
        "a@dest.test", "full@dest.test", "unknown@dest.test", "bad@dest.test", "b@dest.test"
    )
    result = await deliver_job(job, [mx.target()], settings())
    assert outcomes(result) == {1: DELIVERED, 2: DEFERRED, 3: BOUNCED, 4: BOUNCED, 5: DELIVERED}
    assert shape(result.recipients[2].reply) == (452, "4.2.2", "mailbox full")
    assert shape(result.recipients[4].reply) == (554, "5.6.0", "rejected")
    assert result.recipients[3].stage is Stage.RCPT and result.lmtp
    assert mx.commands[0] == "LHLO" and "EHLO" not in mx.commands


async def test_lmtp_drop_after_some_replies(
    mx_factory: MakeMX, job_factory: Callable[..., DeliveryJob]
) -> None:
    first = mx_factory(MXScript(lmtp=True, lmtp_replies={"b@dest.test": DROP}), host="127.0.0.2")
    second = mx_factory(MXScript(lmtp=True), host="127.0.0.3")
    job = job_factory("a@dest.test", "b@dest.test", "c@dest.test")
    result = await deliver_job(job, [first.target(), second.target()], settings())
    assert outcomes(result) == {1: DELIVERED, 2: DEFERRED, 3: DEFERRED}
    assert result.recipients[2].stage is Stage.DATA_END and second.connections == 0


# ---------------------------------------------------------------- pipelining


async def test_envelope_is_pipelined_when_the_server_offers_it(
    mx_factory: MakeMX, job_factory: Callable[..., DeliveryJob], mx_pipelining: bool
) -> None:
    mx = mx_factory(MXScript(rcpt={"gone@dest.test": "550 5.1.1 gone"}))
    job = job_factory("a@dest.test", "gone@dest.test", "c@dest.test")
    result = await deliver_job(job, [mx.target()], settings())
    assert outcomes(result) == {1: DELIVERED, 2: BOUNCED, 3: DELIVERED}
    assert result.recipients[2].reply.text.endswith("gone")
    # MAIL arrived together with the RCPTs and DATA, or alone.
    assert mx.pipelined == [mx_pipelining]
    assert mx.transactions[0].rcpt_tos == ["a@dest.test", "c@dest.test"]


async def test_pipelined_mail_refusal_settles_everyone_and_leaves_the_session_usable(
    mx_factory: MakeMX, job_factory: Callable[..., DeliveryJob]
) -> None:
    mx = mx_factory(MXScript(mail="550 5.7.1 sender refused"))
    conn = await Connection.open(mx.target(), settings())
    try:
        tx = await conn.transact(job_factory("a@dest.test", "b@dest.test"))
        assert tx.failure is None
        assert {rid: r.outcome for rid, r in tx.settled.items()} == {1: BOUNCED, 2: BOUNCED}
        assert all(r.reply.code == 550 and r.stage is Stage.MAIL for r in tx.settled.values())
        mx.script = MXScript()
        again = await conn.transact(job_factory("c@dest.test"))
        assert again.settled[1].outcome is DELIVERED
    finally:
        await conn.close()
    assert mx.connections == 1 and len(mx.transactions) == 1


async def test_pipelined_354_without_recipients_is_ended_with_a_lone_dot(
    mx_factory: MakeMX, job_factory: Callable[..., DeliveryJob]
) -> None:
    # A server that answers 354 although it refused every RCPT (RFC 2920 §3.1).
    mx = mx_factory(MXScript(rcpt_default="550 5.1.1 nobody", data="354 go ahead anyway"))
    conn = await Connection.open(mx.target(), settings())
    try:
        tx = await conn.transact(job_factory("a@dest.test"))
        assert tx.failure is None and tx.settled[1].outcome is BOUNCED
        assert conn.usable
        mx.script = MXScript()
        again = await conn.transact(job_factory("b@dest.test"))
        assert again.settled[1].outcome is DELIVERED
    finally:
        await conn.close()
    assert [t.rcpt_tos for t in mx.transactions] == [["b@dest.test"]]


# ---------------------------------------------------------------- reuse


async def test_connection_can_run_several_transactions(
    mx_factory: MakeMX, job_factory: Callable[..., DeliveryJob], mx_pipelining: bool
) -> None:
    mx = mx_factory(MXScript(rcpt={"gone@dest.test": "550 5.1.1 gone"}))
    conn = await Connection.open(mx.target(), settings())
    try:
        refused = await conn.transact(job_factory("gone@dest.test"))
        assert refused.failure is None and refused.settled[1].outcome is BOUNCED
        first = await conn.transact(job_factory("a@dest.test"))
        second = await conn.transact(job_factory("b@dest.test"))
        assert first.settled[1].outcome is DELIVERED and second.settled[1].outcome is DELIVERED
        assert conn.usable
    finally:
        await conn.close()
    assert not conn.usable and mx.connections == 1
    # RSET only where the previous transaction left the server mid-envelope.
    assert mx.commands == [
        *("EHLO", "MAIL", "RCPT", *(["DATA"] if mx_pipelining else [])),
        *("RSET", "MAIL", "RCPT", "DATA"),
        *("MAIL", "RCPT", "DATA", "QUIT"),
    ]
    assert [tx.rcpt_tos for tx in mx.transactions] == [["a@dest.test"], ["b@dest.test"]]


async def test_transact_on_a_dead_connection_reports_failure(
    mx_factory: MakeMX, job_factory: Callable[..., DeliveryJob]
) -> None:
    mx = mx_factory()
    conn = await Connection.open(mx.target(), settings())
    await conn.close()
    tx = await conn.transact(job_factory())
    assert tx.settled == {} and len(tx.unsettled) == 1
    assert tx.failure is not None and tx.failure.retry_elsewhere
