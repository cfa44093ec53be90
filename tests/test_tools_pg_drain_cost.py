"""``tools/pg-drain-cost`` keeps working: it drains a real PostgreSQL queue to the end.

Nothing here judges speed: the tool must deliver every message (it exits
non-zero on a lost lease or a drain that does not finish) and print its
per-message figures.  ``--url`` drains into the test cluster's database, so
the server's CPU is not measured (the line says so with a dash).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

TOOL = Path(__file__).resolve().parent.parent / "tools" / "pg-drain-cost"


def test_pg_drain_cost_drains_every_message(pg_url: str) -> None:
    done = subprocess.run(
        [sys.executable, str(TOOL), "-n", "40", "--delivery-ms", "1", "--url", pg_url],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert re.match(r"drain of 40 messages by 2 schedulers \(1\.0 ms a delivery\): ", done.stdout)
    assert re.search(r"^  server CPU      - ms/message$", done.stdout, re.M), done.stdout
    found = re.search(r"^  round trips     (\d+\.\d+) per message$", done.stdout, re.M)
    assert found is not None, done.stdout
    assert float(found[1]) > 0
