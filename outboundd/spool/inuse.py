"""Whether a daemon uses a SQLite queue directory: a lock held for a process's life.

``outboundctl queue migrate`` must not copy a queue that a daemon is still
changing, and a daemon must not start on a queue while it is being copied
or after it was moved.  Every ``outboundd`` process (the first one, its
SMTP nodes and its delivery processes) holds a *shared* ``flock`` on
``QUEUE_DIR/outboundd.lock`` from before it opens the queue until after it
closes it.  The migration takes the same lock *exclusively* without
waiting, so it fails at once while any daemon process lives, and keeps it
to the end, so a daemon started meanwhile refuses to start.  The kernel
drops the lock of a process that dies (SIGKILL included): there is no
stale pid file to clean up.

A queue that was moved leaves ``QUEUE_DIR/MIGRATED`` behind (where to, and
when); a daemon refuses to start on it, since it would deliver the same
mail a second time.  A PostgreSQL queue is shared by design and holds no
such lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from outboundd.spool.base import is_postgres_url
from outboundd.spool.errors import SpoolError

LOCK_NAME = "outboundd.lock"
MIGRATED_NAME = "MIGRATED"


class QueueInUseError(SpoolError):
    """A daemon holds the queue (or a migration does)."""


class QueueLock:
    """A held ``outboundd.lock`` (shared or exclusive); :meth:`release` it when done."""

    def __init__(self, fd: int, path: Path) -> None:
        self._fd: int | None = fd
        self.path = path

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = None


def _open_lock(queue_dir: Path) -> tuple[int, Path]:
    path = queue_dir / LOCK_NAME
    try:
        queue_dir.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640), path
    except OSError as exc:
        raise SpoolError(f"cannot open {path}: {exc.strerror or exc}") from exc


def _lock(queue_dir: Path, mode: int, busy: str) -> QueueLock:
    fd, path = _open_lock(queue_dir)
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise QueueInUseError(busy) from None
    except OSError as exc:
        os.close(fd)
        raise SpoolError(f"cannot lock {path}: {exc.strerror or exc}") from exc
    return QueueLock(fd, path)


def migrated_to(queue_dir: Path) -> str | None:
    """The note a finished migration left in ``queue_dir``, if any."""
    with contextlib.suppress(FileNotFoundError):
        return (queue_dir / MIGRATED_NAME).read_text(errors="replace").strip() or "elsewhere"
    return None


def hold_for_daemon(location: str | Path) -> QueueLock | None:
    """For an ``outboundd`` process: hold the queue shared while it runs.

    None for a PostgreSQL queue (any number of hosts share it).  Raises
    :class:`QueueInUseError` while a migration holds the queue, and
    :class:`~outboundd.spool.errors.SpoolError` for a queue that was moved.
    """
    if is_postgres_url(location):
        return None
    queue_dir = Path(location)
    note = migrated_to(queue_dir)
    if note is not None:
        raise SpoolError(
            f"this queue was migrated ({note}); set queue_url in outbound.ini to the new "
            f"queue, or remove {queue_dir / MIGRATED_NAME} to use this one again"
        )
    return _lock(
        queue_dir, fcntl.LOCK_SH, f"{queue_dir} is being migrated (outboundctl queue migrate)"
    )


def hold_exclusive(queue_dir: Path) -> QueueLock:
    """For ``outboundctl queue migrate``: the queue, with no daemon using it.

    Raises :class:`QueueInUseError` at once while any ``outboundd`` process
    has the queue open.
    """
    return _lock(
        queue_dir,
        fcntl.LOCK_EX,
        f"an outboundd process is using {queue_dir}: stop every outboundd on this queue first",
    )


def mark_migrated(queue_dir: Path, note: str) -> None:
    """Leave ``note`` (where the queue went, and when) so no daemon starts on it again."""
    path = queue_dir / MIGRATED_NAME
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(note + "\n")
    os.replace(tmp, path)
