"""``tools/spool-cost`` keeps working: both paths run the real spool to the end.

Nothing here judges speed (machines vary): the tool must deliver every
recipient (it exits non-zero on a lost lease) and print a CPU figure above
zero for the path it was asked for.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parent.parent / "tools" / "spool-cost"


@pytest.mark.parametrize("path", ["leased", "claimed"])
def test_spool_cost_runs_each_path(path: str) -> None:
    done = subprocess.run(
        [sys.executable, str(TOOL), path, "-n", "25", "-k", "3"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    found = re.fullmatch(
        rf"{path}: 25 messages x 3 recipients, (\d+) CPU-us per message\n", done.stdout
    )
    assert found is not None, done.stdout
    assert int(found[1]) > 0
