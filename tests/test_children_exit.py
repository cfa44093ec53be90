"""A child's exit is seen through its pidfd, and only that child is reaped.

``children._watch_exit`` reaps with ``waitpid`` on its own child's pid, so
other children of the same process (a plugin's helper program, the event
loop's own subprocesses) keep their exit status for whoever waits on them.
Run under the default loop and under uvloop, which the daemon uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import pytest
import uvloop

from outboundd.children import _watch_exit


def on_both_loops(body: Callable[[], Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """A test running ``body`` once on asyncio's own loop and once on uvloop's."""

    @pytest.mark.parametrize(
        "loop_factory", [asyncio.new_event_loop, uvloop.new_event_loop], ids=["asyncio", "uvloop"]
    )
    def test(loop_factory: Callable[[], asyncio.AbstractEventLoop]) -> None:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(body())

    test.__name__, test.__doc__ = body.__name__, body.__doc__
    return test


#: Waits for its stdin to close, then exits with the status it was given.
EXIT_WHEN_TOLD = "import sys; sys.stdin.read(); sys.exit(int(sys.argv[1]))"


def _exit_when_told(status: int) -> subprocess.Popen[bytes]:
    """A child that exits with ``status`` once :func:`_tell` closes its stdin."""
    return subprocess.Popen(
        [sys.executable, "-c", EXIT_WHEN_TOLD, str(status)], stdin=subprocess.PIPE
    )


def _tell(proc: subprocess.Popen[bytes]) -> None:
    assert proc.stdin is not None
    proc.stdin.close()


@contextlib.asynccontextmanager
async def watched_child_exiting_cleanly() -> AsyncIterator[asyncio.Future[int]]:
    """A watched child (its exit future) that runs until the block ends, then
    must be seen to exit with status 0."""
    ours = _exit_when_told(0)
    exited = _watch_exit(ours)
    try:
        yield exited
    finally:
        _tell(ours)
    assert await asyncio.wait_for(exited, 30) == 0


def _wait_unreaped(pid: int) -> int:
    """Wait for ``pid`` to exit without reaping it (``waitid`` with ``WNOWAIT``): its status.

    Raises ``ChildProcessError`` if somebody else has already reaped it.
    """
    info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
    assert info is not None and info.si_pid == pid
    return info.si_status


@on_both_loops
async def test_the_watched_child_s_status_is_the_future_s_result() -> None:
    ours = _exit_when_told(3)
    exited = _watch_exit(ours)
    await asyncio.sleep(0.05)
    assert not exited.done()  # a running child resolves nothing
    _tell(ours)
    assert await asyncio.wait_for(exited, 30) == 3
    assert ours.returncode == 3


@on_both_loops
async def test_a_signalled_child_reports_the_negative_signal() -> None:
    ours = _exit_when_told(0)
    exited = _watch_exit(ours)
    ours.send_signal(signal.SIGKILL)
    assert await asyncio.wait_for(exited, 30) == -signal.SIGKILL
    assert ours.stdin is not None
    ours.stdin.close()


@on_both_loops
async def test_a_sibling_that_exits_first_is_neither_reaped_nor_taken_for_ours() -> None:
    sibling = _exit_when_told(7)
    async with watched_child_exiting_cleanly() as exited:
        _tell(sibling)
        # The sibling is a zombie now, waiting for its own parent's wait.
        assert await asyncio.to_thread(_wait_unreaped, sibling.pid) == 7
        await asyncio.sleep(0.1)  # turns of the loop in which a stray reaper would act
        assert not exited.done()
        assert sibling.wait(timeout=30) == 7  # still ours to reap, with its status


@on_both_loops
async def test_a_sibling_that_exits_with_ours_keeps_its_status() -> None:
    ours = _exit_when_told(5)
    sibling = _exit_when_told(9)
    exited = _watch_exit(ours)
    _tell(sibling)
    _tell(ours)
    assert await asyncio.wait_for(exited, 30) == 5
    assert await asyncio.to_thread(_wait_unreaped, sibling.pid) == 9
    assert sibling.wait(timeout=30) == 9


@on_both_loops
async def test_the_loop_s_own_subprocesses_keep_their_status() -> None:
    """A hook starting a program with asyncio's subprocess support is unaffected."""
    async with watched_child_exiting_cleanly() as exited:
        program = await asyncio.create_subprocess_exec(sys.executable, "-c", "raise SystemExit(4)")
        assert await asyncio.wait_for(program.wait(), 30) == 4
        assert not exited.done()


@on_both_loops
async def test_the_pidfd_is_closed_once_the_child_is_reaped() -> None:
    before = set(os.listdir("/proc/self/fd"))
    ours = _exit_when_told(0)
    exited = _watch_exit(ours)
    assert len(set(os.listdir("/proc/self/fd")) - before) >= 1  # the pidfd (and the pipe)
    _tell(ours)
    assert await asyncio.wait_for(exited, 30) == 0
    await asyncio.sleep(0)
    assert set(os.listdir("/proc/self/fd")) - before == set()
