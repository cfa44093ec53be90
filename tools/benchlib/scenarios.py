"""S1, S2 and S3: one run of one scenario against one relay, fully bounded.

A run starts a fresh sink and a fresh relay (new queue), submits with the
client, waits for the sink to have every message *and* the relay's queue to
be empty, and stops both.  Timing and CPU are taken around the phases only,
so start-up and shutdown are not counted.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchlib.pgserver import DbCalls
from benchlib.procs import BenchError, ProcessRegistry, log
from benchlib.proctree import MemorySampler, tree_cpu_seconds
from benchlib.relays import START_TIMEOUT, Relay, RelaySettings
from benchlib.traffic import Sink, run_source

SCENARIOS = ("S1", "S2", "S3")
POLL = 0.05


@dataclass
class TrafficSettings:
    """How the client submits: smtp-source's -s, -l, -d and the fallback switch."""

    sessions: int = 20
    size: int = 4096
    reuse_sessions: bool = False
    use_python: bool = False


@dataclass
class RunSpec:
    scenario: str
    relay: str
    messages: int
    recipients: int
    run_index: int


@dataclass
class RunResult:
    """Raw numbers of one run; rates are derived in :mod:`benchlib.report`."""

    scenario: str
    relay: str
    run_index: int
    messages: int
    recipients: int
    ok: bool = False
    error: str | None = None
    accept_seconds: float | None = None
    accept_cpu: float | None = None
    end_to_end_seconds: float | None = None
    drain_seconds: float | None = None
    drain_cpu: float | None = None
    total_cpu: float | None = None
    sink_messages: int | None = None
    relay_pending_after: int | None = None
    peak_rss_bytes: int | None = None
    peak_pss_bytes: int | None = None
    peak_processes: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def wait_until(what: str, cond: Callable[[], bool], timeout: float, poll: float = POLL) -> float:
    """Poll ``cond`` until true; the monotonic time it became true.  Bounded."""
    deadline = time.monotonic() + timeout
    while True:
        if cond():
            return time.monotonic()
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)


def phase_timeout(messages: int, floor: float, rate: float = 40.0) -> float:
    """A generous bound for a phase: ``floor`` s, or the time at ``rate`` msg/s."""
    return max(floor, messages / rate)


class Runner:
    """Runs scenarios against relays, each run in a fresh working directory."""

    def __init__(
        self,
        registry: ProcessRegistry,
        workroot: Path,
        traffic: TrafficSettings,
        relay_settings: RelaySettings,
        relay_classes: dict[str, type[Relay]],
        keep: bool = False,
        phase_cap: float | None = None,
    ) -> None:
        self.registry = registry
        self.workroot = workroot
        self.traffic = traffic
        self.relay_settings = relay_settings
        self.relay_classes = relay_classes
        self.keep = keep
        self.phase_cap = phase_cap

    def bound(self, seconds: float) -> float:
        """A phase's time limit, shortened by ``--timeout`` (smoke mode uses 30 s)."""
        return min(seconds, self.phase_cap) if self.phase_cap else seconds

    def run(self, spec: RunSpec) -> RunResult:
        result = RunResult(
            spec.scenario, spec.relay, spec.run_index, spec.messages, spec.recipients
        )
        workdir = self.workroot / f"{spec.relay}-{spec.scenario}-{spec.run_index}"
        workdir.mkdir(parents=True)
        sink = Sink(self.registry, use_python=self.traffic.use_python)
        relay = self.relay_classes[spec.relay](
            self.registry, workdir, sink.port, self.relay_settings
        )
        try:
            sink.start()
            relay.start(hold=spec.scenario == "S2", timeout=self.bound(START_TIMEOUT))
            self._measure(spec, relay, sink, result)
            result.ok = True
        except BenchError as exc:
            result.error = str(exc)
            tail = relay.log_tail()
            log(f"{spec.relay} {spec.scenario} run {spec.run_index} FAILED: {exc}")
            if tail:
                log(f"last lines of {relay.logfile()}:\n{tail}")
        finally:
            result.sink_messages = sink.count
            self._collect_extra(relay, result)
            relay.stop()
            sink.stop()
            if not self.keep and result.ok:
                shutil.rmtree(workdir, ignore_errors=True)
        return result

    def _collect_extra(self, relay: Relay, result: RunResult) -> None:
        """Per-relay facts worth keeping in the JSON (outboundd: final statuses)."""
        counts = getattr(relay, "status_counts", None)
        if counts is not None and relay.started is not None:
            try:
                result.extra["status_counts"] = counts()
            except Exception as exc:  # a broken spool must not hide the run's result
                result.extra["status_counts_error"] = str(exc)

    def _submit(self, spec: RunSpec, relay: Relay) -> float:
        res = run_source(
            port=relay.port,
            messages=spec.messages,
            recipients=spec.recipients,
            sessions=self.traffic.sessions,
            size=self.traffic.size,
            reuse_sessions=self.traffic.reuse_sessions,
            use_python=self.traffic.use_python,
            timeout=self.bound(phase_timeout(spec.messages * max(1, spec.recipients // 4), 60)),
            registry=self.registry,
        )
        if res.returncode != 0:
            raise BenchError(f"the client failed (exit {res.returncode}): {res.output[-300:]}")
        return res.seconds

    def _wait_delivered(self, spec: RunSpec, relay: Relay, sink: Sink, timeout: float) -> float:
        """Time when the sink has every message and the relay's queue is empty."""
        t_sink = wait_until(
            f"the sink to receive {spec.messages} messages",
            lambda: sink.count >= spec.messages,
            timeout,
        )
        wait_until(
            "the relay's queue to empty", lambda: relay.pending() == 0, self.bound(60), poll=0.1
        )
        return t_sink

    def _measure(self, spec: RunSpec, relay: Relay, sink: Sink, result: RunResult) -> None:
        roots = relay.cpu_roots()
        db_roots = roots[1:]  # the queue's database server, when it has one

        def cpu() -> float:
            return sum(tree_cpu_seconds(root) for root in roots)

        def db_cpu() -> float:
            return sum(tree_cpu_seconds(root) for root in db_roots)

        timeout = self.bound(phase_timeout(spec.messages * spec.recipients, 120, rate=20))
        with MemorySampler(relay.root_pid) as mem:
            cpu0, db0 = cpu(), db_cpu()
            calls0 = relay.db_calls()
            t0 = time.monotonic()
            result.accept_seconds = self._submit(spec, relay)
            cpu_accepted, db_accepted = cpu(), db_cpu()
            result.accept_cpu = cpu_accepted - cpu0
            if spec.scenario == "S2":
                time.sleep(0.5)  # let the relay settle; nothing may leave while held
                if sink.count:
                    raise BenchError(f"{sink.count} messages left the relay while held")
                cpu1, db1 = cpu(), db_cpu()
                calls1 = relay.db_calls()
                t1 = time.monotonic()
                helper_cpu = relay.release()
                t_done = self._wait_delivered(spec, relay, sink, timeout)
                result.drain_seconds = t_done - t1
                result.drain_cpu = cpu() - cpu1 + helper_cpu
                result.total_cpu = result.accept_cpu + result.drain_cpu
                db_used = db_accepted - db0 + db_cpu() - db1
                if calls0 is not None and calls1 is not None:
                    _db_phase(result, "accept", calls1 - calls0, spec.messages)
                    calls_end = relay.db_calls()
                    assert calls_end is not None
                    _db_phase(
                        result, "deliver", calls_end - calls1, spec.messages * spec.recipients
                    )
            else:
                t_done = self._wait_delivered(spec, relay, sink, timeout)
                result.end_to_end_seconds = t_done - t0
                result.total_cpu = cpu() - cpu0
                db_used = db_cpu() - db0
                calls_end = relay.db_calls()
                if calls0 is not None and calls_end is not None:
                    _db_phase(result, "relay", calls_end - calls0, spec.messages)
            if db_roots:
                # The part of total_cpu the database server spent (same intervals).
                result.extra["db_server_cpu"] = round(db_used, 3)
            result.relay_pending_after = relay.pending()
        result.peak_rss_bytes = mem.peak_rss
        result.peak_pss_bytes = mem.peak_pss
        result.peak_processes = mem.peak_procs


def _db_phase(result: RunResult, phase: str, calls: DbCalls, units: int) -> None:
    """Database statements (round trips) of one phase, in all and per unit.

    ``accept``: per accepted message; ``deliver``: per delivered recipient;
    ``relay`` (S1, S3: accepting and delivering together): per message.
    """
    result.extra[f"db_{phase}_statements"] = calls.statements
    if units:
        result.extra[f"db_{phase}_statements_per_unit"] = round(calls.statements / units, 3)
        # Where they go (JSON only): per unit, the most frequent statements first.
        result.extra[f"db_{phase}_by_statement"] = {
            text: round(n / units, 3)
            for text, n in sorted(calls.by_statement.items(), key=lambda kv: -kv[1])[:10]
        }
