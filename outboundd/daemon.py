"""``outboundd``: wires configuration, spool, plugins, listeners and delivery.

Runs in the foreground and logs to stdout.  SIGTERM/SIGINT stop accepting
mail, let running deliveries finish (bounded by ``shutdown_grace``), give
back every lease and exit 0.  SIGHUP makes every deferred recipient due now.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
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
from outboundd.spool import SpoolError, lease_owner_id
from outboundd.spool import admin as spool_admin
from outboundd.submission import api as submission_api
from outboundd.submission.queueing import SpoolSink
from outboundd.submission.server import Listeners, start_listeners

#: Seconds running deliveries get to finish after SIGTERM before they are cut off.
SHUTDOWN_GRACE = 20.0
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


ROLES = ("all", "submission", "delivery")


@dataclass(frozen=True, slots=True)
class Inherited:
    """What a child process got from the first one: listening sockets, a wake pipe."""

    listen_fds: tuple[tuple[int, bool], ...] = ()
    wake_fd: int | None = None

    @property
    def is_node(self) -> bool:
        return bool(self.listen_fds)


async def serve(config: Config, role: str = "all", inherited: Inherited | None = None) -> int:
    """Run the relay until a stop signal; the process exit status.

    ``role`` ``all`` accepts and delivers in this process.  With
    ``smtp.ini nodes`` ≥ 2 this process also starts nodes - 1 SMTP nodes
    that accept on its listening sockets; with ``delivery_processes`` ≥ 1
    that many delivery children, and then the SMTP processes only accept
    (``role`` ``submission``).  A child is started with ``role``
    ``delivery``, or as an SMTP node with ``inherited`` sockets.
    """
    logmod.configure_from(config.log)
    inherited = inherited or Inherited()
    is_child = role == "delivery" or inherited.is_node
    if role == "all" and config.outbound.delivery_processes > 0:
        role = "submission"
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def request_stop(signame: str) -> None:
        if stop.is_set():
            # Another SIGTERM (an impatient operator, or a process-group
            # signal on top of the parent's own): the graceful stop goes on.
            log.info("already stopping", signal=signame, role=role)
            return
        log.info("stopping", signal=signame, role=role)
        stop.set()

    # From the first moment: a stop signal during start-up stops gracefully
    # too, instead of killing the process with the signal's default action.
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, request_stop, sig.name)
    loop.add_signal_handler(signal.SIGHUP, lambda: None)  # a flush before there is work
    early = early_stop.pending()
    if early is not None:
        request_stop(early)
    listens = role in ("all", "submission")
    delivers = role in ("all", "delivery")
    if not is_child:
        for warning in config.warnings:
            log.warn(warning)
        if config.auth_users and "auth_flat_file" not in config.plugins:
            log.warn(
                "auth_flat_file.ini has users but the auth_flat_file plugin is not listed in "
                "plugins: AUTH is off and only relay_acl_allow clients can relay"
            )
    try:
        plugins = load_plugins(config.plugins, config.plugins_dir)
    except PluginLoadError as exc:
        log.crit("cannot start", error=str(exc))
        return 1
    hooks = HookRunner(plugins)
    logmod.set_log_hook(hooks if hooks.has("log") else None)
    try:
        # Children leave the body-file scan to the first process.
        location = config.outbound.queue_location
        # wait=True: a queue database that is down at start is waited for
        # (logged once per interval), not a reason to exit and crash-loop.
        spool = await spool_backend.open(location, recover_files=not is_child, wait=True)
    except SpoolError as exc:
        shown = spool_backend.describe_location(location)
        log.crit("cannot open the queue", queue=shown, error=str(exc))
        return 1
    report = spool.recovery
    if report is not None:
        log.info(
            "queue opened",
            role=role,
            queue=spool.location,
            leases_released=report.leases_released,
            temp_files_removed=report.temp_files_removed,
            orphan_bodies_removed=report.orphan_bodies_removed,
        )
        for qid in report.missing_bodies:
            log.crit("message body file missing; its recipients were dropped", qid=qid)

    tasks: list[asyncio.Task[None]] = []
    settings = OutboundSettings(config)
    scheduler: Scheduler | None = None
    engine: DeliveryEngine | None = None
    nodes: list[ChildProcess] = []  # SMTP nodes
    deliverers: list[ChildProcess] = []  # delivery processes
    listeners: Listeners | None = None

    if delivers:
        owner = lease_owner_id()
        engine = DeliveryEngine(config, settings, spool, hooks, owner=owner)
        scheduler = Scheduler(spool, settings, engine.deliver, owner=owner, log=log)
        tasks.append(asyncio.create_task(scheduler.run(), name="scheduler"))
        tasks.append(asyncio.create_task(settings.watch(spool.new_work), name="config-watch"))
    elif not is_child:
        # The first process follows outbound.ini even when it does not
        # deliver: a child it (re)starts gets the settings now in force.
        tasks.append(asyncio.create_task(settings.watch(asyncio.Event()), name="config-watch"))

    def child_config() -> Config:
        """The last good configuration, for a child being (re)started."""
        return config.model_copy(update={"outbound": settings.current})

    if is_child:
        parent_gone = asyncio.Event()
        tasks.append(
            asyncio.create_task(watch_parent(spool.new_work, parent_gone), name="parent-watch")
        )

        async def stop_when_parent_goes() -> None:
            await parent_gone.wait()
            request_stop("parent exited")

        tasks.append(asyncio.create_task(stop_when_parent_goes(), name="parent-gone"))
    if listens:
        # A process that also delivers takes its own new mail without a claim.
        sink: SpoolSink = spool if scheduler is None else LocalDelivery(spool, scheduler)
        submission_api.install(sink, config, hooks)
        try:
            listeners = await start_listeners(
                config,
                sink,
                hooks,
                inherited=inherited.listen_fds or None,
                throttle_store=spool,  # shared by every process: one client is one client
            )
        except OSError as exc:
            log.crit("cannot listen", error=str(exc))
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            submission_api.uninstall()
            await spool.close()
            return 1
    if inherited.wake_fd is not None:
        tasks.append(
            asyncio.create_task(notify_parent(spool.new_work, inherited.wake_fd), name="wake-up")
        )
    if listens and not is_child and listeners is not None:
        for number in range(1, config.smtp.nodes):
            node = ChildProcess(
                config.config_dir,
                role=role,
                stop_grace=SHUTDOWN_GRACE,
                config=child_config,
                listen_fds=listeners.listen_fds(),
                # Its new mail must reach our delivery processes (see wake_all).
                wakes=spool.new_work if role == "submission" else None,
            )
            await node.start()
            nodes.append(node)
            tasks.append(asyncio.create_task(node.supervise(), name=f"supervise-node-{number}"))
    if role == "submission" and not is_child:
        for number in range(config.outbound.delivery_processes):
            child = ChildProcess(
                config.config_dir, role="delivery", stop_grace=SHUTDOWN_GRACE, config=child_config
            )
            await child.start()
            deliverers.append(child)
            tasks.append(asyncio.create_task(child.supervise(), name=f"supervise-{number}"))
        tasks.append(asyncio.create_task(wake_all(deliverers, spool.new_work), name="wake"))
    children = nodes + deliverers

    background: set[asyncio.Task[None]] = set()

    def request_flush() -> None:
        if stop.is_set():
            return  # stopping: nothing more will be delivered here
        for child in children:
            child.signal(signal.SIGHUP)
        if not delivers:
            return

        async def flush() -> None:
            count = await spool_admin.flush(spool)
            log.notice("flush requested (SIGHUP)", recipients=count)

        task = loop.create_task(flush())
        background.add(task)
        task.add_done_callback(background.discard)

    loop.add_signal_handler(signal.SIGHUP, request_flush)

    if stop.is_set():
        pass  # a stop signal came during start-up: stopping, not ready
    elif listens and not is_child:
        log.notice(
            "ready",
            listen=",".join(str(a) for a in config.smtp.listen),
            listen_tls=",".join(str(a) for a in config.smtp.listen_tls) or "-",
            queue=spool.location,
            delivery=("disabled" if settings().disabled else "enabled")
            + (f" ({len(deliverers)} delivery process(es))" if deliverers else ""),
            smtp_processes=1 + len(nodes),
        )
    elif not listens:
        # INFO: the first process's "ready" (NOTICE) is the one an operator waits for.
        log.info(
            "delivery ready",
            queue=spool.location,
            delivery="disabled" if settings().disabled else "enabled",
        )
    status = 0
    try:
        stopper: asyncio.Task[Any] = asyncio.create_task(stop.wait())
        watched: list[asyncio.Task[Any]] = [stopper, *tasks]
        done, _ = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
        for finished in done:
            failure = None if finished is stopper else finished.exception()
            if failure is not None:
                log.crit("internal task failed", task=finished.get_name(), error=repr(failure))
                status = 1
                stop.set()
        stopper.cancel()
    finally:
        # The signal handlers stay in place while stopping: a second SIGTERM
        # must not kill the process half-way through its graceful stop.
        # SMTP nodes stop accepting together with this process's listeners.
        for child in children:
            child.stopping()  # none of them is restarted from now on
        node_stops = asyncio.gather(*(node.stop() for node in nodes))
        if listeners is not None:
            await listeners.close()
        statuses = [*await node_stops]
        statuses += await asyncio.gather(*(child.stop() for child in deliverers))
        for child, child_status in zip(children, statuses, strict=True):
            if child_status != 0:
                log.error(f"{child.kind} exited with an error", status=child_status, pid=child.pid)
        if scheduler is not None:
            await scheduler.stop(SHUTDOWN_GRACE)
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if engine is not None:
            await engine.close()
        if listens:
            submission_api.uninstall()
        await spool.close()
        log.info("stopped", role=role)
        await logmod.drain_log_hooks()
        logmod.shutdown()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
            # Stopped: a signal between here and the exit changes nothing.
            signal.signal(sig, signal.SIG_IGN)
    return status


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
    # How the first process hands a child its configuration (see children.config_memfd).
    parser.add_argument("--config-fd", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _inherited(args: argparse.Namespace) -> Inherited:
    fds: list[tuple[int, bool]] = []
    for text in args.listen_fd:
        fd, _, kind = str(text).partition(":")
        fds.append((int(fd), kind == "tls"))
    return Inherited(listen_fds=tuple(fds), wake_fd=args.wake_fd)


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
