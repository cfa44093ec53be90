"""MTA-STS and DANE end to end on loopback: DNS, the policy web server, the MX, the record.

The loopback DNS server serves the ``_mta-sts`` TXT record, TLSA records
and the AD bit (as a validating resolver would); a local HTTPS server with
a trustme certificate serves the policy (its CA handed to the relay by
``mta_sts_ca_file``, its port by ``mta_sts_port``); the scripted MX
presents a matching, an expired or a wrong-name certificate.  Each outcome
is checked at the MX (what it received) and in the ``attempts`` view.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from outboundd.delivery.mx import MXTarget
from outboundd.delivery.tlslookup import TlsPolicyOptions, TlsPolicySource
from outboundd.delivery.tlspolicy import TargetPolicy
from outboundd.hooks import MX
from outboundd.spool import Spool, StoredStsPolicy
from tests import certs
from tests.delivery_rig import Rig, delivery_rig
from tests.dnsserver import SERVFAIL, DNSServer
from tests.httpsserver import PolicyServer
from tests.mxserver import MXScript, MXServer, mx_server

ENFORCE = "version: STSv1\nmode: enforce\nmx: mx.dest.test\nmax_age: 86400\n"
TESTING = ENFORCE.replace("enforce", "testing")
NOW = datetime.datetime.now(datetime.UTC)


@dataclass
class World:
    rig: Rig
    mx: MXServer
    web: PolicyServer
    dns: DNSServer

    @property
    def tlsa_name(self) -> str:
        return f"_{self.mx.port}._tcp.mx.dest.test"

    def policy_rows(self, qid: str) -> list[tuple[Any, ...]]:
        """(tls_policy, tls_policy_met, outcome, status) per attempt."""
        return self.rig._query(
            "SELECT tls_policy, tls_policy_met, outcome, status FROM attempts "
            "WHERE queue_id = ? ORDER BY attempt",
            (qid,),
        )

    def set_tlsa(self, *records: str, ad: bool = True) -> None:
        self.dns.zones[self.tlsa_name] = {"TLSA": list(records), "AD": ad}


def server_context(leaf: trustme.LeafCert) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    leaf.configure_cert(ctx)
    return ctx


def issue(ca: trustme.CA, name: str = "mx.dest.test", *, expired: bool = False) -> trustme.LeafCert:
    if not expired:
        return ca.issue_cert(name)
    return ca.issue_cert(
        name,
        not_before=NOW - datetime.timedelta(days=30),
        not_after=NOW - datetime.timedelta(days=1),
    )


def tlsa_text(pem: bytes, usage: int = 3, selector: int = 1) -> str:
    cert = x509.load_pem_x509_certificate(pem)
    data = (
        cert.public_bytes(Encoding.DER)
        if selector == 0
        else cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    )
    return f"{usage} {selector} 1 {hashlib.sha256(data).hexdigest()}"


@contextlib.asynccontextmanager
async def world(
    dns: DNSServer,
    tmp: Path,
    pki: certs.TestPKI,
    leaf: trustme.LeafCert | None,
    *,
    policy: str | None = ENFORCE,
    **outbound: object,
) -> AsyncIterator[World]:
    """dest.test → mx.dest.test (127.0.0.2) presenting ``leaf`` (None: no STARTTLS)."""
    dns.zones.update(
        {
            "dest.test": {"MX": [(10, "mx.dest.test")]},
            "mx.dest.test": {"A": ["127.0.0.2"]},
            "mta-sts.dest.test": {"A": ["127.0.0.1"]},
        }
    )
    if policy is not None:
        dns.zones["_mta-sts.dest.test"] = {"TXT": ["v=STSv1; id=1"], "TTL": 0}
    script = MXScript(tls=server_context(leaf) if leaf else None, hostname="mx.dest.test")
    async with contextlib.AsyncExitStack() as stack:
        web = await stack.enter_async_context(PolicyServer(pki.ca, "dest.test", policy or ""))
        mx = await stack.enter_async_context(mx_server(script, host="127.0.0.2"))
        settings: dict[str, object] = {
            "mta_sts_port": web.port,
            "mta_sts_ca_file": str(pki.ca_pem),
            "mta_sts_timeout": 3,
        }
        settings.update(outbound)
        rig = await stack.enter_async_context(
            delivery_rig(tmp, dns, mx_port=mx.port, outbound=settings)
        )
        yield World(rig, mx, web, dns)


async def send_one(w: World) -> tuple[str, tuple[Any, ...]]:
    qid = await w.rig.send("bob@dest.test")
    await w.rig.run_once()
    return qid, w.rig.deliveries(qid)["bob@dest.test"]


# ------------------------------------------------------------------ MTA-STS


async def test_enforce_delivers_over_verified_tls_and_caches_the_policy_in_the_spool(
    dns_server: DNSServer, tmp_path: Path, pki: certs.TestPKI
) -> None:
    async with world(dns_server, tmp_path, pki, issue(pki.ca)) as w:
        qid, delivery = await send_one(w)
        assert delivery[0] == "delivered", delivery
        assert w.policy_rows(qid) == [("mta-sts", 1, "delivered", "2.0.0")]
        assert w.web.requests == ["/.well-known/mta-sts.txt"]
        assert w.web.hosts == [f"mta-sts.dest.test:{w.web.port}"]
        stored = await w.rig.spool.get_sts_policy("dest.test")
        assert stored is not None
        assert (stored.policy_id, stored.mode, stored.mx, stored.max_age) == (
            "1", "enforce", ("mx.dest.test",), 86400,
        )  # fmt: skip
        assert stored.expires_at == pytest.approx(stored.fetched_at + 86400)
        # The same id: the cached policy, no second fetch.
        qid2, delivery2 = await send_one(w)
        assert delivery2[0] == "delivered"
        assert w.policy_rows(qid2) == [("mta-sts", 1, "delivered", "2.0.0")]
        assert w.web.requests == ["/.well-known/mta-sts.txt"]
    assert [t.tls for t in w.mx.transactions] == ["TLSv1.3", "TLSv1.3"]


@pytest.mark.parametrize("problem", ["expired", "wrong-name"])
async def test_enforce_defers_4_7_5_when_the_certificate_is_not_valid(
    dns_server: DNSServer, tmp_path: Path, pki: certs.TestPKI, problem: str
) -> None:
    leaf = issue(pki.ca, expired=True) if problem == "expired" else issue(pki.ca, "mx.other.test")
    async with world(dns_server, tmp_path, pki, leaf) as w:
        qid, (status, _code, enhanced, response) = await send_one(w)
        assert (status, enhanced) == ("deferred", "4.7.5"), response
        assert "mta-sts policy" in response and "certificate" in response.lower()
        assert w.policy_rows(qid) == [("mta-sts", 0, "deferred", "4.7.5")]
    assert w.mx.transactions == [] and "MAIL" not in w.mx.commands
    assert w.mx.connections == 1  # no plaintext retry


async def test_enforce_refuses_an_mx_outside_the_policy_without_connecting(
    dns_server: DNSServer, tmp_path: Path, pki: certs.TestPKI
) -> None:
    elsewhere = ENFORCE.replace("mx: mx.dest.test", "mx: *.elsewhere.test")
    async with world(dns_server, tmp_path, pki, issue(pki.ca), policy=elsewhere) as w:
        qid, (status, _code, enhanced, response) = await send_one(w)
        assert (status, enhanced) == ("deferred", "4.7.5")
        assert "does not match the MTA-STS policy of dest.test" in response
        assert w.policy_rows(qid) == [("mta-sts", 0, "deferred", "4.7.5")]
    assert w.mx.connections == 0


async def test_testing_mode_delivers_anyway_and_records_the_policy_as_not_met(
    dns_server: DNSServer, tmp_path: Path, pki: certs.TestPKI, capsys: pytest.CaptureFixture[str]
) -> None:
    async with world(
        dns_server, tmp_path, pki, issue(pki.ca, "mx.other.test"), policy=TESTING
    ) as w:
        qid, delivery = await send_one(w)
        assert delivery[0] == "delivered"
        assert w.policy_rows(qid) == [("mta-sts", 0, "delivered", "2.0.0")]
    # The verified handshake failed; the fallback connection still used TLS.
    assert w.mx.connections == 2 and w.mx.transactions[0].tls == "TLSv1.3"
    out = capsys.readouterr().out
    assert "[WARN]" in out and "delivered although the TLS policy was not met" in out
    assert "policy=mta-sts" in out


async def test_a_policy_fetch_that_times_out_leaves_opportunistic_tls(
    dns_server: DNSServer, tmp_path: Path, pki: certs.TestPKI
) -> None:
    leaf = issue(pki.ca, "mx.other.test")
    async with world(dns_server, tmp_path, pki, leaf, mta_sts_timeout=0.5) as w:
        w.web.silent = True
        started = time.monotonic()
        qid, delivery = await send_one(w)
        assert time.monotonic() - started < 3
        assert delivery[0] == "delivered"
        assert w.policy_rows(qid) == [("opportunistic", 1, "delivered", "2.0.0")]
        assert w.web.requests == ["/.well-known/mta-sts.txt"]
        assert await w.rig.spool.get_sts_policy("dest.test") is None


async def test_a_failed_fetch_keeps_using_the_cached_policy(
    dns_server: DNSServer, tmp_path: Path, pki: certs.TestPKI
) -> None:
    """The TXT id changed, the new policy cannot be fetched: the unexpired cached one applies."""
    leaf = issue(pki.ca, "mx.other.test")
    async with world(dns_server, tmp_path, pki, leaf, mta_sts_timeout=0.5) as w:
        now = time.time()
        old = StoredStsPolicy(
            "dest.test", "0", "enforce", ("mx.dest.test",), 86400, now, now + 86400
        )
        await w.rig.spool.put_sts_policy(old)
        w.web.silent = True
        qid, (status, _code, enhanced, _response) = await send_one(w)
        assert (status, enhanced) == ("deferred", "4.7.5")
        assert w.policy_rows(qid) == [("mta-sts", 0, "deferred", "4.7.5")]
        assert w.web.requests == ["/.well-known/mta-sts.txt"]
        assert await w.rig.spool.get_sts_policy("dest.test") == old
    assert w.mx.transactions == []


async def test_a_new_txt_id_or_an_expired_policy_fetches_again(
    dns_server: DNSServer, tmp_path: Path, pki: certs.TestPKI
) -> None:
    async with world(dns_server, tmp_path, pki, issue(pki.ca, "mx.other.test")) as w:
        now = time.time()
        expired = StoredStsPolicy("dest.test", "1", "none", (), 60, now - 120, now - 60)
        await w.rig.spool.put_sts_policy(expired)
        _qid, (status, *_rest) = await send_one(w)
        assert status == "deferred"  # the fetched policy enforces; the cert names another host
        assert len(w.web.requests) == 1
        # A new id announces a new policy: fetched at once, and it applies.
        w.dns.zones["_mta-sts.dest.test"] = {"TXT": ["v=STSv1; id=2"], "TTL": 0}
        w.web.body = TESTING
        qid2, (status2, *_rest) = await send_one(w)
        assert status2 == "delivered"
        assert len(w.web.requests) == 2
        stored = await w.rig.spool.get_sts_policy("dest.test")
        assert stored is not None and (stored.policy_id, stored.mode) == ("2", "testing")
        assert w.policy_rows(qid2) == [("mta-sts", 0, "delivered", "2.0.0")]


# --------------------------------------------------------------------- DANE


async def test_dane_ee_pins_the_key_and_wins_over_mta_sts(
    dns_server: DNSServer, tmp_path: Path, pki: certs.TestPKI
) -> None:
    """An expired certificate for another name: MTA-STS would refuse it, DANE-EE takes it."""
    leaf = issue(pki.ca, "mx.other.test", expired=True)
    async with world(dns_server, tmp_path, pki, leaf) as w:
        w.set_tlsa(tlsa_text(leaf.cert_chain_pems[0].bytes()))
        qid, delivery = await send_one(w)
        assert delivery[0] == "delivered", delivery
        assert w.policy_rows(qid) == [("dane", 1, "delivered", "2.0.0")]
    assert w.mx.transactions[0].tls == "TLSv1.3"


async def test_dane_mismatch_defers_4_7_5_and_sends_nothing(
    dns_server: DNSServer, tmp_path: Path, pki: certs.TestPKI
) -> None:
    leaf = issue(pki.ca)
    other = issue(pki.ca)
    async with world(dns_server, tmp_path, pki, leaf, policy=None) as w:
        w.set_tlsa(tlsa_text(other.cert_chain_pems[0].bytes()))
        qid, (status, _code, enhanced, response) = await send_one(w)
        assert (status, enhanced) == ("deferred", "4.7.5")
        assert "dane policy not met" in response and "DANE-EE" in response
        assert w.policy_rows(qid) == [("dane", 0, "deferred", "4.7.5")]
    assert "STARTTLS" in w.mx.commands and "MAIL" not in w.mx.commands
    assert w.mx.transactions == []


@pytest.mark.parametrize(("name", "delivered"), [("mx.dest.test", True), ("mx.other.test", False)])
async def test_dane_ta_needs_the_chain_to_the_anchor_and_the_mx_name(
    dns_server: DNSServer, tmp_path: Path, pki: certs.TestPKI, name: str, delivered: bool
) -> None:
    intermediate = pki.ca.create_child_ca()
    leaf = intermediate.issue_cert(name)
    async with world(dns_server, tmp_path, pki, leaf, policy=None) as w:
        w.set_tlsa(tlsa_text(intermediate.cert_pem.bytes(), usage=2, selector=0))
        qid, (status, _code, enhanced, response) = await send_one(w)
        if delivered:
            assert status == "delivered", response
            assert w.policy_rows(qid) == [("dane", 1, "delivered", "2.0.0")]
        else:
            assert (status, enhanced) == ("deferred", "4.7.5")
            assert "not valid for that name" in response
            assert w.policy_rows(qid) == [("dane", 0, "deferred", "4.7.5")]
    assert len(w.mx.transactions) == int(delivered)


async def test_tlsa_records_without_the_ad_bit_are_ignored(
    dns_server: DNSServer, tmp_path: Path, pki: certs.TestPKI
) -> None:
    leaf = issue(pki.ca, "mx.other.test")
    async with world(dns_server, tmp_path, pki, leaf, policy=None) as w:
        w.set_tlsa("3 1 1 " + "00" * 32, ad=False)  # would not match: proves it is unused
        qid, delivery = await send_one(w)
        assert delivery[0] == "delivered"
        assert w.policy_rows(qid) == [("opportunistic", 1, "delivered", "2.0.0")]
        assert w.dns.count(w.tlsa_name, "TLSA") == 1


@pytest.mark.parametrize("signed", [True, False])
async def test_a_failed_tlsa_lookup_defers_only_in_a_signed_zone(
    dns_server: DNSServer, tmp_path: Path, pki: certs.TestPKI, signed: bool
) -> None:
    async with world(dns_server, tmp_path, pki, issue(pki.ca), policy=None) as w:
        w.dns.zones[w.tlsa_name] = {"TLSA": SERVFAIL}
        w.dns.zones["mx.dest.test"] = {"A": ["127.0.0.2"], "AD": signed}
        qid, (status, _code, enhanced, response) = await send_one(w)
        if signed:
            assert (status, enhanced) == ("deferred", "4.7.5")
            assert "TLSA lookup for mx.dest.test failed in a signed zone" in response
            assert w.policy_rows(qid) == [("dane", 0, "deferred", "4.7.5")]
            assert w.mx.connections == 0
        else:
            assert status == "delivered"
            assert w.policy_rows(qid) == [("opportunistic", 1, "delivered", "2.0.0")]


@pytest.mark.parametrize("refused", [False, True], ids=["not-offered", "refused-454"])
async def test_dane_requires_starttls(
    dns_server: DNSServer, tmp_path: Path, pki: certs.TestPKI, refused: bool
) -> None:
    async with world(
        dns_server, tmp_path, pki, issue(pki.ca) if refused else None, policy=None
    ) as w:
        if refused:
            w.mx.script.starttls = "454 4.7.0 TLS not available"
        w.set_tlsa("3 1 1 " + "00" * 32)
        qid, (status, _code, enhanced, response) = await send_one(w)
        assert (status, enhanced) == ("deferred", "4.7.5")
        assert ("refused STARTTLS" if refused else "does not offer STARTTLS") in response
        assert w.policy_rows(qid) == [("dane", 0, "deferred", "4.7.5")]
    assert "MAIL" not in w.mx.commands


async def test_switched_off_no_policy_is_looked_up(
    dns_server: DNSServer, tmp_path: Path, pki: certs.TestPKI
) -> None:
    leaf = issue(pki.ca, "mx.other.test")
    async with world(dns_server, tmp_path, pki, leaf, mta_sts="false", dane="false") as w:
        w.set_tlsa("3 1 1 " + "00" * 32)
        qid, delivery = await send_one(w)
        assert delivery[0] == "delivered"
        assert w.policy_rows(qid) == [("opportunistic", 1, "delivered", "2.0.0")]
        assert w.dns.count("_mta-sts.dest.test", "TXT") == 0
        assert w.dns.count(w.tlsa_name, "TLSA") == 0
    assert w.web.requests == []


async def test_a_kept_connection_is_not_reused_once_a_policy_applies(
    dns_server: DNSServer, tmp_path: Path, pki: certs.TestPKI
) -> None:
    """The pool keys connections by policy: a DANE host gets a new, checked connection."""
    leaf = issue(pki.ca)
    dns_server.negative_ttl = 0  # the "no TLSA record" answer is not cached
    async with world(dns_server, tmp_path, pki, leaf, policy=None, pool_idle_timeout=30) as w:
        qid, delivery = await send_one(w)
        assert delivery[0] == "delivered"
        assert w.policy_rows(qid) == [("opportunistic", 1, "delivered", "2.0.0")]
        assert w.rig.engine.pool.idle == 1
        w.set_tlsa("3 1 1 " + "00" * 32)
        qid2, (status, _code, enhanced, _response) = await send_one(w)
        assert (status, enhanced) == ("deferred", "4.7.5")
        assert w.policy_rows(qid2) == [("dane", 0, "deferred", "4.7.5")]
    assert w.mx.connections == 2 and len(w.mx.transactions) == 1


# ------------------------------------------------- the policy source alone


@contextlib.asynccontextmanager
async def source(
    dns: DNSServer, tmp: Path, pki: certs.TestPKI, body: str = ENFORCE
) -> AsyncIterator[tuple[TlsPolicySource, PolicyServer, TlsPolicyOptions]]:
    dns.zones.update(
        {
            "_mta-sts.dest.test": {"TXT": ["v=STSv1; id=1"]},
            "mta-sts.dest.test": {"A": ["127.0.0.1"]},
        }
    )
    spool = await Spool.open(tmp / "queue")
    try:
        async with PolicyServer(pki.ca, "dest.test", body) as web:
            policies = TlsPolicySource(spool, [dns.nameserver])
            options = TlsPolicyOptions(fetch_timeout=2, https_port=web.port, ca_file=pki.ca_pem)
            try:
                yield policies, web, options
            finally:
                await policies.close()
    finally:
        await spool.close()


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"status": 404}, "HTTP 404"),
        ({"status": 301}, "HTTP 301"),  # redirects are not followed (RFC 8461 §3.3)
        ({"content_type": "text/html"}, "not text/plain"),
        ({"body": "x" * (64 * 1024 + 1)}, "larger than"),
        ({"body": "version: STSv1\nmode: enforce\nmax_age: 60\n"}, "mx pattern"),
    ],
)
async def test_an_unusable_policy_answer_gives_no_policy_and_is_not_refetched_at_once(
    dns_server: DNSServer,
    tmp_path: Path,
    pki: certs.TestPKI,
    capsys: pytest.CaptureFixture[str],
    change: dict[str, Any],
    reason: str,
) -> None:
    async with source(dns_server, tmp_path, pki) as (policies, web, options):
        for key, value in change.items():
            setattr(web, key, value)
        assert await policies.sts_policy("dest.test", options) is None
        assert await policies.sts_policy("dest.test", options) is None
        assert len(web.requests) == 1  # a failed fetch waits a minute
    out = capsys.readouterr().out
    assert "MTA-STS policy fetch failed" in out and reason in out


async def test_a_wrong_certificate_on_the_policy_server_gives_no_policy(
    dns_server: DNSServer, tmp_path: Path, pki: certs.TestPKI
) -> None:
    """The policy server's certificate must verify: here the relay trusts another CA."""
    async with source(dns_server, tmp_path, pki) as (policies, web, options):
        other = certs.make_pki(tmp_path / "other")
        untrusting = TlsPolicyOptions(https_port=web.port, ca_file=other.ca_pem)
        assert await policies.sts_policy("dest.test", untrusting) is None
        assert await policies.sts_policy("other.test", options) is None  # no TXT record
        assert web.requests == []  # the TLS handshake failed before any request


async def test_concurrent_deliveries_share_one_policy_fetch(
    dns_server: DNSServer, tmp_path: Path, pki: certs.TestPKI
) -> None:
    async with source(dns_server, tmp_path, pki) as (policies, web, options):
        found = await asyncio.gather(*(policies.sts_policy("dest.test", options) for _ in range(5)))
        assert all(p is not None and p.mode == "enforce" for p in found)
        assert len(web.requests) == 1


async def test_a_warm_cache_decides_without_dns_or_spool(
    dns_server: DNSServer, tmp_path: Path, pki: certs.TestPKI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hot path: the second delivery to a domain asks nobody (answers cached for their TTL)."""
    target = MXTarget(MX("mx.dest.test"), "127.0.0.2", 25, "mx.dest.test")
    async with source(dns_server, tmp_path, pki) as (policies, web, options):
        [first] = await policies.apply("dest.test", [target], options)
        assert first.tls_policy == TargetPolicy("mta-sts", True)
        queries = dns_server.total_queries()
        assert queries >= 3  # TXT, TLSA, the policy host's A and AAAA

        async def no_spool(*_args: object) -> None:
            raise AssertionError("the spool was asked")

        monkeypatch.setattr(policies.spool, "get_sts_policy", no_spool)
        assert await policies.apply("dest.test", [target], options) == [first]
        assert dns_server.total_queries() == queries
        assert len(web.requests) == 1
