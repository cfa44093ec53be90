"""Acceptance: a stop signal to the whole process group is a normal stop.

``systemctl stop`` (KillMode=control-group) and Ctrl-C in a terminal signal
every process of the group at once, children included.  Sent right after
``ready``, the children were still starting: a child whose interpreter had
not yet reached its own handler died of the signal (status -15), and the
parent logged "delivery process exited with an error" at ERROR (or, seen
first, "exited unexpectedly; restarting" at CRIT, and restarted it during
the stop); with SIGINT Python printed a "Fatal error" traceback.  A child
now ignores SIGTERM/SIGINT until its handler is in place (the parent stops
it through its stdin anyway), and a child killed by the stop signal while
the parent stops is part of that stop, not a crash.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from tests.harness import Daemon, write_config

MX_PORT = 9  # nothing is delivered in this test


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_a_group_stop_right_after_ready_is_graceful(tmp_path: Path, sig: int) -> None:
    for run in range(2):
        config = write_config(
            tmp_path / f"run{run}" / "config", dns_port=53, mx_port=MX_PORT,
            outbound={"delivery_processes": 2}, smtp={"nodes": 2},
        )  # fmt: skip
        daemon = Daemon(config)
        await daemon.start()
        assert daemon.proc is not None
        os.killpg(daemon.proc.pid, sig)  # every process of the group, as systemd does
        status = await asyncio.wait_for(daemon.proc.wait(), 30)
        assert daemon._reader is not None
        await daemon._reader
        loud = [ln for ln in daemon.lines if "level=" in ln and "level=INFO" not in ln
                and "level=NOTICE" not in ln and "level=DEBUG" not in ln]  # fmt: skip
        assert status == 0 and loud == [], (run, status, daemon.lines[-20:])
