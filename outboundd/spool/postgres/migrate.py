"""Applying ``migrations/postgresql/NNNN_name.sql`` in order, as the SQLite runner does.

The same discovery as SQLite's (:func:`outboundd.spool.migrations.discover`,
numbered files without gaps); the version is the highest row of
``schema_migrations``.  Hosts starting at once are serialised by an advisory
lock, and each migration commits with its row.  A database newer than the
newest file is refused.
"""

from __future__ import annotations

import time
from typing import Any

import asyncpg

from outboundd.spool.errors import MigrationError, SchemaTooNewError
from outboundd.spool.migrations import MIGRATIONS_DIR, Migration, discover

#: Where this backend's migration files live.
POSTGRES_MIGRATIONS_DIR = MIGRATIONS_DIR / "postgresql"


def postgres_migrations() -> list[Migration]:
    return discover(POSTGRES_MIGRATIONS_DIR)


async def migrate(
    conn: asyncpg.Connection[Any] | asyncpg.pool.PoolConnectionProxy[Any],
    migrations: list[Migration],
) -> list[int]:
    """Bring the database up to the newest migration; return the versions applied."""
    newest = migrations[-1].version if migrations else 0
    await conn.execute("SELECT pg_advisory_lock(hashtext('outboundd-migrate'))")
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at double precision NOT NULL)"
        )
        current = int(
            await conn.fetchval("SELECT coalesce(max(version), 0) FROM schema_migrations")
        )
        if current > newest:
            raise SchemaTooNewError(
                f"database schema version {current} is newer than this outboundd knows "
                f"({newest}); upgrade outboundd or use a different queue_url"
            )
        applied: list[int] = []
        for migration in migrations:
            if migration.version <= current:
                continue
            try:
                async with conn.transaction():
                    await conn.execute(migration.sql)
                    await conn.execute(
                        "INSERT INTO schema_migrations (version, name, applied_at)"
                        " VALUES ($1, $2, $3)",
                        migration.version,
                        migration.name,
                        time.time(),
                    )
            except asyncpg.PostgresError as exc:
                raise MigrationError(
                    f"migration postgresql/{migration.version:04d}_{migration.name} failed: {exc}"
                ) from exc
            applied.append(migration.version)
        return applied
    finally:
        await conn.execute("SELECT pg_advisory_unlock(hashtext('outboundd-migrate'))")
