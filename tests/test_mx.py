"""MX resolution against a real DNS server on loopback (tests/dnsserver.py).

Only loopback addresses appear in zone data.  Most resolvers here set
``local_mx_ok=True`` because every address we can serve is loopback; the
filtering itself is tested with ``local_mx_ok=False`` and with the pure
``order_targets`` on literal data (never connected to).
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections import Counter
from typing import Any, NamedTuple

import pytest

from outboundd.delivery.mx import (
    DEFAULT_LMTP_PORT,
    InetPrefer,
    MXResolutionError,
    MXResolver,
    MXTarget,
    gather_local_addresses,
    is_local_address,
    normalize_mx_result,
    order_targets,
)
from outboundd.hooks import MX
from tests import dnsserver
from tests.dnsserver import NXDOMAIN, SERVFAIL, TIMEOUT, DNSServer

# The shared fixture (tests/conftest.py may also provide it).
dns_server = dnsserver.dns_server

NO_LOCAL: frozenset[str] = frozenset()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_resolver(server: DNSServer, **kwargs: Any) -> MXResolver:
    kwargs.setdefault("local_mx_ok", True)
    kwargs.setdefault("local_addresses", NO_LOCAL)
    kwargs.setdefault("timeout", 2.0)
    return MXResolver([server.nameserver], **kwargs)


def hosts(targets: list[MXTarget]) -> list[str]:
    return [t.hostname for t in targets]


def addresses(targets: list[MXTarget]) -> list[str]:
    return [t.address for t in targets]


async def resolve_error(resolver: MXResolver, domain: str) -> MXResolutionError:
    with pytest.raises(MXResolutionError) as info:
        await resolver.resolve(domain)
    return info.value


# ---------------------------------------------------------------- ordering


async def test_mx_sorted_by_preference_with_default_port(dns_server: DNSServer) -> None:
    dns_server.zones.update(
        {
            "example.test": {"MX": [(20, "mx2.example.test"), (10, "mx1.example.test")]},
            "mx1.example.test": {"A": ["127.0.0.2"]},
            "mx2.example.test": {"A": ["127.0.0.3"]},
        }
    )
    targets = await make_resolver(dns_server).resolve("example.test")
    assert hosts(targets) == ["mx1.example.test", "mx2.example.test"]
    assert addresses(targets) == ["127.0.0.2", "127.0.0.3"]
    assert [t.port for t in targets] == [25, 25]
    assert [t.mx.priority for t in targets] == [10, 20]
    assert all(t.mx.from_dns for t in targets)


async def test_mx_port_applied(dns_server: DNSServer) -> None:
    dns_server.zones.update(
        {
            "example.test": {"MX": [(10, "mx1.example.test")]},
            "mx1.example.test": {"A": ["127.0.0.2"]},
        }
    )
    targets = await make_resolver(dns_server, mx_port=2525).resolve("example.test")
    assert [(t.address, t.port) for t in targets] == [("127.0.0.2", 2525)]


def equal_pref_zone() -> dict[str, Any]:
    return {
        "example.test": {"MX": [(10, "mx1.example.test"), (10, "mx2.example.test")]},
        "mx1.example.test": {"A": ["127.0.0.2"]},
        "mx2.example.test": {"A": ["127.0.0.3"]},
    }


async def test_equal_preference_shuffle_is_seeded(dns_server: DNSServer) -> None:
    dns_server.zones.update(equal_pref_zone())
    dns_server.shuffle = True  # answers arrive in varying order; the result must not
    first = make_resolver(dns_server, rng=random.Random(7), cache_size=0)
    second = make_resolver(dns_server, rng=random.Random(7), cache_size=0)
    orders_a = [hosts(await first.resolve("example.test")) for _ in range(20)]
    orders_b = [hosts(await second.resolve("example.test")) for _ in range(20)]
    assert orders_a == orders_b
    assert {tuple(order) for order in orders_a} == {
        ("mx1.example.test", "mx2.example.test"),
        ("mx2.example.test", "mx1.example.test"),
    }


async def test_equal_preference_both_orders_occur_evenly(dns_server: DNSServer) -> None:
    dns_server.zones.update(equal_pref_zone())
    resolver = make_resolver(dns_server, rng=random.Random(12345))
    firsts = Counter([hosts(await resolver.resolve("example.test"))[0] for _ in range(400)])
    # Binomial(400, 0.5): below 140 happens with probability ~1e-9.
    assert firsts["mx1.example.test"] > 140
    assert firsts["mx2.example.test"] > 140
    # The answers came from the cache: the shuffle happens per resolve, not per query.
    assert dns_server.count("example.test", "MX") == 1


def test_shuffle_is_uniform_over_permutations() -> None:
    mxs = [MX(f"127.0.0.{i}", priority=5) for i in (2, 3, 4)]
    rng = random.Random(99)
    seen = Counter(
        tuple(addresses(order_targets(mxs, {}, default_port=25, rng=rng))) for _ in range(6000)
    )
    assert set(seen) == set(itertools.permutations(["127.0.0.2", "127.0.0.3", "127.0.0.4"]))
    # Each of 6 permutations expects 1000; a biased swap-neighbours shuffle fails this.
    assert all(800 < n < 1200 for n in seen.values()), seen


def test_order_targets_never_crosses_preference_levels() -> None:
    mxs = [
        MX("b.test", priority=20, from_dns=True),
        MX("a.test", priority=10, from_dns=True),
        MX("c.test", priority=30, from_dns=True),
    ]
    addrs = {"a.test": ["127.0.0.2"], "b.test": ["::1"], "c.test": ["127.0.0.4"]}
    prefers: tuple[InetPrefer, ...] = ("default", "v4", "v6")
    for prefer in prefers:
        targets = order_targets(mxs, addrs, default_port=25, inet_prefer=prefer, local_mx_ok=True)
        assert addresses(targets) == ["127.0.0.2", "::1", "127.0.0.4"], prefer


# ---------------------------------------------------------------- inet_prefer


def mixed_family_zone() -> dict[str, Any]:
    return {
        "example.test": {"MX": [(10, "mx1.example.test"), (20, "mx2.example.test")]},
        "mx1.example.test": {"A": ["127.0.0.2"], "AAAA": ["::1"]},
        "mx2.example.test": {"A": ["127.0.0.3"]},
    }


@pytest.mark.parametrize(
    ("prefer", "expected"),
    [
        ("default", ["::1", "127.0.0.2", "127.0.0.3"]),
        ("v6", ["::1", "127.0.0.2", "127.0.0.3"]),
        ("v4", ["127.0.0.2", "::1", "127.0.0.3"]),
    ],
)
async def test_inet_prefer_orders_within_a_level(
    dns_server: DNSServer, prefer: str, expected: list[str]
) -> None:
    dns_server.zones.update(mixed_family_zone())
    targets = await make_resolver(dns_server, inet_prefer=prefer).resolve("example.test")
    assert addresses(targets) == expected
    assert hosts(targets) == ["mx1.example.test", "mx1.example.test", "mx2.example.test"]


async def test_inet_prefer_v6_does_not_cross_levels(dns_server: DNSServer) -> None:
    dns_server.zones.update(
        {
            "example.test": {"MX": [(10, "mx1.example.test"), (20, "mx2.example.test")]},
            "mx1.example.test": {"A": ["127.0.0.2"]},
            "mx2.example.test": {"AAAA": ["::1"]},
        }
    )
    targets = await make_resolver(dns_server, inet_prefer="v6").resolve("example.test")
    assert addresses(targets) == ["127.0.0.2", "::1"]


def test_inet_prefer_groups_families_across_hosts_of_one_level() -> None:
    mxs = [MX("a.test", priority=10), MX("b.test", priority=10)]
    addrs = {"a.test": ["127.0.0.2", "::1"], "b.test": ["127.0.0.3", "::ffff:127.0.0.4"]}
    v6 = order_targets(mxs, addrs, default_port=25, inet_prefer="v6", rng=random.Random(1))
    v4 = order_targets(mxs, addrs, default_port=25, inet_prefer="v4", rng=random.Random(1))
    assert [":" in a for a in addresses(v6)] == [True, True, False, False]
    assert [":" in a for a in addresses(v4)] == [False, False, True, True]
    # The host order (same seed) is kept inside each family.
    assert [t.hostname for t in v6[:2]] == [t.hostname for t in v4[:2]]


def test_inet_prefer_rejects_unknown_value() -> None:
    with pytest.raises(ValueError, match="inet_prefer"):
        MXResolver([("127.0.0.1", 53)], inet_prefer="ipv6")  # type: ignore[arg-type]


# ---------------------------------------------------------------- implicit, null, errors


async def test_implicit_mx_on_nodata(dns_server: DNSServer) -> None:
    dns_server.zones["implicit.test"] = {"A": ["127.0.0.4"], "AAAA": ["::1"]}
    targets = await make_resolver(dns_server).resolve("implicit.test")
    assert addresses(targets) == ["::1", "127.0.0.4"]
    assert {t.hostname for t in targets} == {"implicit.test"}
    assert targets[0].mx == MX("implicit.test", priority=0, from_dns=True)


async def test_nxdomain_is_permanent_5_1_2(dns_server: DNSServer) -> None:
    dns_server.zones["nxd.test"] = NXDOMAIN
    error = await resolve_error(make_resolver(dns_server), "nxd.test")
    assert (error.permanent, error.code, error.status) == (True, 550, "5.1.2")
    assert error.message == "no such domain: nxd.test (NXDOMAIN)"
    assert str(error) == error.message


async def test_absent_name_is_nxdomain(dns_server: DNSServer) -> None:
    error = await resolve_error(make_resolver(dns_server), "nowhere.test")
    assert (error.permanent, error.status) == (True, "5.1.2")


async def test_null_mx_is_permanent_5_1_10(dns_server: DNSServer) -> None:
    dns_server.zones["nullmx.test"] = {"MX": [(0, ".")], "A": ["127.0.0.2"]}
    error = await resolve_error(make_resolver(dns_server), "nullmx.test")
    assert (error.permanent, error.code, error.status) == (True, 556, "5.1.10")
    assert error.message == "null MX for nullmx.test: the domain does not accept mail (RFC 7505)"
    assert dns_server.count("nullmx.test", "A") == 0


async def test_root_mixed_with_real_mx_is_ignored(dns_server: DNSServer) -> None:
    dns_server.zones.update(
        {
            "mixed.test": {"MX": [(0, "."), (10, "mx.mixed.test")]},
            "mx.mixed.test": {"A": ["127.0.0.2"]},
        }
    )
    targets = await make_resolver(dns_server).resolve("mixed.test")
    assert hosts(targets) == ["mx.mixed.test"]


async def test_servfail_is_temporary_4_4_3(dns_server: DNSServer) -> None:
    dns_server.zones["broken.test"] = SERVFAIL
    error = await resolve_error(make_resolver(dns_server), "broken.test")
    assert (error.permanent, error.code, error.status) == (False, 451, "4.4.3")
    assert error.message == "DNS lookup for broken.test failed: SERVFAIL"


async def test_servfail_is_not_cached(dns_server: DNSServer) -> None:
    dns_server.zones["broken.test"] = SERVFAIL
    resolver = make_resolver(dns_server)
    await resolve_error(resolver, "broken.test")
    await resolve_error(resolver, "broken.test")
    assert dns_server.count("broken.test", "MX") == 2


async def test_timeout_is_temporary_4_4_3(dns_server: DNSServer) -> None:
    dns_server.zones["slow.test"] = TIMEOUT
    resolver = make_resolver(dns_server, timeout=0.3)
    started = time.monotonic()
    error = await resolve_error(resolver, "slow.test")
    assert time.monotonic() - started < 2.0
    assert (error.permanent, error.code, error.status) == (False, 451, "4.4.3")
    assert error.message == "DNS lookup for slow.test failed: timed out after 0.3s"


async def test_no_nameserver_listening_is_temporary() -> None:
    async with DNSServer() as server:
        nameserver = server.nameserver
    resolver = MXResolver([nameserver], timeout=0.3, local_mx_ok=True)
    error = await resolve_error(resolver, "example.test")
    assert (error.permanent, error.status) == (False, "4.4.3")


async def test_all_mx_hosts_nxdomain_is_permanent_5_4_4(dns_server: DNSServer) -> None:
    dns_server.zones["example.test"] = {"MX": [(10, "gone1.test"), (20, "gone2.test")]}
    error = await resolve_error(make_resolver(dns_server), "example.test")
    assert (error.permanent, error.code, error.status) == (True, 550, "5.4.4")
    assert "gone1.test (NXDOMAIN)" in error.message
    assert "gone2.test (NXDOMAIN)" in error.message


async def test_mx_host_without_addresses_is_temporary_4_4_4(dns_server: DNSServer) -> None:
    dns_server.zones.update(
        {
            "example.test": {"MX": [(10, "gone.test"), (20, "empty.example.test")]},
            "empty.example.test": {"TXT": ["no addresses here"]},
        }
    )
    error = await resolve_error(make_resolver(dns_server), "example.test")
    assert (error.permanent, error.code, error.status) == (False, 451, "4.4.4")
    assert error.message == (
        "no usable MX addresses for example.test: gone.test (NXDOMAIN); "
        "empty.example.test (no A/AAAA records)"
    )


async def test_all_mx_hosts_servfail_is_4_4_3(dns_server: DNSServer) -> None:
    dns_server.zones.update(
        {"example.test": {"MX": [(10, "mx.example.test")]}, "mx.example.test": SERVFAIL}
    )
    error = await resolve_error(make_resolver(dns_server), "example.test")
    assert (error.permanent, error.status) == (False, "4.4.3")
    assert "mx.example.test (DNS SERVFAIL)" in error.message


async def test_failing_mx_host_is_skipped(dns_server: DNSServer) -> None:
    dns_server.zones.update(
        {
            "example.test": {"MX": [(10, "bad.example.test"), (20, "good.example.test")]},
            "bad.example.test": SERVFAIL,
            "good.example.test": {"A": ["127.0.0.3"]},
        }
    )
    targets = await make_resolver(dns_server).resolve("example.test")
    assert hosts(targets) == ["good.example.test"]


async def test_one_family_failing_keeps_the_other(dns_server: DNSServer) -> None:
    dns_server.zones.update(
        {
            "example.test": {"MX": [(10, "mx.example.test")]},
            "mx.example.test": {"A": ["127.0.0.2"], "AAAA": SERVFAIL},
        }
    )
    targets = await make_resolver(dns_server).resolve("example.test")
    assert addresses(targets) == ["127.0.0.2"]


async def test_invalid_domain_is_permanent(dns_server: DNSServer) -> None:
    resolver = make_resolver(dns_server)
    for bad in ("", "exa mple.test", "a" * 64 + ".test", "bad_%.test"):
        error = await resolve_error(resolver, bad)
        assert (error.permanent, error.status) == (True, "5.1.2"), bad
    assert dns_server.total_queries() == 0


# ---------------------------------------------------------------- IDNA, CNAME, dedupe


async def test_idna_domain(dns_server: DNSServer) -> None:
    dns_server.zones.update(
        {
            "xn--bcher-kva.test": {"MX": [(10, "mx.xn--bcher-kva.test")]},
            "mx.xn--bcher-kva.test": {"A": ["127.0.0.2"]},
        }
    )
    targets = await make_resolver(dns_server).resolve("Bücher.test")
    assert [(t.hostname, t.address) for t in targets] == [("mx.xn--bcher-kva.test", "127.0.0.2")]
    assert dns_server.count("xn--bcher-kva.test", "MX") == 1
    assert dns_server.count("bücher.test", "MX") == 1


async def test_mx_host_behind_cname(dns_server: DNSServer) -> None:
    dns_server.zones.update(
        {
            "example.test": {"MX": [(10, "alias.example.test")]},
            "alias.example.test": {"CNAME": "real.example.test"},
            "real.example.test": {"A": ["127.0.0.5"]},
        }
    )
    targets = await make_resolver(dns_server).resolve("example.test")
    assert [(t.hostname, t.address) for t in targets] == [("alias.example.test", "127.0.0.5")]


async def test_addresses_deduplicated(dns_server: DNSServer) -> None:
    dns_server.zones.update(
        {
            "example.test": {"MX": [(10, "mx1.example.test"), (20, "mx2.example.test")]},
            "mx1.example.test": {"A": ["127.0.0.2", "127.0.0.2"]},
            "mx2.example.test": {"A": ["127.0.0.2", "127.0.0.3"]},
        }
    )
    targets = await make_resolver(dns_server).resolve("example.test")
    assert [(t.hostname, t.address) for t in targets] == [
        ("mx1.example.test", "127.0.0.2"),
        ("mx2.example.test", "127.0.0.3"),
    ]


async def test_tcp_fallback_on_truncation(dns_server: DNSServer) -> None:
    dns_server.zones.update(
        {
            "example.test": {"MX": [(10, "mx1.example.test")]},
            "mx1.example.test": {"A": ["127.0.0.2"]},
        }
    )
    dns_server.truncate_udp = True
    targets = await make_resolver(dns_server).resolve("example.test")
    assert addresses(targets) == ["127.0.0.2"]
    assert dns_server.count("example.test", "MX") == 2  # UDP (truncated) then TCP


async def test_concurrent_resolves_share_one_query(dns_server: DNSServer) -> None:
    dns_server.zones.update(
        {
            "example.test": {"MX": [(10, "mx1.example.test")]},
            "mx1.example.test": {"A": ["127.0.0.2"]},
        }
    )
    resolver = make_resolver(dns_server)
    results = await asyncio.gather(*(resolver.resolve("example.test") for _ in range(10)))
    assert all(addresses(r) == ["127.0.0.2"] for r in results)
    assert dns_server.count("example.test", "MX") == 1
    assert dns_server.count("mx1.example.test", "A") == 1


# ---------------------------------------------------------------- local_mx_ok


async def test_local_mx_filtered_when_not_ok(dns_server: DNSServer) -> None:
    dns_server.zones.update(
        {
            "example.test": {"MX": [(10, "mx1.example.test")]},
            "mx1.example.test": {"A": ["127.0.0.1"], "AAAA": ["::1"]},
        }
    )
    strict = make_resolver(dns_server, local_mx_ok=False)
    error = await resolve_error(strict, "example.test")
    assert (error.permanent, error.code, error.status) == (False, 451, "4.4.4")
    assert "mx1.example.test (only local addresses ::1, 127.0.0.1; local_mx_ok is off)" in (
        error.message
    )
    relaxed = make_resolver(dns_server, local_mx_ok=True)
    assert addresses(await relaxed.resolve("example.test")) == ["::1", "127.0.0.1"]


async def test_local_filter_gathers_own_addresses_when_not_given(dns_server: DNSServer) -> None:
    dns_server.zones.update(
        {"example.test": {"MX": [(10, "mx.example.test")]}, "mx.example.test": {"A": ["127.0.0.2"]}}
    )
    resolver = MXResolver([dns_server.nameserver], local_mx_ok=False, timeout=2.0)
    error = await resolve_error(resolver, "example.test")
    assert error.status == "4.4.4"


def test_order_targets_filters_only_dns_hosts() -> None:
    dns_mx = MX("mx.test", priority=10, from_dns=True)
    plugin_mx = MX("127.0.0.2", priority=20)
    local = frozenset({"fe80::2"})
    data = {"mx.test": ["127.0.0.3", "fe80::1", "169.254.1.1", "::ffff:127.0.0.1", "fe80::2"]}
    strict = order_targets(
        [dns_mx, plugin_mx], data, default_port=25, local_mx_ok=False, local_addresses=local
    )
    assert addresses(strict) == ["127.0.0.2"]
    relaxed = order_targets([dns_mx, plugin_mx], data, default_port=25, local_mx_ok=True)
    assert len(relaxed) == 6


@pytest.mark.parametrize(
    ("address", "local"),
    [
        ("127.0.0.1", True),
        ("127.9.9.9", True),
        ("::1", True),
        ("fe80::1", True),
        ("169.254.1.1", True),
        ("0.0.0.0", True),
        ("0.1.2.3", True),
        ("::", True),
        ("224.0.0.1", True),
        ("ff02::1", True),
        ("255.255.255.255", True),
        ("::ffff:127.0.0.1", True),
        ("not-an-ip", True),
    ],
)
def test_is_local_address(address: str, local: bool) -> None:
    assert is_local_address(address) is local


def test_is_local_address_own_addresses_canonical() -> None:
    own = frozenset({"fe80::abcd"})
    assert is_local_address("FE80:0:0:0:0:0:0:ABCD", own)


def test_gather_local_addresses_is_canonical() -> None:
    found = gather_local_addresses()
    assert "127.0.0.1" in found or "::1" in found
    assert all(is_local_address(a) or ":" in a or "." in a for a in found)


# ---------------------------------------------------------------- TTL cache


async def test_ttl_cache_and_expiry(dns_server: DNSServer) -> None:
    dns_server.zones.update(
        {
            "example.test": {"MX": [(10, "mx1.example.test", 100)]},
            "mx1.example.test": {"A": [("127.0.0.2", 50)], "AAAA": ["::1"], "TTL": 300},
        }
    )
    clock = FakeClock()
    resolver = make_resolver(dns_server, clock=clock)
    await resolver.resolve("example.test")
    await resolver.resolve("example.test")
    assert dns_server.count("example.test", "MX") == 1
    assert dns_server.count("mx1.example.test", "A") == 1
    assert dns_server.count("mx1.example.test", "AAAA") == 1

    clock.now += 51  # the A RRset (TTL 50) expired; MX (100) and AAAA (300) did not
    dns_server.zones["mx1.example.test"]["A"] = ["127.0.0.7"]
    targets = await resolver.resolve("example.test")
    assert addresses(targets) == ["::1", "127.0.0.7"]
    assert dns_server.count("example.test", "MX") == 1
    assert dns_server.count("mx1.example.test", "A") == 2
    assert dns_server.count("mx1.example.test", "AAAA") == 1

    clock.now += 50
    await resolver.resolve("example.test")
    assert dns_server.count("example.test", "MX") == 2


async def test_negative_answers_cached_with_capped_soa_ttl(dns_server: DNSServer) -> None:
    dns_server.negative_ttl = 3600  # capped to 60 s
    dns_server.zones["nxd.test"] = NXDOMAIN
    dns_server.zones["implicit.test"] = {"A": ["127.0.0.2"]}
    clock = FakeClock()
    resolver = make_resolver(dns_server, clock=clock)
    for _ in range(2):
        await resolve_error(resolver, "nxd.test")
        await resolver.resolve("implicit.test")
    assert dns_server.count("nxd.test", "MX") == 1
    assert dns_server.count("implicit.test", "MX") == 1
    clock.now += 59
    await resolve_error(resolver, "nxd.test")
    assert dns_server.count("nxd.test", "MX") == 1
    clock.now += 2
    await resolve_error(resolver, "nxd.test")
    await resolver.resolve("implicit.test")
    assert dns_server.count("nxd.test", "MX") == 2
    assert dns_server.count("implicit.test", "MX") == 2


async def test_short_soa_minimum_wins(dns_server: DNSServer) -> None:
    dns_server.negative_ttl = 5
    dns_server.zones["nxd.test"] = NXDOMAIN
    clock = FakeClock()
    resolver = make_resolver(dns_server, clock=clock)
    await resolve_error(resolver, "nxd.test")
    clock.now += 6
    await resolve_error(resolver, "nxd.test")
    assert dns_server.count("nxd.test", "MX") == 2


async def test_cache_is_bounded_lru(dns_server: DNSServer) -> None:
    for i in range(5):
        dns_server.zones[f"d{i}.test"] = {"MX": [(10, "mx.test")]}
    dns_server.zones["mx.test"] = {"A": ["127.0.0.2"]}
    resolver = make_resolver(dns_server, cache_size=3)
    for i in range(5):
        await resolver.resolve(f"d{i}.test")
    assert resolver.cache_entries() == 3
    await resolver.resolve("d0.test")
    assert dns_server.count("d0.test", "MX") == 2


async def test_cache_disabled_with_size_zero(dns_server: DNSServer) -> None:
    dns_server.zones.update(equal_pref_zone())
    resolver = make_resolver(dns_server, cache_size=0)
    await resolver.resolve("example.test")
    await resolver.resolve("example.test")
    assert dns_server.count("example.test", "MX") == 2


# ---------------------------------------------------------------- domain literals


async def test_domain_literals_are_direct_targets(dns_server: DNSServer) -> None:
    resolver = make_resolver(dns_server, mx_port=2526)
    v4 = await resolver.resolve("[127.0.0.1]")
    v6 = await resolver.resolve("[IPv6:::1]")
    assert [(t.address, t.port, t.hostname) for t in v4] == [("127.0.0.1", 2526, "127.0.0.1")]
    assert [(t.address, t.port) for t in v6] == [("::1", 2526)]
    assert not v4[0].mx.from_dns
    assert dns_server.total_queries() == 0


@pytest.mark.parametrize("literal", ["[foo]", "[IPv6:127.0.0.1]", "[127.0.0.1", "[]"])
async def test_bad_domain_literal_is_permanent(dns_server: DNSServer, literal: str) -> None:
    error = await resolve_error(make_resolver(dns_server), literal)
    assert (error.permanent, error.status) == (True, "5.1.2")
    assert "invalid address literal" in error.message


async def test_local_domain_literal_refused_without_local_mx_ok(dns_server: DNSServer) -> None:
    error = await resolve_error(make_resolver(dns_server, local_mx_ok=False), "[127.0.0.1]")
    assert (error.permanent, error.code, error.status) == (True, 550, "5.4.4")


# ---------------------------------------------------------------- plugin MX


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("mx.example.test", [MX("mx.example.test", port=25)]),
        ("mx.example.test:2525", [MX("mx.example.test", port=2525)]),
        ("127.0.0.2", [MX("127.0.0.2", port=25)]),
        ("127.0.0.2:26", [MX("127.0.0.2", port=26)]),
        ("[::1]:2525", [MX("::1", port=2525)]),
        ("[IPv6:::1]", [MX("::1", port=25)]),
        ("::1", [MX("::1", port=25)]),
        ("lmtp://127.0.0.2", [MX("127.0.0.2", port=DEFAULT_LMTP_PORT, using_lmtp=True)]),
        ("lmtp://mx.example.test:2424", [MX("mx.example.test", port=2424, using_lmtp=True)]),
        ("LMTP://[::1]:24/", [MX("::1", port=24, using_lmtp=True)]),
        ("smtp://mx.example.test", [MX("mx.example.test", port=25)]),
        ("smtp://mx.example.test:587", [MX("mx.example.test", port=587)]),
        (MX("127.0.0.3", port=2525, priority=10), [MX("127.0.0.3", port=2525, priority=10)]),
        (MX("[::1]"), [MX("::1")]),
        (
            [MX("a.test", priority=5), "b.test:2525"],
            [MX("a.test", priority=5), MX("b.test", port=2525)],
        ),
        ((MX("a.test"),), [MX("a.test")]),
    ],
)
def test_normalize_mx_result(value: object, expected: list[MX]) -> None:
    assert normalize_mx_result(value, default_port=25) == expected


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        (None, "NoneType None"),
        (42, "int 42"),
        ({"exchange": "a.test"}, "dict"),
        ([], "empty list"),
        (["a.test", 7], "item 1 is int 7"),
        ("", "empty string"),
        ("http://a.test", "unknown scheme 'http'"),
        ("a.test:port", "bad port 'port'"),
        ("a.test:0", "port 0 is not 1-65535"),
        ("a.test:70000", "port 70000 is not 1-65535"),
        ("[::1", "missing ']'"),
        ("[::1]x", "unexpected 'x'"),
        ("[nothost]:25", "is not an IP address"),
        ("a::b::c", "not an IPv6 address"),
        ("bad host.test", "invalid domain name"),
        ("lmtp://", "no host"),
        (MX(""), "exchange must be"),
        (MX("a.test", port=0), "port 0"),
        (MX("a.test", priority=-1), "priority -1"),
    ],
)
def test_normalize_mx_result_rejects(value: object, fragment: str) -> None:
    with pytest.raises(ValueError, match="get_mx") as info:
        normalize_mx_result(value, default_port=25)
    assert fragment in str(info.value)


async def test_plugin_mx_names_resolved_without_local_filter(dns_server: DNSServer) -> None:
    dns_server.zones["relay.example.test"] = {"A": ["127.0.0.2"], "AAAA": ["::1"]}
    resolver = make_resolver(dns_server, local_mx_ok=False, inet_prefer="v4")
    mxs = normalize_mx_result(
        [
            MX("relay.example.test", port=2525, priority=1),
            "lmtp://127.0.0.3",
            MX("127.0.0.4", priority=5),
        ],
        default_port=25,
    )
    targets = await resolver.resolve_mxs(mxs, "example.org")
    assert [(t.address, t.port, t.mx.using_lmtp) for t in targets] == [
        ("127.0.0.3", DEFAULT_LMTP_PORT, True),
        ("127.0.0.2", 2525, False),
        ("::1", 2525, False),
        ("127.0.0.4", 25, False),
    ]
    assert dns_server.count("127.0.0.3", "A") == 0


async def test_plugin_mx_ip_literals_need_no_dns(dns_server: DNSServer) -> None:
    resolver = make_resolver(dns_server, local_mx_ok=False)
    targets = await resolver.resolve_mxs([MX("127.0.0.2", port=2525)], "example.org")
    assert [(t.address, t.port, t.hostname) for t in targets] == [("127.0.0.2", 2525, "127.0.0.2")]
    assert dns_server.total_queries() == 0


async def test_plugin_mx_unresolvable_is_temporary(dns_server: DNSServer) -> None:
    resolver = make_resolver(dns_server)
    with pytest.raises(MXResolutionError) as info:
        await resolver.resolve_mxs([MX("gone.test")], "example.org")
    assert (info.value.permanent, info.value.status) == (False, "4.4.4")
    assert info.value.message == "no usable MX addresses for example.org: gone.test (NXDOMAIN)"


async def test_plugin_mx_unicode_host(dns_server: DNSServer) -> None:
    dns_server.zones["mx.xn--bcher-kva.test"] = {"A": ["127.0.0.2"]}
    resolver = make_resolver(dns_server)
    targets = await resolver.resolve_mxs([MX("mx.bücher.test")], "bücher.test")
    assert [(t.hostname, t.address) for t in targets] == [("mx.xn--bcher-kva.test", "127.0.0.2")]


# ---------------------------------------------------------------- construction


class HostPort(NamedTuple):
    host: str
    port: int


async def test_nameserver_objects_with_host_and_port(dns_server: DNSServer) -> None:
    dns_server.zones["implicit.test"] = {"A": ["127.0.0.2"]}
    resolver = MXResolver(
        [HostPort("127.0.0.1", dns_server.port)], local_mx_ok=True, local_addresses=NO_LOCAL
    )
    assert addresses(await resolver.resolve("implicit.test")) == ["127.0.0.2"]


@pytest.mark.parametrize(
    ("nameserver", "fragment"),
    [(("dns.example.test", 53), "not an IP address"), (("127.0.0.1", 0), "port 0")],
)
def test_bad_nameserver_rejected(nameserver: tuple[str, int], fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        MXResolver([nameserver])


def test_system_resolver_when_no_nameservers() -> None:
    resolver = MXResolver(None)
    assert resolver.mx_port == 25
