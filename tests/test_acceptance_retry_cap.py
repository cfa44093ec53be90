"""Acceptance: ``maxTempFailures`` up to its documented 1000 gives retry times a
date can hold.

Haraka's default schedule is 2^(i+5) s; with ``maxTempFailures=40`` (inside
the documented 1 to 1000) the 33rd temporary failure asked for a retry in
the year 2231923: the ``deliveries`` view showed ``next_attempt_at`` NULL
and ``outboundctl list --json`` / ``show`` failed with "year … is out of
range".  Each step is now capped at a year, the longest the explicit
grammar allows.
"""

from __future__ import annotations

import datetime
import time
from pathlib import Path

from outboundd.config import default_temp_fail_intervals, load_config
from outboundd.config.values import MAX_TEMP_FAIL_INTERVAL
from tests.harness import write_config


def test_the_default_schedule_keeps_haraka_steps_and_caps_at_a_year() -> None:
    steps = default_temp_fail_intervals(1000)
    assert len(steps) == 999
    assert steps[:19] == tuple(float(2 ** (i + 5)) for i in range(1, 20))  # Haraka's, unchanged
    assert max(steps) == MAX_TEMP_FAIL_INTERVAL == 365 * 86400.0
    assert steps[19:] == (MAX_TEMP_FAIL_INTERVAL,) * 980


def test_every_retry_of_the_longest_loaded_schedule_is_a_date(tmp_path: Path) -> None:
    config = load_config(
        write_config(tmp_path / "config", dns_port=53, mx_port=25,
                     outbound={"maxTempFailures": 1000, "temp_fail_intervals": "none"})
    )  # fmt: skip
    assert config.outbound.temp_fail_intervals == ()  # an explicit schedule wins
    (tmp_path / "config" / "outbound.ini").write_text("[main]\nmaxTempFailures=1000\n")
    config = load_config(tmp_path / "config")
    now = time.time()
    for step in config.outbound.temp_fail_intervals:
        datetime.datetime.fromtimestamp(now + step, datetime.UTC).isoformat()  # no OverflowError
