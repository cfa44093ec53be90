"""Delivery in a second process: start it, wake it, restart it, stop it.

With ``delivery_processes=N`` (N ≥ 1) the ``outboundd`` process keeps the
SMTP listeners and runs N ``outboundd --role delivery`` children; all open
the same spool (SQLite WAL is safe across processes and leases make claims
exclusive), so submission and delivery use the machine's cores.

The child's stdin is a pipe from the parent.  A line on it means "new mail
was committed": the child wakes its scheduler at once, so delivery still
starts within milliseconds of the 250.  End of file means the parent has
gone: the child stops as on SIGTERM (finishing sessions, releasing leases).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from pathlib import Path

from outboundd import log as logmod

log = logmod.get_logger("outboundd")

#: Longest wait between restarts of a delivery process that keeps dying.
MAX_RESTART_DELAY = 30.0


class DeliveryProcess:
    """The supervised child that delivers; owned by the submission process."""

    def __init__(self, config_dir: Path, *, stop_grace: float) -> None:
        self.config_dir = config_dir
        self.stop_grace = stop_grace
        self.proc: asyncio.subprocess.Process | None = None
        self._stopping = False
        self._restart_delay = 1.0

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "outboundd",
            "-c",
            str(self.config_dir),
            "--role",
            "delivery",
            stdin=asyncio.subprocess.PIPE,
        )
        log.info("delivery process started", pid=self.proc.pid)

    def wake(self) -> None:
        """Tell the child new mail is due (never blocks; a gone child is ignored)."""
        proc = self.proc
        if proc is None or proc.stdin is None or proc.returncode is not None:
            return
        with contextlib.suppress(BrokenPipeError, ConnectionResetError, RuntimeError):
            proc.stdin.write(b"\n")

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    async def supervise(self) -> None:
        """Restart the child if it exits while we are not stopping (with backoff)."""
        while not self._stopping:
            assert self.proc is not None
            status = await self.proc.wait()
            if self._stopping:
                return
            log.crit(
                "delivery process exited unexpectedly; restarting",
                status=status,
                restart_in=self._restart_delay,
            )
            await asyncio.sleep(self._restart_delay)
            self._restart_delay = min(self._restart_delay * 2, MAX_RESTART_DELAY)
            if not self._stopping:
                await self.start()

    async def stop(self) -> int:
        """SIGTERM the child and wait (bounded); its exit status."""
        self._stopping = True
        proc = self.proc
        if proc is None:
            return 0
        if proc.stdin is not None:
            proc.stdin.close()
        self.signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(proc.wait(), self.stop_grace + 10)
        except TimeoutError:
            log.crit("delivery process did not stop in time; killing it", pid=proc.pid)
            self.signal(signal.SIGKILL)
            return await proc.wait()


async def wake_all(children: list[DeliveryProcess], new_work: asyncio.Event) -> None:
    """Relay this process's new-work signal to every delivery process, coalesced.

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
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        chunk = await reader.read(4096)
        if not chunk:
            parent_gone.set()
            return
        new_work.set()
