"""``tools/limits``: what the parts outboundd is built on allow on this machine.

Three limits, measured with the traffic shape of ``tools/bench``'s S1
(20 sessions, 4 KB messages, one recipient), each with nothing of
outboundd around it:

- **aiosmtpd receive**: :mod:`benchlib.barereceive` under smtp-source,
  with asyncio, with uvloop, and with uvloop in as many processes as
  outboundd's ``nodes=cpus`` runs; CPU of its process tree from ``/proc``.
- **aiosmtplib send**: :mod:`benchlib.baresend` to smtp-sink, the same
  three ways; CPU from the sender processes' own ``getrusage``.
- **durable writes**: :mod:`benchlib.fsyncrate` (body fsync, SQLite
  commit, both) in the filesystem of the run directory, per batch size.

Receive and send run in both client modes: a new connection per message
(tools/bench's default) and reused sessions (``--reuse-sessions``).
``--bench FILE`` (a ``tools/bench --json`` report; once per client mode)
adds the remaining distance: outboundd's figure divided by the part's.
"""

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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchlib.fsyncrate import DurableRate, available_kinds, measure
from benchlib.procs import BenchError, ProcessRegistry, log, run_tool
from benchlib.proctree import tree_cpu_seconds
from benchlib.report import CLIENT_MODES, machine_info
from benchlib.scenarios import phase_timeout, wait_until
from benchlib.traffic import (
    Sink,
    free_port,
    postfix_tools_installed,
    python_env,
    run_source,
    wait_for_banner,
)

SIZES = {"full": 20_000, "quick": 2_000, "smoke": 100}
RUNS = {"full": 3, "quick": 1, "smoke": 1}
#: Durable writes: (messages per measure, seconds at most per measure, batch sizes).
DURABLE = {
    "full": (4_000, 10.0, (1, 8, 32)),
    "quick": (800, 3.0, (1, 8, 32)),
    "smoke": (16, 1.0, (1, 8)),
}
MODES = {"new": CLIENT_MODES[False], "reuse": CLIENT_MODES[True]}
PARTS = {"receive": "aiosmtpd receive", "send": "aiosmtplib send"}
DURABLE_LABELS = {
    "body": "body: {size} write + fsync, one directory fsync per batch",
    "body-batched": "bodies: all written, then each fsynced in turn, then the directory",
    "body-parallel": "bodies: all written, then all and the directory fsynced at once (threads)",
    "body-syncfs": "bodies: all written, then one syncfs(2) of the filesystem",
    "commit": "SQLite WAL commit (synchronous=FULL), one row per message",
    "accept": "accept batch: bodies + directory + commit",
    "accept-parallel": "accept batch: bodies and directory fsynced at once + commit",
}


@dataclass(frozen=True, slots=True)
class Variant:
    """How a part runs: its event loop and its number of processes."""

    loop: str
    procs: int

    @property
    def key(self) -> str:
        return f"{self.loop} x{self.procs}"


@dataclass
class PartRun:
    """One run of one part, variant and client mode."""

    part: str
    variant: str
    mode: str
    run_index: int
    messages: int
    ok: bool = False
    error: str | None = None
    seconds: float | None = None
    cpu_seconds: float | None = None

    @property
    def rate(self) -> float | None:
        return self.messages / self.seconds if self.ok and self.seconds else None

    @property
    def cpu_per_1k(self) -> float | None:
        if not self.ok or self.cpu_seconds is None or not self.messages:
            return None
        return self.cpu_seconds / self.messages * 1000


def uvloop_installed() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def variants(procs: int) -> list[Variant]:
    """asyncio in one process, uvloop in one, uvloop in ``procs`` (outboundd's nodes)."""
    found = [Variant("asyncio", 1)]
    if uvloop_installed():
        found.append(Variant("uvloop", 1))
        if procs > 1:
            found.append(Variant("uvloop", procs))
    return found


@dataclass
class Settings:
    messages: int
    sessions: int
    size: int
    use_python: bool
    phase_cap: float | None

    def timeout(self) -> float:
        bound = phase_timeout(self.messages, 60)
        return min(bound, self.phase_cap) if self.phase_cap else bound


def measure_receive(
    registry: ProcessRegistry, variant: Variant, mode: str, settings: Settings, logdir: Path
) -> tuple[float, float]:
    """(seconds, CPU seconds) of the bare receiver taking ``settings.messages``."""
    port = free_port()
    argv = [sys.executable, "-m", "benchlib.barereceive", "--procs", str(variant.procs)]
    argv += ["--uvloop"] if variant.loop == "uvloop" else []
    started = registry.spawn(
        "barereceive",
        [*argv, f"127.0.0.1:{port}"],
        stdout=logdir / f"receive-{port}.log",
        env=python_env(),
    )
    try:
        wait_for_banner(port, 15, started)
        cpu0 = tree_cpu_seconds(started.pid)
        res = run_source(
            port=port,
            messages=settings.messages,
            recipients=1,
            sessions=settings.sessions,
            size=settings.size,
            reuse_sessions=mode == "reuse",
            use_python=settings.use_python,
            timeout=settings.timeout(),
            registry=registry,
        )
        cpu = tree_cpu_seconds(started.pid) - cpu0
    finally:
        registry.stop(started, grace=3)
    if res.returncode != 0:
        raise BenchError(f"the client failed (exit {res.returncode}): {res.output[-300:]}")
    return res.seconds, cpu


def measure_send(
    registry: ProcessRegistry, variant: Variant, mode: str, settings: Settings
) -> tuple[float, float]:
    """(seconds, CPU seconds) of the bare sender delivering ``settings.messages``."""
    sink = Sink(registry, use_python=settings.use_python)
    try:
        sink.start()
        argv = [sys.executable, "-m", "benchlib.baresend", "--procs", str(variant.procs)]
        argv += ["--messages", str(settings.messages), "--concurrency", str(settings.sessions)]
        argv += ["--size", str(settings.size)]
        argv += ["--uvloop"] if variant.loop == "uvloop" else []
        argv += ["--reuse"] if mode == "reuse" else []
        started = registry.spawn(
            "baresend", [*argv, f"127.0.0.1:{sink.port}"], stdout=-1, env=python_env()
        )
        try:
            out, _ = started.proc.communicate(timeout=settings.timeout())
        except Exception as exc:  # TimeoutExpired, or interrupted
            raise BenchError(
                f"the sender did not finish within {settings.timeout():.0f} s"
            ) from exc
        finally:
            registry.stop(started, grace=1)
        text = out.decode(errors="replace") if out else ""
        if started.proc.returncode != 0:
            raise BenchError(f"the sender failed (exit {started.proc.returncode}): {text[-300:]}")
        try:
            report = json.loads(text.strip().splitlines()[-1])
        except (ValueError, IndexError) as exc:
            raise BenchError(f"the sender printed no result: {text[-300:]!r}") from exc
        wait_until(
            f"the sink to count {settings.messages} messages",
            lambda: sink.count >= settings.messages,
            10,
        )
    finally:
        sink.stop()
    return float(report["seconds"]), float(report["cpu_seconds"])


def run_part(
    registry: ProcessRegistry,
    part: str,
    variant: Variant,
    mode: str,
    settings: Settings,
    run_index: int,
    logdir: Path,
) -> PartRun:
    result = PartRun(part, variant.key, mode, run_index, settings.messages)
    try:
        if part == "receive":
            result.seconds, result.cpu_seconds = measure_receive(
                registry, variant, mode, settings, logdir
            )
        else:
            result.seconds, result.cpu_seconds = measure_send(registry, variant, mode, settings)
        result.ok = True
    except BenchError as exc:
        result.error = str(exc)
    return result


def median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarize(runs: Sequence[PartRun]) -> dict[str, dict[str, dict[str, dict[str, Any]]]]:
    """part → variant → mode → medians of msg/s and CPU-s per 1k, and runs ok."""
    summary: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
    for r in runs:
        cell = summary.setdefault(r.part, {}).setdefault(r.variant, {}).setdefault(r.mode, {})
        cell.setdefault("_runs", []).append(r)
    for by_variant in summary.values():
        for by_mode in by_variant.values():
            for mode, cell in by_mode.items():
                got: list[PartRun] = cell.pop("_runs")
                by_mode[mode] = {
                    "msg_per_s": median([r.rate for r in got]),
                    "cpu_s_per_1k": median([r.cpu_per_1k for r in got]),
                    "ok_runs": sum(r.ok for r in got),
                    "total_runs": len(got),
                }
    return summary


def _fmt(value: float | None) -> str:
    if value is None:
        return "—"
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def render_parts(summary: dict[str, Any], modes: Sequence[str]) -> str:
    head = ["part", "event loop", "processes"]
    for mode in modes:
        head += [f"{MODES[mode]}: msg/s", f"{MODES[mode]}: CPU-s/1k msgs"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for part, by_variant in summary.items():
        for variant, by_mode in by_variant.items():
            loop, _, procs = variant.partition(" x")
            cells = [PARTS[part], loop, procs]
            for mode in modes:
                cell = by_mode.get(mode)
                if cell is None:
                    cells += ["", ""]
                    continue
                note = ""
                if cell["ok_runs"] < cell["total_runs"]:
                    note = f" ({cell['ok_runs']}/{cell['total_runs']} runs ok)"
                cells += [_fmt(cell["msg_per_s"]) + note, _fmt(cell["cpu_s_per_1k"])]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def size_text(size: int) -> str:
    return f"{size // 1024} KB" if size and size % 1024 == 0 else f"{size} B"


def render_durable(rates: Sequence[DurableRate], filesystem: str, size: int) -> str:
    head = [
        f"durable write ({filesystem})", "messages per commit", "msg/s", "CPU-s/1k msgs",
        "device flushes per batch",
    ]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rates:
        label = DURABLE_LABELS[r.kind].format(size=size_text(size))
        flushes = "-" if r.flushes_per_batch is None else f"{r.flushes_per_batch:.1f}"
        cells = [label, str(r.batch), _fmt(r.per_second), _fmt(r.cpu_per_1k), flushes]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- distance


@dataclass(frozen=True, slots=True)
class Distance:
    """One outboundd figure from a tools/bench report against the part's limit."""

    figure: str
    outboundd: float
    limit: float
    limit_from: str

    @property
    def ratio(self) -> float:
        return self.outboundd / self.limit


def _bench_median(report: dict[str, Any], key: str) -> float | None:
    value = report.get("summary", {}).get(key, {}).get("outboundd", {}).get("median")
    return float(value) if value is not None else None


def distances(
    report: dict[str, Any],
    summary: dict[str, Any],
    variant: str,
    durable: Sequence[DurableRate] = (),
) -> tuple[str, list[Distance]]:
    """outboundd's figures (a tools/bench JSON) over the parts' limits (``variant``).

    The receive limit is taken in the bench report's client mode; the send
    limit always with reused sessions, because outboundd keeps its delivery
    connections to the sink open whatever the client does.  A CPU floor is
    the sum of the parts a message passes through.  The held accept is also
    read against the fastest durable accept batch measured (the disk's
    ceiling for group-committed accepts).
    """
    mode = "reuse" if report.get("traffic", {}).get("reuse_sessions") else "new"

    def limit(part: str, m: str, what: str) -> float | None:
        cell = summary.get(part, {}).get(variant, {}).get(m)
        value = cell.get(what) if cell else None
        return float(value) if value is not None else None

    recv_rate, recv_cpu = (
        limit("receive", mode, "msg_per_s"),
        limit("receive", mode, "cpu_s_per_1k"),
    )
    send_rate, send_cpu = (
        limit("send", "reuse", "msg_per_s"),
        limit("send", "reuse", "cpu_s_per_1k"),
    )
    both_cpu = recv_cpu + send_cpu if recv_cpu is not None and send_cpu is not None else None
    recv, send = f"receive ({MODES[mode]})", "send (reused sessions)"
    wanted = [
        ("S1 accept (msg/s)", "S1 accept (msg/s)", recv_rate, recv),
        ("S1 end to end (msg/s)", "S1 end to end (msg/s)", recv_rate, recv),
        ("S1 CPU (CPU-s/1k msgs)", "S1 CPU (CPU-s/1k msgs)", both_cpu, f"{recv} + {send}"),
        ("S2 accept (held) (msg/s)", "S2 accept (held) (msg/s)", recv_rate, recv),
        ("S2 accept CPU (CPU-s/1k msgs)", "S2 accept CPU (CPU-s/1k msgs)", recv_cpu, recv),
        ("S2 drain (msg/s)", "S2 drain (msg/s)", send_rate, send),
        ("S2 drain CPU (CPU-s/1k msgs)", "S2 drain CPU (CPU-s/1k msgs)", send_cpu, send),
    ]
    accepts = [r for r in durable if r.kind.startswith("accept")]
    if accepts:
        best = max(accepts, key=lambda r: r.per_second)
        wanted.append(
            (
                "S2 accept (held) (msg/s)",
                "S2 accept (held) (msg/s)",
                best.per_second,
                f"durable accept batch of {best.batch}",
            )
        )
    found = []
    for figure, key, lim, source in wanted:
        ours = _bench_median(report, key)
        if ours is not None and lim:
            found.append(Distance(figure, ours, lim, source))
    return mode, found


def render_distances(found: Sequence[Distance], variant: str) -> str:
    head = [
        "outboundd figure",
        "outboundd",
        f"limit (parts, {variant})",
        "limit from",
        "outboundd / limit",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for d in found:
        cells = [d.figure, _fmt(d.outboundd), _fmt(d.limit), d.limit_from, f"{d.ratio:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="tools/limits",
        description="Measure the limits of outboundd's parts on this machine: a bare aiosmtpd "
        "receiver under smtp-source, a bare aiosmtplib sender to smtp-sink (S1's traffic "
        "shape), and durable writes (fsync, SQLite WAL commits) in the run directory.",
    )
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="2,000 messages, 1 run")
    size.add_argument("--smoke", action="store_true", help="100 messages, 1 run (the CI check)")
    p.add_argument("--messages", type=int, help="messages per receive and send run (20,000)")
    p.add_argument("--runs", type=int, help="runs of each measure (default 3; medians)")
    p.add_argument(
        "--mode",
        choices=("both", "new", "reuse"),
        default="both",
        help="client mode: a new connection per message, reused sessions, or both (default)",
    )
    p.add_argument("--parts", default="receive,send,fsync", help="comma list (default all)")
    p.add_argument(
        "--procs",
        type=int,
        default=os.cpu_count() or 1,
        help="processes of the multi-process variant (default: cpus, as nodes=cpus)",
    )
    p.add_argument("--sessions", type=int, default=20, help="parallel connections (20)")
    p.add_argument("--size", type=int, default=4096, help="message payload bytes (4096)")
    p.add_argument(
        "--py-traffic",
        action="store_true",
        help="the Python client and sink instead of smtp-source/smtp-sink",
    )
    p.add_argument(
        "--bench",
        type=Path,
        action="append",
        default=[],
        help="a tools/bench --json report: add outboundd's distance to the limits "
        "(repeat it for reports of both client modes)",
    )
    p.add_argument("--json", type=Path, help="write every run and the medians here")
    p.add_argument("--timeout", type=float, help="cap on each run's time limit, seconds")
    p.add_argument("--workdir", type=Path, help="parent for the run directory (as tools/bench)")
    args = p.parse_args(argv)
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    bad = [x for x in parts if x not in ("receive", "send", "fsync")]
    if bad or not parts:
        p.error(f"--parts takes receive, send, fsync; not {', '.join(bad) or 'nothing'}")
    args.parts = parts
    return args


def size_name(args: argparse.Namespace) -> str:
    return "smoke" if args.smoke else "quick" if args.quick else "full"


def run_all(args: argparse.Namespace) -> int:
    name = size_name(args)
    runs = args.runs or RUNS[name]
    modes = ["new", "reuse"] if args.mode == "both" else [args.mode]
    use_python = args.py_traffic or not postfix_tools_installed()
    if use_python and not args.py_traffic:
        log("smtp-source/smtp-sink are not installed: using the Python client and sink")
    settings = Settings(
        messages=args.messages or SIZES[name],
        sessions=args.sessions,
        size=args.size,
        use_python=use_python,
        phase_cap=args.timeout or (30.0 if args.smoke else None),
    )
    benches = [(path, load_bench(path)) for path in args.bench]
    chosen = variants(max(1, args.procs))
    if not uvloop_installed():
        log("uvloop is not installed: only the asyncio variants run")
    workroot = Path(tempfile.mkdtemp(prefix="outboundd-limits-", dir=args.workdir))
    registry = ProcessRegistry()
    part_runs: list[PartRun] = []
    rates: list[DurableRate] = []
    started_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    try:
        for run_index in range(1, runs + 1):
            for part in (p for p in ("receive", "send") if p in args.parts):
                for variant in chosen:
                    for mode in modes:
                        log(
                            f"run {run_index}/{runs} {PARTS[part]} {variant.key} {MODES[mode]}: "
                            f"{settings.messages} messages"
                        )
                        r = run_part(registry, part, variant, mode, settings, run_index, workroot)
                        log(f"  -> {_one_line(r)}")
                        part_runs.append(r)
        if "fsync" in args.parts:
            count, seconds, batches = DURABLE[name]
            for kind in available_kinds():
                for batch in batches:
                    rate = median_rate(
                        [
                            measure(workroot, kind, batch, count, seconds, args.size)
                            for _ in range(runs)
                        ]
                    )
                    log(f"{kind} x{batch}: {rate.per_second:,.0f} msg/s")
                    rates.append(rate)
    finally:
        registry.close()
    machine = machine_info(workroot)
    failed = [r for r in part_runs if not r.ok]
    if not failed:
        shutil.rmtree(workroot, ignore_errors=True)
    else:
        log(f"run directory kept in {workroot}")
    summary = summarize(part_runs)
    report: dict[str, Any] = {
        "started_at": started_at,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine,
        "size": name,
        "settings": {
            "messages": settings.messages,
            "sessions": settings.sessions,
            "size": settings.size,
            "runs": runs,
            "modes": modes,
            "client": "pysource" if use_python else "smtp-source",
            "sink": "pysink" if use_python else "smtp-sink",
        },
        "runs": [asdict(r) for r in part_runs],
        "summary": summary,
        "durable": [
            asdict(r) | {"per_second": r.per_second, "cpu_s_per_1k": r.cpu_per_1k} for r in rates
        ],
        "failed_runs": [asdict(r) for r in failed],
    }
    text = [header(report)]
    if summary:
        text += [render_parts(summary, modes)]
    if rates:
        text += [render_durable(rates, str(machine["workdir_filesystem"]), settings.size)]
    if summary:
        against = chosen[-1].key  # the variant that runs as outboundd does (uvloop, nodes)
        report["distance"] = []
        for path, bench in benches:
            mode, found = distances(bench, summary, against, rates)
            report["distance"].append(
                {
                    "bench": str(path),
                    "variant": against,
                    "mode": mode,
                    "figures": [asdict(d) | {"ratio": d.ratio} for d in found],
                }
            )
            text += [
                f"Remaining distance: {path} (client mode: {MODES[mode]}) over the limits",
                render_distances(found, against),
            ]
    for r in failed:
        text.append(
            f"FAILED {PARTS[r.part]} {r.variant} {MODES[r.mode]} run {r.run_index}: {r.error}"
        )
    print("\n\n".join(text))
    sys.stdout.flush()
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        log(f"raw numbers written to {args.json}")
    return 1 if failed else 0


def load_bench(path: Path) -> dict[str, Any]:
    """A ``tools/bench --json`` report, read before anything is measured."""
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BenchError(f"--bench {path}: not a readable tools/bench JSON report ({exc})") from exc
    if not isinstance(report, dict) or "summary" not in report:
        raise BenchError(f"--bench {path}: no 'summary' in it; is it from tools/bench --json?")
    return report


def median_rate(rates: Sequence[DurableRate]) -> DurableRate:
    """The run with the median rate (its own CPU figure with it)."""
    ordered = sorted(rates, key=lambda r: r.per_second)
    return ordered[len(ordered) // 2]


def header(report: dict[str, Any]) -> str:
    m, s = report["machine"], report["settings"]
    return (
        f"outboundd's parts' limits ({report['size']} size), {report['started_at']}\n"
        f"machine: {m['cpu']}, {m['cores']} cores, {m['memory']} RAM, {m['os']}, "
        f"kernel {m['kernel']}, Python {m['python']}, work dir on {m['workdir_filesystem']}\n"
        f"{s['messages']:,} messages of {s['size']} B per run, {s['sessions']} parallel "
        f"connections, client {s['client']}, sink {s['sink']}; medians of {s['runs']} run(s)"
    )


def _one_line(r: PartRun) -> str:
    if not r.ok:
        return f"FAILED: {r.error}"
    return f"{_fmt(r.rate)} msg/s, {_fmt(r.cpu_per_1k)} CPU-s/1k msgs"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_tool("limits", lambda: run_all(args))
