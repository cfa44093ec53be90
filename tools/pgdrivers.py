"""Compare asyncpg and psycopg 3 (async, psycopg_pool) on the spool's two hot statements.

Runs the PostgreSQL backend's own ``accept_batch`` (a group commit of 20
messages as one statement) and a claim transaction (``due_rows`` ``FOR
UPDATE SKIP LOCKED``, ``lease_ids``, ``messages_with_bodies``) through each
driver against a database you give, and prints the client's CPU and wall
time per message.  The server does the same work for both, so the client
side is the difference.  docs/scaling.md has the figures and the choice::

    python tools/pgdrivers.py postgresql://postgres@127.0.0.1:5432/scratch

(``python -m tests.pgcluster start DIR`` makes a throwaway server.)  It
empties the queue tables of that database first: never point it at a real
queue.  psycopg is not a dependency of outboundd: ``pip install
'psycopg[binary]' psycopg_pool`` to run it.
"""

from __future__ import annotations

import asyncio
import re
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from outboundd.spool.postgres import PostgresSpool
from outboundd.spool.postgres.sql import bind, pq, statements

BATCH = 20
BATCHES = 150
CLAIM_GROUPS = 10
BODY = b"Subject: driver test\r\n\r\n" + b"x" * 4000 + b"\r\n"

_NAMED = re.compile(r"(?<![:\w]):([a-z_][a-z0-9_]*)")


def batch_params(round_no: int) -> dict[str, Any]:
    now = time.time()
    qids = [f"DRV{round_no:05d}.{i:03d}" for i in range(BATCH)]
    n = len(qids)
    return {
        "m_queue_id": qids,
        "m_mail_from": ["a@example.test"] * n,
        "m_size": [len(BODY)] * n,
        "m_received_at": [now] * n,
        "m_auth_user": [None] * n,
        "m_client_ip": ["127.0.0.1"] * n,
        "m_env_id": [None] * n,
        "m_ret": [None] * n,
        "m_smtputf8": [0] * n,
        "m_body_8bit": [0] * n,
        "m_notes": ["{}"] * n,
        "m_dsn_of": [None] * n,
        "b_body": [BODY] * n,
        "r_queue_id": qids,
        "r_recipient": [f"r{i}@d{i % 5}.test" for i in range(n)],
        "r_domain": [f"d{i % 5}.test" for i in range(n)],
        "r_notify": [None] * n,
        "r_orcpt": [None] * n,
        "r_next_attempt_at": [now] * n,
        "l_queue_id": [],
        "l_recipient": [],
        "l_dsn_queue_id": [],
    }


async def reset(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("TRUNCATE attempt_log, recipients, bodies, messages")
    finally:
        await conn.close()


async def measure(label: str, work: Callable[[], Awaitable[int]]) -> None:
    cpu, wall = time.process_time(), time.perf_counter()
    count = await work()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    print(
        f"{label:28s} {count:6d} msgs  {cpu / count * 1e6:7.1f} µs CPU/msg  "
        f"{wall / count * 1e6:7.1f} µs wall/msg"
    )


async def run_asyncpg(url: str) -> None:
    pool = await asyncpg.create_pool(url, min_size=1, max_size=2)
    accept, due, lease, msgs = (pq(n) for n in ("accept_batch", "due_rows", "lease_ids",
                                                 "messages_with_bodies"))  # fmt: skip

    async def accepts() -> int:
        for r in range(BATCHES):
            params = batch_params(r)
            async with pool.acquire() as conn:
                await conn.fetchval(accept.text, *bind(accept, params))
        return BATCHES * BATCH

    async def claims() -> int:
        taken = 0
        while True:
            async with pool.acquire() as conn, conn.transaction():
                now = time.time()
                rows = await conn.fetch(
                    due.text,
                    *bind(due, {"now": now, "exclude": [], "limit": CLAIM_GROUPS * 4}),
                )
                if not rows:
                    return taken
                ids = [r[0] for r in rows[:CLAIM_GROUPS]]
                leased = await conn.fetch(
                    lease.text, *bind(lease, {"ids": ids, "owner": "bench", "expires": now + 60})
                )
                await conn.fetch(msgs.text, *bind(msgs, {"ids": sorted({r[1] for r in leased})}))
                taken += len(leased)

    await reset(url)
    await measure("asyncpg accept (group)", accepts)
    await measure("asyncpg claim", claims)
    await pool.close()


async def run_psycopg(url: str) -> None:
    try:
        from psycopg_pool import AsyncConnectionPool
    except ImportError:
        print("psycopg 3 / psycopg_pool not installed: skipped")
        return
    texts = {
        name: _NAMED.sub(lambda m: f"%({m[1]})s", text)
        for name, text in _raw_queries().items()
        if name in ("accept_batch", "due_rows", "lease_ids", "messages_with_bodies")
    }
    pool = AsyncConnectionPool(url, min_size=1, max_size=2, open=False)
    await pool.open()

    async def accepts() -> int:
        for r in range(BATCHES):
            async with pool.connection() as conn:
                await conn.execute(texts["accept_batch"], batch_params(r))
        return BATCHES * BATCH

    async def claims() -> int:
        taken = 0
        while True:
            async with pool.connection() as conn, conn.transaction():
                now = time.time()
                cur = await conn.execute(
                    texts["due_rows"], {"now": now, "exclude": [], "limit": CLAIM_GROUPS * 4}
                )
                rows = await cur.fetchall()
                if not rows:
                    return taken
                ids = [r[0] for r in rows[:CLAIM_GROUPS]]
                cur = await conn.execute(
                    texts["lease_ids"], {"ids": ids, "owner": "bench", "expires": now + 60}
                )
                leased = await cur.fetchall()
                cur = await conn.execute(
                    texts["messages_with_bodies"], {"ids": sorted({r[1] for r in leased})}
                )
                await cur.fetchall()
                taken += len(leased)

    await reset(url)
    await measure("psycopg accept (group)", accepts)
    await measure("psycopg claim", claims)
    await pool.close()


def _raw_queries() -> dict[str, str]:
    from pathlib import Path

    from outboundd.spool.sql import parse_queries

    path = Path(sys.modules[PostgresSpool.__module__].__file__ or "").with_name("queries.sql")
    return parse_queries(path.read_text(encoding="utf-8"))


async def main(url: str) -> None:
    spool = await PostgresSpool.open(url, recover=False)  # creates the schema
    await spool.close()
    statements()
    for _ in range(2):  # the second round is the one to read (warm caches)
        await run_asyncpg(url)
        await run_psycopg(url)
    await reset(url)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print(__doc__)
        sys.exit(2)
    asyncio.run(main(sys.argv[1]))
