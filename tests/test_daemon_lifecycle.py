"""The daemon's own availability: reloads, restarted children, stopping.

The real ``outboundd`` with a delivery process and SMTP nodes, a loopback DNS
server and a scripted MX; the reload logic itself on the real config loader.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from outboundd.config import load_config
from outboundd.daemon import OutboundSettings
from tests.dnsserver import DNSServer
from tests.harness import Daemon, running, submit, write_config
from tests.mxserver import MXScript, MXServer, mx_server

SENDER = "alice@sender.test"
#: Log lines more severe than INFO, in the logfmt the test config asks for.
ABOVE_INFO = re.compile(r"\blevel=(NOTICE|WARN|ERROR|CRIT|ALERT|EMERG)\b")


def stop_lines(lines: list[str]) -> list[str]:
    """The log from the first "stopping" on, without the deliveries' own lines."""
    start = next(i for i, line in enumerate(lines) if 'message="stopping"' in line)
    return [line for line in lines[start:] if 'message="delivered"' not in line]


@dataclass
class World:
    dns: DNSServer
    mx: MXServer
    tmp: Path

    def config(self, smtp: dict[str, object] | None = None, **outbound: object) -> Path:
        return write_config(self.tmp / "config", dns_port=self.dns.port, mx_port=self.mx.port,
                            outbound=outbound, smtp=smtp)  # fmt: skip


@pytest.fixture
async def world(dns_server: DNSServer, tmp_path: Path) -> AsyncIterator[World]:
    dns_server.zones.update(
        {"dest.test": {"MX": [(10, "mx.dest.test")]}, "mx.dest.test": {"A": ["127.0.0.2"]}}
    )
    async with mx_server(MXScript(), host="127.0.0.2") as mx:
        yield World(dns_server, mx, tmp_path)


def edit(config: Path, old: str, new: str) -> None:
    path = config / "outbound.ini"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


# --------------------------------------------------------------------------
# Hot reload compares content (item: an edit made during start-up is not missed)


def test_an_edit_with_the_same_size_and_mtime_is_still_seen(tmp_path: Path) -> None:
    """The file changes after it was read for the start-up configuration but
    keeps its size and mtime (an edit within the timestamp granularity, or
    between the read and a stamp): the first check must still see it."""
    config_dir = write_config(tmp_path / "config", dns_port=53, mx_port=25,
                              outbound={"disabled": "true", "concurrency_max": 100})  # fmt: skip
    path = config_dir / "outbound.ini"
    config = load_config(config_dir)
    assert config.outbound.disabled is True
    before = path.stat()
    old, new = "disabled=true\nconcurrency_max=100", "disabled=false\nconcurrency_max=10"
    assert len(old) == len(new) and old in path.read_text()
    path.write_text(path.read_text().replace(old, new))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)

    settings = OutboundSettings(config)
    assert settings.check() is True
    assert settings().disabled is False and settings().concurrency_max == 10
    assert settings.check() is False  # nothing new


def test_a_broken_edit_keeps_the_settings_and_a_fix_is_taken(tmp_path: Path) -> None:
    config_dir = write_config(tmp_path / "config", dns_port=53, mx_port=25,
                              outbound={"concurrency_max": 7})  # fmt: skip
    settings = OutboundSettings(load_config(config_dir))
    assert settings.check() is False  # the same settings as loaded: no reload reported
    edit(config_dir, "concurrency_max=7", "concurrency_max=seven")
    assert settings.check() is False
    assert settings().concurrency_max == 7
    edit(config_dir, "concurrency_max=seven", "concurrency_max=8")
    assert settings.check() is True
    assert settings().concurrency_max == 8


def test_the_queue_stays_until_a_restart(tmp_path: Path) -> None:
    """queue_dir and queue_url edits are not taken live: a child restarted on the
    settings in force must open the queue every other process has open."""
    config_dir = write_config(tmp_path / "config", dns_port=53, mx_port=25,
                              outbound={"concurrency_max": 7, "queue_dir": "q1"})  # fmt: skip
    config = load_config(config_dir)
    settings = OutboundSettings(config)
    edit(config_dir, "queue_dir=q1", "queue_dir=q2\nqueue_url=postgresql://db.example/q")
    edit(config_dir, "concurrency_max=7", "concurrency_max=8")
    assert settings.check() is True
    assert settings().concurrency_max == 8
    assert settings().queue_dir == config.outbound.queue_dir
    assert settings().queue_url is None


@pytest.mark.parametrize("edit_after", [0.0, 0.3, 0.8])
async def test_an_edit_during_start_up_is_picked_up(world: World, edit_after: float) -> None:
    """disabled=true -> false while the daemon (and its delivery process) is
    still starting: the mail is delivered, not left queued."""
    config = world.config(disabled="true")
    d = Daemon(config)
    starting = asyncio.create_task(d.start())
    try:
        await asyncio.sleep(edit_after)
        edit(config, "disabled=true", "disabled=false")
        await starting
        qid = await submit(d.smtp_port, SENDER, ["bob@dest.test"])
        await d.wait_for_status(qid, "delivered", timeout=10)
    finally:
        if not starting.done():
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError, AssertionError):
                await starting
        if d.proc is not None and d.proc.returncode is None:
            await d.stop()
    assert d.returncode == 0


# --------------------------------------------------------------------------
# A restarted child keeps the last good settings


async def test_a_restarted_delivery_process_runs_on_the_last_good_settings(world: World) -> None:
    """Started disabled, enabled by a good edit, then a broken edit: the
    delivery process is killed and restarted while the broken file is in
    place.  It starts from the parent's last good settings (enabled), so it
    delivers; it neither exits on the broken file nor is restarted again."""
    config = world.config(disabled="true", delivery_processes=1)
    async with running(config) as d:
        [child] = [pid for pid in d.children() if pid != d.proc.pid]  # type: ignore[union-attr]
        edit(config, "disabled=true", "disabled=false")
        await d.wait_for(r'message="outbound.ini reloaded".*disabled=false')
        edit(config, "disabled=false", "disabled=maybe")
        await d.wait_for(r'message="outbound.ini not reloaded')
        os.kill(child, signal.SIGKILL)
        await d.wait_for(r"delivery process exited unexpectedly")
        await d.wait_for(rf"delivery process started\" pid=(?!{child}\b)\d+")
        await d.wait_for(r'message="delivery ready".*delivery=enabled')
        qid = await submit(d.smtp_port, SENDER, ["bob@dest.test"])
        await d.wait_for_status(qid, "delivered", timeout=10)
        restarts = [line for line in d.lines if "exited unexpectedly" in line]
        assert len(restarts) == 1, restarts
        # Fixed later, the file is followed again, by the parent and the restarted child.
        edit(config, "disabled=maybe", "disabled=true")
        for _ in range(100):
            if sum('reloaded" disabled=true' in line for line in d.lines) == 2:
                break
            await asyncio.sleep(0.05)
        assert sum('reloaded" disabled=true' in line for line in d.lines) == 2, d.lines
    assert d.returncode == 0
    assert [t.rcpt_tos for t in world.mx.transactions] == [["bob@dest.test"]]


# --------------------------------------------------------------------------
# Shutdown


async def test_repeated_sigterms_keep_the_graceful_stop(world: World) -> None:
    """nodes=2 and a delivery process, a delivery in progress: SIGTERM three
    times.  The daemon finishes the delivery, exits 0, leaves no process,
    and a normal stop logs nothing above INFO."""
    world.mx.script = MXScript(delays={"data_end": 1.5})
    config = world.config(smtp={"nodes": 2}, delivery_processes=1)
    d = Daemon(config)
    await d.start()
    try:
        await d.wait_for(r"SMTP node started")
        await d.wait_for(r'message="delivery ready"')
        qid = await submit(d.smtp_port, SENDER, ["bob@dest.test"])
        await d.wait_for_status(qid, "sending")
        for _ in range(3):
            d.signal(signal.SIGTERM)
            await asyncio.sleep(0.1)
        status = await d.stop()
    finally:
        if d.proc is not None and d.proc.returncode is None:
            await d.kill()
    assert status == 0
    await d.wait_for_status(qid, "delivered", timeout=1)
    assert any("already stopping" in line for line in d.lines)
    assert [line for line in stop_lines(d.lines) if ABOVE_INFO.search(line)] == []


async def test_sigterm_right_after_start_stops_children_cleanly(world: World) -> None:
    """A stop while the children are still importing: they stop gracefully
    (exit 0), so nothing is reported as an error."""
    config = world.config(smtp={"nodes": 2}, delivery_processes=1)
    d = Daemon(config)
    await d.start()
    d.signal(signal.SIGTERM)
    assert await d.stop() == 0
    assert [line for line in stop_lines(d.lines) if ABOVE_INFO.search(line)] == []
