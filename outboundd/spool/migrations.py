"""Applying the numbered ``migrations/NNNN_name.sql`` files in order.

The schema version is ``PRAGMA user_version`` (transactional, so a migration
and its version bump commit together) and every applied file is also recorded
in ``schema_migrations`` for operators.  A database whose version is newer
than the newest file we know is refused: an older outboundd must not write to
a schema it does not understand.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

import aiosqlite

from outboundd.spool.errors import MigrationError, SchemaTooNewError

#: Where the migration files live: the repository's top-level ``migrations/``.
MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"

_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def discover(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """Every migration file, in version order; gaps and duplicates are errors."""
    if not directory.is_dir():
        raise MigrationError(f"migrations directory {directory} does not exist")
    found: list[Migration] = []
    for path in sorted(directory.iterdir()):
        if path.suffix != ".sql":
            continue
        match = _FILE.match(path.name)
        if match is None:
            raise MigrationError(f"{path}: migration files are named NNNN_name.sql")
        found.append(Migration(int(match[1]), match[2], path.read_text(encoding="utf-8")))
    for expected, migration in enumerate(found, start=1):
        if migration.version != expected:
            raise MigrationError(
                f"migration {migration.version:04d}_{migration.name} is out of sequence "
                f"(expected {expected:04d})"
            )
    return found


async def schema_version(conn: aiosqlite.Connection) -> int:
    rows = list(await conn.execute_fetchall("PRAGMA user_version"))
    return int(rows[0][0])


async def migrate(conn: aiosqlite.Connection, migrations: list[Migration]) -> list[int]:
    """Bring the database up to the newest migration; return the versions applied.

    Safe when several processes start at once: each migration runs inside
    ``BEGIN IMMEDIATE`` and re-checks the version once it holds the lock.
    """
    newest = migrations[-1].version if migrations else 0
    current = await schema_version(conn)
    if current > newest:
        raise SchemaTooNewError(
            f"database schema version {current} is newer than this outboundd knows "
            f"({newest}); upgrade outboundd or use a different queue_dir"
        )
    await conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL) STRICT"
    )
    applied: list[int] = []
    for migration in migrations:
        if migration.version <= current:
            continue
        await conn.execute("BEGIN IMMEDIATE")
        try:
            current = await schema_version(conn)
            if migration.version <= current:
                await conn.execute("ROLLBACK")
                continue
            # executescript() would COMMIT our transaction first; run the
            # statements one by one inside it instead.
            for statement in split_statements(migration.sql):
                await conn.execute(statement)
            await conn.execute(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                (migration.version, migration.name, time.time()),
            )
            await conn.execute(f"PRAGMA user_version = {migration.version:d}")
            await conn.execute("COMMIT")
        except Exception as exc:
            if conn.in_transaction:
                await conn.execute("ROLLBACK")
            raise MigrationError(
                f"migration {migration.version:04d}_{migration.name} failed: {exc}"
            ) from exc
        applied.append(migration.version)
        current = migration.version
    return applied


def split_statements(sql: str) -> list[str]:
    """Split a migration script into complete statements (comments dropped).

    Uses ``sqlite3.complete_statement`` so semicolons inside strings or
    trigger bodies do not split a statement.
    """
    import sqlite3

    statements: list[str] = []
    buffer = ""
    for line in sql.splitlines():
        stripped = line.strip()
        if not buffer and (not stripped or stripped.startswith("--")):
            continue
        buffer += line + "\n"
        if sqlite3.complete_statement(buffer):
            statements.append(buffer.strip())
            buffer = ""
    if buffer.strip():
        raise MigrationError(f"incomplete SQL statement at end of migration: {buffer[:60]!r}")
    return statements
