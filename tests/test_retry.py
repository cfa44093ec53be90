"""The retry schedule, as pure functions and under a frozen clock."""

from __future__ import annotations

import time

import pytest
from freezegun import freeze_time

from outboundd.delivery.retry import next_attempt_at, retry_delay

HARAKA_DEFAULT = [2 ** (i + 5) for i in range(1, 13)]


def test_default_schedule_gives_up_after_thirteen_failures() -> None:
    delays = [retry_delay(n, HARAKA_DEFAULT) for n in range(1, 14)]
    assert delays[:12] == [64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0,
                           16384.0, 32768.0, 65536.0, 131072.0]  # fmt: skip
    assert delays[12] is None


def test_custom_and_empty_schedules() -> None:
    assert [retry_delay(n, [10, 60, 60]) for n in (1, 2, 3, 4)] == [10.0, 60.0, 60.0, None]
    assert retry_delay(1, []) is None  # "none": the first temporary failure bounces


def test_failure_count_starts_at_one() -> None:
    with pytest.raises(ValueError):
        retry_delay(0, [10])


def test_next_attempt_under_frozen_clock() -> None:
    with freeze_time("2026-11-24 10:00:00"):
        now = time.time()
        assert next_attempt_at(2, HARAKA_DEFAULT, now) == now + 128
        assert next_attempt_at(13, HARAKA_DEFAULT, now) is None
