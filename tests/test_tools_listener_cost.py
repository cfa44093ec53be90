"""``tools/listener-cost`` keeps working, a new connection per message and with kept sessions.

Nothing here judges speed (machines vary): every reply the tool's client
reads must be 2xx or 3xx (it exits non-zero otherwise, and so does the
server side), and the figure printed must be above zero, per session or,
with several messages a connection, per message.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parent.parent / "tools" / "listener-cost"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["-n", "6", "--clients", "2"], r"6 sessions: (\d+) CPU-us per session\n"),
        (
            ["-n", "3", "--clients", "3", "--messages-per-session", "4"],
            r"3 sessions of 4 messages: (\d+) CPU-us per message\n",
        ),
        (
            ["-n", "2", "--messages-per-session", "3", "--pipelined"],
            r"2 sessions of 3 messages: (\d+) CPU-us per message\n",
        ),
    ],
)
def test_listener_cost_runs(args: list[str], expected: str) -> None:
    done = subprocess.run(
        [sys.executable, str(TOOL), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    found = re.fullmatch(expected, done.stdout)
    assert found is not None, done.stdout
    assert int(found[1]) > 0
