"""Applying the numbered ``migrations/NNNN_name.sql`` files in order.

The schema version is ``PRAGMA user_version`` (transactional, so a migration
and its version bump commit together) and every applied file is also recorded
in ``schema_migrations`` for operators.  A database whose version is newer
than the newest file we know is refused: an older outboundd must not write to
a schema it does not understand.
"""

from __future__ import annotations

import importlib.resources
import re
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from outboundd.spool.errors import MigrationError, SchemaTooNewError

#: The repository's top-level ``migrations/`` (a checkout or an editable install).
SOURCE_MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"


def default_migrations_dir() -> Path:
    """Where the migration files are: inside the installed package, else the source tree.

    A wheel carries the top-level ``migrations/`` as ``outboundd/migrations/``
    (``setup.py`` copies it at build time); a checkout or an editable install
    has only the top-level directory.
    """
    packaged = importlib.resources.files("outboundd").joinpath("migrations")
    if isinstance(packaged, Path) and packaged.is_dir():
        return packaged
    return SOURCE_MIGRATIONS_DIR


#: Where the migration files live (see :func:`default_migrations_dir`).
MIGRATIONS_DIR = default_migrations_dir()

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


def schema_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def migrate(conn: sqlite3.Connection, migrations: list[Migration]) -> list[int]:
    """Bring the database up to the newest migration; return the versions applied.

    Safe when several processes start at once: each migration runs inside
    ``BEGIN IMMEDIATE`` and re-checks the version once it holds the lock.
    Runs on the database thread (it blocks).
    """
    newest = migrations[-1].version if migrations else 0
    current = schema_version(conn)
    if current > newest:
        raise SchemaTooNewError(
            f"database schema version {current} is newer than this outboundd knows "
            f"({newest}); upgrade outboundd or use a different queue_dir"
        )
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL) STRICT"
    )
    applied: list[int] = []
    for migration in migrations:
        if migration.version <= current:
            continue
        conn.execute("BEGIN IMMEDIATE")
        try:
            current = schema_version(conn)
            if migration.version <= current:
                conn.execute("ROLLBACK")
                continue
            # executescript() would COMMIT our transaction first; run the
            # statements one by one inside it instead.
            for statement in split_statements(migration.sql):
                conn.execute(statement)
            conn.execute(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                (migration.version, migration.name, time.time()),
            )
            conn.execute(f"PRAGMA user_version = {migration.version:d}")
            conn.execute("COMMIT")
        except Exception as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
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
