"""``outboundd``: wires configuration, spool, plugins, listeners and delivery.

Runs in the foreground and logs to stdout.  SIGTERM/SIGINT stop accepting
mail, let running deliveries finish (bounded by ``shutdown_grace``), give
back every lease and exit 0.  SIGHUP makes every deferred recipient due now.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gc
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from outboundd import early_stop
from outboundd import log as logmod
from outboundd import spool as spool_backend
from outboundd.children import (
    ChildProcess,
    notify_parent,
    read_config_fd,
    wake_all,
    watch_parent,
)
from outboundd.config import Config, ConfigError, OutboundConfig, load_config, load_outbound
from outboundd.delivery.engine import DeliveryEngine
from outboundd.delivery.handoff import LocalDelivery
from outboundd.delivery.scheduler import Scheduler
from outboundd.hooks import HookRunner, PluginLoadError, load_plugins
from outboundd.plan import ProcessPlan, Role, plan_processes
from outboundd.spool import Spool, SpoolError, lease_owner_id
from outboundd.spool import admin as spool_admin
from outboundd.spool.inuse import QueueLock, hold_for_daemon
from outboundd.submission import api as submission_api
from outboundd.submission.acceptor import SessionBoard
from outboundd.submission.queueing import SpoolSink
from outboundd.submission.server import Listeners, start_listeners

#: Seconds running deliveries get to finish after SIGTERM before they are cut off.
SHUTDOWN_GRACE = 20.0
#: The longest the first process waits for its SMTP nodes before it accepts.
NODES_START_TIMEOUT = 15.0
#: How often outbound.ini is checked for changes (hot reload).
RELOAD_INTERVAL = 0.5

log = logmod.get_logger("outboundd")


class OutboundSettings:
    """The live ``outbound.ini``: re-read when the file's content changes.

    ``disabled``, ``concurrency_max`` and ``temp_fail_intervals`` (and the
    rest of the file) take effect without a restart.  A broken edit is
    reported once and the previous settings stay in force.

    Changes are found by comparing the file's *content* with the content
    last looked at, never by mtime and size alone: an edit that lands
    between reading the file and stamping it, or within the filesystem's
    timestamp granularity with the same size, would otherwise be missed.
    The content behind ``config`` is not known (the file was read before
    this object existed, maybe by another process), so the first check
    always parses the file; it only reports a change when the settings
    differ.
    """

    def __init__(self, config: Config) -> None:
        self.config_dir = config.config_dir
        self.base_dir = config.base_dir
        self.current: OutboundConfig = config.outbound
        self._path = config.config_dir / "outbound.ini"
        self._seen: bytes | None = None  # the content last looked at

    def __call__(self) -> OutboundConfig:
        return self.current

    def _read(self) -> bytes:
        """The file's bytes; empty when it is missing (then the defaults apply)."""
        try:
            return self._path.read_bytes()
        except OSError:
            # Missing or unreadable: load_outbound says which, with the file's name.
            return b""

    def check(self) -> bool:
        """Reload if the file's content changed; True when new settings took effect."""
        content = self._read()
        if content == self._seen:
            return False
        self._seen = content
        try:
            fresh = load_outbound(self.config_dir, self.base_dir)
        except ConfigError as exc:
            log.error("outbound.ini not reloaded; keeping the previous settings", error=str(exc))
            return False
        if (fresh.queue_dir, fresh.queue_url) != (self.current.queue_dir, self.current.queue_url):
            log.warn("queue_dir and queue_url changes need a restart; keeping the current queue")
            fresh = fresh.model_copy(
                update={"queue_dir": self.current.queue_dir, "queue_url": self.current.queue_url}
            )
        if fresh == self.current:
            return False
        self.current = fresh
        log.notice(
            "outbound.ini reloaded",
            disabled=fresh.disabled,
            concurrency_max=fresh.concurrency_max,
            temp_fail_intervals=",".join(f"{x:g}" for x in fresh.temp_fail_intervals) or "none",
        )
        return True

    async def watch(self, on_change: asyncio.Event) -> None:
        while True:
            await asyncio.sleep(RELOAD_INTERVAL)
            if await asyncio.to_thread(self.check):
                on_change.set()


ROLES = tuple(str(role) for role in Role)


@dataclass(frozen=True, slots=True)
class Inherited:
    """What a child process got from the first one: listening sockets, a wake
    pipe, and its slot on the SMTP nodes' session board."""

    listen_fds: tuple[tuple[int, bool], ...] = ()
    wake_fd: int | None = None
    board: tuple[int, int] | None = None

    @property
    def is_node(self) -> bool:
        return bool(self.listen_fds)


class StopRequest:
    """The graceful stop, asked for once (by a signal, the parent's exit or a failure)."""

    def __init__(self, role: Role) -> None:
        self.role = role
        self.event = asyncio.Event()
        self._on_request: list[Callable[[], None]] = []

    def __call__(self, reason: str) -> None:
        if self.event.is_set():
            # Another SIGTERM (an impatient operator, or a process-group
            # signal on top of the parent's own): the graceful stop goes on.
            log.info("already stopping", signal=reason, role=self.role)
            return
        log.info("stopping", signal=reason, role=self.role)
        self.event.set()
        for action in self._on_request:
            action()

    def on_request(self, action: Callable[[], None]) -> None:
        """Run ``action`` the moment the stop is asked for (now, if it was).

        For what must not wait for :func:`shut_down`'s turn of the loop:
        the children must know at once that an exit from now on is part of
        the stop (see ``ChildProcess.supervise``)."""
        self._on_request.append(action)
        if self.event.is_set():
            action()


@dataclass
class Running:
    """What this process runs; :func:`shut_down` stops it in order."""

    plan: ProcessPlan
    spool: Spool
    settings: OutboundSettings
    #: Held while the queue is open: ``outboundctl queue migrate`` refuses meanwhile.
    queue_lock: QueueLock | None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    scheduler: Scheduler | None = None
    engine: DeliveryEngine | None = None
    listeners: Listeners | None = None
    nodes: list[ChildProcess] = field(default_factory=list)  # SMTP nodes
    deliverers: list[ChildProcess] = field(default_factory=list)  # delivery processes

    @property
    def children(self) -> list[ChildProcess]:
        return self.nodes + self.deliverers

    def spawn(self, work: Coroutine[Any, Any, None], name: str) -> None:
        self.tasks.append(asyncio.create_task(work, name=name))

    def child_config(self, config: Config) -> Callable[[], Config]:
        """The last good configuration, for a child being (re)started."""
        return lambda: config.model_copy(update={"outbound": self.settings.current})


async def serve(config: Config, role: str = "all", inherited: Inherited | None = None) -> int:
    """Run the relay until a stop signal; the process exit status.

    What this process does, and which children it starts, is
    :func:`outboundd.plan.plan_processes`'s decision; here each part of the
    plan is started by its own function and stopped by :func:`shut_down`.
    """
    logmod.configure_from(config.log)
    inherited = inherited or Inherited()
    plan = plan_processes(config, Role(role), is_node=inherited.is_node)
    loop = asyncio.get_running_loop()
    stop = StopRequest(plan.role)
    # From the first moment: a stop signal during start-up stops gracefully
    # too, instead of killing the process with the signal's default action.
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop, sig.name)
    loop.add_signal_handler(signal.SIGHUP, lambda: None)  # a flush before there is work
    early = early_stop.pending()
    if early is not None:
        stop(early)
    if not plan.is_child:
        warn_about(config)
    try:
        plugins = load_plugins(config.plugins, config.plugins_dir)
    except PluginLoadError as exc:
        log.crit("cannot start", error=str(exc))
        return 1
    hooks = HookRunner(plugins)
    logmod.set_log_hook(hooks if hooks.has("log") else None)
    opened = await open_spool(plan)
    if opened is None:
        return 1
    spool, queue_lock = opened
    run = Running(plan, spool, OutboundSettings(config), queue_lock)
    stop.on_request(lambda: mark_children_stopping(run))
    if plan.delivers:
        start_delivery(run, config, hooks)
    if plan.follows_outbound_ini:
        # Without a scheduler to wake, the first process still follows
        # outbound.ini: a child it (re)starts gets the settings now in force.
        wakes = spool.new_work if plan.delivers else asyncio.Event()
        run.spawn(run.settings.watch(wakes), "config-watch")
    if plan.is_child:
        follow_parent(run, stop)
    if plan.listens and not await start_listening(run, config, hooks, inherited):
        await abandon(run)
        return 1
    if inherited.wake_fd is not None:
        run.spawn(notify_parent(spool.new_work, inherited.wake_fd), "wake-up")
    await start_children(run, config)
    if run.listeners is not None and run.listeners.board is not None:
        await accept_together(run, stop, is_node=inherited.is_node)
    loop.add_signal_handler(signal.SIGHUP, flush_on_sighup(run, stop))
    if not stop.event.is_set():  # else a stop signal came during start-up: not ready
        log_ready(run, config)
    status = 0
    try:
        status = await run_until_stopped(stop, run.tasks)
    finally:
        await shut_down(run)
        log.info("stopped", role=plan.role)
        await logmod.drain_log_hooks()
        logmod.shutdown()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
            # Stopped: a signal between here and the exit changes nothing.
            signal.signal(sig, signal.SIG_IGN)
    return status


def warn_about(config: Config) -> None:
    """Start-up warnings, logged once by the first process."""
    for warning in config.warnings:
        log.warn(warning)
    if config.auth_users and "auth_flat_file" not in config.plugins:
        log.warn(
            "auth_flat_file.ini has users but the auth_flat_file plugin is not listed in "
            "plugins: AUTH is off and only relay_acl_allow clients can relay"
        )


async def open_spool(plan: ProcessPlan) -> tuple[Spool, QueueLock | None] | None:
    """The queue, recovered as the plan says, and the lock that says a daemon
    uses it; None (and the reason logged) if it cannot open."""
    lock: QueueLock | None = None
    try:
        lock = hold_for_daemon(plan.queue)
        # wait=True: a queue database that is down at start is waited for
        # (logged once per interval), not a reason to exit and crash-loop.
        spool = await spool_backend.open(plan.queue, recover_files=plan.recovers_files, wait=True)
    except SpoolError as exc:
        if lock is not None:
            lock.release()
        shown = spool_backend.describe_location(plan.queue)
        log.crit("cannot open the queue", queue=shown, error=str(exc))
        return None
    report = spool.recovery
    if report is not None:
        log.info(
            "queue opened",
            role=plan.role,
            queue=spool.location,
            leases_released=report.leases_released,
            temp_files_removed=report.temp_files_removed,
            orphan_bodies_removed=report.orphan_bodies_removed,
        )
        for qid in report.missing_bodies:
            log.crit("message body file missing; its recipients were dropped", qid=qid)
    return spool, lock


def start_delivery(run: Running, config: Config, hooks: HookRunner) -> None:
    """The delivering role: a scheduler claiming due work, an engine delivering it."""
    owner = lease_owner_id()
    run.engine = DeliveryEngine(config, run.settings, run.spool, hooks, owner=owner)
    run.scheduler = Scheduler(run.spool, run.settings, run.engine.deliver, owner=owner, log=log)
    run.spawn(run.scheduler.run(), "scheduler")


def follow_parent(run: Running, stop: StopRequest) -> None:
    """The child's part: wake on the parent's lines, stop when the parent goes."""
    parent_gone = asyncio.Event()
    run.spawn(watch_parent(run.spool.new_work, parent_gone), "parent-watch")

    async def stop_when_parent_goes() -> None:
        await parent_gone.wait()
        stop("parent exited")

    run.spawn(stop_when_parent_goes(), "parent-gone")


async def start_listening(
    run: Running, config: Config, hooks: HookRunner, inherited: Inherited
) -> bool:
    """The SMTP role: listeners on the configured (or inherited) sockets.

    False (and the reason logged) when the sockets cannot be bound.
    """
    # A process that also delivers takes its own new mail without a claim.
    sink: SpoolSink = (
        run.spool if run.scheduler is None else LocalDelivery(run.spool, run.scheduler)
    )
    submission_api.install(sink, config, hooks)
    try:
        run.listeners = await start_listeners(
            config,
            sink,
            hooks,
            inherited=inherited.listen_fds or None,
            throttle_store=run.spool,  # shared by every process: one client is one client
            nodes=run.plan.smtp_nodes + 1,
            # With SMTP nodes, every process accepts once all of them can
            # (see accept_together).
            accept_now=run.plan.smtp_nodes == 0 and inherited.board is None,
            board=None if inherited.board is None else SessionBoard.attach(*inherited.board),
        )
    except OSError as exc:
        log.crit("cannot listen", error=str(exc))
        return False
    return True


async def abandon(run: Running) -> None:
    """Undo a start-up that failed before anything was accepted."""
    for task in run.tasks:
        task.cancel()
    await asyncio.gather(*run.tasks, return_exceptions=True)
    if run.engine is not None:
        await run.engine.close()
    if run.plan.listens:
        submission_api.uninstall()
    await run.spool.close()
    if run.queue_lock is not None:
        run.queue_lock.release()


async def start_children(run: Running, config: Config) -> None:
    """The first process's part: start and supervise the plan's SMTP nodes and
    delivery processes."""
    plan = run.plan
    if plan.smtp_nodes:
        assert run.listeners is not None  # a plan with nodes listens
        for number in range(1, plan.smtp_nodes + 1):
            node = ChildProcess(
                config.config_dir,
                role=plan.node_role,
                stop_grace=SHUTDOWN_GRACE,
                config=run.child_config(config),
                listen_fds=run.listeners.listen_fds(),
                board=run.listeners.node_board(number),
                # Its new mail must reach our delivery processes (see wake_all).
                wakes=run.spool.new_work if plan.nodes_report_mail else None,
                on_exit=functools.partial(run.listeners.retire_node, number),
            )
            await node.start()
            run.nodes.append(node)
            run.spawn(node.supervise(), f"supervise-node-{number}")
    for number in range(plan.delivery_processes):
        child = ChildProcess(
            config.config_dir,
            role=Role.DELIVERY,
            stop_grace=SHUTDOWN_GRACE,
            config=run.child_config(config),
        )
        await child.start()
        run.deliverers.append(child)
        run.spawn(child.supervise(), f"supervise-{number}")
    if plan.delivery_processes:
        run.spawn(wake_all(run.deliverers, run.spool.new_work), "wake")


async def accept_together(run: Running, stop: StopRequest, *, is_node: bool) -> None:
    """The SMTP processes (the first one and its nodes) start accepting together.

    Until every one of them can accept, connections wait in the listening
    sockets' queue, so a burst of clients that keep their sessions open is
    shared by every process (acceptor.py) instead of staying for good on
    whichever came up first.  Bounded: processes that are not up after
    :data:`NODES_START_TIMEOUT` seconds (or a stop) keep no other from
    accepting.  A node restarted later finds the others accepting and
    starts at once.
    """
    assert run.listeners is not None
    together = await run.listeners.accept_together(NODES_START_TIMEOUT, stop.event)
    if not together and not stop.event.is_set():
        log.warn(
            "other SMTP processes not ready; accepting without them",
            waited=NODES_START_TIMEOUT,
        )
    if is_node:
        # The first process logs "SMTP node started" when it spawns a node;
        # this says the node is taking connections.
        log.info("SMTP node accepting", pid=os.getpid())


def flush_on_sighup(run: Running, stop: StopRequest) -> Callable[[], None]:
    """SIGHUP: passed on to the children; a delivering process makes deferred work due."""
    background: set[asyncio.Task[None]] = set()

    async def flush() -> None:
        count = await spool_admin.flush(run.spool)
        log.notice("flush requested (SIGHUP)", recipients=count)

    def request_flush() -> None:
        if stop.event.is_set():
            return  # stopping: nothing more will be delivered here
        for child in run.children:
            child.signal(signal.SIGHUP)
        if run.plan.delivers:
            task = asyncio.get_running_loop().create_task(flush())
            background.add(task)
            task.add_done_callback(background.discard)

    return request_flush


def log_ready(run: Running, config: Config) -> None:
    disabled = run.settings().disabled
    if run.plan.announces_ready:
        log.notice(
            "ready",
            listen=",".join(str(a) for a in config.smtp.listen),
            listen_tls=",".join(str(a) for a in config.smtp.listen_tls) or "-",
            queue=run.spool.location,
            delivery=("disabled" if disabled else "enabled")
            + (f" ({len(run.deliverers)} delivery process(es))" if run.deliverers else ""),
            smtp_processes=1 + len(run.nodes),
        )
    elif not run.plan.listens:
        # INFO: the first process's "ready" (NOTICE) is the one an operator waits for.
        log.info(
            "delivery ready",
            queue=run.spool.location,
            delivery="disabled" if disabled else "enabled",
        )


async def run_until_stopped(stop: StopRequest, tasks: list[asyncio.Task[None]]) -> int:
    """Wait for a stop request or a background task's failure; the exit status."""
    status = 0
    stopper: asyncio.Task[Any] = asyncio.create_task(stop.event.wait())
    try:
        watched: list[asyncio.Task[Any]] = [stopper, *tasks]
        done, _ = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
        for finished in done:
            failure = None if finished is stopper else finished.exception()
            if failure is not None:
                log.crit("internal task failed", task=finished.get_name(), error=repr(failure))
                status = 1
                stop.event.set()
    finally:
        stopper.cancel()
    return status


def mark_children_stopping(run: Running) -> None:
    """From now on no child's exit is a crash to restart or report."""
    for child in run.children:
        child.stopping()


async def shut_down(run: Running) -> None:
    """Stop accepting, stop the children, let deliveries finish, close the queue.

    The signal handlers stay in place meanwhile: a second SIGTERM must not
    kill the process half-way through its graceful stop.
    """
    mark_children_stopping(run)  # those started after the stop was asked for, too
    # SMTP nodes stop accepting together with this process's listeners.
    node_stops = asyncio.gather(*(node.stop() for node in run.nodes))
    if run.listeners is not None:
        await run.listeners.close()
    statuses = [*await node_stops]
    statuses += await asyncio.gather(*(child.stop() for child in run.deliverers))
    for child, child_status in zip(run.children, statuses, strict=True):
        if child_status != 0:
            log.error(f"{child.kind} exited with an error", status=child_status, pid=child.pid)
    if run.scheduler is not None:
        await run.scheduler.stop(SHUTDOWN_GRACE)
    for task in run.tasks:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
    if run.engine is not None:
        await run.engine.close()
    if run.plan.listens:
        submission_api.uninstall()
    await run.spool.close()
    if run.queue_lock is not None:
        run.queue_lock.release()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="outboundd", description="Outbound mail relay: accepts, queues and delivers mail."
    )
    parser.add_argument(
        "-c",
        "--config",
        default="config",
        metavar="CONFIG_DIR",
        help="configuration directory (default: ./config)",
    )
    parser.add_argument(
        "--role",
        choices=ROLES,
        default="all",
        help=argparse.SUPPRESS,  # "delivery" is how outboundd starts its own child
    )
    # How the first process hands an SMTP node its listening sockets and wake pipe.
    parser.add_argument("--listen-fd", action="append", default=[], help=argparse.SUPPRESS)
    parser.add_argument("--wake-fd", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--sessions-board", help=argparse.SUPPRESS)  # FD:SLOT
    # How the first process hands a child its configuration (see children.config_memfd).
    parser.add_argument("--config-fd", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _inherited(args: argparse.Namespace) -> Inherited:
    fds: list[tuple[int, bool]] = []
    for text in args.listen_fd:
        fd, _, kind = str(text).partition(":")
        fds.append((int(fd), kind == "tls"))
    board: tuple[int, int] | None = None
    if args.sessions_board:
        board_fd, _, slot = str(args.sessions_board).partition(":")
        board = (int(board_fd), int(slot))
    return Inherited(listen_fds=tuple(fds), wake_fd=args.wake_fd, board=board)


#: Young-generation collection threshold.  Each message allocates a few
#: thousand objects, so the default (700) ran a collection every few
#: messages; measured: collections took 4% of a process's CPU, 1% with this.
GC_THRESHOLD = (10_000, 20, 20)


def tune_gc() -> None:
    """Move everything allocated at start-up out of the collector's sight, and
    collect the young generation less often (see ``GC_THRESHOLD``)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)


def main(argv: Sequence[str] | None = None) -> int:
    early_stop.catch()
    args = parse_args(argv)
    try:
        if args.config_fd is not None:
            # A child runs on its parent's last good configuration, even
            # while a broken edit sits in the directory.
            config = read_config_fd(args.config_fd)
        else:
            config = load_config(Path(args.config))
    except ConfigError as exc:
        print(f"outboundd: {exc}", file=sys.stderr)
        return 1
    loop_factory = None
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:  # uvloop is optional: the stdlib loop works, slower
        pass
    tune_gc()
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(serve(config, args.role, _inherited(args)))


if __name__ == "__main__":
    sys.exit(main())
