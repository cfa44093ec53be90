"""Every wait for a remote has a bound (RFC 5321 §4.5.3.2): each phase of the
session against a scripted MX that goes silent exactly there.

The MX keeps the connection open and says nothing (``SILENT``), as a hung
remote does; each timeout is 0.3 s, so a phase that used any other bound
(the old fixed 300 s) fails the elapsed-time check.  The engine-level test
at the end reads the outcome back from the ``deliveries`` and ``attempts``
views: the recipient is deferred with our reason, not left ``sending``.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from outboundd.config import load_config
from outboundd.daemon import OutboundSettings
from outboundd.delivery.engine import DeliveryEngine
from outboundd.delivery.pool import ConnectionPool
from outboundd.delivery.replies import Stage
from outboundd.delivery.session import DeliveryJob, JobRecipient, SessionSettings, deliver_job
from outboundd.hooks import HookRunner
from outboundd.spool import NewMessage, NewRecipient, Spool, lease_owner_id
from outboundd.spool.types import Outcome
from tests import certs
from tests.dnsserver import DNSServer
from tests.harness import write_config
from tests.mxserver import SILENT, MXScript, mx_server

T = 0.3  # every timeout in this module
#: Generous slack for a loaded two-core machine, far below any default (20 s+).
SLACK = 3.0
BODY = b"From: a@sender.test\r\nSubject: silent\r\n\r\nhello\r\n"


#: Every documented wait for a remote (docs/configuration.md), in session order;
#: other tests import this list rather than keep their own.
TIMEOUTS = (
    "connect_timeout",
    "greeting_timeout",
    "ehlo_timeout",
    "starttls_timeout",
    "auth_timeout",
    "mail_timeout",
    "rcpt_timeout",
    "data_timeout",
    "data_block_timeout",
    "data_end_timeout",
    "rset_timeout",
    "quit_timeout",
)
LONG = 60.0  # every other timeout: a phase bounded by the wrong key fails the time check


def only(key: str, **overrides: object) -> SessionSettings:
    """Settings where ``key`` is the only short timeout."""
    assert key in TIMEOUTS
    values: dict[str, Any] = {"helo": "outboundd.test", **dict.fromkeys(TIMEOUTS, LONG)}
    values[key] = T
    values.update(overrides)
    return SessionSettings(**values)


@pytest.fixture
def make_job(tmp_path: Path) -> Callable[..., DeliveryJob]:
    counter = iter(range(1_000_000))

    def make(body: bytes = BODY) -> DeliveryJob:
        path = tmp_path / f"body{next(counter)}.eml"
        path.write_bytes(body)
        rcpt = JobRecipient(1, "rcpt@dest.test")
        return DeliveryJob("sender@origin.test", (rcpt,), path, len(body))

    return make


# The phase (and its timeout key), the script that goes silent there, MX
# options, the stage the failure is recorded at, and what the reason says.
SILENT_PHASES: list[tuple[str, dict[str, Any], dict[str, Any], Stage, str]] = [
    ("greeting", {"banner": SILENT}, {}, Stage.GREETING, f"did not answer within {T:g}s"),
    ("ehlo", {"ehlo": SILENT}, {}, Stage.EHLO, f"did not answer within {T:g}s at ehlo"),
    (
        "helo",
        {"ehlo": "502 5.5.1 no EHLO here", "helo": SILENT},
        {},
        Stage.EHLO,
        f"did not answer within {T:g}s at ehlo",
    ),
    ("lhlo", {"lmtp": True, "lhlo": SILENT}, {}, Stage.EHLO, f"within {T:g}s at ehlo"),
    (
        "auth",
        {"auth": SILENT, "credentials": {"u": "p"}, "auth_require_tls": False},
        {"auth_user": "u", "auth_pass": "p", "auth_without_tls": True},
        Stage.AUTH,
        f"did not answer within {T:g}s at auth",
    ),
    ("mail", {"mail": SILENT}, {}, Stage.MAIL, f"did not answer within {T:g}s at mail"),
    ("rcpt", {"rcpt_default": SILENT}, {}, Stage.RCPT, f"did not answer within {T:g}s at rcpt"),
    ("data", {"data": SILENT}, {}, Stage.DATA, f"did not answer within {T:g}s at data"),
    (
        "data_end",
        {"data_end": SILENT},
        {},
        Stage.DATA_END,
        f"did not answer within {T:g}s at data_end",
    ),
]


KEY_OF = {
    "greeting": "greeting_timeout",
    "ehlo": "ehlo_timeout",
    "helo": "ehlo_timeout",
    "lhlo": "ehlo_timeout",
    "auth": "auth_timeout",
    "mail": "mail_timeout",
    "rcpt": "rcpt_timeout",
    "data": "data_timeout",
    "data_end": "data_end_timeout",
}

# MAIL, RCPT and DATA go out in one write to a PIPELINING server and one by
# one otherwise: both paths are timed.
CASES = [
    pytest.param(*case, pipelining, id=f"{case[0]}-{'pipelined' if pipelining else 'stepwise'}")
    for case in SILENT_PHASES
    for pipelining in (True, False)
    if pipelining or case[0] in ("mail", "rcpt", "data")
]


@pytest.mark.parametrize(("phase", "script", "mx_options", "stage", "reason", "pipelining"), CASES)
async def test_a_silent_mx_defers_after_the_phase_timeout(
    make_job: Callable[..., DeliveryJob],
    phase: str,
    script: dict[str, Any],
    mx_options: dict[str, Any],
    stage: Stage,
    reason: str,
    pipelining: bool,
) -> None:
    async with mx_server(MXScript(pipelining=pipelining, **script)) as mx:
        began = time.monotonic()
        result = await deliver_job(make_job(), [mx.target(**mx_options)], only(KEY_OF[phase]))
        elapsed = time.monotonic() - began
    res = result.recipients[1]
    assert (res.outcome, res.stage) == (Outcome.DEFERRED, stage)
    assert reason in res.reply.text, res.reply.text
    assert elapsed < T + SLACK, elapsed
    # Only a silence after the dot leaves a body at the MX (it may have taken it).
    assert len(mx.transactions) == (1 if stage is Stage.DATA_END else 0)


async def test_a_silent_data_end_is_not_retried_on_the_next_mx(
    make_job: Callable[..., DeliveryJob],
) -> None:
    """No reply to the dot: the remote may hold the message, so the next MX is not tried."""
    async with (
        mx_server(MXScript(data_end=SILENT)) as silent,
        mx_server(MXScript(), host="127.0.0.3") as second,
    ):
        targets = [silent.target(), second.target()]
        result = await deliver_job(make_job(), targets, only("data_end_timeout"))
    assert result.recipients[1].outcome is Outcome.DEFERRED
    assert second.connections == 0


async def test_a_remote_that_stops_reading_the_body_hits_the_block_timeout(
    make_job: Callable[..., DeliveryJob],
) -> None:
    # Larger than the socket buffers, so the writes block once the MX stops reading.
    body = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 24_000
    async with mx_server(MXScript(body_silent=True)) as mx:
        began = time.monotonic()
        result = await deliver_job(make_job(body), [mx.target()], only("data_block_timeout"))
        elapsed = time.monotonic() - began
    res = result.recipients[1]
    assert (res.outcome, res.stage) == (Outcome.DEFERRED, Stage.DATA)
    assert f"did not answer within {T:g}s at data" in res.reply.text
    assert elapsed < T + SLACK, elapsed


async def test_a_body_the_remote_never_read_goes_to_the_next_mx(
    make_job: Callable[..., DeliveryJob],
) -> None:
    """Stuck before the dot left us: the remote cannot have the message."""
    body = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 24_000
    async with (
        mx_server(MXScript(body_silent=True)) as stuck,
        mx_server(MXScript(), host="127.0.0.3") as second,
    ):
        targets = [stuck.target(), second.target()]
        result = await deliver_job(make_job(body), targets, only("data_block_timeout"))
    assert result.recipients[1].outcome is Outcome.DELIVERED
    assert [e.stage for e in result.errors] == [Stage.DATA]
    assert len(second.transactions) == 1 and stuck.transactions == []


@pytest.mark.parametrize("phase", ["reply", "handshake"])
async def test_a_silent_starttls_is_bounded(
    make_job: Callable[..., DeliveryJob], pki: certs.TestPKI, phase: str
) -> None:
    script = MXScript(tls=pki, starttls=SILENT if phase == "reply" else None)
    script.tls_silent = phase == "handshake"
    async with mx_server(script) as mx:
        # TLS required for this host: the timeout defers with 4.7.10.
        began = time.monotonic()
        required = only("starttls_timeout", force_tls_hosts=(mx.host,))
        result = await deliver_job(make_job(), [mx.target()], required)
        elapsed = time.monotonic() - began
        res = result.recipients[1]
        assert (res.outcome, res.reply.status) == (Outcome.DEFERRED, "4.7.10")
        assert f"starttls_timeout {T:g}s" in res.reply.text, res.reply.text
        assert elapsed < T + SLACK, elapsed
        # TLS not required: after the timeout the same host is tried in plaintext.
        result = await deliver_job(make_job(), [mx.target()], only("starttls_timeout"))
        res = result.recipients[1]
        assert res.outcome is Outcome.DELIVERED
        assert res.connection is not None and res.connection.tls is None
        assert f"starttls_timeout {T:g}s" in (res.connection.tls_error or "")
    assert len(mx.transactions) == 1


async def test_a_silent_rset_on_a_kept_connection_goes_on_a_new_one(
    make_job: Callable[..., DeliveryJob],
) -> None:
    pool = ConnectionPool(idle_timeout=30)
    settings = only("rset_timeout")
    async with mx_server(MXScript()) as mx:
        first = await deliver_job(make_job(), [mx.target()], settings, pool=pool)
        assert first.recipients[1].outcome is Outcome.DELIVERED
        # Leave the kept connection mid-transaction so that the next message needs RSET.
        kept = await pool.take(mx.target(), settings)
        assert kept is not None
        kept._needs_rset = True
        await pool.give_back(kept, settings)
        mx.script.rset = SILENT
        began = time.monotonic()
        second = await deliver_job(make_job(), [mx.target()], settings, pool=pool)
        elapsed = time.monotonic() - began
        await pool.close()
    assert second.recipients[1].outcome is Outcome.DELIVERED
    assert second.errors == ()  # a stale kept connection is not the remote's failure
    assert "RSET" in mx.commands and mx.connections == 2
    assert elapsed < T + SLACK, elapsed


async def test_a_silent_quit_does_not_hold_the_delivery(
    make_job: Callable[..., DeliveryJob],
) -> None:
    async with mx_server(MXScript(quit=SILENT)) as mx:
        began = time.monotonic()
        result = await deliver_job(make_job(), [mx.target()], only("quit_timeout"))
        elapsed = time.monotonic() - began
    assert result.recipients[1].outcome is Outcome.DELIVERED
    assert mx.commands[-1] == "QUIT"
    assert T <= elapsed < T + SLACK, elapsed


# ------------------------------------------------------------ through the engine


@pytest.fixture
async def engine_rig(
    dns_server: DNSServer, tmp_path: Path
) -> AsyncIterator[tuple[Spool, DeliveryEngine, Any]]:
    dns_server.zones.update(
        {
            "dest.test": {"MX": [(10, "mx.dest.test")]},
            "mx.dest.test": {"A": ["127.0.0.2"]},
        }
    )
    async with contextlib.AsyncExitStack() as stack:
        mx = await stack.enter_async_context(mx_server(MXScript(ehlo=SILENT)))
        config_dir = write_config(
            tmp_path / "config",
            dns_port=dns_server.port,
            mx_port=mx.port,
            outbound={"ehlo_timeout": T, "quit_timeout": T},
        )
        config = load_config(config_dir)
        assert config.outbound.ehlo_timeout == T
        spool = await Spool.open(config.outbound.queue_dir)
        engine = DeliveryEngine(
            config, OutboundSettings(config), spool, HookRunner([], timeout=1.0),
            owner=lease_owner_id(),
        )  # fmt: skip
        try:
            yield spool, engine, mx
        finally:
            await engine.close()
            await spool.close()


async def test_the_engine_records_a_timeout_as_a_deferral_with_its_reason(
    engine_rig: tuple[Spool, DeliveryEngine, Any],
) -> None:
    spool, engine, _mx = engine_rig
    qid = await spool.accept(NewMessage("a@sender.test", [NewRecipient("bob@dest.test")], BODY))
    claims = await spool.claim(engine.owner, limit=5, lease_seconds=60)
    began = time.monotonic()
    for claim in claims:
        await engine.deliver(claim)
    assert time.monotonic() - began < T + SLACK
    con = sqlite3.connect(spool.db_path)
    try:
        status, last_code, last_status, last_response = con.execute(
            "SELECT status, last_code, last_status, last_response FROM deliveries"
            " WHERE queue_id = ?",
            (qid,),
        ).fetchone()
        outcome, code, response, mx_ip = con.execute(
            "SELECT outcome, code, response, mx_ip FROM attempts WHERE queue_id = ?", (qid,)
        ).fetchone()
    finally:
        con.close()
    assert (status, last_status, outcome, mx_ip) == ("deferred", "4.4.2", "deferred", "127.0.0.2")
    # A timeout is our reason, not a reply: no code was sent, none is recorded.
    assert (code, last_code) == (None, None)
    assert f"did not answer within {T:g}s at ehlo" in last_response
    assert last_response == response


async def test_tls_stays_on_the_record_when_the_ehlo_after_starttls_fails(
    make_job: Callable[..., DeliveryJob], pki: certs.TestPKI
) -> None:
    """Item 19: the handshake happened, so the attempt says TLS even though the
    EHLO over it went unanswered."""
    async with mx_server(MXScript(tls=pki, ehlo_tls=SILENT)) as mx:
        result = await deliver_job(make_job(), [mx.target()], only("ehlo_timeout"))
    res = result.recipients[1]
    assert (res.outcome, res.stage) == (Outcome.DEFERRED, Stage.EHLO)
    assert res.connection is not None and res.connection.tls is not None
