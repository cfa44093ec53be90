"""A delivery engine on real parts, for tests that watch what reaches an MX.

:func:`delivery_rig` builds a config directory (``tests.harness.write_config``,
so ``outbound.ini`` and ``tls.ini`` are read by the real loader), opens the
real spool in a temporary directory, and wires a :class:`DeliveryEngine`
to the loopback DNS server.  :meth:`Rig.run_once` claims what is due and
delivers it; :meth:`Rig.deliveries` and :meth:`Rig.attempts` read the
accounting views as an operator would.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from outboundd.config import Config, load_config
from outboundd.daemon import OutboundSettings
from outboundd.delivery.engine import DeliveryEngine
from outboundd.hooks import HookRunner
from outboundd.spool import NewMessage, NewRecipient, Spool, lease_owner_id
from tests.dnsserver import DNSServer
from tests.harness import write_config

SENDER = "alice@sender.test"
BODY = b"From: alice@sender.test\r\nSubject: rig\r\nMessage-ID: <rig@sender.test>\r\n\r\nhi\r\n"


@dataclass
class Rig:
    spool: Spool
    engine: DeliveryEngine
    hooks: HookRunner
    config: Config
    owner: str

    async def send(self, *rcpts: str | NewRecipient, sender: str = SENDER, **kw: Any) -> str:
        recipients = [r if isinstance(r, NewRecipient) else NewRecipient(r) for r in rcpts]
        return await self.spool.accept(NewMessage(sender, recipients, BODY, **kw))

    async def run_once(self) -> int:
        """Claim everything due now and deliver it; how many groups ran."""
        claims = await self.spool.claim(self.owner, limit=50, lease_seconds=60)
        for claim in claims:
            await self.engine.deliver(claim)
        return len(claims)

    def _query(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        con = sqlite3.connect(self.spool.db_path)
        try:
            return con.execute(sql, params).fetchall()
        finally:
            con.close()

    def deliveries(self, qid: str) -> dict[str, tuple[Any, ...]]:
        """recipient → (status, last_code, last_status, last_response)."""
        rows = self._query(
            "SELECT recipient, status, last_code, last_status, last_response "
            "FROM deliveries WHERE queue_id = ?",
            (qid,),
        )
        return {r[0]: r[1:] for r in rows}

    def attempts(self, qid: str) -> list[tuple[Any, ...]]:
        """(recipient, attempt, mx_host, mx_ip, tls, auth, outcome), in attempt order."""
        return self._query(
            "SELECT recipient, attempt, mx_host, mx_ip, tls, auth, outcome FROM attempts "
            "WHERE queue_id = ? ORDER BY attempt, recipient",
            (qid,),
        )

    def dsn_count(self) -> int:
        """Messages queued with the null sender (DSNs)."""
        return int(self._query("SELECT count(*) FROM messages WHERE mail_from = ''", ())[0][0])


@contextlib.asynccontextmanager
async def delivery_rig(
    tmp_path: Path,
    dns: DNSServer,
    *,
    mx_port: int,
    outbound: Mapping[str, object] | None = None,
    extra_files: Mapping[str, str] | None = None,
) -> AsyncIterator[Rig]:
    """A rig whose DNS-routed mail goes to ``mx_port``; closed (pool QUIT, spool) after."""
    config_dir = write_config(
        tmp_path / "config",
        dns_port=dns.port,
        mx_port=mx_port,
        outbound=dict(outbound or {}),
        extra_files=extra_files,
    )
    config = load_config(config_dir)
    spool = await Spool.open(config.outbound.queue_dir)
    hooks = HookRunner([], timeout=2.0)
    owner = lease_owner_id()
    engine = DeliveryEngine(config, OutboundSettings(config), spool, hooks, owner=owner)
    try:
        yield Rig(spool, engine, hooks, config, owner)
    finally:
        await engine.close()
        await spool.close()
