"""Many outboundd hosts on one PostgreSQL queue, as processes on one machine.

Real processes throughout: ``outboundd`` instances with their own config
directories and listeners sharing one ``queue_url``, a real PostgreSQL
cluster (tests/pgcluster.py), a loopback DNS server and a scripted MX that
records every message.  Each submitted message carries a token, so the MX's
record says which message arrived how many times.

* Three hosts take submissions at once; one is SIGKILLed mid-load.  Every
  message that got a ``250`` reaches the MX at least once (a delivery the
  dead host had made but not recorded is made again after its lease
  expires: at-least-once); the duplicates are counted and printed.
* The PostgreSQL server is stopped and started under load: submission
  answers ``451 4.3.0`` meanwhile, never ``250``; every ``250`` is in the
  queue and delivered; the daemons carry on without a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosmtplib
import asyncpg
import pytest

from tests.dnsserver import DNSServer
from tests.harness import Daemon, write_config
from tests.mxserver import MXScript, MXServer, mx_server
from tests.pgcluster import PgCluster, PgUnavailable, pg_bindir

SENDER = "alice@sender.test"
TOKEN = re.compile(rb"^X-Token: (t\d+)\r$", re.MULTILINE)
#: The shortest lease outboundd allows: how long a dead host's deliveries wait.
LEASE_SECONDS = 10
UNFINISHED = ("queued", "deferred", "sending")


@dataclass
class Submissions:
    """What the clients were told, per token."""

    accepted: dict[str, str] = field(default_factory=dict)  # token -> queue ID (250)
    refused: Counter[str] = field(default_factory=Counter)  # reply code -> count
    failed: int = 0  # no reply: connection refused or cut
    by_host: Counter[int] = field(default_factory=Counter)  # host index -> 250s


def message(token: str, recipient: str) -> bytes:
    return (
        f"From: <{SENDER}>\r\nTo: <{recipient}>\r\nSubject: load {token}\r\n"
        f"X-Token: {token}\r\n\r\nOne of many.\r\n"
    ).encode()


async def submit_once(port: int, token: str, recipients: list[str]) -> tuple[int, str]:
    """One message; the DATA reply's code and text (raises when there is no reply)."""
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=15, start_tls=False)
    await client.connect()
    try:
        await client.ehlo(hostname="client.test")
        await client.mail(SENDER)
        for rcpt in recipients:
            await client.rcpt(rcpt)
        reply = await client.data(message(token, recipients[0]))
        return reply.code, reply.message
    except aiosmtplib.SMTPResponseException as exc:
        return exc.code, exc.message
    finally:
        with contextlib.suppress(Exception):
            await client.quit()


async def submit(
    done: Submissions, host: int, port: int, token: str, recipients: list[str]
) -> bool:
    """Submit and record the outcome; False when the host gave no reply at all."""
    try:
        code, text = await submit_once(port, token, recipients)
    except (OSError, aiosmtplib.SMTPException, TimeoutError):
        done.failed += 1
        return False
    if code == 250:
        match = re.search(r"queued as ([A-Za-z0-9._-]+)", text)
        assert match is not None, text
        done.accepted[token] = match[1]
        done.by_host[host] += 1
    else:
        done.refused[f"{code} {text.split()[0] if text else ''}".strip()] += 1
    return True


def arrivals(mx: MXServer) -> Counter[str]:
    """Token -> how many times the MX received that message."""
    seen: Counter[str] = Counter()
    for txn in list(mx.transactions):
        match = TOKEN.search(txn.body)
        assert match is not None, txn.body[:200]
        seen[match[1].decode()] += 1
    return seen


async def query(url: str, sql: str) -> list[tuple[Any, ...]]:
    conn = await asyncpg.connect(url, timeout=5)
    try:
        return [tuple(r) for r in await conn.fetch(sql)]
    finally:
        await conn.close()


async def wait_until(what: str, check: Callable[[], Any], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.25)


async def all_final(url: str) -> bool:
    with contextlib.suppress(OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
        rows = await query(url, "SELECT count(*) FROM deliveries WHERE status <> 'delivered'")
        return rows == [(0,)]
    return False


@dataclass
class World:
    dns: DNSServer
    mx: MXServer
    tmp: Path

    def host_config(self, name: str, url: str, **outbound: object) -> Path:
        settings: dict[str, object] = {
            "queue_url": url,
            "lease_seconds": LEASE_SECONDS,
            "delivery_processes": 0,  # one process per host: SIGKILL takes the whole host
        }
        settings.update(outbound)
        return write_config(self.tmp / name / "config", dns_port=self.dns.port,
                            mx_port=self.mx.port, outbound=settings)  # fmt: skip


@pytest.fixture
async def world(dns_server: DNSServer, tmp_path: Path) -> AsyncIterator[World]:
    dns_server.zones.update(
        {"dest.test": {"MX": [(10, "mx.dest.test")]}, "mx.dest.test": {"A": ["127.0.0.2"]}}
    )
    # A little time per message at the MX, so a host dies with deliveries in flight.
    script = MXScript(delays={"data_end": 0.05})
    async with mx_server(script, host="127.0.0.2") as mx:
        yield World(dns_server, mx, tmp_path)


@contextlib.asynccontextmanager
async def hosts(configs: list[Path]) -> AsyncIterator[list[Daemon]]:
    daemons = [Daemon(config) for config in configs]
    try:
        await asyncio.gather(*(d.start(timeout=30) for d in daemons))
        yield daemons
    finally:
        for d in daemons:
            if d.proc is not None and d.proc.returncode is None:
                with contextlib.suppress(AssertionError):
                    await d.stop()


# --------------------------------------------------------------------------
# Three hosts, one queue, one of them killed


async def test_three_hosts_share_one_queue_and_survive_a_sigkill(world: World, pg_url: str) -> None:
    per_client, clients_per_host = 30, 3  # 270 messages in all
    configs = [world.host_config(f"host{i}", pg_url) for i in range(3)]
    done = Submissions()
    tokens = (f"t{n}" for n in itertools.count())
    async with hosts(configs) as daemons:
        ports = [d.smtp_port for d in daemons]
        victim = 1
        killed = asyncio.Event()

        async def client(host: int) -> None:
            for _ in range(per_client):
                token = next(tokens)
                rcpts = [f"user{token}@dest.test"]
                if token.endswith("7"):  # some with two recipients
                    rcpts.append(f"cc{token}@dest.test")
                if await submit(done, host, ports[host], token, rcpts):
                    continue
                # The host is gone: a client tries the next one, as MX fallback would.
                assert killed.is_set(), "a live host gave no reply"
                await submit(done, (host + 1) % 3, ports[(host + 1) % 3], token, rcpts)

        async def kill_mid_load() -> None:
            await wait_until("a third of the load accepted",
                             _at_least(lambda: len(done.accepted), 90), 60)  # fmt: skip
            killed.set()
            await daemons[victim].kill()

        await asyncio.gather(
            kill_mid_load(), *(client(h) for h in range(3) for _ in range(clients_per_host))
        )
        assert daemons[victim].proc is not None and daemons[victim].proc.returncode == -9
        # Every host accepted, the victim only until it died.
        assert all(done.by_host[h] > 0 for h in range(3)), done.by_host
        # The dead host's leases run out; the others deliver what it held.
        await wait_until("every recipient delivered", lambda: all_final(pg_url),
                         LEASE_SECONDS + 50)  # fmt: skip
        survivors = [d for i, d in enumerate(daemons) if i != victim]
        assert [await d.stop() for d in survivors] == [0, 0]

    seen = arrivals(world.mx)
    missing = sorted(set(done.accepted) - set(seen))
    assert missing == [], f"accepted but never delivered: {missing}"
    duplicates = sum(n - 1 for n in seen.values() if n > 1)
    statuses = await query(pg_url, "SELECT status, count(*) FROM deliveries GROUP BY status")
    queued = {qid for (qid,) in await query(pg_url, "SELECT DISTINCT queue_id FROM deliveries")}
    print(
        f"\nmulti-host: {len(done.accepted)} messages got a 250 "
        f"(per host {dict(sorted(done.by_host.items()))}), {done.failed} got no reply "
        f"(host {victim} killed), MX received {sum(seen.values())} messages, "
        f"duplicates {duplicates}; deliveries: {dict(statuses)}"
    )
    assert dict(statuses).keys() == {"delivered"}
    assert set(done.accepted.values()) <= queued
    # A message the victim committed without its client seeing the 250 was
    # sent again elsewhere under a new queue ID: the only way to have more.
    assert len(queued) <= len(done.accepted) + done.failed


def _at_least(count: Callable[[], int], target: int) -> Callable[[], Any]:
    async def check() -> bool:
        return count() >= target

    return check


# --------------------------------------------------------------------------
# PostgreSQL stopped and started under load


class OwnCluster:
    """A cluster of this test's own, stopped and started again on the same port."""

    def __init__(self, base: Path) -> None:
        self.cluster = PgCluster.start(base)
        self.options = " ".join(
            [
                f"-c port={self.cluster.port}",
                "-c listen_addresses=127.0.0.1",
                f"-c unix_socket_directories={base}",
                "-c fsync=off",
                "-c max_connections=200",
                "-c log_min_messages=warning",
            ]
        )

    def _pg_ctl(self, *args: str) -> None:
        argv = [str(pg_bindir() / "pg_ctl"), "-D", str(self.cluster.data), *args]
        if os.geteuid() == 0:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        subprocess.run(argv, check=True, capture_output=True, timeout=60)

    def stop_server(self) -> None:
        """A fast shutdown: sessions are cut, as when the database host goes away."""
        self._pg_ctl("-m", "fast", "-w", "stop")

    def start_server(self) -> None:
        self._pg_ctl("-o", self.options, "-l", str(self.cluster.base / "server.log"),
                     "-w", "start")  # fmt: skip

    def close(self) -> None:
        self.cluster.stop()


@pytest.fixture
def own_cluster() -> Any:
    base = Path(tempfile.mkdtemp(prefix="outboundd-pg-stop-"))
    try:
        cluster = OwnCluster(base / "cluster")
    except PgUnavailable as exc:
        base.rmdir()
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL tests must run in CI: {exc}")
        pytest.skip(str(exc))
    try:
        yield cluster
    finally:
        cluster.close()
        with contextlib.suppress(OSError):
            base.rmdir()


async def test_postgresql_stopped_and_started_under_load(
    world: World, own_cluster: OwnCluster
) -> None:
    url = own_cluster.cluster.create_database("queue")
    configs = [world.host_config(f"host{i}", url) for i in range(2)]
    done = Submissions()
    tokens = (f"t{n}" for n in itertools.count())
    outage = {"down": 0.0, "up": 0.0}
    during_outage: Counter[str] = Counter()
    async with hosts(configs) as daemons:
        ports = [d.smtp_port for d in daemons]
        stop_load = asyncio.Event()

        def is_down() -> bool:
            return bool(outage["down"]) and not outage["up"]

        async def client(host: int) -> None:
            while not stop_load.is_set():
                token = next(tokens)
                started_down = is_down()
                assert await submit(done, host, ports[host], token, [f"u{token}@dest.test"])
                if started_down and is_down():  # the whole exchange with the server stopped
                    during_outage["250" if token in done.accepted else "refused"] += 1
                # A refused client waits a little before trying again, as a real one would.
                await asyncio.sleep(0.01 if token in done.accepted else 0.1)

        async def outage_mid_load() -> None:
            await wait_until("load under way", _at_least(lambda: len(done.accepted), 40), 60)
            await asyncio.to_thread(own_cluster.stop_server)
            outage["down"] = time.monotonic()
            await asyncio.sleep(3)
            outage["up"] = time.monotonic()
            await asyncio.to_thread(own_cluster.start_server)
            accepted_at_restart = len(done.accepted)
            await wait_until("mail accepted again after the restart",
                             _at_least(lambda: len(done.accepted), accepted_at_restart + 40),
                             60)  # fmt: skip
            stop_load.set()

        await asyncio.gather(outage_mid_load(), *(client(h) for h in (0, 1) for _ in range(2)))
        await wait_until("every recipient delivered", lambda: all_final(url), 60)
        # The same processes throughout: none exited or was restarted.
        for d in daemons:
            assert d.proc is not None and d.proc.returncode is None
            assert any("unreachable" in line for line in d.lines), d.lines[-20:]
        assert [await d.stop() for d in daemons] == [0, 0]

    # During the outage submission said 451 4.3.0, never 250.
    assert during_outage["refused"] > 0, (done.refused, during_outage)
    assert during_outage["250"] == 0, during_outage
    assert set(done.refused) == {"451 4.3.0"}, done.refused
    seen = arrivals(world.mx)
    missing = sorted(set(done.accepted) - set(seen))
    assert missing == [], f"accepted but never delivered: {missing}"
    queued = {qid for (qid,) in await query(url, "SELECT DISTINCT queue_id FROM deliveries")}
    # No 250 without a commit: every queue ID a client was given is in the queue.
    assert set(done.accepted.values()) <= queued
    statuses = await query(url, "SELECT status, count(*) FROM deliveries GROUP BY status")
    duplicates = sum(n - 1 for n in seen.values() if n > 1)
    print(
        f"\npostgresql outage: {len(done.accepted)} messages got a 250, refused "
        f"{dict(done.refused)} ({during_outage['refused']} while down, "
        f"none accepted then), duplicates {duplicates}; deliveries: {dict(statuses)}"
    )
    assert dict(statuses).keys() == {"delivered"}
