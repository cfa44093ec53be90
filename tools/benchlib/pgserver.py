"""``--backend postgresql``: a private PostgreSQL server whose CPU counts as the relay's.

One server per bench invocation, in the run's temporary directory, started
from Debian's binaries (``/usr/lib/postgresql/<version>/bin``) as the
``postgres`` user, listening on 127.0.0.1 only, and stopped by PID (its
process group) at the end.  Durability as in production: ``fsync`` and
``synchronous_commit`` on, so a commit costs what it costs for a user.

Each outboundd run gets a fresh database.  The server's process tree
(postmaster, one backend per connection, WAL writer, checkpointer, ...) is
added to the relay's CPU: a queue in PostgreSQL is work the relay causes.

Database round trips are read from ``pg_stat_statements`` (updated when a
statement ends, unlike ``pg_stat_database``, which backends flush lazily):
every statement a client runs, ``BEGIN`` and ``COMMIT`` included, is one
call, and with asyncpg one call is one round trip.  The bench's own status
queries are left out.
"""

from __future__ import annotations

import asyncio
import glob
import os
import pwd
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchlib.procs import BenchError, ProcessRegistry, Started, log, run_helper
from benchlib.traffic import free_port

PG_USER = "postgres"
START_TIMEOUT = 60.0

_STATEMENTS = """
SELECT left(regexp_replace(s.query, '\\s+', ' ', 'g'), 70), sum(s.calls)::bigint
  FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid
 WHERE d.datname = $1 AND s.query NOT LIKE '%FROM deliveries GROUP BY status%'
 GROUP BY 1
"""


def pg_bindir() -> Path:
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/postgres"),
        key=lambda p: int(Path(p).parent.parent.name),
    )
    if not found:
        raise BenchError(
            "PostgreSQL is not installed (apt-get install postgresql): --backend postgresql "
            "needs its server binaries"
        )
    return Path(found[-1]).parent


def _as_server_user(argv: list[str]) -> list[str]:
    return ["runuser", "-u", PG_USER, "--", *argv] if os.geteuid() == 0 else argv


@dataclass(frozen=True, slots=True)
class DbCalls:
    """``pg_stat_statements`` totals for one database at one moment, in all and
    per statement (its text's start, so that a breakdown says where they go)."""

    statements: int
    by_statement: dict[str, int] = field(default_factory=dict)

    def __sub__(self, other: DbCalls) -> DbCalls:
        return DbCalls(
            self.statements - other.statements,
            {
                text: n - other.by_statement.get(text, 0)
                for text, n in self.by_statement.items()
                if n != other.by_statement.get(text, 0)
            },
        )


class PgServer:
    """The bench's PostgreSQL server; :meth:`database` makes a fresh queue database."""

    def __init__(self, registry: ProcessRegistry, base: Path) -> None:
        self.registry = registry
        self.base = base
        self.port = free_port()
        self.started: Started | None = None
        self._loop = asyncio.new_event_loop()
        self._conn: Any = None
        self._count = 0

    @property
    def data(self) -> Path:
        return self.base / "data"

    def url(self, database: str) -> str:
        return f"postgresql://{PG_USER}@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        bindir = pg_bindir()
        self.base.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            entry = pwd.getpwnam(PG_USER)
            os.chown(self.base, entry.pw_uid, entry.pw_gid)
        log(f"starting PostgreSQL ({bindir.parent.name}) in {self.base}")
        res = run_helper(
            _as_server_user(
                [str(bindir / "initdb"), "-D", str(self.data), "-U", PG_USER, "-A", "trust",
                 "-E", "UTF8", "--locale=C"]
            ),
            timeout=START_TIMEOUT,
        )  # fmt: skip
        if res.returncode != 0:
            raise BenchError(f"initdb failed: {res.output[-400:]}")
        settings = {
            "port": str(self.port),
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": str(self.base),
            "max_connections": "300",
            "shared_preload_libraries": "pg_stat_statements",
            "pg_stat_statements.track_utility": "on",
            "fsync": "on",
            "synchronous_commit": "on",
        }
        argv = [str(bindir / "postgres"), "-D", str(self.data)]
        for key, value in settings.items():
            argv += ["-c", f"{key}={value}"]
        self.started = self.registry.spawn(
            "postgresql", _as_server_user(argv), stdout=self.base.parent / "postgresql.log"
        )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                self._conn = self._run(self._connect("postgres"))
                break
            except (OSError, ConnectionError) as exc:
                if self.started.proc.poll() is not None or time.monotonic() > deadline:
                    raise BenchError(f"PostgreSQL did not start: {exc}") from exc
                time.sleep(0.2)
            except Exception as exc:  # "the database system is starting up"
                if "starting up" not in str(exc) or time.monotonic() > deadline:
                    raise BenchError(f"PostgreSQL did not start: {exc}") from exc
                time.sleep(0.2)
        self.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")

    @property
    def root_pid(self) -> int:
        assert self.started is not None
        return self.started.pid

    def _run(self, work: Any) -> Any:
        return self._loop.run_until_complete(work)

    async def _connect(self, database: str) -> Any:
        import asyncpg  # the bench needs it only for this backend

        return await asyncpg.connect(self.url(database), timeout=5)

    def execute(self, sql: str, *args: Any) -> None:
        self._run(self._conn.execute(sql, *args))

    def fetch(self, sql: str, *args: Any) -> list[Any]:
        return list(self._run(self._conn.fetch(sql, *args)))

    def database(self) -> str:
        """A new, empty database for one run; its name."""
        self._count += 1
        name = f"run{self._count}"
        self.execute(f'CREATE DATABASE "{name}"')
        return name

    def calls(self, database: str) -> DbCalls:
        by_statement = {str(text): int(n) for text, n in self.fetch(_STATEMENTS, database)}
        return DbCalls(sum(by_statement.values()), by_statement)

    def stop(self) -> None:
        if self._conn is not None:
            self._run(self._conn.close())
            self._conn = None
        self._loop.close()
        if self.started is not None:
            self.registry.stop(self.started, grace=20)
            self.started = None


class QueueReader:
    """A run's queue database, read through one kept connection (the ``deliveries`` view)."""

    def __init__(self, server: PgServer, database: str) -> None:
        self.server = server
        self.database = database
        self._conn: Any = None

    def status_counts(self) -> dict[str, int]:
        if self._conn is None:
            self._conn = self.server._run(self.server._connect(self.database))
        try:
            rows = self.server._run(
                self._conn.fetch("SELECT status, count(*) FROM deliveries GROUP BY status")
            )
        except Exception as exc:
            if "deliveries" in str(exc) and "does not exist" in str(exc):
                return {}  # outboundd has not created the schema yet
            raise
        return {str(status): int(n) for status, n in rows}

    def close(self) -> None:
        if self._conn is not None:
            self.server._run(self._conn.close())
            self._conn = None
