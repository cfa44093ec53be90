"""The submitting client and the receiving MX: Postfix's smtp-source/smtp-sink.

When those are not installed (CI has no Debian package) the smoke mode uses
:mod:`benchlib.pysource` and :mod:`benchlib.pysink`, which take the same
options and print the same ``mesg=N`` counters, so the rest of the bench does
not care which one runs.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from benchlib.procs import BenchError, ProcessRegistry, Started, log

TOOLS_DIR = Path(__file__).resolve().parent.parent
SMTP_SOURCE = "/usr/sbin/smtp-source"
SMTP_SINK = "/usr/sbin/smtp-sink"
SENDER = "bench@source.bench.test"
RECIPIENT = "rcpt@dest.bench.test"
_MESG = re.compile(rb"mesg=(\d+)")


def postfix_tools_installed() -> bool:
    return os.access(SMTP_SOURCE, os.X_OK) and os.access(SMTP_SINK, os.X_OK)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_banner(port: int, timeout: float, started: Started | None = None) -> None:
    """Wait until something on 127.0.0.1:port answers with an SMTP 220 greeting."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if started is not None and started.proc.poll() is not None:
            raise BenchError(f"{started.name} exited with {started.proc.returncode} at start-up")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
                banner = sock.recv(512)
                if banner.startswith(b"220"):
                    sock.sendall(b"QUIT\r\n")
                    return
                last = repr(banner[:80])
        except OSError as exc:
            last = str(exc)
        time.sleep(0.1)
    raise BenchError(f"nothing greeted on 127.0.0.1:{port} within {timeout:.0f} s ({last})")


def python_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TOOLS_DIR), env.get("PYTHONPATH")]))
    return env


class Sink:
    """A receiving MX on 127.0.0.1 that counts the messages it accepted."""

    def __init__(self, registry: ProcessRegistry, *, use_python: bool) -> None:
        self.registry = registry
        self.use_python = use_python
        self.port = free_port()
        self._count = 0
        self._lock = threading.Lock()
        self.started: Started | None = None
        self._reader: threading.Thread | None = None

    def start(self) -> None:
        if self.use_python:
            argv = [sys.executable, "-m", "benchlib.pysink", f"127.0.0.1:{self.port}"]
            env: dict[str, str] | None = python_env()
        else:
            # -u: smtp-sink refuses to run as root; -c prints "mesg=N" counters.
            argv = [SMTP_SINK, "-u", "nobody", "-c", "-4", f"127.0.0.1:{self.port}", "1024"]
            env = None
        self.started = self.registry.spawn("sink", argv, stdout=-1, env=env)
        self._reader = threading.Thread(target=self._read, name="sink-reader", daemon=True)
        self._reader.start()
        wait_for_banner(self.port, 15, self.started)

    def _read(self) -> None:
        assert self.started is not None and self.started.proc.stdout is not None
        fd = self.started.proc.stdout.fileno()
        tail = b""
        while True:
            data = os.read(fd, 65536)
            if not data:
                return
            tail = (tail + data)[-256:]
            found = _MESG.findall(tail)
            if found:
                with self._lock:
                    self._count = max(self._count, int(found[-1]))

    @property
    def count(self) -> int:
        with self._lock:
            return self._count

    def stop(self) -> None:
        if self.started is not None:
            self.registry.stop(self.started, grace=3)
            self.started = None


@dataclass(frozen=True, slots=True)
class SourceResult:
    seconds: float
    returncode: int
    output: str


def run_source(
    *,
    port: int,
    messages: int,
    recipients: int,
    sessions: int,
    size: int,
    reuse_sessions: bool,
    use_python: bool,
    timeout: float,
    registry: ProcessRegistry,
) -> SourceResult:
    """Submit ``messages`` messages and return how long it took (bounded by ``timeout``)."""
    opts = ["-s", str(sessions), "-m", str(messages), "-l", str(size), "-r", str(recipients)]
    opts += ["-f", SENDER, "-t", RECIPIENT, "-M", "source.bench.test"]
    if reuse_sessions:
        opts.append("-d")
    if use_python:
        argv = [sys.executable, "-m", "benchlib.pysource", *opts, f"127.0.0.1:{port}"]
        env: dict[str, str] | None = python_env()
    else:
        argv = [SMTP_SOURCE, *opts, f"127.0.0.1:{port}"]
        env = None
    t0 = time.monotonic()
    started = registry.spawn("source", argv, stdout=-1, env=env)
    try:
        out, _ = started.proc.communicate(timeout=timeout)
    except Exception as exc:  # TimeoutExpired, or interrupted
        registry.stop(started, grace=1)
        raise BenchError(f"the client did not finish submitting within {timeout:.0f} s") from exc
    seconds = time.monotonic() - t0
    registry.stop(started, grace=1)
    text = out.decode(errors="replace") if out else ""
    if started.proc.returncode != 0:
        log(f"source exited {started.proc.returncode}: {text.strip()[-500:]}")
    return SourceResult(seconds, started.proc.returncode or 0, text)


def which(name: str) -> str | None:
    return shutil.which(name)
