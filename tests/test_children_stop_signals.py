"""A child is created with SIGTERM/SIGINT blocked, and catches them once it can.

Deterministic counterparts of tests/test_acceptance_group_stop.py: the
child signals itself at the very start of its interpreter, the moment a
stop of the whole process group could reach it before it has a handler.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from outboundd.children import STOP_SIGNALS, spawn_with_stop_signals_blocked
from tests.harness import Daemon, write_config

#: Kills itself with the signal first thing, then reports whether it is pending.
PENDING = (
    "import os, signal, sys; sig = signal.Signals[sys.argv[1]]; os.kill(os.getpid(), sig); "
    "os.write(int(sys.argv[2]), str(sig in signal.sigpending()).encode())"
)
#: Kills itself with the signal, then catches it as ``python -m outboundd`` does.
CAUGHT = (
    "import os, signal, sys; os.kill(os.getpid(), signal.Signals[sys.argv[1]]); "
    "from outboundd import early_stop; early_stop.catch(); "
    "os.write(int(sys.argv[2]), str(early_stop.pending()).encode())"
)


def _output(code: str, sig: signal.Signals) -> tuple[int, str]:
    """Run ``code`` as a child spawned like outboundd's; its status and what it
    wrote to the pipe it is given."""
    stdin_read, stdin_write = os.pipe()
    out_read, out_write = os.pipe()
    before = signal.pthread_sigmask(signal.SIG_BLOCK, ())
    try:
        argv = [sys.executable, "-c", code, sig.name, str(out_write)]
        proc = spawn_with_stop_signals_blocked(argv, stdin_read, [out_write])
    finally:
        os.close(stdin_read)
        os.close(stdin_write)
        os.close(out_write)
    assert signal.pthread_sigmask(signal.SIG_BLOCK, ()) == before  # ours is untouched
    with os.fdopen(out_read, "rb") as output:
        text = output.read().decode()
    return proc.wait(timeout=30), text


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_before_the_child_has_a_handler_waits(sig: signal.Signals) -> None:
    assert _output(PENDING, sig) == (0, "True")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_the_child_records_a_stop_signal_that_came_before_its_handler(sig: signal.Signals) -> None:
    assert _output(CAUGHT, sig) == (0, sig.name)


def test_without_the_block_such_a_signal_kills_the_child() -> None:
    """What the block prevents (and so what the tests above would see without it)."""
    argv = [sys.executable, "-c", PENDING, "SIGTERM", "2"]
    proc = subprocess.run(argv, timeout=30, check=False)
    assert proc.returncode == -signal.SIGTERM


def test_the_mask_is_restored_when_the_spawn_fails(tmp_path: Path) -> None:
    before = signal.pthread_sigmask(signal.SIG_BLOCK, ())
    stdin_read, stdin_write = os.pipe()
    try:
        with pytest.raises(FileNotFoundError):
            spawn_with_stop_signals_blocked([str(tmp_path / "no-such-program")], stdin_read, [])
    finally:
        os.close(stdin_read)
        os.close(stdin_write)
    assert signal.pthread_sigmask(signal.SIG_BLOCK, ()) == before


def test_signals_the_caller_had_blocked_stay_blocked() -> None:
    """Restored, not unblocked: a caller's own block of SIGTERM outlives the spawn."""
    before = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, ())
        stdin_read, stdin_write = os.pipe()
        try:
            proc = spawn_with_stop_signals_blocked([sys.executable, "-c", "pass"], stdin_read, [])
        finally:
            os.close(stdin_read)
            os.close(stdin_write)
        assert proc.wait(timeout=30) == 0
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, ())
        assert signal.SIGTERM in mask and signal.SIGINT not in mask
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def _signal_mask(pid: int) -> int:
    """The signals the main thread of ``pid`` blocks (``SigBlk`` in /proc), as bits."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^SigBlk:\s*([0-9a-f]+)$", status, re.M)[1], 16)  # type: ignore[index]


def _stop_signals_in(mask: int) -> set[signal.Signals]:
    return {sig for sig in STOP_SIGNALS if mask & (1 << (sig - 1))}


def _blocked(pid: int) -> set[signal.Signals]:
    """The stop signals the main thread of ``pid`` blocks."""
    return _stop_signals_in(_signal_mask(pid))


#: ``SigBlk`` while every signal is blocked (the kernel never blocks SIGKILL
#: and SIGSTOP).  glibc's ``pthread_create`` blocks them all in the creating
#: thread for the few microseconds of its ``clone3`` and restores the mask
#: (``strace``: ``rt_sigprocmask(SIG_BLOCK, ~[], ...)``), in any program that
#: starts a thread, as the parent does for every spawn; a signal then is kept
#: pending and handled the moment it returns.
_ALL_BLOCKED = ((1 << 64) - 1) & ~((1 << (signal.SIGKILL - 1)) | (1 << (signal.SIGSTOP - 1)))


def _stop_signals_held(pid: int) -> set[signal.Signals]:
    """:func:`_blocked`, except within a thread creation's block of every signal."""
    mask = _signal_mask(pid)
    return set() if mask == _ALL_BLOCKED else _stop_signals_in(mask)


async def _until_unblocked(pid: int) -> None:
    """A child unblocks its stop signals as its first act; wait (bounded) for that."""
    for _ in range(200):
        if not _blocked(pid):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"process {pid} still blocks {_blocked(pid)} after 10 s")


async def test_no_process_of_a_running_daemon_blocks_its_stop_signals(tmp_path: Path) -> None:
    """The parent's main thread never blocks them, not even while it creates
    a child (its first children, a restart); each child unblocks its own.
    (Only libc's block of every signal while a thread is created is allowed:
    see ``_ALL_BLOCKED``.)"""
    config = write_config(
        tmp_path / "config", dns_port=53, mx_port=9,
        outbound={"delivery_processes": 2}, smtp={"nodes": 2},
    )  # fmt: skip
    async with Daemon(config) as daemon:
        assert daemon.proc is not None
        parent = daemon.proc.pid
        seen_blocked: set[signal.Signals] = set()
        children: list[int] = []
        for _ in range(2000):  # the parent logs READY before its last children exist
            seen_blocked |= _stop_signals_held(parent)
            children = daemon.children()
            if len(children) == 3:
                break
            await asyncio.sleep(0.005)
        assert len(children) == 3
        for child in children:
            await _until_unblocked(child)
        os.kill(children[0], signal.SIGKILL)
        restarted: set[int] = set()
        for _ in range(4000):  # restarted after a 1 s back-off; sampled all along
            seen_blocked |= _stop_signals_held(parent)
            restarted = set(daemon.children()) - set(children)
            if restarted:
                break
            await asyncio.sleep(0.001)
        await daemon.wait_for("exited unexpectedly; restarting", timeout=10)
        assert len(restarted) == 1 and seen_blocked == set() and _stop_signals_held(parent) == set()
        await _until_unblocked(restarted.pop())
    assert daemon.returncode == 0
