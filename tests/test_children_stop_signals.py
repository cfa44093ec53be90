"""A child is created with SIGTERM/SIGINT blocked, and catches them once it can.

Deterministic counterparts of tests/test_acceptance_group_stop.py: the
child signals itself at the very start of its interpreter, the moment a
stop of the whole process group could reach it before it has a handler.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from outboundd.children import spawn_with_stop_signals_blocked

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
