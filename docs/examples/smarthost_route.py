"""Example plugin: route one domain through a smarthost, log deliveries, cap retries.

Put it in ``plugins/smarthost_route.py`` beside your config directory and
add a line ``smarthost_route`` to ``config/plugins``.  The test suite loads
this very file (tests/test_plugins_example.py), so it stays correct.
"""

from __future__ import annotations

from typing import Any

from outboundd.hooks import MX, HookResult, denysoft, ok

SMARTHOST_DOMAINS = {"partner.example"}


async def get_mx(hmail: Any, domain: str) -> HookResult | None:
    """Mail for partner domains goes to the smarthost; everything else to DNS."""
    if domain in SMARTHOST_DOMAINS:
        return ok(MX("127.0.0.1", port=2526, priority=10))
    return None  # continue: the next plugin, then DNS


async def deferred(hmail: Any, info: dict[str, Any]) -> HookResult | None:
    """Greylisting answers come back quickly: retry those after 5 minutes."""
    if "greylist" in str(info.get("err", "")).lower():
        return denysoft(300)
    return None  # keep the normal temp_fail_intervals schedule


async def delivered(hmail: Any, info: dict[str, Any]) -> None:
    """Remember where each message went (a real plugin might post to a webhook)."""
    hmail.notes.setdefault("delivered_via", []).append(info["host"])
