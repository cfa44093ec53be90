"""Every example query in docs/accounting.md, run against real deliveries.

The queries are read out of the markdown (each follows a
``<!-- query: NAME -->`` marker), so the documentation and this test cannot
drift: a query added to the doc without a check here fails, and so does a
check whose query left the doc.

The queue is filled once per module by the real ``outboundd``: mail is
submitted over SMTP (some with AUTH), routed by a loopback DNS server to
scripted MX hosts (one with STARTTLS), delivered, deferred, bounced (with a
DSN to the sender's MX) and flushed with ``outboundctl``.  Only one thing is
faked: one deferred message's ``received_at`` is moved two days back, so
"stuck for more than a day" has something to find without waiting a day.

All of it runs twice, with the queue in SQLite and in PostgreSQL
(``queue_url``); on PostgreSQL a query's ``<!-- query-postgresql: NAME -->``
form is used where the doc gives one.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from outboundd.plugins.auth_flat_file import add_user
from tests.certs import make_pki
from tests.dnsserver import DNSServer
from tests.harness import run_sql, running, view_columns, write_config
from tests.mxserver import MXScript, mx_server
from tests.pgcluster import PgCluster
from tests.test_ctl import ctl, send

DOC = Path(__file__).resolve().parents[1] / "docs" / "accounting.md"
QUERY = re.compile(r"<!-- query: (\w+) -->\s*```sql\n(.*?)```", re.DOTALL)
PG_QUERY = re.compile(r"<!-- query-postgresql: (\w+) -->\s*```sql\n(.*?)```", re.DOTALL)

PLAIN_RCPT = {
    "gone@plain.test": "550 5.1.1 user unknown",
    "grey@plain.test": "451 4.7.1 greylisted",
    "stuck@plain.test": "452 4.3.1 insufficient system storage",
}


def doc_queries(backend: str = "sqlite") -> dict[str, str]:
    """The documented queries; for ``postgresql``, its own forms where there are."""
    text = DOC.read_text(encoding="utf-8")
    found = QUERY.findall(text)
    queries = dict(found)
    assert len(queries) == len(found), "a query name is used twice in docs/accounting.md"
    if backend == "postgresql":
        forms = PG_QUERY.findall(text)
        assert len(dict(forms)) == len(forms), "a PostgreSQL form is given twice"
        assert set(dict(forms)) <= set(queries), "a PostgreSQL form without its query"
        queries.update(forms)
    return queries


@dataclass
class Filled:
    db: Path | str  # the SQLite file, or the PostgreSQL queue's URL
    ids: dict[str, str]  # scenario name -> queue ID
    backend: str

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        return run_sql(self.db, sql, params)


async def fill(tmp: Path, queue_url: str | None) -> Filled:
    """Run the daemon through the scenario the checks below describe."""
    pki = make_pki(tmp / "pki")
    zones = {
        "tls.test": {"MX": [(10, "mx.tls.test")]},
        "mx.tls.test": {"A": ["127.0.0.2"]},
        "plain.test": {"MX": [(10, "mx.plain.test")]},
        "mx.plain.test": {"A": ["127.0.0.3"]},
        "sender.test": {"MX": [(10, "mx.sender.test")]},
        "mx.sender.test": {"A": ["127.0.0.4"]},
    }
    async with contextlib.AsyncExitStack() as stack:
        dns = await stack.enter_async_context(DNSServer(zones))
        tls_mx = await stack.enter_async_context(mx_server(MXScript(tls=pki), host="127.0.0.2"))
        port = tls_mx.port
        plain = await stack.enter_async_context(
            mx_server(MXScript(rcpt=PLAIN_RCPT), host="127.0.0.3", port=port)
        )
        await stack.enter_async_context(mx_server(MXScript(), host="127.0.0.4", port=port))
        config = write_config(
            tmp / "config",
            dns_port=dns.port,
            mx_port=port,
            outbound={
                "temp_fail_intervals": "1h",
                **({"queue_url": queue_url} if queue_url else {}),
            },
            plugins=["auth_flat_file"],
        )
        add_user(config / "auth_flat_file.ini", "alice", "alice-pw")
        add_user(config / "auth_flat_file.ini", "bob", "bob-pw")
        ids: dict[str, str] = {}
        async with running(config) as d:
            alice, bob = ("alice", "alice-pw"), ("bob", "bob-pw")
            p = d.smtp_port
            ids["tls"] = await send(
                p, "alice@sender.test", ["a@tls.test", "b@tls.test"], login=alice
            )
            ids["plain"] = await send(p, "bob@sender.test", ["c@plain.test"], login=bob)
            ids["gone"] = await send(p, "carol@sender.test", ["gone@plain.test"])
            ids["grey"] = await send(p, "alice@sender.test", ["grey@plain.test"], login=alice)
            ids["stuck"] = await send(p, "dave@sender.test", ["stuck@plain.test"])
            await d.wait_for_status(ids["tls"], "delivered", count=2)
            await d.wait_for_status(ids["plain"], "delivered")
            await d.wait_for_status(ids["gone"], "bounced")
            await d.wait_for_status(ids["grey"], "deferred")
            await d.wait_for_status(ids["stuck"], "deferred")
            [(ids["dsn"],)] = d.query(
                "SELECT queue_id FROM submissions WHERE dsn_of = ?", (ids["gone"],)
            )
            await d.wait_for_status(ids["dsn"], "delivered")
            plain.script = MXScript(rcpt={k: v for k, v in PLAIN_RCPT.items() if "grey" not in k})
            flushed = await ctl(config, "flush", ids["grey"])
            assert flushed.out == "1 recipient(s) due now\n", flushed
            await d.wait_for_status(ids["grey"], "delivered")
        filled = Filled(
            queue_url or d.queue_dir / "outbound.db",
            ids,
            "postgresql" if queue_url else "sqlite",
        )
    filled.query(
        "UPDATE messages SET received_at = received_at - 2 * 86400 WHERE queue_id = ?",
        (ids["stuck"],),
    )
    return filled


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def filled(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Filled:
    url = None
    if request.param == "postgresql":
        cluster: PgCluster = request.getfixturevalue("pg_cluster")
        url = cluster.create_database("accounting")
    return asyncio.run(fill(tmp_path_factory.mktemp("accounting"), url))


def seconds(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


# ------------------------------------------------------------ the checks


def check_last_hour(f: Filled, rows: list[tuple[Any, ...]]) -> None:
    # delivered: a, b, c, the DSN, grey's 2nd; deferred: grey's 1st, stuck
    assert rows == [("bounced", 1), ("deferred", 2), ("delivered", 5)]


def check_deliveries_per_domain_per_hour(f: Filled, rows: list[tuple[Any, ...]]) -> None:
    per_domain: dict[str, int] = {}
    for hour, domain, n in rows:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:00Z", hour)
        per_domain[domain] = per_domain.get(domain, 0) + n
    assert per_domain == {"tls.test": 2, "plain.test": 2, "sender.test": 1}
    assert rows == sorted(rows, key=lambda r: (r[0], -r[2], r[1]))


def check_top_bounce_reasons(f: Filled, rows: list[tuple[Any, ...]]) -> None:
    assert rows == [("5.1.1", "user unknown", 1)]


def check_delivery_delay_percentiles(f: Filled, rows: list[tuple[Any, ...]]) -> None:
    delays = sorted(
        seconds(done) - seconds(received)
        for received, done in f.query(
            "SELECT received_at, finished_at FROM deliveries WHERE status = 'delivered'"
        )
    )
    [(n, median, p95)] = rows
    assert n == len(delays) == 5
    # nearest rank: the smallest value with at least p% of the values at or below it
    assert median == pytest.approx(delays[2], abs=0.002)
    assert p95 == pytest.approx(delays[4], abs=0.002)
    assert 0 < median <= p95 < 60


def check_stuck_over_a_day(f: Filled, rows: list[tuple[Any, ...]]) -> None:
    [(qid, rcpt, status, attempts, received_at, code, response)] = rows
    assert (qid, rcpt, status, attempts) == (f.ids["stuck"], "stuck@plain.test", "deferred", 1)
    assert (code, response) == (452, "insufficient system storage")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", received_at)


def check_volume_per_auth_user(f: Filled, rows: list[tuple[Any, ...]]) -> None:
    def size(*names: str) -> int:
        return sum(
            f.query("SELECT size FROM messages WHERE queue_id = ?", (f.ids[n],))[0][0]
            for n in names
        )

    assert rows == [
        ("(relay)", 2, 2, size("gone", "stuck")),
        ("alice", 2, 3, size("tls", "grey")),
        ("bob", 1, 1, size("plain")),
    ]


def check_tls_share(f: Filled, rows: list[tuple[Any, ...]]) -> None:
    assert rows == [(5, 2, 40.0)]  # only mx.tls.test offers STARTTLS
    tls = f.query("SELECT DISTINCT tls FROM attempts WHERE queue_id = ?", (f.ids["tls"],))
    assert tls[0][0].startswith("TLSv1.")


def check_retry_distribution(f: Filled, rows: list[tuple[Any, ...]]) -> None:
    assert rows == [(1, "bounced", 1), (1, "delivered", 4), (2, "delivered", 1)]


def check_mx_hosts_4xx(f: Filled, rows: list[tuple[Any, ...]]) -> None:
    [(host, ip, n, codes)] = rows
    assert (host, ip, n) == ("mx.plain.test", "127.0.0.3", 2)
    assert sorted(codes.split(",")) == ["451", "452"]


def check_bounces_and_their_dsns(f: Filled, rows: list[tuple[Any, ...]]) -> None:
    assert rows == [
        (f.ids["gone"], "gone@plain.test", "5.1.1", f.ids["dsn"], "carol@sender.test", "delivered")
    ]


CHECKS: dict[str, Callable[[Filled, list[tuple[Any, ...]]], None]] = {
    "last_hour": check_last_hour,
    "deliveries_per_domain_per_hour": check_deliveries_per_domain_per_hour,
    "top_bounce_reasons": check_top_bounce_reasons,
    "delivery_delay_percentiles": check_delivery_delay_percentiles,
    "stuck_over_a_day": check_stuck_over_a_day,
    "volume_per_auth_user": check_volume_per_auth_user,
    "tls_share": check_tls_share,
    "retry_distribution": check_retry_distribution,
    "mx_hosts_4xx": check_mx_hosts_4xx,
    "bounces_and_their_dsns": check_bounces_and_their_dsns,
}


def test_every_documented_query_has_a_check() -> None:
    assert sorted(doc_queries()) == sorted(CHECKS)
    assert sorted(doc_queries("postgresql")) == sorted(CHECKS)
    assert len(CHECKS) >= 8


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_documented_query(name: str, filled: Filled) -> None:
    sql = doc_queries(filled.backend)[name]
    CHECKS[name](filled, filled.query(sql))


def test_views_match_the_documented_columns(filled: Filled) -> None:
    """The column tables in the doc list exactly the views' columns, in order."""
    text = DOC.read_text(encoding="utf-8")
    for view in ("deliveries", "attempts", "submissions", "dsn_reports"):
        section = text.split(f"## `{view}`", 1)[1].split("\n## ", 1)[0]
        documented: list[str] = []
        for cells in re.findall(r"^\| (`[^|]+`) \|", section, re.MULTILINE):
            documented += re.findall(r"`(\w+)`", cells)
        assert documented == view_columns(filled.db, view), view
