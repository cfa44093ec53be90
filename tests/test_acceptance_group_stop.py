"""Acceptance: a stop signal to the whole process group is a normal stop.

``systemctl stop`` (KillMode=control-group) and Ctrl-C in a terminal signal
every process of the group at once, children included.  Sent right after
``ready``, the children were still starting: a child whose interpreter had
not yet reached its own handler died of the signal (status -15), and the
parent logged "delivery process exited with an error" at ERROR (or, seen
first, "exited unexpectedly; restarting" at CRIT, and restarted it during
the stop); with SIGINT Python printed a "Fatal error" traceback.  A child
once ignored the signals from a ``/bin/sh`` trap, which left the fork to
the trap open (1 run in 6 to 15 failed).  Now a child is created with
SIGTERM and SIGINT blocked and unblocks them only with its handler in
place, so a signal at any moment of its start-up waits and stops it
gracefully.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
from pathlib import Path

import pytest

from tests.harness import READY, Daemon, write_config

MX_PORT = 9  # nothing is delivered in this test
#: The parent's line for each child it has just created (the fork and exec done).
CHILD_STARTED = re.compile(r"(SMTP node|delivery process) started")


async def _group_stop(config_dir: Path, sig: int, until: re.Pattern[str], delay: float) -> None:
    """Start outboundd, signal its whole process group ``delay`` s after
    ``until``, and check that it stopped cleanly (status 0, nothing logged
    above NOTICE)."""
    daemon = Daemon(config_dir)
    await daemon.start(until=until)
    assert daemon.proc is not None
    await asyncio.sleep(delay)
    os.killpg(daemon.proc.pid, sig)  # every process of the group, as systemd does
    status = await asyncio.wait_for(daemon.proc.wait(), 30)
    assert daemon._reader is not None
    await daemon._reader
    loud = [ln for ln in daemon.lines if "level=" in ln and "level=INFO" not in ln
            and "level=NOTICE" not in ln and "level=DEBUG" not in ln]  # fmt: skip
    assert status == 0 and loud == [], (until.pattern, delay, status, daemon.lines[-20:])


def _config(base: Path) -> Path:
    return write_config(
        base / "config", dns_port=53, mx_port=MX_PORT,
        outbound={"delivery_processes": 2}, smtp={"nodes": 2},
    )  # fmt: skip


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_a_group_stop_right_after_ready_is_graceful(tmp_path: Path, sig: int) -> None:
    for run in range(2):
        await _group_stop(_config(tmp_path / f"run{run}"), sig, READY, 0.0)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_a_group_stop_while_children_start_is_graceful(tmp_path: Path, sig: int) -> None:
    """The signal lands at several points of the children's start-up: right
    after the first child is created (its interpreter starting, the others
    not yet created or being created) and a few milliseconds later."""
    for run, delay in enumerate((0.0, 0.0, 0.002, 0.005, 0.02)):
        await _group_stop(_config(tmp_path / f"run{run}"), sig, CHILD_STARTED, delay)
