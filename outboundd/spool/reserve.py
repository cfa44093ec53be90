"""Space kept back on the queue's disk, so delivery can go on when it is full.

A full disk must not stop delivery: delivering mail is what frees space
(a body is removed when its last recipient is final), and recording a
result, renewing a lease or claiming work needs only a few database pages.
So a file of :data:`RESERVE_BYTES` (``QUEUE_DIR/space.reserve``) holds that
space while the disk has room.  When a write of the delivery side (a claim,
a record, a release) fails because the disk is full, the file is removed
and the write retried in the space it gave back.

While the file is absent, new messages are refused (submission answers
``451 4.3.1``): otherwise the next accept would take the freed space and
delivery would be stuck again.  The file is made again, and accepts resume,
once the disk has twice its size free, the margin keeping the two from
taking turns at the edge.  The file's presence is the state, so every
process sharing the queue sees it.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import time
from pathlib import Path
from typing import Final

from outboundd.spool.errors import SpoolFullError

#: Space held back for the delivery side's writes when the disk fills.
RESERVE_BYTES: Final = 2 * 1024 * 1024
#: Name of the reserve file in the queue directory.
RESERVE_NAME: Final = "space.reserve"
#: Shortest time between two attempts to make the file again (statvfs + write).
REARM_INTERVAL: Final = 2.0


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` says the disk (or quota) is full, whatever raised it."""
    if isinstance(exc, SpoolFullError):
        return True
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    if isinstance(exc, sqlite3.Error):
        return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or (
            "full" in str(exc).lower()
        )
    return False


class SpaceReserve:
    """The reserve file of one queue directory.  Blocking: database thread only."""

    def __init__(self, queue_dir: Path, size: int = RESERVE_BYTES) -> None:
        self.path = queue_dir / RESERVE_NAME
        self.queue_dir = queue_dir
        self.size = size
        self._last_try = float("-inf")

    def held(self) -> bool:
        """True while the file exists; when it does not, try (rate-limited) to make it."""
        if os.path.exists(self.path):
            return True
        now = time.monotonic()
        if now - self._last_try < REARM_INTERVAL:
            return False
        self._last_try = now
        return self.ensure()

    def ensure(self) -> bool:
        """Make the file if it is missing and the disk has twice its size free."""
        if os.path.exists(self.path):
            return True
        try:
            stats = os.statvfs(self.queue_dir)
        except OSError:
            return False
        if stats.f_bavail * stats.f_frsize < 2 * self.size:
            return False
        tmp = self.path.with_name(f".{RESERVE_NAME}.{os.getpid()}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
            try:
                # Real blocks, not a sparse file: the point is that they are
                # taken now and given back later.
                _allocate(fd, self.size)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
        except OSError:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            return False
        return True

    def release(self) -> bool:
        """Give the space back; True when this call removed the file."""
        try:
            os.unlink(self.path)
        except OSError:
            return False
        return True


def _allocate(fd: int, size: int) -> None:
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
        chunk = bytes(64 * 1024)  # a filesystem without fallocate: write zeros
        for offset in range(0, size, len(chunk)):
            os.pwrite(fd, chunk[: size - offset], offset)
