"""How many durable writes a second this filesystem allows: the fsync limit.

outboundd answers 250 to DATA only after the body file is fsynced, its
directory fsynced and the rows committed (SQLite in WAL mode with
``synchronous=FULL``), and it group-commits: one batch of waiting accepts
shares one directory fsync and one commit.  These measures take the same
steps with nothing else around them, in a directory of the filesystem the
bench's runs use, one thread, for batches of 1, 8, 32, ... messages:

- ``body``: per message write 4 KB to a new file and fsync it; per batch
  fsync the directory.
- ``body-batched``: every body of the batch created and written first, then
  each fsynced in turn, then the directory (outboundd before its fsyncs ran
  in parallel).
- ``body-parallel``: written first, then every body and the directory
  fsynced at once, one on the calling thread and the rest on up to
  :data:`PARALLEL_THREADS` threads, as outboundd's spool does
  (``outboundd/spool/bodies.py``, :class:`ParallelFsync`): ext4's journal
  (jbd2) joins fsyncs that wait at the same time into one commit and one
  device flush.
- ``body-syncfs``: written first, then one ``syncfs(2)`` of the whole
  filesystem (Linux only; not used by outboundd: it flushes every other
  program's dirty data on that filesystem too, and reports no per-file
  error before Linux 5.8).
- ``commit``: per batch one SQLite transaction inserting one row per
  message, committed with ``synchronous=FULL`` in WAL mode.
- ``accept``: ``body`` then ``commit``: what one group-committed accept
  batch must wait for at least.
- ``accept-parallel``: ``body-parallel`` then ``commit``.

Each measure runs until ``count`` messages are done or ``seconds`` have
passed, whichever is first, and reports messages per second, the
process's CPU seconds (``time.process_time``: the fsync threads count) and,
where the kernel counts them, the device's cache flushes per batch (from
``/sys/dev/block/MAJ:MIN/stat``, so other programs' flushes during the
measure count too): a figure the machine's load moves far less than the
rate.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

KINDS = (
    "body", "body-batched", "body-parallel", "body-syncfs", "commit", "accept", "accept-parallel",
)  # fmt: skip
#: Threads besides the caller's that fsync a batch's files at once (outboundd's figure).
PARALLEL_THREADS = 8

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
    #: Device cache flushes per batch, or None where the kernel does not count them.
    flushes_per_batch: float | None = None

    @property
    def per_second(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else 0.0

    @property
    def cpu_per_1k(self) -> float:
        return self.cpu_seconds / self.messages * 1000 if self.messages else 0.0


def _syncfs() -> Callable[[int], None] | None:
    """``syncfs(2)`` through libc, or None where there is none."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name, use_errno=True) if name else None
    call = getattr(libc, "syncfs", None)
    if call is None:
        return None

    def syncfs(fd: int) -> None:
        if call(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    return syncfs


def available_kinds() -> tuple[str, ...]:
    """:data:`KINDS` this machine can run (``body-syncfs`` needs ``syncfs(2)``)."""
    return KINDS if _syncfs() is not None else tuple(k for k in KINDS if k != "body-syncfs")


def device_flushes(path: Path) -> int | None:
    """Cache flushes the device holding ``path`` has completed, or None if not counted."""
    dev = os.stat(path).st_dev
    stat = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/stat")
    try:
        fields = stat.read_text().split()
    except OSError:
        return None
    return int(fields[15]) if len(fields) >= 17 else None


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
        self.pool = ThreadPoolExecutor(PARALLEL_THREADS, thread_name_prefix="fsyncrate")
        self.syncfs = _syncfs()

    def close(self) -> None:
        self.pool.shutdown()
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

    def write_then_sync(self, names: list[str], how: str) -> None:
        """Create and write every body, then make them and the directory durable ``how``."""
        fds: list[int] = []
        try:
            for name in names:
                fds.append(os.open(self.bodies / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
                os.write(fds[-1], self.data)
            if how == "batched":
                for fd in [*fds, self.dir_fd]:
                    os.fsync(fd)
            elif how == "parallel":
                first, *rest = [*fds, self.dir_fd]
                waiting = [self.pool.submit(os.fsync, fd) for fd in rest]
                os.fsync(first)
                for future in waiting:
                    future.result()
            elif self.syncfs is not None:
                self.syncfs(self.dir_fd)
            else:
                raise OSError("syncfs(2) is not available here")
        finally:
            for fd in fds:
                os.close(fd)

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
        elif kind.startswith("body-"):
            self.write_then_sync(names, kind.removeprefix("body-"))
        elif kind == "accept-parallel":
            self.write_then_sync(names, "parallel")
        if kind.startswith(("commit", "accept")):
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
        flushes0 = device_flushes(where)
        cpu0, t0 = time.process_time(), time.monotonic()
        deadline = t0 + seconds
        while done < count and time.monotonic() < deadline:
            writer.batch(kind, batch)
            done += batch
        elapsed = time.monotonic() - t0
        cpu = time.process_time() - cpu0
        flushes1 = device_flushes(where)
    finally:
        writer.close()
        shutil.rmtree(where, ignore_errors=True)
    per_batch = None
    if flushes0 is not None and flushes1 is not None and done:
        per_batch = (flushes1 - flushes0) / (done / batch)
    return DurableRate(kind, batch, done, elapsed, cpu, per_batch)
