"""Acceptance: a plugin's delay is a time the queue can keep and show.

``delay(float("nan"))`` from ``send_email`` postponed the message to "now"
hundreds of times a second (a hot loop filling the log), and
``delay(float("inf"))`` or ``delay(1e15)`` stored a retry time that
``outboundctl list`` then died on with a traceback.  A delay is bad plugin
input like any other: the plugin's hook fails, naming it, and the queue
stays readable.
"""

from __future__ import annotations

import json
import math

import pytest

from outboundd.hooks import MAX_DELAY_SECONDS, HookResult, ResultCode, delay, denysoft
from tests.harness import running, submit
from tests.test_ctl import ctl
from tests.test_e2e_delivery import SENDER, World, world

__all__ = ["world"]  # the fixture is used by name below

PLUGIN = """
from outboundd.hooks import delay


async def send_email(hmail):
    local = hmail.rcpt_to[0].split("@")[0]
    if local.startswith("d"):
        return delay(float(local[1:]))
"""


@pytest.mark.parametrize("seconds", [math.nan, math.inf, -math.inf, -1.0, 1e15])
def test_a_delay_outside_zero_to_a_year_is_refused(seconds: float) -> None:
    with pytest.raises(ValueError, match="delay must be a number of seconds"):
        delay(seconds)
    with pytest.raises(ValueError, match="delay must be a number of seconds"):
        denysoft(seconds)
    with pytest.raises(ValueError):
        HookResult(ResultCode.DELAY, delay_seconds=seconds)


def test_a_delay_of_a_year_is_kept() -> None:
    assert delay(MAX_DELAY_SECONDS).delay_seconds == MAX_DELAY_SECONDS
    assert denysoft(0).delay_seconds == 0.0


async def test_a_bad_plugin_delay_fails_the_hook_and_the_queue_stays_readable(
    world: World,
) -> None:
    config = world.config()
    (config / "plugins").write_text("delayer\n")
    (world.tmp / "plugins").mkdir()
    (world.tmp / "plugins" / "delayer.py").write_text(PLUGIN)
    async with running(config) as d:
        ids = [await submit(d.smtp_port, SENDER, [f"d{v}@dest.test"]) for v in ("nan", "inf")]
        ids.append(await submit(d.smtp_port, SENDER, ["d1e15@dest.test"]))
        for qid in ids:
            line = await d.wait_for(rf'uuid={qid}.*message="send_email hook failed"')
            assert "plugin=delayer" in line and "delay must be a number of seconds" in line
            await d.wait_for_status(qid, "deferred")
        listing = await ctl(config, "list", "--json")
        assert listing.code == 0, listing.err
        assert {entry["queue_id"] for entry in json.loads(listing.out)} == set(ids)
        plain = await ctl(config, "list")
        assert plain.code == 0 and "Traceback" not in plain.err, plain.err
        for qid in ids:
            shown = await ctl(config, "show", qid, "--json")
            assert shown.code == 0, shown.err
    postponed = [line for line in d.lines if "postponed by plugin" in line]
    assert postponed == []
    assert not [line for line in d.lines if "Traceback" in line]
