"""How many durable writes a second this filesystem allows: the fsync limit.

outboundd answers 250 to DATA only after the body file is fsynced, its
directory fsynced and the rows committed (SQLite in WAL mode with
``synchronous=FULL``), and it group-commits: one batch of waiting accepts
shares one directory fsync and one commit.  These measures take the same
steps with nothing else around them, in a directory of the filesystem the
bench's runs use, one thread, for batches of 1, 8, 32, ... messages:

- ``body``: per message write 4 KB to a new file and fsync it; per batch
  fsync the directory.
- ``commit``: per batch one SQLite transaction inserting one row per
  message, committed with ``synchronous=FULL`` in WAL mode.
- ``accept``: both, in that order: what one group-committed accept batch
  must wait for at least.

Each measure runs until ``count`` messages are done or ``seconds`` have
passed, whichever is first, and reports messages per second and the
thread's CPU seconds (``time.thread_time``).
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

KINDS = ("body", "commit", "accept")

SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    queue_id TEXT PRIMARY KEY,
    mail_from TEXT NOT NULL,
    recipient TEXT NOT NULL,
    size INTEGER NOT NULL
)
"""
INSERT = "INSERT INTO messages (queue_id, mail_from, recipient, size) VALUES (?, ?, ?, ?)"


@dataclass(frozen=True, slots=True)
class DurableRate:
    """One measure: ``messages`` made durable in ``seconds``, using ``cpu_seconds``."""

    kind: str
    batch: int
    messages: int
    seconds: float
    cpu_seconds: float

    @property
    def per_second(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else 0.0

    @property
    def cpu_per_1k(self) -> float:
        return self.cpu_seconds / self.messages * 1000 if self.messages else 0.0


class DurableWriter:
    """The steps of an accept batch, on one directory and one SQLite database."""

    def __init__(self, workdir: Path, size: int) -> None:
        self.bodies = workdir / "bodies"
        self.bodies.mkdir(parents=True)
        self.data = b"X" * size
        self.dir_fd = os.open(self.bodies, os.O_RDONLY | os.O_DIRECTORY)
        self.db = sqlite3.connect(workdir / "limits.db", isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute(SCHEMA)
        self.seq = 0

    def close(self) -> None:
        os.close(self.dir_fd)
        self.db.close()

    def write_bodies(self, names: list[str]) -> None:
        for name in names:
            fd = os.open(self.bodies / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, self.data)
                os.fsync(fd)
            finally:
                os.close(fd)
        os.fsync(self.dir_fd)

    def commit_rows(self, names: list[str]) -> None:
        rows = [
            (name, "limits@source.bench.test", "rcpt@dest.bench.test", len(self.data))
            for name in names
        ]
        self.db.execute("BEGIN IMMEDIATE")
        self.db.executemany(INSERT, rows)
        self.db.execute("COMMIT")

    def batch(self, kind: str, size: int) -> None:
        names = [f"m{self.seq + i}" for i in range(size)]
        self.seq += size
        if kind in ("body", "accept"):
            self.write_bodies(names)
        if kind in ("commit", "accept"):
            self.commit_rows(names)


def measure(
    workdir: Path, kind: str, batch: int, count: int, seconds: float, size: int = 4096
) -> DurableRate:
    """Run ``kind`` batches of ``batch`` messages of ``size`` bytes in a fresh directory."""
    if kind not in KINDS:
        raise ValueError(f"unknown measure {kind!r}; one of {', '.join(KINDS)}")
    where = workdir / f"{kind}-{batch}"
    writer = DurableWriter(where, size)
    try:
        done = 0
        cpu0, t0 = time.thread_time(), time.monotonic()
        deadline = t0 + seconds
        while done < count and time.monotonic() < deadline:
            writer.batch(kind, batch)
            done += batch
        elapsed = time.monotonic() - t0
        cpu = time.thread_time() - cpu0
    finally:
        writer.close()
        shutil.rmtree(where, ignore_errors=True)
    return DurableRate(kind, batch, done, elapsed, cpu)
