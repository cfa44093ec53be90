"""A throwaway PostgreSQL cluster for tests: Debian's server, a temp dir, a loopback port.

Tests that need PostgreSQL use the ``pg_url`` fixture (tests/conftest.py):
one cluster per test session, a fresh database per test.  The cluster is
made with ``initdb`` in a temporary directory owned by the ``postgres``
user (``initdb``/``pg_ctl`` refuse to run as root, so they run through
``runuser``), listens on 127.0.0.1 on a free port and in the same
directory's unix socket, trusts local connections, and is stopped by the
PID in its ``postmaster.pid`` at teardown.  ``fsync=off`` keeps the suite
fast; ``synchronous_commit`` stays on (what outboundd relies on).

The binaries come from Debian's ``postgresql`` package
(``/usr/lib/postgresql/<version>/bin``; ``.ci/run`` installs it).  Where
they are missing the PostgreSQL tests are skipped, except under ``CI=true``
where they fail: CI must run them.

From a shell (multi-process tests, or poking at a queue by hand)::

    python -m tests.pgcluster start DIR     # prints the server's base URL
    python -m tests.pgcluster createdb DIR NAME   # prints NAME's URL
    python -m tests.pgcluster stop DIR

In Python::

    cluster = PgCluster.start(Path(tempfile.mkdtemp()))
    url = cluster.create_database("queue1")   # postgresql://postgres@127.0.0.1:PORT/queue1
    ...
    cluster.stop()
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

#: The user the server runs as when we are root.
PG_USER = "postgres"


class PgUnavailable(RuntimeError):
    """No PostgreSQL server binaries on this machine."""


def pg_bindir() -> Path:
    """Debian's newest installed server version's bin directory."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parent.parent.name),
    )
    if not found:
        raise PgUnavailable(
            "PostgreSQL server binaries not found under /usr/lib/postgresql "
            "(apt-get install postgresql)"
        )
    return Path(found[-1]).parent


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_server_user(argv: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return argv
    return ["runuser", "-u", PG_USER, "--", *argv]


@dataclass
class PgCluster:
    """A running throwaway cluster: its directory and port."""

    base: Path
    port: int

    @property
    def data(self) -> Path:
        return self.base / "data"

    @property
    def url(self) -> str:
        """The server's base URL (database ``postgres``)."""
        return self.database_url("postgres")

    def database_url(self, name: str) -> str:
        return f"postgresql://{PG_USER}@127.0.0.1:{self.port}/{name}"

    @classmethod
    def start(cls, base: Path, *, timeout: float = 60.0) -> PgCluster:
        """initdb in ``base/data`` and start the server; raise when it cannot."""
        bindir = pg_bindir()
        base.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            entry = pwd.getpwnam(PG_USER)
            os.chown(base, entry.pw_uid, entry.pw_gid)
            # runuser needs to reach the directory through its parents.
            os.chmod(base, 0o755)
            parent = base.parent
            os.chmod(parent, os.stat(parent).st_mode | 0o005)
        data = base / "data"
        subprocess.run(
            _as_server_user(
                [
                    str(bindir / "initdb"),
                    "-D",
                    str(data),
                    "-U",
                    PG_USER,
                    "-A",
                    "trust",
                    "-E",
                    "UTF8",
                    "--locale=C",
                    "--no-sync",
                ]
            ),
            check=True,
            capture_output=True,
            timeout=timeout,
        )
        port = _free_port()
        cluster = cls(base, port)
        cluster.start_server(timeout=timeout)
        return cluster

    def start_server(self, *, timeout: float = 60.0) -> None:
        """Start the server on the existing data directory (again, after :meth:`kill`)."""
        options = (
            f"-c port={self.port} -c listen_addresses=127.0.0.1 "
            f"-c unix_socket_directories={self.base} "
            "-c fsync=off -c full_page_writes=off -c max_connections=200 "
            "-c shared_buffers=32MB -c log_min_messages=warning"
        )
        subprocess.run(
            _as_server_user(
                [
                    str(pg_bindir() / "pg_ctl"),
                    "-D",
                    str(self.data),
                    "-o",
                    options,
                    "-l",
                    str(self.base / "server.log"),
                    "-w",
                    "-t",
                    str(int(timeout)),
                    "start",
                ]
            ),
            check=True,
            capture_output=True,
            timeout=timeout + 10,
        )

    def kill(self, *, timeout: float = 30.0) -> None:
        """Stop the server by its PID (immediate shutdown), keeping the data directory."""
        pid = self.pid()
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGQUIT)  # "immediate" shutdown: like a crash, WAL replays
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.05)
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(FileNotFoundError):
            (self.data / "postmaster.pid").unlink()

    @classmethod
    def attach(cls, base: Path) -> PgCluster:
        """The cluster already running in ``base`` (its port from ``postmaster.pid``)."""
        lines = (base / "data" / "postmaster.pid").read_text().splitlines()
        return cls(base, int(lines[3]))

    def psql(self, sql: str, database: str = "postgres") -> str:
        out = subprocess.run(
            [
                str(pg_bindir() / "psql"),
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                self.database_url(database),
                "-c",
                sql,
            ],
            check=True,
            capture_output=True,
            text=True,
            timeout=30,
        )
        return out.stdout

    def create_database(self, name: str) -> str:
        """A new, empty database; its URL."""
        self.psql(f'CREATE DATABASE "{name}"')
        return self.database_url(name)

    def pid(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self, *, timeout: float = 30.0) -> None:
        """Stop the server by its PID (fast shutdown, then SIGKILL), and remove the directory."""
        pid = self.pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGINT)  # "fast" shutdown
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and _alive(pid):
                time.sleep(0.05)
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.base, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[:1]
    except OSError:
        return False
    return state not in (["Z"], ["X"])


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] not in ("start", "stop", "createdb"):
        print(
            "usage: python -m tests.pgcluster start|stop DIR | createdb DIR NAME", file=sys.stderr
        )
        return 2
    base = Path(argv[1]).resolve()
    if argv[0] == "start":
        print(PgCluster.start(base).url)
    elif argv[0] == "createdb":
        print(PgCluster.attach(base).create_database(argv[2]))
    else:
        PgCluster.attach(base).stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
