"""The per-class cache of aiosmtpd's introspection changes nothing it builds."""

from __future__ import annotations

import asyncio
import inspect
from typing import Any

import aiosmtpd.smtp
from aiosmtpd.smtp import SMTP

from outboundd.submission import fastinit
from outboundd.submission.handler import SubmissionHandler


class Probe(SMTP):
    async def auth_CUSTOM(self, server: Any, args: list[str]) -> None:
        return None


class ProbeHandler(SubmissionHandler):
    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        return responses


def tables(session: SMTP) -> dict[str, Any]:
    return {
        "auth": {
            k: (getattr(v.method, "__func__", v.method), v.is_builtin)
            for k, v in session._auth_methods.items()
        },
        "hooks": {k: getattr(v, "__func__", v) for k, v in session._handle_hooks.items()},
        "smtp": {k: getattr(v, "__func__", v) for k, v in session._smtp_methods.items()},
        "ehlo": session._ehlo_hook_ver,
    }


async def test_cached_introspection_builds_the_same_tables() -> None:
    loop = asyncio.get_running_loop()
    assert isinstance(aiosmtpd.smtp.inspect, fastinit._InspectShim)
    cached = [tables(Probe(ProbeHandler(), loop=loop)) for _ in range(2)]
    aiosmtpd.smtp.inspect = inspect  # type: ignore[attr-defined]
    del aiosmtpd.smtp.dir  # type: ignore[attr-defined]
    try:
        plain = tables(Probe(ProbeHandler(), loop=loop))
    finally:
        fastinit.install()
    assert cached[0] == plain == cached[1]
    assert "CUSTOM" in plain["auth"] and "EHLO" in plain["hooks"] and "DATA" in plain["smtp"]
