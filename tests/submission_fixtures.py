"""Fixtures for the submission tests: a real spool, real listeners on loopback.

:func:`make_config` builds a :class:`Config` in code (port 0, loopback
only); :class:`Relay` starts the listeners on it and reads back what the
spool stored through its SQLite file, as an operator would.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import sqlite3
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from outboundd.config import Config, HostPort, OutboundConfig, SmtpConfig, TlsConfig
from outboundd.hooks import HookRunner
from outboundd.plugins.auth_flat_file import hash_password
from outboundd.spool import Spool
from outboundd.submission.server import Listeners, start_listeners
from tests.certs import TestPKI

ME = "relay.test"
PASSWORD = "correct horse battery staple"

_HASHES: dict[str, str] = {}


def password_hash(password: str = PASSWORD) -> str:
    """scrypt is slow on purpose; hash each test password once per run."""
    if password not in _HASHES:
        _HASHES[password] = hash_password(password)
    return _HASHES[password]


def make_config(
    base: Path,
    *,
    pki: TestPKI | None = None,
    implicit_tls: bool = False,
    plugins: Sequence[str] = ("auth_flat_file",),
    users: Mapping[str, str] | None = None,
    relay_acl: Sequence[str] = (),
    received_header: str | None = "outboundd",
    **smtp: Any,
) -> Config:
    config_dir = base / "config"
    config_dir.mkdir(parents=True, exist_ok=True)
    smtp_settings: dict[str, Any] = {
        "listen": [HostPort("127.0.0.1", 0)],
        "listen_tls": [HostPort("127.0.0.1", 0)] if implicit_tls else [],
        "auth_failure_delay": 0.05,
    }
    smtp_settings.update(smtp)
    tls = TlsConfig(key=pki.key_pem, cert=pki.cert_pem) if pki is not None else TlsConfig()
    return Config(
        config_dir=config_dir,
        base_dir=base,
        plugins_dir=base / "plugins",
        me=ME,
        smtp=SmtpConfig(**smtp_settings),
        outbound=OutboundConfig(queue_dir=base / "queue", received_header=received_header),
        tls=tls,
        plugins=list(plugins),
        relay_acl_allow=[ipaddress.ip_network(n) for n in relay_acl],
        auth_users=dict(users) if users is not None else {"alice": password_hash()},
    )


@dataclass
class Relay:
    """Running listeners plus their spool."""

    config: Config
    spool: Spool
    hooks: HookRunner
    listeners: Listeners
    queue_dir: Path
    log_lines: list[str] = field(default_factory=list)

    def port(self, implicit_tls: bool = False) -> int:
        for _, port, implicit in self.listeners.addresses():
            if implicit == implicit_tls:
                return port
        raise AssertionError("no such listener")

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        con = sqlite3.connect(self.queue_dir / "outbound.db", timeout=10)
        try:
            return con.execute(sql, params).fetchall()
        finally:
            con.close()

    def messages(self) -> list[tuple[Any, ...]]:
        return self.query(
            "SELECT queue_id, mail_from, auth_user, client_ip, env_id, ret, smtputf8, "
            "body_8bit, notes FROM messages ORDER BY received_at"
        )

    def recipients(self, queue_id: str) -> list[tuple[Any, ...]]:
        return self.query(
            "SELECT recipient, notify, orcpt, status FROM recipients WHERE queue_id = ? "
            "ORDER BY id",
            (queue_id,),
        )

    def body(self, queue_id: str) -> bytes:
        return self.spool.body_path(queue_id).read_bytes()

    def body_files(self) -> list[Path]:
        return [p for p in (self.queue_dir / "bodies").rglob("*") if p.is_file()]


@contextlib.asynccontextmanager
async def running_relay(config: Config, hooks: HookRunner | None = None) -> AsyncIterator[Relay]:
    spool = await Spool.open(config.outbound.queue_dir)
    runner = hooks or HookRunner([])
    listeners = await start_listeners(config, spool, runner)
    try:
        yield Relay(config, spool, runner, listeners, config.outbound.queue_dir)
    finally:
        await listeners.close(grace=2.0)
        await spool.close()


class LineClient:
    """A raw SMTP client on a socket: sends exact bytes, reads whole replies."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int, host: str = "127.0.0.1") -> LineClient:
        reader, writer = await asyncio.open_connection(host, port)
        client = cls(reader, writer)
        greeting = await client.reply()
        assert greeting.startswith("220 "), greeting
        return client

    async def reply(self, timeout: float = 10.0) -> str:
        """One complete (possibly multi-line) reply, lines joined by newlines."""
        lines: list[str] = []
        while True:
            raw = await asyncio.wait_for(self.reader.readline(), timeout)
            if not raw:
                raise ConnectionError("connection closed; got " + repr(lines))
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            lines.append(line)
            if len(line) < 4 or line[3] != "-":
                return "\n".join(lines)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def cmd(self, line: str | bytes) -> str:
        data = line.encode("utf-8") if isinstance(line, str) else line
        await self.send(data + b"\r\n")
        return await self.reply()

    async def closed(self, timeout: float = 5.0) -> bool:
        """True when the server closed the connection (EOF within ``timeout``)."""
        try:
            await asyncio.wait_for(self.reader.read(), timeout)
        except TimeoutError:
            return False
        except ConnectionError:
            return True
        return True

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()
