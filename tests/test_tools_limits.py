"""``tools/limits`` keeps working: ``--smoke`` produces every figure it promises.

Nothing here judges speed (machines vary): the checks are that each limit —
aiosmtpd receive and aiosmtplib send in every variant and client mode, and
every durable-write measure — was measured (a rate and a CPU figure above
zero), and that ``--bench`` reads outboundd's figures against the limits
from the same run.  smtp-source/smtp-sink are used when installed, else the
tool's Python client and sink, as in ``tools/bench``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
LIMITS = REPO / "tools" / "limits"

#: A tools/bench report reduced to what --bench reads: outboundd's medians.
BENCH_FIGURES = {
    "S1 CPU (CPU-s/1k msgs)": 2.0,
    "S2 accept (held) (msg/s)": 120.0,
    "S2 drain (msg/s)": 90.0,
}


def run_limits(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(LIMITS), "--workdir", str(tmp_path), *extra],
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )


def write_bench_report(path: Path) -> None:
    summary = {key: {"outboundd": {"median": value}} for key, value in BENCH_FIGURES.items()}
    path.write_text(json.dumps({"summary": summary, "traffic": {"reuse_sessions": False}}))


@pytest.mark.timeout(110)
def test_smoke_measures_every_limit(tmp_path: Path) -> None:
    report_path = tmp_path / "limits.json"
    bench_path = tmp_path / "bench.json"
    write_bench_report(bench_path)
    proc = run_limits(tmp_path, "--smoke", "--json", str(report_path), "--bench", str(bench_path))
    assert proc.returncode == 0, f"limits failed:\n{proc.stdout}\n{proc.stderr}"
    report: dict[str, Any] = json.loads(report_path.read_text())
    assert report["failed_runs"] == []

    procs = os.cpu_count() or 1
    expected_variants = {"asyncio x1", "uvloop x1"} | ({f"uvloop x{procs}"} if procs > 1 else set())
    summary = report["summary"]
    assert set(summary) == {"receive", "send"}
    for part, by_variant in summary.items():
        assert set(by_variant) == expected_variants, part
        for variant, by_mode in by_variant.items():
            assert set(by_mode) == {"new", "reuse"}, (part, variant)
            for mode, cell in by_mode.items():
                where = (part, variant, mode)
                assert cell["ok_runs"] == cell["total_runs"] == 1, where
                assert cell["msg_per_s"] > 0, where
                assert cell["cpu_s_per_1k"] > 0, where

    durable = {(r["kind"], r["batch"]): r for r in report["durable"]}
    kinds = {"body", "body-batched", "body-parallel", "commit", "accept", "accept-parallel"}
    if sys.platform == "linux":
        kinds.add("body-syncfs")
    assert set(durable) == {(k, b) for k in kinds for b in (1, 8)}
    for key, rate in durable.items():
        assert rate["messages"] >= rate["batch"], key
        assert rate["per_second"] > 0, key
        assert rate["cpu_seconds"] > 0, key

    # The distance is outboundd's figure over the limit measured in this run.
    last = f"uvloop x{procs}" if procs > 1 else "uvloop x1"
    [distance] = report["distance"]
    assert distance["variant"] == last
    assert distance["mode"] == "new"
    figures = {f["figure"]: f for f in distance["figures"]}
    receive = summary["receive"][last]["new"]
    send = summary["send"][last]["reuse"]
    held = [f for f in distance["figures"] if f["figure"] == "S2 accept (held) (msg/s)"]
    assert [f["limit"] for f in held] == [
        receive["msg_per_s"],
        max(r["per_second"] for r in report["durable"] if r["kind"].startswith("accept")),
    ]
    assert held[0]["ratio"] == pytest.approx(120.0 / receive["msg_per_s"])
    assert figures["S1 CPU (CPU-s/1k msgs)"]["limit"] == pytest.approx(
        receive["cpu_s_per_1k"] + send["cpu_s_per_1k"]
    )
    assert figures["S2 drain (msg/s)"]["ratio"] == pytest.approx(90.0 / send["msg_per_s"])

    # The printed report: both tables and the distance, each mode named.
    for text in (
        "| aiosmtpd receive | uvloop |",
        "| aiosmtplib send | asyncio | 1 |",
        "new connection per message: msg/s",
        "reused sessions: CPU-s/1k msgs",
        "| accept batch: bodies + directory + commit | 8 |",
        "Remaining distance:",
    ):
        assert text in proc.stdout, text
    # A run where everything was measured leaves no run directory behind.
    assert not list(tmp_path.glob("outboundd-limits-*"))


def test_unreadable_bench_report_is_refused_before_measuring(tmp_path: Path) -> None:
    bad = tmp_path / "bench.json"
    bad.write_text("not json")
    proc = run_limits(tmp_path, "--smoke", "--bench", str(bad))
    assert proc.returncode == 1
    assert "not a readable tools/bench JSON report" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "run 1/1" not in proc.stderr  # nothing was measured
