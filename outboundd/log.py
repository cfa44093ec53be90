"""The logger: Haraka's levels, three line formats, and the ``log`` hook.

Every part of outboundd logs through :func:`get_logger`::

    log = get_logger("delivery")
    log.notice("delivered", qid=qid, host=host, code=250)
    if log.enabled(Level.DEBUG):
        log.debug("reply", text=expensive_render())

What callers may rely on:

* A call at a level that is off costs one integer comparison: no string is
  formatted, no record is built, no argument is converted with ``str()``.
  Only the ``**fields`` dict Python builds for the call exists.
* One call writes exactly one line.  Messages and values are escaped so a
  newline, quote or control character can never split a line or forge a
  field.
* Logging never raises into the caller.  A value whose ``str()`` fails, a
  closed stream or a failing ``log`` plugin is reported on stderr (once) and
  the caller carries on.
* The ``qid`` field is the queue ID: ``[qid]`` in the default format, key
  ``uuid`` in logfmt and JSON (as Haraka calls its transaction id).

Formats (``log.ini [main] format``)::

    default  [NOTICE] [qid] [delivery] delivered host=mx.example code=250
    logfmt   level=NOTICE uuid=qid source=delivery message="delivered" host=mx.example code=250
    json     {"level":"NOTICE","uuid":"qid","source":"delivery","message":"delivered",...}

With ``timestamps`` on, an ISO-8601 UTC time with milliseconds comes first:
as the first word (default), as ``timestamp=`` (logfmt) or as the first key
``"timestamp"`` (json).  Without a queue ID the default format shows ``-``,
logfmt ``uuid=-`` and json ``"uuid":null``.  In logfmt and json a field that
would clash with a fixed key (``level``, ``uuid``, ``source``, ``message``,
``timestamp``) is written with a leading underscore (``_level``).

Output goes to stdout (or the stream given to :func:`configure`) through the
stream's own buffer; it is flushed after every WARN-or-worse line and by
:func:`shutdown`, so a burst of INFO lines costs no system call each.

Libraries that log through the standard :mod:`logging` module (aiosmtpd,
asyncio, aiosmtplib) are bridged: :func:`configure` installs a handler on the
root logger that re-emits their records in our format, with the logger name
as source.
"""

from __future__ import annotations

import asyncio
import atexit
import contextvars
import json
import logging
import re
import secrets
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from types import MappingProxyType
from typing import TYPE_CHECKING, Final, Protocol, TextIO, overload

if TYPE_CHECKING:
    from outboundd.hooks import HookRunner

__all__ = [
    "FORMATS",
    "Level",
    "LogRecord",
    "LogSettings",
    "Logger",
    "configure",
    "configure_from",
    "drain_log_hooks",
    "get_logger",
    "level_from_name",
    "set_log_hook",
    "shutdown",
]


class Level(IntEnum):
    """Haraka's log levels.  A line is written when its level <= the configured level."""

    EMERG = 0
    ALERT = 1
    CRIT = 2
    ERROR = 3
    WARN = 4
    NOTICE = 5
    INFO = 6
    DEBUG = 7
    PROTOCOL = 8
    DATA = 9


#: The accepted values of ``log.ini [main] format``.
FORMATS: Final = ("default", "logfmt", "json")

_LEVELS: Final = tuple(Level)  # index == value, so _LEVELS[n] avoids Level(n)'s lookup
_NAMES: Final = tuple(level.name for level in Level)
_RESERVED: Final = frozenset({"level", "uuid", "source", "message", "timestamp"})


def level_from_name(name: str) -> Level:
    """Parse a level as written in ``loglevel``/``log.ini``: a name (any case,
    ``LOG`` prefix allowed as in Haraka's ``LOGDEBUG``) or a number 0-9.

    Raises :class:`ValueError` with the accepted names when it is neither.
    """
    text = name.strip().upper()
    if text.startswith("LOG") and text[3:] in Level.__members__:
        text = text[3:]
    if text in Level.__members__:
        return Level[text]
    if text == "WARNING":
        return Level.WARN
    if text.isdigit() and int(text) <= Level.DATA:
        return _LEVELS[int(text)]
    raise ValueError(f"{name!r} is not a log level (one of {', '.join(_NAMES)} or 0-9)")


@dataclass(frozen=True, slots=True)
class LogRecord:
    """One emitted line, as handed to ``log`` hook plugins.

    ``fields`` is read-only and holds the caller's values unconverted;
    ``time`` is seconds since the epoch (``time.time()``).
    """

    level: Level
    source: str
    message: str
    qid: str | None
    fields: Mapping[str, object]
    time: float


class LogSettings(Protocol):
    """What :func:`configure_from` reads: the ``log`` part of the config."""

    @property
    def level(self) -> int: ...

    @property
    def timestamps(self) -> bool: ...

    @property
    def format(self) -> str: ...


# --------------------------------------------------------------------------
# Escaping

# Characters that force a value into quotes: whitespace (which includes the
# Unicode line separators), quotes, '=', backslash, and every control char.
_NEEDS_QUOTES: Final = re.compile(r'[\s"=\\\x00-\x1f\x7f-\x9f]')
_HAS_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_BAD_KEY: Final = re.compile(r"[^A-Za-z0-9_.\-]")


def _control_table(extra: dict[int, str]) -> dict[int, str]:
    table = {c: f"\\u{c:04x}" for c in (*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029)}
    table.update({ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"})
    table.update(extra)
    return table


# Inside quotes: escape the quote and backslash too, JSON-style.
_QUOTED_TABLE: Final = _control_table({ord('"'): '\\"', ord("\\"): "\\\\"})
# A bare default-format message: only characters that would break the line.
_MESSAGE_TABLE: Final = _control_table({})
# json.dumps(ensure_ascii=False) leaves these raw; they split lines for some readers.
_JSON_TABLE: Final = {0x85: "\\u0085", 0x2028: "\\u2028", 0x2029: "\\u2029"}


def _quote(text: str) -> str:
    return '"' + text.translate(_QUOTED_TABLE) + '"'


def _text_value(value: object) -> str:
    """A field value for the default and logfmt formats: bare when safe, else quoted."""
    if value.__class__ is str:
        text: str = value
    elif value is True:
        return "true"
    elif value is False:
        return "false"
    elif value is None:
        return "null"
    elif value.__class__ is int or value.__class__ is float:
        return str(value)
    else:
        text = str(value)
    if text.isprintable():
        # The only characters of _NEEDS_QUOTES a printable string can hold
        # (whitespace other than the space and controls are not printable),
        # and of them only the quote and backslash need escaping: substring
        # tests cost less than the regex search and the translation.
        if '"' in text or "\\" in text:
            return _quote(text)
        if not text or " " in text or "=" in text:
            return '"' + text + '"'
        return text
    if _NEEDS_QUOTES.search(text):
        return _quote(text)
    return text


def _key(key: str, structured: bool) -> str:
    if _BAD_KEY.search(key) or not key:
        key = _BAD_KEY.sub("_", key) or "_"
    if structured and key in _RESERVED:
        return "_" + key
    return key


#: ``key=`` as the default and logfmt formats write it, per key: the keys of
#: a program's log calls are a small fixed set, and checking each one again
#: on every line was a regex search per field (a tenth of a NOTICE line).
_PLAIN_KEYS: Final[dict[str, str]] = {}
_STRUCTURED_KEYS: Final[dict[str, str]] = {}
#: Keys beyond this many (fields named from data) are checked each time.
_MAX_CACHED_KEYS: Final = 1024


def _key_prefix(key: str, structured: bool) -> str:
    """``key=`` for the default (``structured`` False) and logfmt formats."""
    cache = _STRUCTURED_KEYS if structured else _PLAIN_KEYS
    prefix = cache.get(key)
    if prefix is None:
        prefix = _key(key, structured) + "="
        if len(cache) < _MAX_CACHED_KEYS:
            cache[key] = prefix
    return prefix


# --------------------------------------------------------------------------
# Timestamps


class _Clock:
    """ISO-8601 UTC with milliseconds; the seconds part is cached per second.

    The cache is one tuple, swapped in a single assignment, so a thread that
    reads it while another updates it sees a matching second and prefix.
    """

    __slots__ = ("_cache",)

    def __init__(self) -> None:
        self._cache: tuple[int, str] = (-1, "")

    def iso(self, t: float) -> str:
        second = int(t)
        cached_second, prefix = self._cache
        if second != cached_second:
            prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._cache = (second, prefix)
        return f"{prefix}.{int((t - second) * 1000):03d}Z"


_clock = _Clock()


# --------------------------------------------------------------------------
# Formatters: (level, source, message, qid, fields, time or None) -> line


Formatter = Callable[[int, str, str, "str | None", dict[str, object], "float | None"], str]


def _format_default(
    level: int,
    source: str,
    message: str,
    qid: str | None,
    fields: dict[str, object],
    t: float | None,
) -> str:
    # Every character _HAS_CONTROL finds is unprintable: a printable text
    # (almost every one) is taken without the regex search.
    if not message.isprintable() and _HAS_CONTROL.search(message):
        message = message.translate(_MESSAGE_TABLE)
    if not source.isprintable() and _HAS_CONTROL.search(source):
        source = source.translate(_MESSAGE_TABLE)
    if qid is None:
        qid = "-"
    elif not qid.isprintable() and _HAS_CONTROL.search(qid):
        qid = qid.translate(_MESSAGE_TABLE)
    parts = [f"[{_NAMES[level]}] [{qid}] [{source}] {message}"]
    if t is not None:
        parts.insert(0, _clock.iso(t))
    keys = _PLAIN_KEYS
    for key, value in fields.items():
        parts.append((keys.get(key) or _key_prefix(key, False)) + _text_value(value))
    return " ".join(parts)


def _format_logfmt(
    level: int,
    source: str,
    message: str,
    qid: str | None,
    fields: dict[str, object],
    t: float | None,
) -> str:
    parts = [
        f"level={_NAMES[level]}",
        f"uuid={'-' if qid is None else _text_value(qid)}",
        f"source={_text_value(source)}",
        f"message={_quote(message)}",
    ]
    if t is not None:
        parts.insert(0, f"timestamp={_clock.iso(t)}")
    keys = _STRUCTURED_KEYS
    for key, value in fields.items():
        parts.append((keys.get(key) or _key_prefix(key, True)) + _text_value(value))
    return " ".join(parts)


def _json_value(value: object) -> object:
    if value is None or value.__class__ in (str, int, bool):
        return value
    if value.__class__ is float:
        # NaN and infinities are not JSON.
        return (
            value if value == value and value not in (float("inf"), float("-inf")) else str(value)
        )
    if isinstance(value, list | tuple):
        return [_json_value(item) for item in value]
    if isinstance(value, dict):
        return {str(k): _json_value(v) for k, v in value.items()}
    return str(value)


def _format_json(
    level: int,
    source: str,
    message: str,
    qid: str | None,
    fields: dict[str, object],
    t: float | None,
) -> str:
    obj: dict[str, object] = {}
    if t is not None:
        obj["timestamp"] = _clock.iso(t)
    obj["level"] = _NAMES[level]
    obj["uuid"] = qid
    obj["source"] = source
    obj["message"] = message
    for key, value in fields.items():
        obj[_key(key, True)] = _json_value(value)
    line = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    if "\x85" in line or "\u2028" in line or "\u2029" in line:
        line = line.translate(_JSON_TABLE)
    return line


_FORMATTERS: Final[dict[str, Formatter]] = {
    "default": _format_default,
    "logfmt": _format_logfmt,
    "json": _format_json,
}


def _json_text(value: object) -> str:
    """One field value as :func:`_format_json` writes it."""
    text = json.dumps(_json_value(value), ensure_ascii=False)
    if "\x85" in text or "\u2028" in text or "\u2029" in text:
        text = text.translate(_JSON_TABLE)
    return text


#: How each formatter writes a single field value, for :meth:`Logger.each`.
_VALUE_TEXT: Final[dict[Formatter, Callable[[object], str]]] = {
    _format_default: _text_value,
    _format_logfmt: _text_value,
    _format_json: _json_text,
}

#: Stands for the varying value while :meth:`Logger.each` formats the shared
#: part of its lines once.  Random per process, and only ever searched for in
#: the part of the line that precedes the caller's values.
_PLACEHOLDER: Final = "v" + secrets.token_hex(12)


# --------------------------------------------------------------------------
# Shared state


class _State:
    """The one configuration every Logger reads; mutated in place by configure()."""

    __slots__ = (
        "formatter",
        "hook_loop",
        "hooks",
        "level",
        "lock",
        "reported",
        "stream",
        "timestamps",
    )

    def __init__(self) -> None:
        self.level: int = Level.INFO
        self.timestamps = False
        self.formatter: Formatter = _format_default
        self.stream: TextIO | None = None  # None: whatever sys.stdout is at write time
        self.hooks: HookRunner | None = None
        self.hook_loop: asyncio.AbstractEventLoop | None = None
        self.lock = threading.Lock()
        self.reported: set[str] = set()


_state = _State()


def _report_once(key: str, text: str) -> None:
    """Tell the operator about a logging failure on stderr, once per ``key``.

    Never goes through the logger: the logger is what is failing.
    """
    if key in _state.reported:
        return
    _state.reported.add(key)
    try:
        sys.stderr.write(f"outboundd: logging: {text}\n")
        sys.stderr.flush()
    except Exception:
        pass


def _emit(level: int, source: str, message: str, fields: dict[str, object]) -> None:
    """Format and write one enabled record, then hand it to the ``log`` hook."""
    now = time.time()
    stamp = now if _state.timestamps else None
    qid: str | None = None
    try:
        if message.__class__ is not str:
            message = str(message)
        qid_value = fields.pop("qid", None)
        if qid_value is not None:
            qid = str(qid_value)
        line = _state.formatter(level, source, message, qid, fields, stamp)
    except Exception as exc:
        # A value whose __str__ raised: still say that something was logged.
        if message.__class__ is not str:
            message = "<unprintable message>"
        fields = {"log_error": f"{type(exc).__name__} while formatting this line"}
        line = _state.formatter(level, source, message, qid, fields, stamp)
    stream = _state.stream or sys.stdout
    try:
        with _state.lock:
            stream.write(line + "\n")
            if level <= Level.WARN:
                stream.flush()
    except Exception as exc:
        _report_once("stream", f"cannot write log lines: {type(exc).__name__}: {exc}")
    runner = _state.hooks
    if runner is not None and runner.has("log") and not _in_log_hook.get():
        record = LogRecord(_LEVELS[level], source, message, qid, MappingProxyType(fields), now)
        _dispatch_hook(runner, record)


def _emit_each(
    level: int,
    source: str,
    message: str,
    key: str,
    values: Sequence[object],
    fields: dict[str, object],
) -> None:
    """:meth:`Logger.each`: the line is formatted once with a placeholder for
    the first field's value, then each value is put in its place, and every
    line goes to the stream in one write.

    With a ``log`` hook (each record is its own hook call) or when the
    shared part cannot be formatted, each value is emitted on its own.
    """
    runner = _state.hooks
    value_text = _VALUE_TEXT.get(_state.formatter)
    if value_text is None or (runner is not None and runner.has("log")):
        for value in values:
            _emit(level, source, message, {key: value, **fields})
        return
    stamp = time.time() if _state.timestamps else None
    qid_value = fields.pop("qid", None)
    qid = None if qid_value is None else str(qid_value)
    try:
        if len(values) == 1:  # one line: no shared part to reuse
            text = (
                _state.formatter(level, source, message, qid, {key: values[0], **fields}, stamp)
                + "\n"
            )
        else:
            template = _state.formatter(
                level, source, message, qid, {key: _PLACEHOLDER, **fields}, stamp
            )
            head, found, tail = template.partition(value_text(_PLACEHOLDER))
            if not found:
                raise ValueError("placeholder not found")
            text = "".join([head + value_text(value) + tail + "\n" for value in values])
    except Exception:
        if qid_value is not None:
            fields["qid"] = qid_value
        for value in values:
            _emit(level, source, message, {key: value, **fields})
        return
    stream = _state.stream or sys.stdout
    try:
        with _state.lock:
            stream.write(text)
            if level <= Level.WARN:
                stream.flush()
    except Exception as exc:
        _report_once("stream", f"cannot write log lines: {type(exc).__name__}: {exc}")


# --------------------------------------------------------------------------
# The log hook

_in_log_hook: Final = contextvars.ContextVar("outboundd_in_log_hook", default=False)
_MAX_PENDING_HOOKS: Final = 10_000
_pending: set[asyncio.Task[None]] = set()


def _dispatch_hook(runner: HookRunner, record: LogRecord) -> None:
    """Schedule the hook chain for ``record`` without waiting for it.

    From a thread with no running loop (an ``asyncio.to_thread`` worker, a
    library thread) the record is handed to the loop that last ran a hook.
    """
    if len(_pending) >= _MAX_PENDING_HOOKS:
        _report_once(
            "hook-backlog",
            f"log hook plugins are {_MAX_PENDING_HOOKS} records behind; dropping records",
        )
        return
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        target = _state.hook_loop
        if target is None or target.is_closed():
            return
        try:
            target.call_soon_threadsafe(_start_hook_task, runner, record)
        except RuntimeError:
            pass  # the loop closed between the check and the call
        return
    _state.hook_loop = loop
    _start_hook_task(runner, record)


def _start_hook_task(runner: HookRunner, record: LogRecord) -> None:
    task = asyncio.get_running_loop().create_task(_run_log_hook(runner, record))
    _pending.add(task)
    task.add_done_callback(_pending.discard)


async def _run_log_hook(runner: HookRunner, record: LogRecord) -> None:
    # Inside this task (and any task a plugin starts from it) logging does
    # not call the hook again, so a plugin that logs cannot loop forever.
    _in_log_hook.set(True)
    from outboundd.hooks import HookFailure

    try:
        await runner.run("log", record)
    except HookFailure as exc:
        _report_once(f"hook:{exc.plugin}", f"{exc} (further failures not reported)")
    except Exception as exc:
        _report_once("hook", f"log hook failed: {type(exc).__name__}: {exc}")


def set_log_hook(runner: HookRunner | None) -> None:
    """Pass every emitted record to ``runner``'s ``log`` hook chain (None: stop).

    The chain runs as a task on the event loop; the logging call never waits
    for it.  Plugin failures are reported once per plugin on stderr.
    """
    _state.hooks = runner


async def drain_log_hooks() -> None:
    """Wait for ``log`` hook calls already scheduled on this loop (shutdown, tests)."""
    loop = asyncio.get_running_loop()
    while True:
        mine = [task for task in _pending if task.get_loop() is loop and not task.done()]
        if not mine:
            return
        await asyncio.gather(*mine, return_exceptions=True)


# --------------------------------------------------------------------------
# The stdlib bridge


def _from_stdlib_level(levelno: int) -> int:
    if levelno >= logging.CRITICAL:
        return Level.CRIT
    if levelno >= logging.ERROR:
        return Level.ERROR
    if levelno >= logging.WARNING:
        return Level.WARN
    if levelno >= logging.INFO:
        return Level.INFO
    if levelno >= logging.DEBUG:
        return Level.DEBUG
    return Level.PROTOCOL


def _to_stdlib_level(level: int) -> int:
    """The root logger's level, so libraries skip records we would drop anyway."""
    if level >= Level.PROTOCOL:
        return 1
    if level >= Level.DEBUG:
        return logging.DEBUG
    if level >= Level.INFO:
        return logging.INFO
    if level >= Level.WARN:
        return logging.WARNING  # NOTICE too: stdlib has nothing between INFO and WARNING
    if level >= Level.ERROR:
        return logging.ERROR
    return logging.CRITICAL


_EXC_FORMATTER: Final = logging.Formatter()


class StdlibBridge(logging.Handler):
    """Re-emits standard-library log records as ours (source = logger name)."""

    def emit(self, record: logging.LogRecord) -> None:
        level = _from_stdlib_level(record.levelno)
        if _state.level < level:
            return
        try:
            message = record.getMessage()
        except Exception:
            message = str(record.msg)
        fields: dict[str, object] = {}
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            fields["error"] = f"{type(exc).__name__}: {exc}"
            if _state.level >= Level.DEBUG:
                fields["traceback"] = _EXC_FORMATTER.formatException(record.exc_info)
        _emit(level, record.name, message, fields)


_bridge: StdlibBridge | None = None


def _install_bridge(level: int) -> None:
    global _bridge
    root = logging.getLogger()
    if _bridge is None:
        _bridge = StdlibBridge()
        root.addHandler(_bridge)
    elif _bridge not in root.handlers:
        root.addHandler(_bridge)
    root.setLevel(_to_stdlib_level(level))


def _remove_bridge() -> None:
    global _bridge
    if _bridge is not None:
        logging.getLogger().removeHandler(_bridge)
        _bridge = None


# --------------------------------------------------------------------------
# Configuration


@overload
def configure(
    level: LogSettings,
    /,
    *,
    stream: TextIO | None = None,
    hooks: HookRunner | None = None,
) -> None: ...


@overload
def configure(
    level: int = Level.INFO,
    timestamps: bool = False,
    fmt: str = "default",
    stream: TextIO | None = None,
    *,
    hooks: HookRunner | None = None,
) -> None: ...


def configure(
    level: int | LogSettings = Level.INFO,
    timestamps: bool = False,
    fmt: str = "default",
    stream: TextIO | None = None,
    *,
    hooks: HookRunner | None = None,
) -> None:
    """Set the level, timestamps and format for every logger, now.

    Takes either the values or a config object with ``level``,
    ``timestamps`` and ``format`` (the ``log`` part of ``load_config``).
    ``stream`` defaults to stdout; ``hooks`` (when given) becomes the ``log``
    hook runner, as :func:`set_log_hook`.  Also installs the stdlib bridge on
    the root logger.  Safe to call again (config reload): loggers already
    handed out follow the new settings.  Raises :class:`ValueError` for a
    level outside 0-9 or an unknown format, and changes nothing then.
    """
    if not isinstance(level, int):
        timestamps, fmt, level = level.timestamps, level.format, level.level
    if isinstance(level, bool) or not 0 <= level <= Level.DATA:
        raise ValueError(f"log level {level!r} is not between 0 (EMERG) and 9 (DATA)")
    formatter = _FORMATTERS.get(fmt)
    if formatter is None:
        raise ValueError(f"log format {fmt!r} is not one of {', '.join(FORMATS)}")
    old_stream = _state.stream
    if old_stream is not None and old_stream is not stream:
        _flush(old_stream)
    _state.level = int(level)
    _state.timestamps = bool(timestamps)
    _state.formatter = formatter
    _state.stream = stream
    if hooks is not None:
        _state.hooks = hooks
    _install_bridge(_state.level)


def configure_from(
    settings: LogSettings,
    *,
    stream: TextIO | None = None,
    hooks: HookRunner | None = None,
) -> None:
    """:func:`configure` from the config's ``log`` section."""
    configure(settings.level, settings.timestamps, settings.format, stream, hooks=hooks)


def _flush(stream: TextIO) -> None:
    try:
        with _state.lock:
            stream.flush()
    except Exception:
        pass


def shutdown() -> None:
    """Flush the stream, detach the ``log`` hook and remove the stdlib bridge.

    Runs automatically at interpreter exit; calling it twice is harmless.
    Loggers keep working afterwards (writing to the same stream).
    """
    _flush(_state.stream or sys.stdout)
    _state.hooks = None
    _state.hook_loop = None
    _remove_bridge()


atexit.register(shutdown)


# --------------------------------------------------------------------------
# Loggers


class Logger:
    """Logs for one source (a module or plugin name).  Get one with :func:`get_logger`.

    Each level method checks the configured level with one integer compare
    before doing anything else.  The message is positional-only, so every
    keyword (even ``message=``) is a field.
    """

    __slots__ = ("source",)

    def __init__(self, source: str) -> None:
        self.source = source

    def __repr__(self) -> str:
        return f"Logger({self.source!r})"

    def enabled(self, level: int) -> bool:
        """True when a line at ``level`` would be written (guard expensive fields)."""
        return _state.level >= level

    def log(self, level: int, message: str, /, **fields: object) -> None:
        """Log at a level given as a number; levels above 9 count as DATA, below 0 as EMERG."""
        level = 9 if level > 9 else 0 if level < 0 else int(level)
        if _state.level >= level:
            _emit(level, self.source, message, fields)

    def each(
        self, level: int, message: str, key: str, values: Sequence[object], /, **fields: object
    ) -> None:
        """One line per item of ``values``, each exactly the line of
        ``log(level, message, **{key: value}, **fields)`` (``key`` is the
        first field), for the same fields repeated over many items such as
        the recipients of one delivery: the shared part is formatted once.
        """
        level = 9 if level > 9 else 0 if level < 0 else int(level)
        if _state.level >= level:
            _emit_each(level, self.source, message, key, values, fields)

    def data(self, message: str, /, **fields: object) -> None:
        if _state.level >= 9:
            _emit(9, self.source, message, fields)

    def protocol(self, message: str, /, **fields: object) -> None:
        if _state.level >= 8:
            _emit(8, self.source, message, fields)

    def debug(self, message: str, /, **fields: object) -> None:
        if _state.level >= 7:
            _emit(7, self.source, message, fields)

    def info(self, message: str, /, **fields: object) -> None:
        if _state.level >= 6:
            _emit(6, self.source, message, fields)

    def notice(self, message: str, /, **fields: object) -> None:
        if _state.level >= 5:
            _emit(5, self.source, message, fields)

    def warn(self, message: str, /, **fields: object) -> None:
        if _state.level >= 4:
            _emit(4, self.source, message, fields)

    def error(self, message: str, /, **fields: object) -> None:
        if _state.level >= 3:
            _emit(3, self.source, message, fields)

    def crit(self, message: str, /, **fields: object) -> None:
        if _state.level >= 2:
            _emit(2, self.source, message, fields)

    def alert(self, message: str, /, **fields: object) -> None:
        if _state.level >= 1:
            _emit(1, self.source, message, fields)

    def emerg(self, message: str, /, **fields: object) -> None:
        _emit(0, self.source, message, fields)


_loggers: dict[str, Logger] = {}


def get_logger(source: str) -> Logger:
    """The logger for ``source`` (shown as ``[source]``); the same object per name."""
    logger = _loggers.get(source)
    if logger is None:
        logger = _loggers.setdefault(source, Logger(source))
    return logger
