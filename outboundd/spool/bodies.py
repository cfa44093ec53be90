"""Message bodies on disk: written durably, found again, removed when done.

Layout: ``QUEUE_DIR/bodies/XX/QUEUE_ID`` where ``XX`` follows from the time
part of the queue ID (:func:`relative_body_path`); the 256 fan-out
directories are created once at open, so a new body never needs a directory
fsync of ``bodies/`` itself.  A body is written under its final name and
fsynced; its directory is fsynced before the rows that point at it are
committed, and only those rows make it a message.  (Queues written by
earlier versions may hold ``XX/.tmp-QUEUE_ID`` files; recovery removes
them.)  These functions block: call them off the event loop.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from outboundd.spool.errors import SpoolFullError, SpoolWriteError

TMP_PREFIX = ".tmp-"
FANOUT = [f"{i:02x}" for i in range(256)]


def bodies_root(queue_dir: Path) -> Path:
    return queue_dir / "bodies"


def relative_body_path(queue_id: str) -> str:
    """Where a new message's body goes, relative to the queue directory.

    The fan-out directory comes from the time part of the queue ID (its
    first 11 hex digits, milliseconds): a new one about every second,
    cycling through the 256.  So the messages of one group commit nearly
    always share a directory, and one directory fsync covers them all
    (with a random directory per message, that fsync was one per message).
    Other IDs use their last two characters.  Rows store the path, so a
    queue written under another rule stays readable.
    """
    if len(queue_id) > 12 and queue_id[11] == ".":
        try:
            return f"bodies/{(int(queue_id[:11], 16) >> 10) & 0xFF:02x}/{queue_id}"
        except ValueError:
            pass
    return f"bodies/{queue_id[-2:].lower()}/{queue_id}"


def prepare_tree(queue_dir: Path) -> None:
    """Create the queue directory and all fan-out directories, durably."""
    root = bodies_root(queue_dir)
    created = False
    for path in (queue_dir, root):
        if not path.is_dir():
            path.mkdir(mode=0o750, parents=True, exist_ok=True)
            created = True
    for name in FANOUT:
        sub = root / name
        if not sub.is_dir():
            sub.mkdir(mode=0o750, exist_ok=True)
            created = True
    if created:
        fsync_directory(root)
        fsync_directory(queue_dir)


_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
#: Threads, besides the caller, that fsync one batch's files at the same time.
FSYNC_THREADS = 8


class ParallelFsync:
    """Fsyncs one batch's files at the same time: a share on the caller's thread, the rest on lanes.

    Why: fsyncs made one after another each wait for their own journal
    commit and device cache flush (on ext4 the block allocation of a
    delayed-allocation file happens inside its fsync, so every fsync of a
    new file starts a new journal transaction).  Fsyncs that wait at the
    same time are joined by the journal (jbd2) into one commit and one
    flush.  ``tools/limits`` (``body-batched`` against ``body-parallel``)
    measures the difference on the spool's filesystem.

    Durability is the same as fsyncing each descriptor in turn: every
    descriptor handed in has had its own ``fsync(2)`` return (or its error
    reported) before :meth:`fsync` returns, whatever the filesystem; where
    a filesystem does not join them, the fsyncs simply overlap.  One
    thread's descriptor is never closed before its fsync has returned,
    because :meth:`fsync` waits for all of them.  The threads start on the
    first batch of more than one file; :meth:`close` ends them.

    Each thread is a :class:`_Lane` handed its share of the batch through
    two plain locks, not a ``ThreadPoolExecutor``: a pool's ``submit``,
    future, idle semaphore and ``wait()`` ran Python code on both sides of
    every hand-off (each a turn holding the GIL the database thread and
    the event loop also want), and the profile of an SMTP node under S2's
    held accept showed ``submit`` alone at 10% of the GIL's time.
    """

    def __init__(self, threads: int = FSYNC_THREADS) -> None:
        self._threads = threads
        self._lanes: list[_Lane] = []

    def fsync(self, fds: Sequence[int]) -> list[OSError | None]:
        """Fsync every descriptor of ``fds``; per descriptor ``None`` or its error."""
        if len(fds) < 2 or self._threads < 1:
            return [_fsync_error(fd) for fd in fds]
        if not self._lanes:
            self._lanes = _start_lanes(self._threads)
        groups = min(len(fds), self._threads + 1)
        busy = self._lanes[: groups - 1]
        for i, lane in enumerate(busy, 1):
            lane.start(fds[i::groups])
        try:
            mine = [_fsync_error(fd) for fd in fds[0::groups]]
        finally:
            # Whatever happened here: no descriptor may be closed under a running fsync.
            theirs = [lane.result() for lane in busy]
        results: list[OSError | None] = [None] * len(fds)
        results[0::groups] = mine
        for i, errors in enumerate(theirs, 1):
            results[i::groups] = errors
        return results

    def close(self) -> None:
        """End the threads (after any fsync still running)."""
        lanes, self._lanes = self._lanes, []
        for lane in lanes:
            lane.stop()


class _Lane:
    """One fsync thread, handed descriptors by :meth:`start`, answering by :meth:`result`.

    Two locks carry the hand-off (``_go``: work is waiting; ``_done``: its
    results are in), so each side wakes the other with one release and
    runs no Python beyond it.  The thread is a daemon so that a spool
    never closed cannot keep the interpreter from exiting; a batch it was
    fsyncing then never committed, so nothing durable is at stake.
    """

    def __init__(self, name: str) -> None:
        self._go = threading.Lock()
        self._go.acquire()
        self._done = threading.Lock()
        self._done.acquire()
        self._fds: Sequence[int] = ()
        self._errors: list[OSError | None] = []
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def start(self, fds: Sequence[int]) -> None:
        """Fsync ``fds`` on the lane's thread; :meth:`result` must follow."""
        self._fds = fds
        self._go.release()

    def result(self) -> list[OSError | None]:
        """Wait for the fsyncs :meth:`start` handed over; per descriptor ``None`` or its error."""
        self._done.acquire()
        errors = self._errors
        # A descriptor the thread did not get to (it failed) is never reported durable.
        missing = len(self._fds) - len(errors)
        return errors + [OSError(errno.EIO, "fsync did not run")] * missing

    def stop(self) -> None:
        """End the thread, after the fsyncs it is running."""
        self._stopping = True
        self._go.release()
        self._thread.join()

    def _run(self) -> None:
        while True:
            self._go.acquire()
            if self._stopping:
                return
            errors: list[OSError | None] = []
            try:
                for fd in self._fds:
                    errors.append(_fsync_error(fd))
            except Exception as exc:  # not an fsync's own error: the lane must live on
                failed = OSError(errno.EIO, f"fsync failed: {exc!r}")
                errors += [failed] * (len(self._fds) - len(errors))
            finally:
                self._errors = errors
                self._done.release()


def _start_lanes(count: int) -> list[_Lane]:
    lanes: list[_Lane] = []
    try:
        for i in range(count):
            lanes.append(_Lane(f"spool-fsync_{i}"))
    except BaseException:
        for lane in lanes:
            lane.stop()
        raise
    return lanes


def _fsync_error(fd: int) -> OSError | None:
    try:
        os.fsync(fd)
    except OSError as exc:
        return exc
    return None


#: Fsyncs one after another, on the caller's thread: for single bodies.
SERIAL_FSYNC = ParallelFsync(threads=0)


def write_body(path: str | Path, body: bytes) -> None:
    """Create ``path`` (it must not exist), write ``body``, fsync it.

    No temp file and rename: the file means nothing until rows that point at
    it commit, which happens only after this fsync and the caller's fsync
    of ``path``'s directory (batched across messages).  A crash in between
    leaves a body without rows, which recovery removes once it is old
    enough.  On any failure nothing is left behind and
    :class:`SpoolWriteError` (or :class:`SpoolFullError`) says why.
    """
    error = write_bodies([(str(path), body)])[0][0]
    if error is not None:
        raise error


def write_bodies(
    items: Sequence[tuple[str, bytes]],
    syncer: ParallelFsync = SERIAL_FSYNC,
    directories: Sequence[int] = (),
) -> tuple[list[SpoolWriteError | None], list[OSError | None]]:
    """:func:`write_body` for each ``(path, body)``: all written first, then all fsynced.

    Why that order: on a journalling filesystem each fsync of a new file
    commits the journal, and a create that comes while a commit runs waits
    for it.  Written one after another (create, write, fsync), a batch of
    bodies paid one commit each and its creates queued behind them; created
    and written first, the first fsync commits them all and the others find
    their file already on disk.  Every file is still fsynced before its
    rows can commit, so durability is unchanged.

    The bodies' fsyncs and those of ``directories`` (descriptors of the
    directories the batch's bodies are in, kept open by the caller) go to
    ``syncer`` together, so with a :class:`ParallelFsync` they all wait at
    once: each body's bytes are durable when its own ``fsync`` returns, its
    directory entry when the directory's does, and both have returned
    before this function does.  A directory fsynced at the same time as a
    body in it covers that body's entry: the entry was created (by
    ``open``) before either call began.

    Returns, per item, ``None`` (durable) or the error (a file that failed
    is removed, the others are kept), and per directory ``None`` or the
    fsync's error.
    """
    errors: list[SpoolWriteError | None] = [None] * len(items)
    dir_errors: list[OSError | None] = []
    fds = [-1] * len(items)
    try:
        for i, (path, body) in enumerate(items):
            name = os.path.basename(path)
            try:
                fds[i] = os.open(path, _CREATE_FLAGS, 0o640)
            except FileExistsError:
                errors[i] = SpoolWriteError(f"queue ID {name} is already in use")
                continue
            except OSError as exc:
                errors[i] = _write_error(exc, name)
                continue
            try:
                view = memoryview(body)
                while view:
                    written = os.write(fds[i], view)
                    view = view[written:]
            except OSError as exc:
                errors[i] = _write_error(exc, name)
        pending = [i for i, fd in enumerate(fds) if fd >= 0 and errors[i] is None]
        results = syncer.fsync([fds[i] for i in pending] + list(directories))
        for i, failed in zip(pending, results, strict=False):
            if failed is not None:
                errors[i] = _write_error(failed, os.path.basename(items[i][0]))
        dir_errors = results[len(pending) :]
    finally:
        for i, fd in enumerate(fds):
            if fd < 0:
                continue
            try:
                os.close(fd)
            except OSError as exc:
                if errors[i] is None:
                    errors[i] = _write_error(exc, os.path.basename(items[i][0]))
            if errors[i] is not None:
                _unlink_quietly(items[i][0])
    return errors, dir_errors


def _write_error(exc: OSError, name: str) -> SpoolWriteError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return SpoolFullError(f"queue disk is full writing {name}")
    return SpoolWriteError(f"cannot write message body {name}: {exc.strerror}")


def fsync_directory(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_directories(paths: Iterable[str | Path]) -> None:
    for path in set(paths):
        fsync_directory(path)


class DirectorySync:
    """Body directories' descriptors, kept open between batches for their fsyncs.

    Every accept batch fsyncs its bodies' directory; opening and closing it
    each time cost two more system calls per batch, each a release of the
    GIL by the database thread (so, under load, a thread switch with the
    event loop).  The fan-out directories are created once and never
    replaced, so a descriptor opened once stays valid; at most
    ``len(FANOUT)`` are kept (the fan-out moves to a new directory about
    every second).  The batch fsyncs them with its bodies
    (:func:`write_bodies`) and hands the results to :meth:`check`.
    Database thread only; :meth:`close` at spool close.
    """

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}

    def descriptors(self, paths: Iterable[str]) -> list[tuple[str, int]]:
        """``(directory, open descriptor)`` for each distinct directory of ``paths``.

        Raises ``OSError`` when one cannot be opened.
        """
        pairs = []
        for path in set(paths):
            fd = self._fds.get(path)
            if fd is None:
                if len(self._fds) >= len(FANOUT):
                    self.close()
                fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                self._fds[path] = fd
            pairs.append((path, fd))
        return pairs

    def forget(self, path: str) -> None:
        """Close ``path``'s descriptor after a failed fsync: the next batch reopens it."""
        fd = self._fds.pop(path, None)
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def check(self, pairs: Sequence[tuple[str, int]], errors: Sequence[OSError | None]) -> None:
        """Raise the first of ``errors`` (the fsyncs of ``pairs``); forget failed descriptors."""
        failed = [(path, error) for (path, _), error in zip(pairs, errors, strict=True) if error]
        for path, _ in failed:
            self.forget(path)
        if failed:
            raise failed[0][1]

    def close(self) -> None:
        """Close every kept descriptor."""
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            try:
                os.close(fd)
            except OSError:
                continue


class BackgroundRemoval:
    """Removes finished messages' bodies on a thread of its own.

    Why: an ``unlink`` waits for the filesystem's journal while other
    processes' fsyncs hold it (a millisecond on average, tens at worst, on
    the loaded development disk), and on the database thread that wait
    held up everything committed with the finishing record (the 250s of
    the accepts in the same batch) and the next batch.  A body is handed
    over only after the commit that finished its message, so it is never
    removed for a message that is not finished; one a crash leaves behind
    is a finished stray, which recovery removes.  The thread starts with
    the first removal; :meth:`close` waits for every removal handed over.
    """

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None

    def remove(self, paths: list[str]) -> None:
        """Remove ``paths`` soon, on the removal thread (errors are ignored)."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="spool-unlink")
        self._pool.submit(remove_bodies, paths)

    def close(self) -> None:
        """Finish the removals handed over, then end the thread."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)


def remove_bodies(paths: Iterable[str | Path]) -> None:
    for path in paths:
        _unlink_quietly(path)


def _unlink_quietly(path: str | Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


@dataclass(frozen=True, slots=True)
class BodyFile:
    path: Path
    is_temp: bool
    mtime: float

    @property
    def queue_id(self) -> str:
        name = self.path.name
        return name[len(TMP_PREFIX) :] if self.is_temp else name


def scan(queue_dir: Path) -> Iterator[BodyFile]:
    """Every file under ``bodies/`` (temp files flagged)."""
    root = bodies_root(queue_dir)
    if not root.is_dir():
        return
    with os.scandir(root) as subdirs:
        for sub in subdirs:
            if not sub.is_dir(follow_symlinks=False):
                continue
            with os.scandir(sub.path) as entries:
                for entry in entries:
                    if entry.is_file(follow_symlinks=False):
                        try:
                            mtime = entry.stat(follow_symlinks=False).st_mtime
                        except FileNotFoundError:
                            continue  # removed while we looked: not ours to judge
                        yield BodyFile(Path(entry.path), entry.name.startswith(TMP_PREFIX), mtime)


@dataclass(frozen=True, slots=True)
class Leftovers:
    """What a recovery scan found, holding only what needs action."""

    temps: list[Path]  # temp files old enough to be abandoned
    strays: list[tuple[str, Path]]  # (queue ID, path) of old bodies without a live row
    missing: tuple[str, ...]  # live queue IDs with no body file


def find_leftovers(queue_dir: Path, live: set[str], older_than: float) -> Leftovers:
    """Compare the body files with the live queue IDs in one pass.

    Only files last modified before ``older_than`` can be leftovers; the
    scan keeps names, not objects, so 100,000 queued bodies cost little.
    """
    remaining = set(live)
    temps: list[Path] = []
    strays: list[tuple[str, Path]] = []
    for body in scan(queue_dir):
        if body.is_temp:
            if body.mtime < older_than:
                temps.append(body.path)
            continue
        qid = body.queue_id
        if qid in remaining:
            remaining.discard(qid)
        elif qid not in live and body.mtime < older_than:
            strays.append((qid, body.path))
    return Leftovers(temps, strays, tuple(sorted(remaining)))
