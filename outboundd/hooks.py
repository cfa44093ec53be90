"""Plugins and hooks: loading, result values, and running a hook chain.

A plugin is a Python module with ``async def`` functions named after the
hooks it handles.  A hook returns ``None`` to let the next plugin decide, or a
:class:`HookResult` made by :func:`ok`, :func:`deny`, :func:`denysoft` or
:func:`delay`.  The first plugin that returns a result ends the chain.

A plugin that raises, times out or returns something that is not a result is
*never* allowed to take the message down with it: :meth:`HookRunner.run`
turns that into a :class:`HookFailure` naming the plugin, and the caller
decides what the safe answer is (451 at submission, a deferral in delivery).
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import math
import sys
from collections.abc import Awaitable, Callable, Coroutine, Generator, Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from types import CoroutineType, ModuleType
from typing import Any

__all__ = [
    "HOOK_NAMES",
    "MAX_DELAY_SECONDS",
    "MX",
    "HookFailure",
    "HookOutcome",
    "HookResult",
    "HookRunner",
    "PluginLoadError",
    "ResultCode",
    "delay",
    "deny",
    "denysoft",
    "load_plugins",
    "ok",
]

#: Every hook a plugin may implement, in the order a message meets them.
HOOK_NAMES: tuple[str, ...] = (
    "queue_outbound",
    "pre_send_trans_email",
    "send_email",
    "get_mx",
    "deferred",
    "bounce",
    "delivered",
    "log",
)

#: Seconds a single plugin call may take before it counts as failed.
DEFAULT_HOOK_TIMEOUT = 30.0


class ResultCode(StrEnum):
    """What a plugin decided.  ``cont`` (returning ``None``) is implicit."""

    OK = "ok"
    DENY = "deny"
    DENYSOFT = "denysoft"
    DELAY = "delay"


#: The longest delay a plugin may ask for (a year, the longest step of
#: ``temp_fail_intervals``): a retry time further out cannot be shown as a
#: date, and infinity or NaN would never (or constantly) be due.
MAX_DELAY_SECONDS: float = 365 * 86400.0


@dataclass(frozen=True, slots=True)
class HookResult:
    """A plugin's decision: a code plus an optional message/value/delay.

    ``delay_seconds`` is checked here, where the plugin builds its result,
    so a bad delay raises in the plugin (its hook fails, naming it) instead
    of reaching the queue.
    """

    code: ResultCode
    value: Any = None
    message: str | None = None
    delay_seconds: float | None = None

    def __post_init__(self) -> None:
        seconds = self.delay_seconds
        if seconds is not None and not (
            math.isfinite(seconds) and 0 <= seconds <= MAX_DELAY_SECONDS
        ):
            raise ValueError(
                f"a delay must be a number of seconds from 0 to {MAX_DELAY_SECONDS:.0f},"
                f" not {seconds!r}"
            )


def ok(value: Any = None) -> HookResult:
    """The plugin handled it; ``value`` carries what the hook asks for (e.g. MX list)."""
    return HookResult(ResultCode.OK, value=value)


def deny(message: str | None = None) -> HookResult:
    """Permanent refusal: 5xx at submission, a bounce in delivery."""
    return HookResult(ResultCode.DENY, message=message)


def denysoft(message_or_delay: str | float | None = None) -> HookResult:
    """Temporary refusal.  A number is a delay in seconds (``deferred`` hook)."""
    if isinstance(message_or_delay, bool):
        raise TypeError("denysoft() takes a message or a delay in seconds, not a bool")
    if isinstance(message_or_delay, int | float):
        return HookResult(ResultCode.DENYSOFT, delay_seconds=float(message_or_delay))
    return HookResult(ResultCode.DENYSOFT, message=message_or_delay)


def delay(seconds: float) -> HookResult:
    """Postpone delivery without counting a failure (``send_email`` hook)."""
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        raise ValueError("delay() takes a number of seconds")
    return HookResult(ResultCode.DELAY, delay_seconds=float(seconds))


@dataclass(frozen=True, slots=True)
class MX:
    """One mail exchanger to try, from DNS or from a ``get_mx`` plugin.

    ``exchange`` is a host name or an IP address literal.  ``from_dns`` is
    true only for hosts found in DNS; ``local_mx_ok`` filtering applies only to
    those (a plugin-given MX is used exactly as given).
    """

    exchange: str
    port: int | None = None
    priority: int = 0
    bind: str | None = None
    bind_helo: str | None = None
    auth_user: str | None = None
    auth_pass: str | None = field(default=None, repr=False)
    auth_type: str | None = None
    auth_without_tls: bool = False
    using_lmtp: bool = False
    from_dns: bool = False


class PluginLoadError(Exception):
    """A plugin named in ``config/plugins`` could not be found or imported."""


class HookFailure(Exception):
    """A plugin raised, timed out or returned a value that is not a result."""

    def __init__(self, hook: str, plugin: str, reason: str) -> None:
        super().__init__(f"plugin {plugin} failed in hook {hook}: {reason}")
        self.hook = hook
        self.plugin = plugin
        self.reason = reason


@dataclass(frozen=True, slots=True)
class HookOutcome:
    """The result that ended a hook chain and the plugin that gave it."""

    result: HookResult | None
    plugin: str | None


HookFunction = Callable[..., Awaitable[HookResult | None]]


@dataclass(frozen=True, slots=True)
class Plugin:
    name: str
    module: ModuleType


BUILTIN_PACKAGE = "outboundd.plugins"


def _load_one(name: str, plugins_dir: Path) -> Plugin:
    if not name.replace("_", "").replace("-", "").replace(".", "").isalnum():
        raise PluginLoadError(f"plugin name {name!r} is not a valid module name")
    local = plugins_dir / f"{name}.py"
    if local.is_file():
        module_name = f"outboundd_local_plugins.{name}"
        spec = importlib.util.spec_from_file_location(module_name, local)
        if spec is None or spec.loader is None:
            raise PluginLoadError(f"plugin {name}: cannot load {local}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(module_name, None)
            raise PluginLoadError(
                f"plugin {name}: {local} failed to import: {type(exc).__name__}: {exc}"
            ) from exc
        return Plugin(name, module)
    try:
        module = importlib.import_module(f"{BUILTIN_PACKAGE}.{name}")
    except ModuleNotFoundError as exc:
        if exc.name == f"{BUILTIN_PACKAGE}.{name}":
            raise PluginLoadError(
                f"plugin {name}: no built-in plugin of that name and no file {local}"
            ) from exc
        raise PluginLoadError(f"plugin {name}: failed to import: {exc}") from exc
    except Exception as exc:
        raise PluginLoadError(
            f"plugin {name}: failed to import: {type(exc).__name__}: {exc}"
        ) from exc
    return Plugin(name, module)


def load_plugins(names: Iterable[str], plugins_dir: Path) -> list[Plugin]:
    """Import each named plugin: ``plugins_dir/NAME.py`` first, then a built-in."""
    return [_load_one(name, plugins_dir) for name in names]


class HookRunner:
    """Runs hook chains over the loaded plugins, in configuration order."""

    def __init__(self, plugins: Iterable[Plugin], timeout: float = DEFAULT_HOOK_TIMEOUT) -> None:
        self.plugins = list(plugins)
        self.timeout = timeout
        self._chains: dict[str, list[tuple[str, HookFunction]]] = {}
        for hook in HOOK_NAMES:
            chain: list[tuple[str, HookFunction]] = []
            for plugin in self.plugins:
                fn = getattr(plugin.module, hook, None)
                if fn is not None and callable(fn):
                    chain.append((plugin.name, fn))
            self._chains[hook] = chain

    def has(self, hook: str) -> bool:
        """True when at least one plugin implements ``hook`` (lets callers skip work)."""
        return bool(self._chains.get(hook))

    def add(self, name: str, hook: str, fn: HookFunction) -> None:
        """Register a hook function directly (built-in behaviour, tests)."""
        if hook not in HOOK_NAMES:
            raise ValueError(f"unknown hook {hook!r}")
        self._chains[hook].append((name, fn))

    async def run(self, hook: str, *args: Any) -> HookOutcome:
        """Call each plugin's ``hook`` until one returns a result.

        Raises :class:`HookFailure` when a plugin raises, times out or returns
        something other than ``None`` or a :class:`HookResult`.
        """
        for plugin_name, fn in self._chains.get(hook, ()):
            try:
                call = fn(*args)
                if type(call) is CoroutineType:
                    # Its first step runs here, with no time limit to set up:
                    # most hooks (a routing table, a check) decide without
                    # waiting for anything, and a step that never yields to
                    # the loop is not one asyncio.timeout could stop anyway.
                    # Only a hook that does wait gets the timer (8 µs a call).
                    try:
                        waiting_on = call.send(None)
                    except StopIteration as done:
                        result = done.value
                    else:
                        async with asyncio.timeout(self.timeout):
                            result = await _Resumed(call, waiting_on)
                else:
                    # asyncio.timeout, not wait_for: no extra task (and loop turn) per call.
                    async with asyncio.timeout(self.timeout):
                        result = await call
            except TimeoutError as exc:
                raise HookFailure(hook, plugin_name, f"timed out after {self.timeout:g}s") from exc
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                raise HookFailure(hook, plugin_name, f"{type(exc).__name__}: {exc}") from exc
            if result is None:
                continue
            if not isinstance(result, HookResult):
                raise HookFailure(
                    hook,
                    plugin_name,
                    f"returned {type(result).__name__}, expected None or a result from "
                    "outboundd.hooks (ok, deny, denysoft, delay)",
                )
            return HookOutcome(result, plugin_name)
        return HookOutcome(None, None)


class _Resumed:
    """The rest of a coroutine whose first step has run and is waiting on ``pending``.

    Awaiting it hands ``pending`` to the task, as the coroutine's own await
    would have, then passes everything the task sends or throws (a result,
    a cancellation) on to the coroutine until it returns: the same
    behaviour as awaiting the coroutine from the start.
    """

    __slots__ = ("_coro", "_pending")

    def __init__(self, coro: Coroutine[Any, Any, Any], pending: Any) -> None:
        self._coro = coro
        self._pending = pending

    def __await__(self) -> Generator[Any, Any, Any]:
        coro, pending = self._coro, self._pending
        while True:
            try:
                sent = yield pending
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # a cancellation thrown in by the task
                try:
                    pending = coro.throw(exc)
                except StopIteration as done:
                    return done.value
            else:
                try:
                    pending = coro.send(sent)
                except StopIteration as done:
                    return done.value
