"""Medians, ratios and the markdown table; the machine description for the JSON."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchlib.scenarios import RunResult

MB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Metric:
    """One row of the table: how to compute it from a run, and whether lower wins."""

    scenario: str
    label: str
    unit: str
    compute: Callable[[RunResult], float | None]
    lower_is_better: bool = False


Compute = Callable[[RunResult], float | None]


def _rate(count: Callable[[RunResult], int], seconds: Compute) -> Compute:
    def compute(r: RunResult) -> float | None:
        s = seconds(r)
        return count(r) / s if s else None

    return compute


def _per_k(count: Callable[[RunResult], int], cpu: Compute) -> Compute:
    def compute(r: RunResult) -> float | None:
        c = cpu(r)
        n = count(r)
        return c / n * 1000 if c is not None and n else None

    return compute


def _msgs(r: RunResult) -> int:
    return r.messages


def _rcpts(r: RunResult) -> int:
    return r.messages * r.recipients


def _rss_mb(r: RunResult) -> float | None:
    return r.peak_rss_bytes / MB if r.peak_rss_bytes is not None else None


def _pss_mb(r: RunResult) -> float | None:
    return r.peak_pss_bytes / MB if r.peak_pss_bytes is not None else None


METRICS: tuple[Metric, ...] = (
    Metric("S1", "accept", "msg/s", _rate(_msgs, lambda r: r.accept_seconds)),
    Metric("S1", "end to end", "msg/s", _rate(_msgs, lambda r: r.end_to_end_seconds)),
    Metric("S1", "CPU", "CPU-s/1k msgs", _per_k(_msgs, lambda r: r.total_cpu), True),
    Metric("S1", "peak RSS", "MB", _rss_mb, True),
    Metric("S1", "peak PSS", "MB", _pss_mb, True),
    Metric("S2", "accept (held)", "msg/s", _rate(_msgs, lambda r: r.accept_seconds)),
    Metric("S2", "accept CPU", "CPU-s/1k msgs", _per_k(_msgs, lambda r: r.accept_cpu), True),
    Metric("S2", "drain", "msg/s", _rate(_msgs, lambda r: r.drain_seconds)),
    Metric("S2", "drain CPU", "CPU-s/1k msgs", _per_k(_msgs, lambda r: r.drain_cpu), True),
    Metric("S2", "peak RSS", "MB", _rss_mb, True),
    Metric("S2", "peak PSS", "MB", _pss_mb, True),
    Metric("S3", "accept", "msg/s", _rate(_msgs, lambda r: r.accept_seconds)),
    Metric("S3", "end to end", "msg/s", _rate(_msgs, lambda r: r.end_to_end_seconds)),
    Metric("S3", "CPU", "CPU-s/1k rcpts", _per_k(_rcpts, lambda r: r.total_cpu), True),
    Metric("S3", "peak RSS", "MB", _rss_mb, True),
    Metric("S3", "peak PSS", "MB", _pss_mb, True),
)


def median_of(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarize(results: Sequence[RunResult], relays: Sequence[str]) -> dict[str, Any]:
    """Medians per scenario/metric/relay over the successful runs."""
    summary: dict[str, Any] = {}
    for metric in METRICS:
        row: dict[str, Any] = {}
        for relay in relays:
            runs = [r for r in results if r.scenario == metric.scenario and r.relay == relay]
            if not runs:
                continue
            good = [r for r in runs if r.ok]
            row[relay] = {
                "median": median_of([metric.compute(r) for r in good]),
                "runs": [metric.compute(r) for r in good],
                "ok_runs": len(good),
                "total_runs": len(runs),
            }
        if row:
            summary[f"{metric.scenario} {metric.label} ({metric.unit})"] = row
    return summary


def _fmt(value: float | None) -> str:
    if value is None:
        return "—"
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


#: How the client submits, as the report and the table name it.
CLIENT_MODES = {False: "new connection per message", True: "reused sessions"}


def client_mode(reuse_sessions: bool) -> str:
    """The client mode's name: the table's first column says it, so a table
    copied into docs/performance.md cannot be read as the other mode."""
    return CLIENT_MODES[reuse_sessions]


def render_table(
    summary: dict[str, Any],
    relays: Sequence[str],
    labels: dict[str, str],
    sizes: dict[str, str],
    reuse_sessions: bool = False,
) -> str:
    """The markdown table: relays side by side, then outboundd/peer ratios."""
    peers = [r for r in relays if r != "outboundd"]
    ratio_cols = peers if "outboundd" in relays else []
    head = [f"scenario ({client_mode(reuse_sessions)})", "metric", *(labels[r] for r in relays)]
    head += [f"outboundd / {labels[p]}" for p in ratio_cols]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for key, row in summary.items():
        scenario, _, metric = key.partition(" ")
        cells = [f"{scenario} {sizes.get(scenario, '')}".strip(), metric]
        for relay in relays:
            cell = row.get(relay)
            if cell is None:
                cells.append("")
                continue
            text = _fmt(cell["median"])
            if cell["ok_runs"] < cell["total_runs"]:
                text += f" ({cell['ok_runs']}/{cell['total_runs']} runs ok)"
            cells.append(text)
        ours = row.get("outboundd", {}).get("median")
        for peer in ratio_cols:
            theirs = row.get(peer, {}).get("median")
            cells.append(f"{ours / theirs:.2f}x" if ours is not None and theirs else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _first_line_with(path: str, prefix: str) -> str:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(prefix):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


def _fs_type(path: Path) -> str:
    try:
        out = subprocess.run(
            ["stat", "-f", "-c", "%T", str(path)],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
        return out.stdout.strip() or "?"
    except OSError:
        return "?"


def machine_info(workroot: Path) -> dict[str, Any]:
    """Enough about the machine to compare runs: CPU, cores, memory, kernel, filesystem."""
    return {
        "cpu": _first_line_with("/proc/cpuinfo", "model name"),
        "cores": os.cpu_count(),
        "memory": _mem_total(),
        "kernel": platform.release(),
        "os": _os_release(),
        "python": platform.python_version(),
        "workdir_filesystem": _fs_type(workroot),
    }


def _mem_total() -> str:
    text = _first_line_with("/proc/meminfo", "MemTotal")
    try:
        return f"{int(text.split()[0]) / 2**20:.1f} GiB"
    except (ValueError, IndexError):
        return text


def _os_release() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return platform.platform()
