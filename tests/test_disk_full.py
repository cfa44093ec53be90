"""A full queue disk: refuse new mail with 4.3.1, keep delivering, recover.

The queue lives on a small tmpfs mounted for the test (we are root; it is
unmounted in teardown), filled to the last byte by a filler file: the real
``outboundd`` with a delivery process, a loopback DNS server and MX.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiosmtplib
import pytest

from outboundd.delivery.scheduler import Scheduler
from outboundd.spool import Claim, NewMessage, NewRecipient, Spool, lease_owner_id
from outboundd.spool.reserve import RESERVE_NAME, SpaceReserve
from tests.dnsserver import DNSServer
from tests.harness import Daemon, submit, write_config
from tests.mxserver import MXScript, mx_server

SENDER = "alice@sender.test"


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs at ``tmp_path/disk``, unmounted afterwards."""
    mount = tmp_path / "disk"
    mount.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs", str(mount)],
                       check=True, capture_output=True, timeout=10)  # fmt: skip
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.fail(f"cannot mount a tmpfs for the test (root is required): {exc}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False, timeout=10)


def fill(directory: Path) -> Path:
    """Write a filler file until the filesystem is full; its path."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        size = 1024 * 1024
        for _ in range(10_000):  # bounded: the disk is 16 MiB
            try:
                os.write(fd, bytes(size))
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                if size == 1:
                    break
                size //= 2
    finally:
        os.close(fd)
    assert os.statvfs(directory).f_bavail == 0
    return filler


async def send(port: int, recipient: str) -> aiosmtplib.SMTPResponse:
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=10, start_tls=False)
    await client.connect()
    try:
        await client.ehlo(hostname="client.test")
        await client.mail(SENDER)
        await client.rcpt(recipient)
        try:
            return await client.data(f"From: <{SENDER}>\r\nSubject: x\r\n\r\nbody\r\n".encode())
        except aiosmtplib.SMTPDataError as exc:
            return aiosmtplib.SMTPResponse(exc.code, exc.message)
    finally:
        with contextlib.suppress(Exception):
            await client.quit()


async def test_the_reserve_is_made_released_and_made_again(small_disk: Path) -> None:
    queue = small_disk / "queue"
    spool = await Spool.open(queue)
    await spool.close()
    reserve = SpaceReserve(queue)
    assert (queue / RESERVE_NAME).stat().st_size == reserve.size
    filler = fill(small_disk)
    assert reserve.release() is True
    assert reserve.release() is False
    assert reserve.ensure() is False  # only its own size is free: not enough to take it back
    filler.unlink()
    assert reserve.ensure() is True and reserve.held()


async def test_a_full_disk_refuses_new_mail_and_keeps_delivering(
    dns_server: DNSServer, small_disk: Path, tmp_path: Path
) -> None:
    dns_server.zones.update(
        {"dest.test": {"MX": [(10, "mx.dest.test")]}, "mx.dest.test": {"A": ["127.0.0.2"]}}
    )
    async with mx_server(MXScript(), host="127.0.0.2") as mx:
        config = write_config(
            tmp_path / "config", dns_port=dns_server.port, mx_port=mx.port,
            outbound={"disabled": "true", "delivery_processes": 1,
                      "queue_dir": str(small_disk / "queue")},
        )  # fmt: skip
        d = Daemon(config)
        d.queue_dir = small_disk / "queue"
        await d.start()
        try:
            waiting = [await submit(d.smtp_port, SENDER, [f"r{i}@dest.test"]) for i in range(3)]
            filler = fill(small_disk)

            refused = await send(d.smtp_port, "late@dest.test")
            assert (refused.code, refused.message[:5]) == (451, "4.3.1"), refused

            # Delivery is switched on with the disk full: claims and records
            # go through in the reserved space, and every message is delivered.
            text = (config / "outbound.ini").read_text()
            (config / "outbound.ini").write_text(text.replace("disabled=true", "disabled=false"))
            for qid in waiting:
                await d.wait_for_status(qid, "delivered", timeout=15)
            assert sorted(r for t in mx.transactions for r in t.rcpt_tos) == [
                "r0@dest.test", "r1@dest.test", "r2@dest.test"
            ]  # fmt: skip

            # Still full (the reserve was used): new mail is still refused...
            again = await send(d.smtp_port, "late@dest.test")
            assert (again.code, again.message[:5]) == (451, "4.3.1"), again
            # ... until space comes back; then it is accepted and delivered.
            filler.unlink()
            for _ in range(100):
                reply = await send(d.smtp_port, "late@dest.test")
                if reply.code == 250:
                    break
                assert reply.code == 451
                await asyncio.sleep(0.1)
            assert reply.code == 250, reply
            assert (d.queue_dir / RESERVE_NAME).stat().st_size > 0  # held again
            await d.wait_for_status(reply.message.split()[-1], "delivered", timeout=15)
            assert d.returncode is None
            assert not any("exited unexpectedly" in line for line in d.lines)
            assert not any("Traceback" in line for line in d.lines)
        finally:
            if d.proc is not None and d.proc.returncode is None:
                assert await d.stop() == 0


class RecordingLog:
    """The scheduler's log, kept for assertions."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def error(self, message: str, /, **fields: object) -> None:
        self.lines.append(("error", message))

    def warn(self, message: str, /, **fields: object) -> None:
        self.lines.append(("warn", message))

    def notice(self, message: str, /, **fields: object) -> None:
        self.lines.append(("notice", message))

    def info(self, message: str, /, **fields: object) -> None:
        self.lines.append(("info", message))


@dataclass
class Settings:
    disabled: bool = False
    concurrency_max: int = 10
    domain_concurrency_max: int = 10
    always_split: bool = False
    lease_seconds: float = 60.0


async def test_the_scheduler_waits_out_a_full_disk_and_resumes(small_disk: Path) -> None:
    """With the reserve already spent and no byte free, a claim fails: the
    scheduler logs it once, backs off and keeps running; once space is back
    it claims and delivers."""
    spool = await Spool.open(small_disk / "queue")
    claimed: list[str] = []
    log = RecordingLog()

    async def deliver(claim: Claim) -> None:
        claimed.append(claim.queue_id)

    try:
        qid = await spool.accept(NewMessage(SENDER, [NewRecipient("bob@dest.test")], b"x\r\n"))
        assert SpaceReserve(spool.queue_dir).release()
        filler = fill(small_disk)
        sched = Scheduler(spool, Settings, deliver, owner=lease_owner_id(), log=log,
                          poll_interval=0.1)  # fmt: skip
        runner = asyncio.create_task(sched.run())
        try:
            for _ in range(100):
                if log.lines:
                    break
                await asyncio.sleep(0.05)
            assert log.lines[:1] == [("warn", "queue disk full; not claiming new work, "
                                      "running deliveries go on")], log.lines  # fmt: skip
            await asyncio.sleep(1.5)  # backing off: 1 s, then 2 s
            assert claimed == [] and not runner.done()
            assert [level for level, _ in log.lines] == ["warn"]  # logged once
            filler.unlink()
            for _ in range(200):  # the back-off is at 2 or 4 s by now
                if claimed:
                    break
                await asyncio.sleep(0.05)
            assert claimed == [qid]
            assert log.lines[-1] == ("notice", "queue writable again; claiming")
        finally:
            await sched.stop(1.0)
            await asyncio.wait_for(runner, 5)
    finally:
        await spool.close()
