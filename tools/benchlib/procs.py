"""Starting and stopping processes: every PID tracked, every one stopped.

Each long-running process gets its own session (process group), so stopping
it also stops whatever it forked, and we never signal anything we did not
start.  ``ProcessRegistry.close`` is the ``finally`` that kills leftovers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType


class BenchError(Exception):
    """A run could not be completed (timeout, lost mail, a relay that would not start)."""


def run_tool(tool: str, body: Callable[[], int]) -> int:
    """A measuring tool's ``main``: SIGTERM/SIGHUP end ``body`` through the
    ``finally`` that stops every process it started, and a failure or an
    interruption is one line on stderr, not a traceback."""

    def interrupt(signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)
    try:
        return body()
    except BenchError as exc:
        print(f"{tool}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        print(
            f"{tool}: interrupted ({exc}); every process it started has been stopped",
            file=sys.stderr,
        )
        return 130


def log(msg: str) -> None:
    """Progress on stderr, so stdout stays the report."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass
class Started:
    """A process we started in its own session."""

    name: str
    proc: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        return self.proc.pid


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_process(started: Started, grace: float = 10.0) -> None:
    """SIGTERM the process group, wait up to ``grace`` s, then SIGKILL it."""
    pgid = started.pid  # start_new_session: the group id is the leader's pid
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        if started.proc.poll() is not None and not _group_alive(pgid):
            return
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            started.proc.poll()
            if started.proc.returncode is not None and not _group_alive(pgid):
                return
            time.sleep(0.05)
    started.proc.poll()


class ProcessRegistry:
    """Every process the bench starts; ``close()`` stops those still running."""

    def __init__(self) -> None:
        self._procs: list[Started] = []

    def spawn(
        self,
        name: str,
        argv: Sequence[str],
        *,
        stdout: int | Path | None = None,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> Started:
        """Start ``argv`` in a new session; stdout/stderr to a file or a pipe."""
        out_fh = open(stdout, "ab") if isinstance(stdout, Path) else None  # noqa: SIM115
        try:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out_fh
                if out_fh is not None
                else (stdout if isinstance(stdout, int) else None),
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=dict(env) if env is not None else None,
                cwd=cwd,
            )
        finally:
            if out_fh is not None:
                out_fh.close()
        started = Started(name, proc)
        self._procs.append(started)
        return started

    def stop(self, started: Started, grace: float = 10.0) -> None:
        stop_process(started, grace)
        if started in self._procs:
            self._procs.remove(started)

    def close(self) -> None:
        for started in reversed(self._procs):
            stop_process(started, grace=3.0)
        self._procs.clear()


@dataclass(frozen=True, slots=True)
class HelperResult:
    """A short command's exit status, output and its CPU (user+sys, from wait4)."""

    returncode: int
    output: str
    cpu_seconds: float


def run_helper(
    argv: Sequence[str], *, timeout: float = 120.0, env: Mapping[str, str] | None = None
) -> HelperResult:
    """Run a short command to completion, bounded in time, and return its rusage.

    Used for the relay's own control commands (``postsuper``, ``postqueue``,
    ``outboundctl``): their CPU is part of what the relay costs, and wait4
    gives it exactly, children included.
    """
    proc = subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env=dict(env) if env is not None else None,
    )
    assert proc.stdout is not None
    os.set_blocking(proc.stdout.fileno(), False)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    while True:
        try:
            data = proc.stdout.read()
        except BlockingIOError:
            data = None
        if data:
            chunks.append(data)
        pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            _, status, rusage = os.wait4(proc.pid, 0)
            proc.returncode = -9
            raise BenchError(f"{argv[0]} did not finish within {timeout:.0f} s")
        time.sleep(0.02)
    proc.returncode = os.waitstatus_to_exitcode(status)
    rest = proc.stdout.read()
    if rest:
        chunks.append(rest)
    proc.stdout.close()
    return HelperResult(
        proc.returncode,
        b"".join(chunks).decode(errors="replace"),
        rusage.ru_utime + rusage.ru_stime,
    )
