"""The database thread's hand-off (``outboundd.spool.database``), on a real SQLite file.

What must hold: calls run one at a time, in order, on the one thread that
owns the connection; a call's exception reaches its caller; a caller
cancelled before its call started leaves it unrun and the thread working;
``close()`` finishes the calls queued before it; when the thread ends, every
waiting and later caller gets an error instead of hanging; and a process
that never closes its database still exits.
"""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from outboundd.spool.database import Database, DatabaseThreadError


@pytest.fixture
async def db(tmp_path: Path) -> Database:
    return await Database.open(tmp_path / "outbound.db")


def blocker(started: threading.Event, release: threading.Event):  # type: ignore[no-untyped-def]
    """A call that holds the database thread until ``release`` is set."""

    def hold(_conn: sqlite3.Connection) -> str:
        started.set()
        release.wait(10)
        return "held"

    return hold


async def test_calls_run_in_order_on_one_thread_that_owns_the_connection(db: Database) -> None:
    seen: list[tuple[int, int]] = []

    def note(conn: sqlite3.Connection, i: int) -> int:
        conn.execute("SELECT 1").fetchone()
        seen.append((i, threading.get_ident()))
        return i * 2

    results = await asyncio.gather(*(db.call(note, i) for i in range(50)))
    await db.close()
    assert results == [i * 2 for i in range(50)]
    assert [i for i, _ in seen] == list(range(50))
    assert len({ident for _, ident in seen}) == 1
    assert seen[0][1] != threading.get_ident()


async def test_an_exception_in_a_call_reaches_its_caller_and_the_thread_lives_on(
    db: Database,
) -> None:
    def fail(conn: sqlite3.Connection) -> None:
        conn.execute("SELECT * FROM no_such_table")

    with pytest.raises(sqlite3.OperationalError, match="no_such_table"):
        await db.call(fail)
    assert await db.call(lambda conn: conn.execute("SELECT 7").fetchone()[0]) == 7
    await db.close()


async def test_a_cancelled_caller_leaves_its_call_unrun_and_the_thread_working(
    db: Database,
) -> None:
    started, release = threading.Event(), threading.Event()
    ran: list[str] = []
    holding = asyncio.ensure_future(db.call(blocker(started, release)))
    await asyncio.to_thread(started.wait, 10)
    cancelled = asyncio.ensure_future(db.call(lambda _conn: ran.append("cancelled")))
    await asyncio.sleep(0)
    cancelled.cancel()
    release.set()
    assert await holding == "held"
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert await db.call(lambda _conn: ran.append("after") or "ok") == "ok"
    assert ran == ["after"]
    await db.close()


async def test_close_finishes_the_calls_queued_before_it_and_ends_the_thread(
    tmp_path: Path,
) -> None:
    db = await Database.open(tmp_path / "outbound.db")
    threads = {t for t in threading.enumerate() if t.name == "spool-db"}
    await db.call(lambda conn: conn.execute("CREATE TABLE t (n INTEGER)"))
    started, release = threading.Event(), threading.Event()
    holding = asyncio.ensure_future(db.call(blocker(started, release)))
    await asyncio.to_thread(started.wait, 10)
    inserts = [
        asyncio.ensure_future(
            db.call(lambda conn, n=n: conn.execute("INSERT INTO t VALUES (?)", (n,)))
        )
        for n in range(5)
    ]
    await asyncio.sleep(0)
    closing = asyncio.ensure_future(db.close())
    release.set()
    await asyncio.wait_for(closing, 10)
    assert await holding == "held"
    assert all(task.done() and task.exception() is None for task in inserts)
    assert not any(t.is_alive() for t in threads)
    with sqlite3.connect(tmp_path / "outbound.db") as check:
        assert check.execute("SELECT count(*) FROM t").fetchone()[0] == 5
    assert not (tmp_path / "outbound.db-wal").exists() or (
        (tmp_path / "outbound.db-wal").stat().st_size == 0
    )


async def test_a_call_after_close_fails_at_once(db: Database) -> None:
    await db.close()
    with pytest.raises(DatabaseThreadError):
        await asyncio.wait_for(db.call(lambda _conn: None), 5)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
async def test_every_waiting_caller_gets_an_error_when_the_thread_dies(db: Database) -> None:
    started, release = threading.Event(), threading.Event()
    holding = asyncio.ensure_future(db.call(blocker(started, release)))
    await asyncio.to_thread(started.wait, 10)
    # Not a call the thread can run: it ends the thread as a bug in it would.
    db._worker._calls.put(("not", "a call"))  # type: ignore[arg-type]
    waiting = [asyncio.ensure_future(db.call(lambda _conn: "never")) for _ in range(3)]
    await asyncio.sleep(0)
    release.set()
    assert await holding == "held"
    for task in waiting:
        with pytest.raises(DatabaseThreadError):
            await asyncio.wait_for(task, 5)
    with pytest.raises(DatabaseThreadError):
        await asyncio.wait_for(db.call(lambda _conn: "never"), 5)
    await asyncio.to_thread(db._worker._thread.join, 5)  # its exception reported in this test


def test_a_process_that_never_closes_its_database_exits(tmp_path: Path) -> None:
    program = (
        "import asyncio, sys\n"
        "from pathlib import Path\n"
        "from outboundd.spool.database import Database\n"
        "async def main():\n"
        "    db = await Database.open(Path(sys.argv[1]))\n"
        "    await db.call(lambda conn: conn.execute('CREATE TABLE t (n)'))\n"
        "asyncio.run(main())\n"
        "print('exited')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", program, str(tmp_path / "outbound.db")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "exited\n"
