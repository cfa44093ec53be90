"""The benchmark harness keeps working: ``tools/bench --smoke`` delivers every message.

This asserts nothing about speed (CI machines vary); it fails when the bench
cannot run outboundd end to end or when any message is lost.  When Postfix's
smtp-source/smtp-sink are not installed (a fresh CI machine), the bench
falls back to its Python client and sink, so no Debian package is needed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.pgcluster import PgUnavailable, pg_bindir

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "tools" / "bench"


def run_bench(tmp_path: Path, *extra: str) -> dict[str, Any]:
    report_path = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--smoke", "--json", str(report_path), *extra],
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert proc.returncode == 0, f"bench failed:\n{proc.stdout}\n{proc.stderr}"
    report: dict[str, Any] = json.loads(report_path.read_text())
    return report


def assert_nothing_lost(report: dict[str, Any]) -> None:
    assert report["all_delivered"] is True, report["failed_runs"]
    assert report["failed_runs"] == []
    runs = report["runs"]
    assert {r["scenario"] for r in runs} == {"S1", "S2", "S3"}
    assert all(r["relay"] == "outboundd" for r in runs)
    assert sum(r["messages"] for r in runs) >= 200
    for r in runs:
        assert r["ok"], r["error"]
        assert r["sink_messages"] >= r["messages"]
        assert r["relay_pending_after"] == 0
        assert r["extra"]["status_counts"] == {"delivered": r["messages"] * r["recipients"]}
        assert r["total_cpu"] is not None and r["total_cpu"] > 0
        assert r["peak_rss_bytes"] is not None and r["peak_rss_bytes"] > 0


@pytest.mark.timeout(120)
def test_smoke_delivers_every_message(tmp_path: Path) -> None:
    """Default traffic tools: smtp-source/smtp-sink when installed, else the Python ones."""
    report = run_bench(tmp_path)
    assert_nothing_lost(report)
    assert "outboundd" in report["relays"]


@pytest.mark.timeout(120)
def test_smoke_with_python_traffic(tmp_path: Path) -> None:
    """The fallback client and sink CI uses on a machine without Postfix's tools."""
    report = run_bench(tmp_path, "--py-traffic")
    assert_nothing_lost(report)
    assert report["traffic"]["client"] == "pysource"
    assert report["traffic"]["sink"] == "pysink"


@pytest.mark.timeout(120)
def test_smoke_with_the_queue_in_postgresql(tmp_path: Path) -> None:
    """``--backend postgresql``: the bench starts its own server, every message is
    delivered, and the database round trips per message and recipient are reported."""
    try:
        pg_bindir()
    except PgUnavailable as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL tests must run in CI: {exc}")
        pytest.skip(str(exc))
    report = run_bench(tmp_path, "--py-traffic", "--backend", "postgresql")
    assert_nothing_lost(report)
    assert report["settings"]["outboundd_backend"] == "postgresql"
    extra = {r["scenario"]: r["extra"] for r in report["runs"]}
    # S2 measures accepting and delivering apart; S1 and S3 both at once.
    assert extra["S2"]["db_accept_statements"] >= 1
    assert extra["S2"]["db_deliver_statements"] >= 1
    assert extra["S2"]["db_accept_statements_per_unit"] > 0
    assert extra["S1"]["db_relay_statements_per_unit"] > 0
    assert extra["S3"]["db_relay_statements_per_unit"] > 0
    # The server's CPU is part of the relay's total, and reported apart.
    for r in report["runs"]:
        assert 0 < r["extra"]["db_server_cpu"] < r["total_cpu"]


@pytest.mark.timeout(120)
def test_smoke_dkim_mode_runs_signed_and_unsigned_outboundd(tmp_path: Path) -> None:
    """``--dkim both``: outboundd signs (dual), an unsigned one runs beside it, none lost."""
    report = run_bench(tmp_path, "--dkim", "both", "--scenarios", "S1")
    assert report["all_delivered"] is True, report["failed_runs"]
    assert sorted(report["relays"]) == ["outboundd", "outboundd-unsigned"]
    assert report["relays"]["outboundd"] == "outboundd + DKIM rsa+ed25519"
    assert {r["relay"] for r in report["runs"]} == {"outboundd", "outboundd-unsigned"}
    for r in report["runs"]:
        assert r["extra"]["status_counts"] == {"delivered": r["messages"]}
    assert report["dkim"]["key_types"] == ["rsa", "ed25519"]
    assert isinstance(report["dkim"]["cost_ms"]["S1"], float)


@pytest.mark.timeout(120)
def test_smoke_with_reused_sessions_names_the_mode(tmp_path: Path) -> None:
    """``--reuse-sessions``: every message delivered, and the table and the JSON say
    which client mode ran, so a table copied into the docs cannot be misread."""
    report_path = tmp_path / "report.json"
    argv = [sys.executable, str(BENCH), "--smoke", "--reuse-sessions", "--scenarios", "S1"]
    proc = subprocess.run(
        [*argv, "--json", str(report_path)],
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert proc.returncode == 0, f"bench failed:\n{proc.stdout}\n{proc.stderr}"
    report = json.loads(report_path.read_text())
    assert report["all_delivered"] is True, report["failed_runs"]
    assert report["traffic"]["reuse_sessions"] is True
    assert report["traffic"]["mode"] == "reused sessions"
    assert "| scenario (reused sessions) | metric |" in proc.stdout
    assert "4096 B, reused sessions)" in proc.stdout
