"""CPU and memory of a relay's whole process tree, read from ``/proc``.

Why this method: the relays fork (Postfix's master starts and reaps smtpd,
cleanup, qmgr, smtp, ...; outboundd may run worker processes), so the CPU of
one PID is not the cost of the relay.  For every process in the tree rooted
at the relay's PID we add ``utime + stime + cutime + cstime`` from
``/proc/PID/stat``.  A child that exits and is reaped by its parent moves its
CPU (and that of its own reaped children) into the parent's ``cutime/cstime``,
so this sum never loses the work of processes that came and went between two
readings: the difference of two readings is exactly the CPU the tree used in
between.  The only blind spot is a process that escapes the tree (a double
fork re-parented to init), which none of the relays does once started in the
foreground.  cgroup v2 ``cpu.stat`` would be simpler, but it is not available
on every machine (here only cgroup v1 is delegated), and psutil is not a
dependency.

Memory: the sum of RSS (and of PSS, which splits shared pages fairly between
processes) over the tree, sampled by a background thread; the peak of those
samples is reported.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
PROC = Path("/proc")


@dataclass(frozen=True, slots=True)
class ProcStat:
    """The fields of ``/proc/PID/stat`` the benchmark needs."""

    pid: int
    ppid: int
    cpu_ticks: int  # utime + stime + cutime + cstime
    rss_pages: int


def parse_stat(text: str) -> ProcStat:
    """Parse one ``/proc/PID/stat`` line; the command name may hold spaces and ')'."""
    pid_part, _, rest = text.partition(" (")
    fields = rest.rsplit(") ", 1)[1].split()
    # fields[0] is state (field 3); field N of proc(5) is fields[N - 3]
    ppid = int(fields[1])
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    rss = int(fields[21])
    return ProcStat(int(pid_part), ppid, utime + stime + cutime + cstime, rss)


def read_all() -> dict[int, ProcStat]:
    """Every process visible now; processes that vanish while reading are skipped."""
    result: dict[int, ProcStat] = {}
    for entry in os.scandir(PROC):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as fh:
                result[int(entry.name)] = parse_stat(fh.read())
        except (OSError, IndexError, ValueError):
            continue
    return result


def tree_of(root: int, stats: dict[int, ProcStat]) -> list[ProcStat]:
    """The root and all its descendants among ``stats``."""
    children: dict[int, list[int]] = {}
    for st in stats.values():
        children.setdefault(st.ppid, []).append(st.pid)
    out: list[ProcStat] = []
    todo = [root]
    while todo:
        pid = todo.pop()
        found = stats.get(pid)
        if found is None:
            continue
        out.append(found)
        todo.extend(children.get(pid, ()))
    return out


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds (user+sys, including reaped children) used so far by the tree.

    Read three times and keep the largest: a child reaped between reading
    its parent and reading the child would be missed by one pass, and the
    true value only grows.
    """
    best = 0
    for _ in range(3):
        best = max(best, sum(st.cpu_ticks for st in tree_of(root, read_all())))
    return best / CLK_TCK


def _pss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def tree_memory(root: int) -> tuple[int, int, int]:
    """(RSS bytes, PSS bytes, process count) of the tree now."""
    tree = tree_of(root, read_all())
    rss = sum(st.rss_pages for st in tree) * PAGE_SIZE
    pss = sum(_pss_bytes(st.pid) for st in tree)
    return rss, pss, len(tree)


class MemorySampler:
    """Samples the tree's memory in a thread and keeps the peaks."""

    def __init__(self, root: int, interval: float = 0.25) -> None:
        self.root = root
        self.interval = interval
        self.peak_rss = 0
        self.peak_pss = 0
        self.peak_procs = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mem-sampler", daemon=True)

    def _sample(self) -> None:
        rss, pss, procs = tree_memory(self.root)
        self.peak_rss = max(self.peak_rss, rss)
        self.peak_pss = max(self.peak_pss, pss)
        self.peak_procs = max(self.peak_procs, procs)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> MemorySampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sample()
