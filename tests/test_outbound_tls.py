"""Outbound TLS and AUTH as configured: ``outbound.ini``/``tls.ini`` through the engine.

The session tests (test_session.py) drive ``deliver_job`` with settings
made by hand; these go the way an operator does: the config directory is
read by the real loader, mail is routed by the loopback DNS server (or a
``get_mx`` plugin) to scripted MX hosts with trustme certificates, and the
outcome is read from the ``deliveries`` and ``attempts`` views.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from outboundd.hooks import MX, HookResult, ok
from tests import certs
from tests.delivery_rig import Rig, delivery_rig
from tests.dnsserver import DNSServer
from tests.mxserver import MXScript, MXServer, mx_server


@dataclass
class World:
    rig: Rig
    mx: MXServer  # 127.0.0.2: mx.dest.test (preference 10)
    backup: MXServer  # 127.0.0.3: mx2.dest.test (preference 20)
    other: MXServer  # 127.0.0.4: mx.other.test


@contextlib.asynccontextmanager
async def world(
    dns: DNSServer,
    tmp: Path,
    pki: certs.TestPKI,
    *,
    mx: MXScript | None = None,
    tls_ini: str = "",
    **outbound: object,
) -> AsyncIterator[World]:
    """dest.test → mx (TLS offered unless ``mx`` says otherwise), backup; other.test → other."""
    dns.zones.update(
        {
            "dest.test": {"MX": [(10, "mx.dest.test"), (20, "mx2.dest.test")]},
            "mx.dest.test": {"A": ["127.0.0.2"]},
            "mx2.dest.test": {"A": ["127.0.0.3"]},
            "other.test": {"MX": [(10, "mx.other.test")]},
            "mx.other.test": {"A": ["127.0.0.4"]},
        }
    )
    extra: Mapping[str, str] = {"tls.ini": tls_ini} if tls_ini else {}
    async with contextlib.AsyncExitStack() as stack:
        main = await stack.enter_async_context(
            mx_server(mx or MXScript(tls=pki, hostname="mx.dest.test"), host="127.0.0.2")
        )
        backup = await stack.enter_async_context(
            mx_server(MXScript(tls=pki, hostname="mx2.dest.test"), host="127.0.0.3", port=main.port)
        )
        other = await stack.enter_async_context(
            mx_server(MXScript(hostname="mx.other.test"), host="127.0.0.4", port=main.port)
        )
        rig = await stack.enter_async_context(
            delivery_rig(tmp, dns, mx_port=main.port, outbound=outbound, extra_files=extra)
        )
        yield World(rig, main, backup, other)


# ---------------------------------------------------------------- STARTTLS


async def test_starttls_to_the_mx_is_used_and_recorded(
    dns_server: DNSServer, tmp_path: Path, pki: certs.TestPKI
) -> None:
    async with world(dns_server, tmp_path, pki, tls_ini="[outbound]\nminVersion=TLSv1.3\n") as w:
        qid = await w.rig.send("bob@dest.test")
        await w.rig.run_once()
        assert w.rig.deliveries(qid)["bob@dest.test"][0] == "delivered"
        [row] = w.rig.attempts(qid)
        assert row == ("bob@dest.test", 1, "mx.dest.test", "127.0.0.2", "TLSv1.3", None,
                       "delivered")  # fmt: skip
    assert w.mx.commands[:3] == ["EHLO", "STARTTLS", "EHLO"]
    assert w.mx.transactions[0].tls == "TLSv1.3"


async def test_failed_handshake_falls_back_to_plaintext_on_the_same_host(
    dns_server: DNSServer, tmp_path: Path, pki: certs.TestPKI
) -> None:
    broken = MXScript(tls=pki, tls_broken=True, hostname="mx.dest.test")
    async with world(dns_server, tmp_path, pki, mx=broken) as w:
        qid = await w.rig.send("bob@dest.test")
        await w.rig.run_once()
        [row] = w.rig.attempts(qid)
        assert row[2:] == ("mx.dest.test", "127.0.0.2", None, None, "delivered")
    # The same host again, in plaintext: not the backup MX, and no failure counted.
    assert w.mx.connections == 2 and w.mx.commands.count("STARTTLS") == 1
    assert w.mx.transactions[0].tls is None
    assert w.backup.connections == 0


@pytest.mark.parametrize(
    "tls_ini",
    [
        "[outbound]\nforce_tls=true\n",
        "[outbound]\nforce_tls_hosts=mx.dest.test,mx2.dest.test\n",
        "[outbound]\nforce_tls_hosts[]=MX.Dest.Test\nforce_tls_hosts[]=mx2.dest.test\n",
        "[outbound]\nforce_tls_hosts=127.0.0.0/30, 127.0.0.3\n",
    ],
    ids=["force_tls", "by-name", "list-any-case", "by-cidr-and-ip"],
)
async def test_required_tls_that_fails_defers_4_7_10_and_sends_nothing(
    dns_server: DNSServer, tmp_path: Path, pki: certs.TestPKI, tls_ini: str
) -> None:
    """Both dest.test hosts: the first without STARTTLS, the second with a broken handshake."""
    async with world(
        dns_server, tmp_path, pki, mx=MXScript(hostname="mx.dest.test"), tls_ini=tls_ini
    ) as w:
        w.backup.script = MXScript(tls=pki, tls_broken=True, hostname="mx2.dest.test")
        qid = await w.rig.send("bob@dest.test")
        await w.rig.run_once()
        status, _code, enhanced, response = w.rig.deliveries(qid)["bob@dest.test"]
        assert (status, enhanced) == ("deferred", "4.7.10"), response
        assert "TLS" in response and "required" in response
        assert [r[-1] for r in w.rig.attempts(qid)] == ["deferred"]
    for mx in (w.mx, w.backup):
        assert "MAIL" not in mx.commands and mx.transactions == []
    assert w.backup.connections == 1  # no plaintext retry of a host that requires TLS


async def test_starttls_refused_by_a_host_that_requires_tls_defers(
    dns_server: DNSServer, tmp_path: Path, pki: certs.TestPKI
) -> None:
    """A 454 to STARTTLS leaves a plaintext session, which force_tls does not accept."""
    refusing = MXScript(tls=pki, starttls="454 4.7.0 TLS not available", hostname="mx.dest.test")
    async with world(
        dns_server, tmp_path, pki, mx=refusing, tls_ini="[outbound]\nforce_tls=true\n"
    ) as w:
        w.backup.script = refusing
        qid = await w.rig.send("bob@dest.test")
        await w.rig.run_once()
        status, _code, enhanced, response = w.rig.deliveries(qid)["bob@dest.test"]
        assert (status, enhanced) == ("deferred", "4.7.10") and "454" in response
    assert "MAIL" not in w.mx.commands and "MAIL" not in w.backup.commands


async def test_force_tls_hosts_leave_other_hosts_opportunistic(
    dns_server: DNSServer, tmp_path: Path, pki: certs.TestPKI
) -> None:
    tls_ini = "[outbound]\nforce_tls_hosts=mx.dest.test\n"
    async with world(dns_server, tmp_path, pki, tls_ini=tls_ini) as w:
        qid = await w.rig.send("bob@dest.test", "carol@other.test")
        await w.rig.run_once()
        rows = w.rig.deliveries(qid)
        assert rows["bob@dest.test"][0] == rows["carol@other.test"][0] == "delivered"
        tls = {r[0]: r[4] for r in w.rig.attempts(qid)}
        assert tls["bob@dest.test"] is not None and tls["carol@other.test"] is None
    assert "STARTTLS" not in w.other.commands  # it offers none, and that is fine for it


@pytest.mark.parametrize(
    ("tls_ini", "outbound"),
    [
        ("[outbound]\nno_tls_hosts=mx.dest.test\n", {}),
        ("[outbound]\nno_tls_hosts=127.0.0.2\n", {}),
        ("", {"enable_tls": "false"}),
    ],
    ids=["no_tls_hosts-name", "no_tls_hosts-ip", "enable_tls-false"],
)
async def test_starttls_is_not_tried_where_configured_off(
    dns_server: DNSServer,
    tmp_path: Path,
    pki: certs.TestPKI,
    tls_ini: str,
    outbound: dict[str, Any],
) -> None:
    async with world(dns_server, tmp_path, pki, tls_ini=tls_ini, **outbound) as w:
        qid = await w.rig.send("bob@dest.test")
        await w.rig.run_once()
        [row] = w.rig.attempts(qid)
        assert row[2:] == ("mx.dest.test", "127.0.0.2", None, None, "delivered")
    assert "STARTTLS" not in w.mx.commands and w.mx.transactions[0].tls is None


async def test_unverified_certificate_with_reject_unauthorized(
    dns_server: DNSServer, tmp_path: Path, pki: certs.TestPKI
) -> None:
    """The MX's CA is not trusted: opportunistic TLS falls back to plaintext;
    with TLS required the recipient is deferred 4.7.10 instead."""
    tls_ini = "[outbound]\nrejectUnauthorized=true\nforce_tls_hosts=mx.other.test\n"
    async with world(dns_server, tmp_path, pki, tls_ini=tls_ini) as w:
        w.other.script = MXScript(tls=pki, hostname="mx.other.test")
        qid = await w.rig.send("bob@dest.test", "carol@other.test")
        await w.rig.run_once()
        rows = w.rig.deliveries(qid)
        assert rows["bob@dest.test"][0] == "delivered"
        assert (rows["carol@other.test"][0], rows["carol@other.test"][2]) == ("deferred", "4.7.10")
        assert "certificate" in rows["carol@other.test"][3].lower()
    assert w.mx.transactions[0].tls is None and w.other.transactions == []


# ---------------------------------------------------------------- AUTH to a plugin's MX


def route_with_credentials(mx: MXServer, password: str, **options: Any) -> Any:
    async def get_mx(hmail: Any, domain: str) -> HookResult:
        return ok(
            MX("127.0.0.2", port=mx.port, auth_user="relayuser", auth_pass=password, **options)
        )

    return get_mx


async def test_auth_to_a_plugin_mx_over_tls(
    dns_server: DNSServer, tmp_path: Path, pki: certs.TestPKI
) -> None:
    script = MXScript(tls=pki, hostname="mx.dest.test", credentials={"relayuser": "s3cret"})
    async with world(dns_server, tmp_path, pki, mx=script) as w:
        w.rig.hooks.add("smarthost", "get_mx", route_with_credentials(w.mx, "s3cret"))
        qid = await w.rig.send("bob@dest.test")
        await w.rig.run_once()
        [row] = w.rig.attempts(qid)
        assert row[4] is not None and row[5:] == ("PLAIN relayuser", "delivered")
    assert w.mx.transactions[0].auth_user == "relayuser"
    assert w.mx.commands.index("STARTTLS") < w.mx.commands.index("AUTH")


async def test_credentials_are_never_sent_in_plaintext(
    dns_server: DNSServer, tmp_path: Path, pki: certs.TestPKI
) -> None:
    """An MX that offers AUTH but no STARTTLS gets no AUTH: the mail waits, 4.7.10."""
    script = MXScript(
        hostname="mx.dest.test", credentials={"relayuser": "s3cret"}, auth_require_tls=False
    )
    async with world(dns_server, tmp_path, pki, mx=script) as w:
        w.rig.hooks.add("smarthost", "get_mx", route_with_credentials(w.mx, "s3cret"))
        qid = await w.rig.send("bob@dest.test")
        await w.rig.run_once()
        status, _code, enhanced, response = w.rig.deliveries(qid)["bob@dest.test"]
        assert (status, enhanced) == ("deferred", "4.7.10") and "without TLS" in response
    assert "AUTH" not in w.mx.commands and w.mx.transactions == []


async def test_refused_auth_defers_and_sends_no_mail(
    dns_server: DNSServer, tmp_path: Path, pki: certs.TestPKI
) -> None:
    script = MXScript(tls=pki, hostname="mx.dest.test", credentials={"relayuser": "s3cret"})
    async with world(dns_server, tmp_path, pki, mx=script) as w:
        w.rig.hooks.add("smarthost", "get_mx", route_with_credentials(w.mx, "wrong"))
        qid = await w.rig.send("bob@dest.test")
        await w.rig.run_once()
        status, code, enhanced, response = w.rig.deliveries(qid)["bob@dest.test"]
        # Our credentials are wrong, not the recipient: defer for the operator to fix.
        # The record keeps the server's refusal as sent (code 535, its text).
        assert status == "deferred" and enhanced is not None and enhanced.startswith("4.")
        assert (code, response) == (535, "Authentication credentials invalid")
        assert w.rig.dsn_count() == 0
    assert "MAIL" not in w.mx.commands and w.mx.transactions == []


@pytest.mark.parametrize(
    ("key", "mx_offers_tls"), [("force_tls_hosts", False), ("no_tls_hosts", True)]
)
async def test_tls_host_lists_name_internationalised_hosts_in_either_form(
    dns_server: DNSServer, tmp_path: Path, pki: certs.TestPKI, key: str, mx_offers_tls: bool
) -> None:
    """The MX host name is compared in A-label form, so a U-label entry must match it too:
    otherwise ``force_tls_hosts=mx.bücher.test`` would silently allow plaintext."""
    dns_server.zones.update(
        {"bücher.test": {"MX": [(10, "mx.bücher.test")]}, "mx.bücher.test": {"A": ["127.0.0.2"]}}
    )
    script = MXScript(tls=pki if mx_offers_tls else None, hostname="mx.xn--bcher-kva.test")
    async with world(
        dns_server, tmp_path, pki, mx=script, tls_ini=f"[outbound]\n{key}=MX.Bücher.test\n"
    ) as w:
        qid = await w.rig.send("bob@xn--bcher-kva.test")
        await w.rig.run_once()
        status, _code, enhanced, _response = w.rig.deliveries(qid)["bob@xn--bcher-kva.test"]
        if key == "force_tls_hosts":
            assert (status, enhanced) == ("deferred", "4.7.10")
            assert w.mx.transactions == []
        else:
            assert status == "delivered" and "STARTTLS" not in w.mx.commands
