"""``tools/bench``: argument parsing, installing what is needed, the run loop, the report."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchlib.pgserver import PgServer
from benchlib.procs import BenchError, ProcessRegistry, log, run_helper, run_tool
from benchlib.relays import (
    HARAKA_DIR,
    HARAKA_VERSION,
    RELAYS,
    RelaySettings,
    haraka_bin,
    install_haraka,
    postfix_version,
)
from benchlib.report import client_mode, machine_info, render_table, summarize
from benchlib.scenarios import SCENARIOS, Runner, RunResult, RunSpec, TrafficSettings
from benchlib.traffic import postfix_tools_installed

FULL_SIZES = {"S1": 20_000, "S2": 20_000, "S3": 2_000}
QUICK_SIZES = {"S1": 2_000, "S2": 2_000, "S3": 200}
SMOKE_SIZES = {"S1": 150, "S2": 100, "S3": 20}
S3_RECIPIENTS = 10


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="tools/bench",
        description="Benchmark outboundd against Postfix and Haraka with smtp-source/smtp-sink "
        "on loopback (S1 relay N x 1 rcpt; S2 accept held, then drain; S3 M x 10 rcpts).",
    )
    p.add_argument("--peers", action="store_true", help="also run Postfix and Haraka")
    p.add_argument("--only", choices=sorted(RELAYS), help="run this relay alone")
    p.add_argument("--scenarios", default="S1,S2,S3", help="comma list (default S1,S2,S3)")
    p.add_argument("--messages", type=int, help="S1 and S2 message count; S3 gets a tenth")
    p.add_argument("--quick", action="store_true", help="a tenth of the default sizes, 1 run")
    p.add_argument("--smoke", action="store_true", help="a few hundred messages, outboundd only")
    p.add_argument("--runs", type=int, help="runs per relay and scenario (default 3; medians)")
    p.add_argument("--json", type=Path, help="write raw per-run numbers and medians here")
    p.add_argument("--sessions", type=int, default=20, help="parallel client sessions (20)")
    p.add_argument("--size", type=int, default=4096, help="message payload bytes (4096)")
    p.add_argument(
        "--reuse-sessions",
        action="store_true",
        help="send many messages per client connection (smtp-source -d)",
    )
    p.add_argument("--concurrency", type=int, default=100, help="relay concurrency_max (100)")
    p.add_argument(
        "--domain-concurrency",
        type=int,
        default=20,
        help="outboundd domain_concurrency_max (20 = Postfix's per-destination default)",
    )
    p.add_argument(
        "--nodes",
        default="cpus",
        help="outboundd smtp.ini nodes: SMTP processes (default cpus, like Haraka's)",
    )
    p.add_argument(
        "--delivery-processes",
        type=int,
        default=0,
        help="outboundd delivery_processes (default 0: every SMTP node also delivers)",
    )
    p.add_argument(
        "--backend",
        choices=("sqlite", "postgresql"),
        default="sqlite",
        help="outboundd's queue: sqlite (default) or postgresql (a private server started "
        "for the bench; its CPU counts as outboundd's, and database round trips are reported)",
    )
    p.add_argument(
        "--haraka-nodes",
        default="cpus",
        help="Haraka smtp.ini nodes (default cpus, its performance advice; 1 = one process)",
    )
    p.add_argument(
        "--py-traffic",
        action="store_true",
        help="use the Python client/sink instead of smtp-source/smtp-sink",
    )
    p.add_argument(
        "--timeout", type=float, help="cap on each phase's time limit, seconds (smoke: 30)"
    )
    p.add_argument("--workdir", type=Path, help="parent for the temporary run directories")
    p.add_argument("--keep", action="store_true", help="keep every run directory")
    p.add_argument("--no-install", action="store_true", help="never run apt-get or npm")
    p.add_argument(
        "--dkim",
        nargs="?",
        const="rsa",
        choices=("rsa", "ed25519", "both"),
        help="outboundd DKIM-signs every message (rsa by default; both = dual signing) and an "
        "unsigned outboundd runs beside it to measure the cost; Haraka (--peers) signs with its "
        "dkim plugin and an RSA key; Postfix does not sign",
    )
    args = p.parse_args(argv)
    if args.smoke and (args.peers or (args.only and args.only != "outboundd")):
        p.error("--smoke runs outboundd only")
    return args


def choose_relays(args: argparse.Namespace) -> list[str]:
    if args.only:
        relays = [args.only]
    elif args.peers and not args.smoke:
        relays = ["outboundd", "postfix", "haraka"]
    else:
        relays = ["outboundd"]
    if args.dkim and "outboundd" in relays:
        relays.insert(1, "outboundd-unsigned")  # the baseline the signing cost is read from
    return relays


def dkim_types(args: argparse.Namespace) -> tuple[str, ...] | None:
    if not args.dkim:
        return None
    return ("rsa", "ed25519") if args.dkim == "both" else (args.dkim,)


def dkim_cost(summary: dict[str, Any]) -> dict[str, float | None]:
    """CPU-ms per message that signing added: signing outboundd minus the unsigned one.

    CPU-s per 1,000 messages is CPU-ms per message, so the medians subtract directly.
    """
    cost: dict[str, float | None] = {}
    for key, label in (
        ("S1 CPU (CPU-s/1k msgs)", "S1"),
        ("S2 accept CPU (CPU-s/1k msgs)", "S2 accept"),
    ):
        row = summary.get(key, {})
        signed = row.get("outboundd", {}).get("median")
        unsigned = row.get("outboundd-unsigned", {}).get("median")
        if signed is not None and unsigned is not None:
            cost[label] = signed - unsigned
    return cost


def choose_sizes(args: argparse.Namespace) -> dict[str, int]:
    if args.smoke:
        sizes = dict(SMOKE_SIZES)
    elif args.quick:
        sizes = dict(QUICK_SIZES)
    else:
        sizes = dict(FULL_SIZES)
    if args.messages:
        sizes = {"S1": args.messages, "S2": args.messages, "S3": max(1, args.messages // 10)}
    return sizes


def install_postfix() -> None:
    """apt-get install postfix (for smtp-source/smtp-sink and the Postfix peer).

    Preseeded "No configuration": the package then leaves the system's
    Postfix unconfigured and not running; the bench only runs its own
    instance from a temporary directory.
    """
    log("installing the postfix package (smtp-source, smtp-sink, Postfix) with apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    preseed = "postfix postfix/main_mailer_type select No configuration\n"
    tmp = Path(tempfile.mkstemp(prefix="bench-debconf-")[1])
    try:
        tmp.write_text(preseed)
        run_helper(["debconf-set-selections", str(tmp)], timeout=60, env=env)
    finally:
        tmp.unlink(missing_ok=True)
    res = run_helper(["apt-get", "install", "-y", "-qq", "postfix"], timeout=600, env=env)
    if res.returncode != 0:
        run_helper(["apt-get", "update", "-qq"], timeout=600, env=env)
        res = run_helper(["apt-get", "install", "-y", "-qq", "postfix"], timeout=600, env=env)
    if res.returncode != 0 or not postfix_tools_installed():
        raise BenchError(f"apt-get install postfix failed: {res.output[-600:]}")


def prepare_tools(args: argparse.Namespace, relays: list[str]) -> tuple[list[str], dict[str, str]]:
    """Install what the run needs; relays that cannot run are reported, not faked."""
    unavailable: dict[str, str] = {}
    need_postfix = "postfix" in relays or not (args.py_traffic or args.smoke)
    if need_postfix and not postfix_tools_installed():
        if args.no_install:
            raise BenchError("smtp-source/smtp-sink are not installed (apt-get install postfix)")
        install_postfix()
    if "haraka" in relays:
        try:
            if args.no_install and not haraka_bin().exists():
                raise BenchError(f"Haraka is not installed in {HARAKA_DIR} (--no-install)")
            install_haraka()
        except BenchError as exc:
            unavailable["haraka"] = str(exc)
            log(f"Haraka will not run: {exc}")
    return [r for r in relays if r not in unavailable], unavailable


def labels_for(relays: Sequence[str], dkim: tuple[str, ...] | None = None) -> dict[str, str]:
    labels = {
        "outboundd": "outboundd",
        "outboundd-unsigned": "outboundd (unsigned)",
        "haraka": f"Haraka {HARAKA_VERSION}",
    }
    if dkim:
        labels["outboundd"] = f"outboundd + DKIM {'+'.join(dkim)}"
        labels["haraka"] += " + dkim plugin (rsa)"
    if "postfix" in relays:
        labels["postfix"] = f"Postfix {postfix_version()}" + (" (unsigned)" if dkim else "")
    return labels


def check_no_loss(result: RunResult) -> None:
    """A run that 'finished' but lost mail is a failed run."""
    if not result.ok:
        return
    expected = result.messages
    if (result.sink_messages or 0) < expected:
        result.ok = False
        result.error = f"sink received {result.sink_messages} of {expected} messages"
        return
    counts = result.extra.get("status_counts")
    if counts is not None:
        delivered = counts.get("delivered", 0)
        if delivered != result.messages * result.recipients:
            result.ok = False
            result.error = (
                f"spool says {delivered} of {result.messages * result.recipients} "
                f"recipients delivered: {counts}"
            )


def run_all(args: argparse.Namespace) -> int:
    relays = choose_relays(args)
    sizes = choose_sizes(args)
    scenarios = [s.strip().upper() for s in args.scenarios.split(",") if s.strip()]
    bad = [s for s in scenarios if s not in SCENARIOS]
    if bad:
        raise BenchError(f"unknown scenario(s): {', '.join(bad)}")
    runs = args.runs or (1 if args.quick or args.smoke else 3)
    relays, unavailable = prepare_tools(args, relays)
    use_python = args.py_traffic or (args.smoke and not postfix_tools_installed())
    traffic = TrafficSettings(args.sessions, args.size, args.reuse_sessions, use_python)
    relay_settings = RelaySettings(
        concurrency_max=args.concurrency,
        domain_concurrency_max=args.domain_concurrency,
        haraka_nodes=args.haraka_nodes,
        outboundd_nodes=args.nodes,
        outboundd_delivery_processes=args.delivery_processes,
        dkim_types=dkim_types(args),
    )
    labels = labels_for(relays, dkim_types(args))
    workroot = Path(tempfile.mkdtemp(prefix="outboundd-bench-", dir=args.workdir))
    os.chmod(workroot, 0o755)  # Postfix's unprivileged daemons must reach their queue
    registry = ProcessRegistry()
    results: list[RunResult] = []
    started_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    cap = args.timeout or (30.0 if args.smoke else None)
    runner = Runner(
        registry, workroot, traffic, relay_settings, RELAYS, keep=args.keep, phase_cap=cap
    )
    pg_server: PgServer | None = None
    try:
        if args.backend == "postgresql" and "outboundd" in relays:
            pg_server = PgServer(registry, workroot / "postgresql")
            relay_settings.pg_server = pg_server
            pg_server.start()
        for run_index in range(1, runs + 1):
            for scenario in scenarios:
                rcpts = S3_RECIPIENTS if scenario == "S3" else 1
                for relay in relays:  # alternate relays within each run
                    log(f"run {run_index}/{runs} {scenario} {relay}: {sizes[scenario]} x {rcpts}")
                    result = runner.run(RunSpec(scenario, relay, sizes[scenario], rcpts, run_index))
                    check_no_loss(result)
                    log(_one_line(result))
                    results.append(result)
    finally:
        if pg_server is not None:
            pg_server.stop()
        registry.close()
        if not args.keep and all(r.ok for r in results):
            shutil.rmtree(workroot, ignore_errors=True)
        else:
            log(f"run directories kept in {workroot}")
    summary = summarize(results, relays)
    size_text = {
        s: f"{sizes[s]:,} x {S3_RECIPIENTS if s == 'S3' else 1}" for s in scenarios if s in sizes
    }
    table = render_table(summary, relays, labels, size_text, traffic.reuse_sessions)
    report = build_report(args, results, summary, relays, unavailable, labels, started_at)
    report["sizes"] = {s: sizes[s] for s in scenarios}
    report["runs_per_relay"] = runs
    if args.dkim:
        report["dkim"] = {"key_types": list(dkim_types(args) or ()), "cost_ms": dkim_cost(summary)}
    report["traffic"] = {
        "client": "pysource" if use_python else "smtp-source",
        "sink": "pysink" if use_python else "smtp-sink",
        "sessions": traffic.sessions,
        "size": traffic.size,
        "reuse_sessions": traffic.reuse_sessions,
        "mode": client_mode(traffic.reuse_sessions),
    }
    print_report(report, table, unavailable)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        log(f"raw numbers written to {args.json}")
    return 0 if report["all_ok"] else 1


def build_report(
    args: argparse.Namespace,
    results: list[RunResult],
    summary: dict[str, Any],
    relays: list[str],
    unavailable: dict[str, str],
    labels: dict[str, str],
    started_at: str,
) -> dict[str, Any]:
    delivered = all(r.ok for r in results) and bool(results)
    return {
        "started_at": started_at,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(args.workdir or Path(tempfile.gettempdir())),
        "relays": {r: labels.get(r, r) for r in relays},
        "unavailable": unavailable,
        "settings": {
            "concurrency_max": args.concurrency,
            "domain_concurrency_max": args.domain_concurrency,
            "haraka_nodes": args.haraka_nodes,
            "outboundd_nodes": args.nodes,
            "outboundd_delivery_processes": args.delivery_processes,
            "outboundd_backend": args.backend,
        },
        "all_ok": delivered and not unavailable,
        "all_delivered": delivered,
        "failed_runs": [
            {"scenario": r.scenario, "relay": r.relay, "run": r.run_index, "error": r.error}
            for r in results
            if not r.ok
        ],
        "runs": [r.to_json() for r in results],
        "summary": summary,
    }


def _one_line(r: RunResult) -> str:
    if not r.ok:
        return f"  -> FAILED: {r.error}"
    parts = [f"accept {r.messages / r.accept_seconds:,.0f} msg/s"] if r.accept_seconds else []
    if r.end_to_end_seconds:
        parts.append(f"end-to-end {r.messages / r.end_to_end_seconds:,.0f} msg/s")
    if r.drain_seconds:
        parts.append(f"drain {r.messages / r.drain_seconds:,.0f} msg/s")
    if r.total_cpu is not None:
        parts.append(f"CPU {r.total_cpu:.2f} s")
    if r.peak_rss_bytes:
        parts.append(f"peak RSS {r.peak_rss_bytes / 2**20:.0f} MB")
    for phase, unit in (("accept", "message"), ("deliver", "recipient"), ("relay", "message")):
        per_unit = r.extra.get(f"db_{phase}_statements_per_unit")
        if per_unit is not None:
            parts.append(f"db {phase}: {per_unit:.2f} round trips/{unit}")
    return "  -> " + ", ".join(parts)


def print_report(report: dict[str, Any], table: str, unavailable: dict[str, str]) -> None:
    m = report["machine"]
    print(f"\noutboundd bench, {report['started_at']}")
    print(
        f"machine: {m['cpu']}, {m['cores']} cores, {m['memory']} RAM, {m['os']}, "
        f"kernel {m['kernel']}, work dir on {m['workdir_filesystem']}"
    )
    t = report["traffic"]
    print(
        f"client {t['client']} ({t['sessions']} sessions, {t['size']} B, {t['mode']}), "
        f"sink {t['sink']}; "
        f"medians of {report['runs_per_relay']} run(s)\n"
    )
    print(table)
    dkim = report.get("dkim")
    if dkim:
        costs = ", ".join(f"{k} {v:+.2f}" for k, v in dkim["cost_ms"].items()) or "not measured"
        print(
            f"\nDKIM ({'+'.join(dkim['key_types'])}) added CPU-ms per message "
            f"(outboundd minus outboundd unsigned): {costs}"
        )
    for relay, why in unavailable.items():
        print(f"\n{relay}: NOT MEASURED — {why}")
    for failed in report["failed_runs"]:
        where = f"{failed['relay']} {failed['scenario']} run {failed['run']}"
        print(f"\nFAILED {where}: {failed['error']}")
    print_database(report)
    print(
        "\nCPU = user+sys of the relay's whole process tree (/proc, reaped children "
        "included); ratios are outboundd / peer (for CPU and memory, < 1 is better)."
    )
    if report["settings"]["outboundd_backend"] == "postgresql":
        print(
            "outboundd's queue in PostgreSQL: the server's process tree is in outboundd's CPU "
            "(not in its memory columns)."
        )
    sys.stdout.flush()


#: The database figures the report prints: (scenario, phase, unit).
DB_FIGURES = (("S2", "accept", "accepted message"), ("S2", "deliver", "delivered recipient"),
              ("S1", "relay", "message"), ("S3", "relay", "message of 10 recipients"))  # fmt: skip


def print_database(report: dict[str, Any]) -> None:
    """Medians of the database round trips (statements), when measured."""
    lines = []
    for scenario, phase, unit in DB_FIGURES:
        runs = [
            r["extra"]
            for r in report["runs"]
            if r["scenario"] == scenario and r["ok"] and f"db_{phase}_statements" in r["extra"]
        ]
        if not runs:
            continue
        statements = statistics.median(e[f"db_{phase}_statements_per_unit"] for e in runs)
        lines.append(f"  {scenario} {phase}: {statements:.2f} round trips (statements) per {unit}")
    for scenario in ("S1", "S2", "S3"):
        shares = [
            r["extra"]["db_server_cpu"] / r["total_cpu"]
            for r in report["runs"]
            if r["scenario"] == scenario and r["ok"] and r["total_cpu"]
            and "db_server_cpu" in r["extra"]
        ]  # fmt: skip
        if shares:
            lines.append(
                f"  {scenario}: the PostgreSQL server spent {statistics.median(shares):.0%} "
                "of the CPU counted"
            )
    if lines:
        print("\nPostgreSQL queue (round trips from pg_stat_statements; medians):")
        print("\n".join(lines))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_tool("bench", lambda: run_all(args))
