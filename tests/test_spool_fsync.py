"""A batch's bodies and directories fsynced at once (``bodies.ParallelFsync``).

Real files, real descriptors, a real SQLite spool.  What must hold: every
descriptor of a batch goes through its own ``fsync`` and its error comes
back in its place; the threads exist only while the spool is open; a
directory fsync that fails refuses the whole batch (no 250) and leaves no
body behind.  That a process killed while batches of many bodies are in
flight loses no accepted message and leaves no body that recovery does not
clean is tested with the other crash cases, in tests/test_spool.py
(``test_sigkill_loses_no_accepted_message``, batches of 8 and 32).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from outboundd.spool import NewMessage, NewRecipient, Spool, SpoolWriteError, bodies
from outboundd.spool.core import SqliteSpool

BODY = b"Subject: fsync\r\n\r\nbody\r\n"


def fsync_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("spool-fsync")]


def open_files(tmp_path: Path, count: int) -> list[int]:
    fds = []
    for i in range(count):
        fd = os.open(tmp_path / f"f{i}", os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, b"x" * 100)
        fds.append(fd)
    return fds


@contextlib.contextmanager
def syncer_and_files(
    tmp_path: Path, threads: int, count: int
) -> Iterator[tuple[bodies.ParallelFsync, list[int], int]]:
    """A syncer, ``count`` open files and an O_PATH descriptor (its fsync fails with EBADF).

    Afterwards every descriptor is closed and no fsync thread is left.
    """
    syncer = bodies.ParallelFsync(threads=threads)
    fds = open_files(tmp_path, count)
    bad = os.open(tmp_path, os.O_PATH)
    try:
        yield syncer, fds, bad
    finally:
        syncer.close()
        os.close(bad)
        for fd in fds:
            os.close(fd)
    assert fsync_threads() == []


def test_every_descriptor_is_fsynced_and_its_error_kept_in_place(tmp_path: Path) -> None:
    # The O_PATH descriptor marks where the fsyncs of the caller's thread
    # (first) and of a worker (fourth) land.
    with syncer_and_files(tmp_path, threads=3, count=6) as (syncer, fds, bad):
        batch = [bad, *fds[:2], bad, *fds[2:]]
        errors = syncer.fsync(batch)
        assert [e is None for e in errors] == [False, True, True, False, True, True, True, True]
        assert all(isinstance(e, OSError) for e in (errors[0], errors[3]))
        assert len(fsync_threads()) >= 1


def test_a_batch_larger_than_the_threads_keeps_every_error_in_place(tmp_path: Path) -> None:
    """20 descriptors over the caller and 3 lanes: each comes back where it was handed in."""
    where = {0, 5, 13, 19}
    with syncer_and_files(tmp_path, threads=3, count=16) as (syncer, fds, bad):
        good = iter(fds)
        batch = [bad if i in where else next(good) for i in range(20)]
        for _ in range(3):  # the same lanes serve batch after batch
            errors = syncer.fsync(batch)
            assert {i for i, e in enumerate(errors) if e is not None} == where
            assert len(fsync_threads()) == 3


def test_a_lane_that_fails_reports_its_files_not_durable_and_serves_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Something other than an fsync's own error on a lane: its files fail, nothing hangs."""
    syncer = bodies.ParallelFsync(threads=2)
    fds = open_files(tmp_path, 6)
    real_fsync = os.fsync
    poisoned = fds[1]  # with 2 lanes, lane 1 gets the 2nd and 5th descriptors

    def fsync(fd: int) -> None:
        if fd == poisoned:
            raise ValueError("not an OSError")
        real_fsync(fd)

    try:
        monkeypatch.setattr(bodies.os, "fsync", fsync)
        errors = syncer.fsync(fds)
        monkeypatch.undo()
        assert [e is None for e in errors] == [True, False, True, True, False, True]
        assert all(isinstance(errors[i], OSError) for i in (1, 4))
        assert "not an OSError" in str(errors[1])
        assert syncer.fsync(fds) == [None] * 6
    finally:
        syncer.close()
        for fd in fds:
            os.close(fd)
    assert fsync_threads() == []


def test_a_single_file_is_fsynced_without_a_thread(tmp_path: Path) -> None:
    syncer = bodies.ParallelFsync()
    [fd] = open_files(tmp_path, 1)
    try:
        assert syncer.fsync([fd]) == [None]
        assert fsync_threads() == []
    finally:
        syncer.close()
        os.close(fd)


def test_write_bodies_reports_the_directories_apart(tmp_path: Path) -> None:
    syncer = bodies.ParallelFsync(threads=2)
    good = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    bad = os.open(tmp_path, os.O_PATH)
    items = [(str(tmp_path / f"b{i}"), b"body %d\r\n" % i) for i in range(4)]
    try:
        errors, dir_errors = bodies.write_bodies(items, syncer, [good, bad])
    finally:
        syncer.close()
        os.close(good)
        os.close(bad)
    assert errors == [None] * 4
    assert dir_errors[0] is None and isinstance(dir_errors[1], OSError)
    assert [Path(p).read_bytes() for p, _ in items] == [b for _, b in items]


async def test_the_spool_ends_its_fsync_threads_at_close(tmp_path: Path) -> None:
    spool = await Spool.open(tmp_path / "q")
    try:
        many = (NewMessage("a@x.test", [NewRecipient(f"r{i}@y.test")], BODY) for i in range(40))
        qids = await asyncio.gather(*(spool.accept(m) for m in many))
        assert all(spool.body_path(q).read_bytes() == BODY for q in qids)
    finally:
        await spool.close()
    assert fsync_threads() == []


async def test_a_failed_directory_fsync_refuses_the_batch_and_keeps_no_body(
    tmp_path: Path,
) -> None:
    spool = await Spool.open(tmp_path / "q")
    assert isinstance(spool, SqliteSpool)
    try:
        await spool.accept(NewMessage("a@x.test", [NewRecipient("r@y.test")], BODY))
        # The spool keeps its body directories open between batches: put a
        # descriptor that cannot be fsynced (O_PATH) in place of every one.
        kept = dict(spool._directories._fds)
        assert kept
        for fd in kept.values():
            blocker = os.open(tmp_path, os.O_PATH)
            os.dup2(blocker, fd)
            os.close(blocker)
        # Every body of this batch goes into a kept directory (same second).
        before = {f.queue_id for f in bodies.scan(spool.queue_dir)}
        sent = [NewMessage("a@x.test", [NewRecipient(f"s{i}@y.test")], BODY) for i in range(8)]
        results = await asyncio.gather(*(spool.accept(m) for m in sent), return_exceptions=True)
        refused = [r for r in results if isinstance(r, SpoolWriteError)]
        assert refused and all("cannot fsync the body directory" in str(r) for r in refused)
        stored = {r for r in results if isinstance(r, str)}
        # Nothing refused is left on disk; anything accepted has its body.
        assert {f.queue_id for f in bodies.scan(spool.queue_dir)} == before | stored
        # The failed descriptor was dropped: the next batch reopens and succeeds.
        qid = await spool.accept(NewMessage("a@x.test", [NewRecipient("t@y.test")], BODY))
        assert spool.body_path(qid).read_bytes() == BODY
    finally:
        await spool.close()


async def test_a_missing_directory_reports_the_body_error_first(tmp_path: Path) -> None:
    """The body's own error, as when directories were fsynced after the bodies."""
    spool = await Spool.open(tmp_path / "q")
    try:
        (spool.queue_dir / "bodies" / "ab").rmdir()
        lost = NewMessage("a@x.test", [NewRecipient("r@y.test")], BODY)
        with pytest.raises(SpoolWriteError, match=r"cannot write message body lost-ab: "):
            await spool.accept(lost, queue_id="lost-ab")
        kept = await spool.accept(lost, queue_id="kept-cd")
        assert spool.body_path(kept).read_bytes() == BODY
    finally:
        await spool.close()


@pytest.mark.parametrize("threads", [0, 1, 8])
def test_any_thread_count_makes_every_body_durable_in_order(tmp_path: Path, threads: int) -> None:
    """0 threads is the serial fallback; the results do not depend on the count."""
    syncer = bodies.ParallelFsync(threads=threads)
    items = [(str(tmp_path / f"b{i}"), b"%d\r\n" % i) for i in range(10)]
    items.append((items[3][0], b"again\r\n"))  # the name is taken: refused, the first kept
    try:
        errors, dir_errors = bodies.write_bodies(items, syncer)
    finally:
        syncer.close()
    assert dir_errors == []
    assert errors[:10] == [None] * 10
    assert isinstance(errors[10], SpoolWriteError) and "already in use" in str(errors[10])
    assert Path(items[3][0]).read_bytes() == b"3\r\n"
