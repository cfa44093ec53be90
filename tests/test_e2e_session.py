"""End to end through the real outboundd: a silent MX and the connection limit.

The outside run's cases: an MX that greets and then says nothing must not
keep a recipient ``sending`` (every wait has its bound), and
``domain_concurrency_max`` must hold for the connections the MX sees.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.dnsserver import DNSServer
from tests.harness import running, submit, write_config
from tests.mxserver import SILENT, MXScript, MXServer, mx_server
from tests.test_session_timeouts import TIMEOUTS as PHASE_TIMEOUTS

SENDER = "alice@sender.test"
#: Every documented timeout of the session after the connect, short.
TIMEOUTS = {key: 0.5 for key in PHASE_TIMEOUTS if key != "connect_timeout"}


@pytest.fixture
async def mx(dns_server: DNSServer) -> AsyncIterator[MXServer]:
    dns_server.zones.update(
        {
            "dest.test": {"MX": [(10, "mx.dest.test")]},
            "mx.dest.test": {"A": ["127.0.0.2"]},
        }
    )
    async with contextlib.AsyncExitStack() as stack:
        yield await stack.enter_async_context(mx_server(MXScript(), host="127.0.0.2"))


async def test_an_mx_that_greets_and_goes_silent_defers_within_the_timeout(
    mx: MXServer, dns_server: DNSServer, tmp_path: Path
) -> None:
    mx.script = MXScript(ehlo=SILENT)
    config = write_config(
        tmp_path / "config", dns_port=dns_server.port, mx_port=mx.port, outbound=TIMEOUTS
    )
    async with running(config) as d:
        began = time.monotonic()
        qid = await submit(d.smtp_port, SENDER, ["bob@dest.test"])
        await d.wait_for_status(qid, "deferred", timeout=10)
        assert time.monotonic() - began < 10
        [(response,)] = d.query("SELECT response FROM attempts WHERE queue_id = ?", (qid,))
        assert "did not answer within 0.5s at ehlo" in response
    assert d.returncode == 0


async def test_domain_concurrency_max_holds_at_the_mx(
    mx: MXServer, dns_server: DNSServer, tmp_path: Path
) -> None:
    mx.script = MXScript(delays={"data_end": 0.2})
    config = write_config(
        tmp_path / "config",
        dns_port=dns_server.port,
        mx_port=mx.port,
        outbound={"domain_concurrency_max": 2, "pool_idle_timeout": 0},
    )
    async with running(config) as d:
        qids = [await submit(d.smtp_port, SENDER, [f"r{n}@dest.test"]) for n in range(10)]
        for qid in qids:
            await d.wait_for_status(qid, "delivered")
    assert d.returncode == 0
    assert len(mx.transactions) == 10
    assert mx.max_open_connections == 2
    assert mx.commands.count("QUIT") == mx.connections
