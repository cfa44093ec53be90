"""The processes ``outboundd`` starts beside itself: start, wake, restart, stop.

Two kinds, both opening the same spool (SQLite WAL is safe across
processes, and leases make claims exclusive):

* **SMTP nodes** (``smtp.ini nodes=N``, N ≥ 2): N - 1 children that accept
  SMTP on the listening sockets the first process bound and passes down
  (one shared accept queue, so the least busy process takes the next
  connection), as Haraka's cluster workers do.  Each node also delivers
  unless there are delivery processes.
* **Delivery processes** (``outbound.ini delivery_processes=N``): children
  that only claim and deliver.

A child starts from the parent's configuration, not from the directory: the
parent passes its validated :class:`Config` (with the ``outbound.ini``
settings in force at that moment) in an anonymous in-memory file
(``--config-fd``).  A child restarted while a broken edit of a config file
is in place therefore runs on the last good settings instead of exiting on
the broken file and being restarted in a loop; it then follows
``outbound.ini`` edits like every process.

A child's stdin is a pipe from the parent.  A line on it means "new mail was
committed": a delivering child wakes its scheduler at once, so delivery
starts within milliseconds of the 250.  End of file means the parent has
gone: the child stops as on SIGTERM (finishing sessions, releasing leases).
This is also how the parent stops its children (see :meth:`ChildProcess.stop`).
An SMTP node whose mail others deliver writes a line to its wake pipe after
each commit; in the parent that sets the new-work event the delivery
processes are woken by.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pickle
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any, Final

from outboundd import log as logmod
from outboundd.config import Config

log = logmod.get_logger("outboundd")

#: Longest wait between restarts of a child that keeps dying.
MAX_RESTART_DELAY = 30.0
#: How long a child's clean exit (status 0) waits for the parent's own stop.
#: A child exits 0 only when it was asked to stop; a stop of the whole
#: process group asks every process at once, and a parent whose loop is
#: busy (or held up) may see its child's exit before its own signal.
CLEAN_EXIT_GRACE = 2.0


class ChildProcess:
    """One supervised child (an SMTP node or a delivery process)."""

    def __init__(
        self,
        config_dir: Path,
        *,
        role: str,
        stop_grace: float,
        config: Callable[[], Config],
        listen_fds: Sequence[tuple[int, bool]] = (),
        board: tuple[int, int] | None = None,
        wakes: asyncio.Event | None = None,
        on_exit: Callable[[], None] | None = None,
    ) -> None:
        """``config``: the configuration a (re)started child runs on, asked at
        each start.  ``wakes``: set whenever the child reports new mail on its
        wake pipe.  ``board``: ``(fd, slot)`` of the SMTP nodes' session board
        (see submission/acceptor.py).  ``on_exit``: called whenever the
        child has exited (before any restart)."""
        self.config_dir = config_dir
        self.config = config
        self.role = role
        self.stop_grace = stop_grace
        self.listen_fds = list(listen_fds)
        self.board = board
        self.wakes = wakes
        self.on_exit = on_exit
        self.proc: subprocess.Popen[bytes] | None = None
        #: The write end of the child's stdin (-1 once closed): wake-ups, and EOF to stop.
        self._stdin = -1
        #: Resolves to the child's exit status (see :func:`_watch_exit`).
        self._exit: asyncio.Future[int] | None = None
        #: Set once the parent has begun to stop: no exit from then on is restarted.
        self._stop_asked = asyncio.Event()
        self._restart_delay = 1.0
        self._exit_reported = False
        self._wake_reader: asyncio.Task[None] | None = None

    @property
    def kind(self) -> str:
        return "SMTP node" if self.listen_fds else "delivery process"

    async def start(self) -> None:
        config_fd = config_memfd(self.config())
        argv = [sys.executable, "-m", "outboundd"]
        argv += ["-c", str(self.config_dir), "--role", self.role]
        argv += ["--config-fd", str(config_fd)]
        fds: list[int] = [config_fd]
        for fd, implicit_tls in self.listen_fds:
            fds.append(fd)
            argv += ["--listen-fd", f"{fd}{':tls' if implicit_tls else ''}"]
        if self.board is not None:
            board_fd, slot = self.board
            fds.append(board_fd)
            argv += ["--sessions-board", f"{board_fd}:{slot}"]
        read_end = write_end = -1
        if self.wakes is not None:
            read_end, write_end = os.pipe()
            fds.append(write_end)
            argv += ["--wake-fd", str(write_end)]
        stdin_read, stdin_write = os.pipe()
        try:
            self.proc = spawn_with_stop_signals_blocked(argv, stdin_read, fds)
        except BaseException:
            os.close(stdin_write)
            raise
        finally:
            os.close(stdin_read)
            os.close(config_fd)
            if write_end >= 0:
                os.close(write_end)
        os.set_blocking(stdin_write, False)
        self._stdin = stdin_write
        self._exit = _watch_exit(self.proc)
        self._exit_reported = False
        if self.wakes is not None:
            pipe = os.fdopen(read_end, "rb", buffering=0)
            self._wake_reader = asyncio.create_task(
                _read_until_eof(pipe, self.wakes), name="wake-read"
            )
        log.info(f"{self.kind} started", pid=self.proc.pid)

    def wake(self) -> None:
        """Tell the child new mail is due (never blocks; a gone child is ignored)."""
        if self._stdin < 0:
            return
        with contextlib.suppress(BlockingIOError, BrokenPipeError):
            os.write(self._stdin, b"\n")  # a full pipe already holds a wake-up

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    async def supervise(self) -> None:
        """Restart the child if it exits while we are not stopping (with backoff).

        A clean exit (status 0) is a stop the child was asked for: when the
        parent's own stop follows within :data:`CLEAN_EXIT_GRACE` (a stop of
        the whole process group), it is part of that stop and not reported.
        """
        while not self._stop_asked.is_set():
            assert self._exit is not None
            status = await asyncio.shield(self._exit)
            self._close_stdin()
            if self.on_exit is not None:
                self.on_exit()
            if status == 0 and await self._stop_asked_within(CLEAN_EXIT_GRACE):
                return
            if self._stop_asked.is_set():
                return
            self._exit_reported = True
            log.crit(
                f"{self.kind} exited unexpectedly; restarting",
                status=status,
                restart_in=self._restart_delay,
            )
            if await self._stop_asked_within(self._restart_delay):
                return
            self._restart_delay = min(self._restart_delay * 2, MAX_RESTART_DELAY)
            await self.start()

    async def _stop_asked_within(self, seconds: float) -> bool:
        """Whether the parent begins to stop within ``seconds`` (at once if it has)."""
        if not self._stop_asked.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop_asked.wait(), seconds)
        return self._stop_asked.is_set()

    def stopping(self) -> None:
        """The parent has begun to stop: an exit from now on is no crash to restart.

        Called as soon as the stop is asked for (see ``daemon.StopRequest``),
        before the children are told to stop."""
        self._stop_asked.set()

    async def stop(self) -> int:
        """Ask the child to stop and wait (bounded); its exit status.

        The request is the end of its stdin, which the child treats as
        SIGTERM.  Not a signal: a child still starting up has no handler yet
        and would die of it (status -15, an error), while the end of file
        waits in the pipe until the child reads it.  A child that has not
        stopped after ``stop_grace`` + 10 s is killed.  0 for a child that
        exited while waiting to be restarted: that exit was already reported
        when it happened.
        """
        self._stop_asked.set()
        proc, exited = self.proc, self._exit
        if proc is None or exited is None or self._exit_reported:
            return 0
        self._close_stdin()
        try:
            status = await asyncio.wait_for(asyncio.shield(exited), self.stop_grace + 10)
        except TimeoutError:
            log.crit(f"{self.kind} did not stop in time; killing it", pid=proc.pid)
            self.signal(signal.SIGKILL)
            status = await exited
        if self._wake_reader is not None:
            self._wake_reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._wake_reader
        return status

    def _close_stdin(self) -> None:
        if self._stdin >= 0:
            os.close(self._stdin)
            self._stdin = -1


#: The signals a stop of the whole process group sends (``systemctl stop``, Ctrl-C).
STOP_SIGNALS: Final = frozenset({signal.SIGTERM, signal.SIGINT})


def spawn_with_stop_signals_blocked(
    argv: Sequence[str], stdin: int, pass_fds: Sequence[int]
) -> subprocess.Popen[bytes]:
    """Start a child whose SIGTERM and SIGINT stay blocked until it can handle them.

    A stop of the whole process group (``systemctl stop``, Ctrl-C) right
    after start-up signals children that are still being created.  Between
    the fork and the child's ``early_stop.catch()`` the signal would take its
    default action and kill the child (status -15, an ERROR in our log, or a
    restart during the stop).  A blocked signal is not lost but kept pending,
    and the signal mask is inherited by the fork and kept across exec: the
    child gets it the moment ``early_stop.catch()`` unblocks it with its
    handler in place, and stops gracefully.

    The fork is made from a thread of its own that blocks the two signals
    for itself and ends with the spawn, so the caller's signal mask is never
    changed, not even for the few milliseconds of the fork and exec: a stop
    signal meanwhile reaches this process's other threads and is acted on at
    once.  The caller waits for that thread (as it would for ``Popen``), so
    the child exists, or the error is raised, when this returns.
    ``subprocess`` (a plain fork/exec), not the event loop's subprocess
    support: under uvloop, libuv clears the child's signal mask and
    handlers before exec, which reopened the window.
    """
    outcome: list[subprocess.Popen[bytes] | BaseException] = []

    def spawn() -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # this thread's own mask
        try:
            outcome.append(subprocess.Popen(argv, stdin=stdin, pass_fds=pass_fds))
        except BaseException as exc:  # handed to the caller, raised there
            outcome.append(exc)

    spawner = threading.Thread(target=spawn, name="spawn-child")
    spawner.start()
    spawner.join()
    result = outcome[0]
    if isinstance(result, BaseException):
        raise result
    return result


def _watch_exit(proc: subprocess.Popen[bytes]) -> asyncio.Future[int]:
    """A future for ``proc``'s exit status, resolved when it exits (a pidfd in the loop).

    Reaps only this child (``waitpid`` on its pid), so it coexists with any
    loop's own child handling.
    """
    loop = asyncio.get_running_loop()
    exited: asyncio.Future[int] = loop.create_future()
    pidfd = os.pidfd_open(proc.pid)

    def reap() -> None:
        status = proc.poll()
        if status is not None:
            loop.remove_reader(pidfd)
            os.close(pidfd)
            if not exited.done():
                exited.set_result(status)

    loop.add_reader(pidfd, reap)
    return exited


def config_memfd(config: Config) -> int:
    """An anonymous in-memory file holding ``config``, positioned at its start.

    Pickle, because the models hold values JSON does not (paths, networks,
    the bounce image's bytes) and both ends are this program: the file goes
    only from a parent to the child it starts.  A file, not a pipe, so a
    large configuration never blocks the parent.
    """
    fd = os.memfd_create("outboundd-config")
    try:
        with os.fdopen(os.dup(fd), "wb") as out:
            out.write(pickle.dumps(config, protocol=pickle.HIGHEST_PROTOCOL))
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_config_fd(fd: int) -> Config:
    """In the child: the configuration the parent passed (see :func:`config_memfd`)."""
    with os.fdopen(fd, "rb") as snapshot:
        config = pickle.load(snapshot)
    if not isinstance(config, Config):
        raise TypeError(f"--config-fd {fd} does not hold a configuration")
    return config


async def wake_all(children: list[ChildProcess], new_work: asyncio.Event) -> None:
    """Relay this process's new-work signal to every delivering child, coalesced.

    Every child is woken; their claims are exclusive, so the first to claim
    takes the work and the others find nothing and sleep again.
    """
    while True:
        await new_work.wait()
        new_work.clear()
        for child in children:
            child.wake()


async def watch_parent(new_work: asyncio.Event, parent_gone: asyncio.Event) -> None:
    """In the child: each line on stdin wakes the scheduler; EOF means stop."""
    await _read_until_eof(sys.stdin, new_work)
    parent_gone.set()


async def _read_until_eof(pipe: IO[Any], event: asyncio.Event) -> None:
    """Set ``event`` for every chunk read from ``pipe``; return at end of file."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), pipe)
    try:
        while await reader.read(4096):
            event.set()
    finally:
        transport.close()


async def notify_parent(new_work: asyncio.Event, fd: int) -> None:
    """In an SMTP node whose mail others deliver: one line per burst of commits."""
    os.set_blocking(fd, False)
    try:
        while True:
            await new_work.wait()
            new_work.clear()
            with contextlib.suppress(BlockingIOError, BrokenPipeError):
                os.write(fd, b"\n")  # a full pipe already holds a wake-up
    finally:
        os.close(fd)
