"""Routing observed at the MX: ``inet_prefer`` order and the shuffle among equal preferences.

test_mx.py checks the order :class:`MXResolver` returns; these check where
the mail actually goes when the engine follows it — scripted MX hosts on
127.0.0.2-4 and ``[::1]``, all on one port (``mx_port``), found through the
loopback DNS server.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.delivery_rig import Rig, delivery_rig
from tests.dnsserver import DNSServer
from tests.mxserver import MXScript, MXServer, mx_server


@contextlib.asynccontextmanager
async def hosts(*addresses: str) -> AsyncIterator[dict[str, MXServer]]:
    """One scripted MX per address, all on the first one's port."""
    async with contextlib.AsyncExitStack() as stack:
        servers: dict[str, MXServer] = {}
        port = 0
        for address in addresses:
            server = await stack.enter_async_context(
                mx_server(MXScript(hostname=f"mx-{address}"), host=address, port=port)
            )
            port = server.port
            servers[address] = server
        yield servers


def received(servers: dict[str, MXServer]) -> dict[str, int]:
    return {address: len(server.transactions) for address, server in servers.items()}


async def deliver_one(rig: Rig) -> None:
    qid = await rig.send("bob@dest.test")
    await rig.run_once()
    assert rig.deliveries(qid)["bob@dest.test"][0] == "delivered"


# ---------------------------------------------------------------- inet_prefer


@pytest.mark.parametrize(
    ("inet_prefer", "first"), [("v4", "127.0.0.2"), ("v6", "::1"), ("default", "::1")]
)
async def test_inet_prefer_picks_the_family_tried_first(
    dns_server: DNSServer, tmp_path: Path, inet_prefer: str, first: str
) -> None:
    dns_server.zones.update(
        {
            "dest.test": {"MX": [(10, "mx.dest.test")]},
            "mx.dest.test": {"A": ["127.0.0.2"], "AAAA": ["::1"]},
        }
    )
    async with hosts("127.0.0.2", "::1") as servers:
        async with delivery_rig(
            tmp_path, dns_server, mx_port=servers["::1"].port, outbound={"inet_prefer": inet_prefer}
        ) as rig:
            await deliver_one(rig)
        assert {a: n for a, n in received(servers).items() if n} == {first: 1}
        assert servers[first].transactions[0].peer == ("::1" if ":" in first else "127.0.0.1")


async def test_the_other_family_is_the_fallback_within_the_level(
    dns_server: DNSServer, tmp_path: Path
) -> None:
    dns_server.zones.update(
        {
            "dest.test": {"MX": [(10, "mx.dest.test")]},
            "mx.dest.test": {"A": ["127.0.0.2"], "AAAA": ["::1"]},
        }
    )
    async with hosts("127.0.0.2", "::1") as servers:
        servers["::1"].script = MXScript(banner="554 5.7.1 not from you")
        async with delivery_rig(
            tmp_path, dns_server, mx_port=servers["::1"].port, outbound={"inet_prefer": "v6"}
        ) as rig:
            await deliver_one(rig)
        assert servers["::1"].connections == 1 and received(servers) == {"127.0.0.2": 1, "::1": 0}


async def test_inet_prefer_never_crosses_preference_levels(
    dns_server: DNSServer, tmp_path: Path
) -> None:
    """v6 preferred, but the only IPv6 host is the backup MX: the IPv4 primary gets the mail."""
    dns_server.zones.update(
        {
            "dest.test": {"MX": [(10, "primary.dest.test"), (20, "backup.dest.test")]},
            "primary.dest.test": {"A": ["127.0.0.2"]},
            "backup.dest.test": {"AAAA": ["::1"]},
        }
    )
    async with hosts("127.0.0.2", "::1") as servers:
        async with delivery_rig(
            tmp_path, dns_server, mx_port=servers["::1"].port, outbound={"inet_prefer": "v6"}
        ) as rig:
            await deliver_one(rig)
        assert received(servers) == {"127.0.0.2": 1, "::1": 0}
        assert servers["::1"].connections == 0


# ---------------------------------------------------------------- equal preferences


async def test_equal_preferences_share_the_mail_and_the_backup_waits(
    dns_server: DNSServer, tmp_path: Path
) -> None:
    """Two MX hosts at preference 10 each get part of 40 messages (each is first
    with probability 1/2, so either getting fewer than 5 is a 2e-7 event);
    the preference-20 host gets none while they answer."""
    dns_server.zones.update(
        {
            "dest.test": {
                "MX": [(10, "a.dest.test"), (10, "b.dest.test"), (20, "c.dest.test")],
            },
            "a.dest.test": {"A": ["127.0.0.2"]},
            "b.dest.test": {"A": ["127.0.0.3"]},
            "c.dest.test": {"A": ["127.0.0.4"]},
        }
    )
    dns_server.shuffle = True  # a round-robin server: the order DNS gives must not matter
    async with hosts("127.0.0.2", "127.0.0.3", "127.0.0.4") as servers:
        async with delivery_rig(tmp_path, dns_server, mx_port=servers["127.0.0.2"].port) as rig:
            for _ in range(40):
                await rig.send("bob@dest.test")
            assert await rig.run_once() == 40
        counts = received(servers)
        assert counts["127.0.0.2"] + counts["127.0.0.3"] == 40
        assert counts["127.0.0.2"] >= 5 and counts["127.0.0.3"] >= 5, counts
        assert counts["127.0.0.4"] == 0 and servers["127.0.0.4"].connections == 0


async def test_backup_mx_takes_over_when_every_preferred_host_fails(
    dns_server: DNSServer, tmp_path: Path
) -> None:
    dns_server.zones.update(
        {
            "dest.test": {
                "MX": [(10, "a.dest.test"), (10, "b.dest.test"), (20, "c.dest.test")],
            },
            "a.dest.test": {"A": ["127.0.0.2"]},
            "b.dest.test": {"A": ["127.0.0.3"]},
            "c.dest.test": {"A": ["127.0.0.4"]},
        }
    )
    async with hosts("127.0.0.2", "127.0.0.3", "127.0.0.4") as servers:
        for address in ("127.0.0.2", "127.0.0.3"):
            servers[address].script = MXScript(banner="421 4.3.2 going down")
        async with delivery_rig(tmp_path, dns_server, mx_port=servers["127.0.0.2"].port) as rig:
            await deliver_one(rig)
        assert received(servers) == {"127.0.0.2": 0, "127.0.0.3": 0, "127.0.0.4": 1}
        assert servers["127.0.0.2"].connections == servers["127.0.0.3"].connections == 1
