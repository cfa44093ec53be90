"""Fifty clients at once: every one gets 250 and every envelope is in the spool."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiosmtplib

from tests.submission_fixtures import PASSWORD, make_config, running_relay

CLIENTS = 50


async def test_fifty_concurrent_clients_all_queued(tmp_path: Path) -> None:
    async with running_relay(make_config(tmp_path)) as relay:
        port = relay.port()

        async def one(n: int) -> str:
            smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=30)
            async with smtp:
                await smtp.login("alice", PASSWORD)
                message = f"Subject: load {n}\r\n\r\nmessage {n}\r\n".encode()
                _, text = await smtp.sendmail(
                    f"sender{n}@example.com",
                    [f"r{n}a@example.org", f"r{n}b@example.net"],
                    message,
                    mail_options=[f"ENVID=env{n}"],
                    rcpt_options=["NOTIFY=FAILURE"],
                )
            assert text.startswith("2.0.0 Ok: queued as ")
            return text.rsplit(" ", 1)[1]

        queue_ids = await asyncio.gather(*(one(n) for n in range(CLIENTS)))
        assert len(set(queue_ids)) == CLIENTS
        stored = {row[0]: row for row in relay.messages()}
        assert set(stored) == set(queue_ids)
        for n, qid in enumerate(queue_ids):
            _, mail_from, auth_user, _, env_id, *_ = stored[qid]
            assert (mail_from, auth_user, env_id) == (f"sender{n}@example.com", "alice", f"env{n}")
            assert relay.recipients(qid) == [
                (f"r{n}a@example.org", "FAILURE", None, "queued"),
                (f"r{n}b@example.net", "FAILURE", None, "queued"),
            ]
            assert relay.body(qid).endswith(f"\r\n\r\nmessage {n}\r\n".encode())
