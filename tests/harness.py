"""Running the real ``outboundd`` process in tests.

:func:`write_config` makes a throwaway config directory (loopback only);
:class:`Daemon` starts ``python -m outboundd -c DIR``, waits for its
``ready`` line, collects its log lines, and stops it by PID.  When the
config has ``queue_url`` (the PostgreSQL backend), :meth:`Daemon.query`
reads that database instead of ``queue/outbound.db`` (:func:`run_sql`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import signal
import socket
import sqlite3
import ssl
import sys
import time
from collections.abc import AsyncIterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

READY = re.compile(r"\bready\b")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def write_config(
    directory: Path,
    *,
    dns_port: int,
    mx_port: int,
    smtp_port: int | None = None,
    outbound: Mapping[str, Any] | None = None,
    smtp: Mapping[str, Any] | None = None,
    plugins: list[str] | None = None,
    extra_files: Mapping[str, str] | None = None,
) -> Path:
    """A config dir for a test daemon: loopback listener, loopback DNS, MX port."""
    directory.mkdir(parents=True, exist_ok=True)
    port = smtp_port or free_port()
    (directory / "me").write_text("outboundd.test\n")
    smtp_lines = [f"[main]\nlisten=127.0.0.1:{port}"] + [
        f"{k}={v}" for k, v in (smtp or {}).items()
    ]
    (directory / "smtp.ini").write_text("\n".join(smtp_lines) + "\n")
    settings: dict[str, Any] = {
        "nameservers": f"127.0.0.1:{dns_port}",
        "mx_port": mx_port,
        "local_mx_ok": "true",
        "connect_timeout": 3,
        "temp_fail_intervals": "5s*3",
    }
    settings.update(outbound or {})
    lines = ["[main]"] + [f"{k}={v}" for k, v in settings.items()]
    (directory / "outbound.ini").write_text("\n".join(lines) + "\n")
    (directory / "relay_acl_allow").write_text("127.0.0.0/8\n::1/128\n")
    (directory / "log.ini").write_text("[main]\nlevel=info\nformat=logfmt\n")
    (directory / "plugins").write_text("\n".join(plugins or []) + "\n")
    for name, text in (extra_files or {}).items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return directory


def queue_url_of(config_dir: Path) -> str | None:
    """The ``queue_url`` a test config sets (PostgreSQL), or None (SQLite in queue/)."""
    match = re.search(r"^queue_url=(\S+)$", (config_dir / "outbound.ini").read_text(), re.M)
    return match[1] if match else None


def run_sql(location: str | Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """One statement (``?`` placeholders) on a queue: a ``postgresql://`` URL or an SQLite file.

    Blocking, like ``sqlite3``: the PostgreSQL query runs on its own event
    loop in a helper thread, so it can be called from async tests too.
    """
    if isinstance(location, str) and location.startswith("postgresql://"):
        import asyncpg

        numbers = itertools.count(1)
        text = re.sub(r"\?", lambda _m: f"${next(numbers)}", sql)

        async def fetch() -> list[tuple[Any, ...]]:
            conn = await asyncpg.connect(location)
            try:
                if text.lstrip().upper().startswith(("UPDATE", "DELETE", "INSERT")):
                    await conn.execute(text, *params)
                    return []
                return [tuple(r) for r in await conn.fetch(text, *params)]
            finally:
                await conn.close()

        with ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, fetch()).result()
    con = sqlite3.connect(location, timeout=10)
    try:
        with con:
            return con.execute(sql, params).fetchall()
    finally:
        con.close()


def view_columns(location: str | Path, view: str) -> list[str]:
    """A view's column names, in order, on either backend."""
    if isinstance(location, str) and location.startswith("postgresql://"):
        import asyncpg

        async def names() -> list[str]:
            conn = await asyncpg.connect(location)
            try:
                stmt = await conn.prepare(f"SELECT * FROM {view} LIMIT 0")
                return [a.name for a in stmt.get_attributes()]
            finally:
                await conn.close()

        with ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, names()).result()
    con = sqlite3.connect(location)
    try:
        return [c[0] for c in con.execute(f"SELECT * FROM {view} LIMIT 0").description]
    finally:
        con.close()


def smtp_port_of(config_dir: Path) -> int:
    text = (config_dir / "smtp.ini").read_text()
    match = re.search(r"listen=127\.0\.0\.1:(\d+)", text)
    assert match is not None
    return int(match[1])


class Daemon:
    """A running ``outboundd``; use as ``async with Daemon(config_dir) as d``."""

    def __init__(self, config_dir: Path) -> None:
        self.config_dir = config_dir
        self.smtp_port = smtp_port_of(config_dir)
        self.queue_dir = config_dir.parent / "queue"
        self.queue_url = queue_url_of(config_dir)
        self.proc: asyncio.subprocess.Process | None = None
        self.lines: list[str] = []
        self._reader: asyncio.Task[None] | None = None
        self._new_line = asyncio.Event()
        self.returncode: int | None = None

    async def start(self, timeout: float = 20.0, until: re.Pattern[str] = READY) -> None:
        """Start outboundd and wait for ``until`` (by default its ``ready`` line)."""
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "outboundd", "-c", str(self.config_dir),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env,
            start_new_session=True,  # its own process group: a crash takes the child too
        )  # fmt: skip
        self._reader = asyncio.create_task(self._read())
        await self.wait_for(until, timeout)

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while True:
            line = await self.proc.stdout.readline()
            if not line:
                break
            self.lines.append(line.decode("utf-8", "replace").rstrip("\n"))
            self._new_line.set()
        self._new_line.set()

    async def wait_for(self, pattern: re.Pattern[str] | str, timeout: float = 10.0) -> str:
        """The first log line matching ``pattern`` (waiting for it if needed)."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for line in self.lines[seen:]:
                if regex.search(line):
                    return line
            seen = len(self.lines)
            if self.proc is not None and self.proc.returncode is not None and self._reader_done:
                raise AssertionError("outboundd exited; log:\n" + "\n".join(self.lines[-40:]))
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"no log line matching {regex.pattern!r} within {timeout}s; log:\n"
                    + "\n".join(self.lines[-40:])
                )
            self._new_line.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._new_line.wait(), min(remaining, 0.5))

    @property
    def _reader_done(self) -> bool:
        return self._reader is not None and self._reader.done()

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    def children(self) -> list[int]:
        """PIDs of the processes outboundd started (SMTP nodes, delivery processes)."""
        assert self.proc is not None
        path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        return [int(pid) for pid in path.read_text().split()]

    async def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM by PID; wait for exit; the exit status."""
        assert self.proc is not None
        if self.proc.returncode is None:
            self.signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
            except TimeoutError:
                self.signal(signal.SIGKILL)
                await self.proc.wait()
                raise AssertionError("outboundd did not stop within the grace period") from None
        if self._reader is not None:
            await self._reader
        self.returncode = self.proc.returncode
        await self._assert_group_gone()
        return self.returncode

    async def _assert_group_gone(self) -> None:
        """outboundd must have stopped its delivery process before exiting."""
        assert self.proc is not None
        for _ in range(100):
            try:
                os.killpg(self.proc.pid, 0)
            except ProcessLookupError:
                return
            await asyncio.sleep(0.05)
        os.killpg(self.proc.pid, signal.SIGKILL)
        raise AssertionError("outboundd exited but left a process of its group running")

    async def kill(self) -> None:
        """SIGKILL the daemon's process group (it and its delivery process): a crash."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        await self.proc.wait()
        if self._reader is not None:
            await self._reader

    async def __aenter__(self) -> Daemon:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.returncode is None:
            await self.stop()

    # ---------------------------------------------------------- queue view

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        return run_sql(self.queue_url or self.queue_dir / "outbound.db", sql, params)

    def lose_body(self, queue_id: str) -> None:
        """Take ``queue_id``'s body away behind the daemon's back (a file, or a row)."""
        if self.queue_url:
            self.query("DELETE FROM bodies WHERE queue_id = ?", (queue_id,))
            return
        [body] = list((self.queue_dir / "bodies").glob(f"*/{queue_id}"))
        body.unlink()

    def body_kept(self, queue_id: str) -> bool:
        """Whether the spool still holds ``queue_id``'s body (a file, or a row)."""
        if self.queue_url:
            rows = self.query("SELECT count(*) FROM bodies WHERE queue_id = ?", (queue_id,))
            return bool(rows[0][0])
        return bool(list((self.queue_dir / "bodies").glob(f"*/{queue_id}")))

    async def wait_for_status(
        self, queue_id: str, status: str, *, count: int = 1, timeout: float = 15.0
    ) -> None:
        deadline = time.monotonic() + timeout
        while True:
            rows = self.query(
                "SELECT count(*) FROM deliveries WHERE queue_id = ? AND status = ?",
                (queue_id, status),
            )
            if rows[0][0] >= count:
                return
            if time.monotonic() > deadline:
                table = self.query("SELECT recipient, status, last_response FROM deliveries "
                                   "WHERE queue_id = ?", (queue_id,))  # fmt: skip
                raise AssertionError(
                    f"{queue_id}: wanted {count} {status}, have {table}; log:\n"
                    + "\n".join(self.lines[-30:])
                )
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def running(config_dir: Path) -> AsyncIterator[Daemon]:
    daemon = Daemon(config_dir)
    await daemon.start()
    try:
        yield daemon
    finally:
        if daemon.proc is not None and daemon.proc.returncode is None:
            await daemon.stop()


def queued_id(reply: bytes | str) -> str:
    """The queue ID in a ``250 2.0.0 Ok: queued as ID`` reply."""
    text = reply.decode() if isinstance(reply, bytes) else reply
    match = re.search(r"queued as ([A-Za-z0-9._-]+)", text)
    assert match is not None, text
    return match[1]


async def submit(
    port: int,
    sender: str,
    recipients: list[str],
    body: bytes | None = None,
    *,
    subject: str = "test",
    tls_context: ssl.SSLContext | None = None,
) -> str:
    """Send one message to the daemon's listener over loopback; its queue ID.

    With ``tls_context`` the connection is implicit TLS (``listen_tls``).
    """
    import aiosmtplib

    message = (
        body
        or (
            f"From: <{sender}>\r\nTo: <{recipients[0]}>\r\nSubject: {subject}\r\n\r\n"
            "Hello from the test suite.\r\n"
        ).encode()
    )
    client = aiosmtplib.SMTP(
        hostname="127.0.0.1",
        port=port,
        timeout=10,
        start_tls=False,
        use_tls=tls_context is not None,
        tls_context=tls_context,
    )
    await client.connect()
    try:
        await client.ehlo(hostname="client.test")
        await client.mail(sender)
        for rcpt in recipients:
            await client.rcpt(rcpt)
        response = await client.data(message)
    finally:
        with contextlib.suppress(Exception):
            await client.quit()
    assert response.code == 250, response
    return queued_id(response.message)
