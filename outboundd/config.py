"""The configuration directory, read into frozen pydantic models.

:func:`load_config` reads every file of the directory (``-c``, default
``./config``) once, at start-up; :func:`load_outbound` re-reads
``outbound.ini`` alone for hot reload.  Both either return a complete,
validated configuration or raise :class:`ConfigError`, whose ``str()`` is one
line naming the file, the section, the key, the value and what was expected::

    config/outbound.ini [main] concurrency_max: 'ten' is not an integer

so that a bad edit stops start-up with a message the operator can act on and
never with a traceback.

The files keep Haraka's names, formats and meanings (see
``docs/configuration.md``): ini files as haraka-config reads them, Haraka's
boolean words, ``temp_fail_intervals`` in Haraka's grammar.  Where Haraka
silently ignores a broken value (an unparsable ``temp_fail_intervals``, a
line that is not ``key=value``), outboundd refuses it: a configuration that
does something other than what its author wrote is worse than one that does
not start.  Unknown keys, sections and Haraka settings outboundd does not use
are not errors (Haraka configs must keep working); they are collected in
:attr:`Config.warnings` for the daemon to log.

A missing file, or a missing directory, means the defaults.  An empty value
(``key=``) also means the default for a single value, and an empty list for a
list (``listen=``, ``nameservers=``).  Relative paths resolve against the
directory that contains the configuration directory (``base_dir``).
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
import socket
import ssl
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import Final, Literal, TypeAlias, TypeVar, cast, get_args

from pydantic import BaseModel, ConfigDict, Field

from outboundd.log import Level, level_from_name
from outboundd.plugins.auth_flat_file import is_plaintext, read_users

__all__ = [
    "BOOLEAN_FALSE",
    "BOOLEAN_TRUE",
    "MIN_TEMP_FAIL_INTERVAL",
    "BounceTemplates",
    "Config",
    "ConfigError",
    "HostPort",
    "IniEntry",
    "IniFile",
    "LogConfig",
    "OutboundConfig",
    "SmtpConfig",
    "TlsConfig",
    "TlsMain",
    "TlsOutbound",
    "default_temp_fail_intervals",
    "load_config",
    "load_outbound",
    "parse_bool",
    "parse_ini",
    "parse_temp_fail_intervals",
]

#: Haraka's words for true and false (case-insensitive).  Haraka treats every
#: word outside the first set as false; outboundd rejects words in neither set.
BOOLEAN_TRUE: Final = frozenset({"true", "yes", "ok", "enabled", "on", "1"})
BOOLEAN_FALSE: Final = frozenset({"false", "no", "off", "disabled", "0"})

#: The shortest retry delay ``temp_fail_intervals`` accepts (Haraka's limit).
MIN_TEMP_FAIL_INTERVAL: Final = 5.0
#: The longest single retry delay: one year.  Larger values would overflow the
#: spool's timestamps; no one means them.
MAX_TEMP_FAIL_INTERVAL: Final = 365 * 86400.0
#: The longest duration any other setting accepts: one year, for the same reason.
MAX_SECONDS: Final = 365 * 86400.0
#: The most retries a schedule may hold, so that ``1d*99999999`` cannot eat memory.
MAX_TEMP_FAIL_ENTRIES: Final = 1000

_TLS_VERSIONS: Final = ("TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3")

InetPrefer: TypeAlias = Literal["default", "v4", "v6"]
LogFormat: TypeAlias = Literal["default", "logfmt", "json"]
_MAX_SHOWN_VALUE: Final = 120


# --------------------------------------------------------------------------
# Errors


def _shown(value: str) -> str:
    """A value quoted for an error line: repr (so control characters and
    newlines are escaped and the message stays one line), long values cut."""
    if len(value) > _MAX_SHOWN_VALUE:
        value = value[:_MAX_SHOWN_VALUE] + "..."
    return repr(value)


class ConfigError(Exception):
    """A configuration file holds something outboundd cannot use.

    ``str()`` is always one line: ``FILE [SECTION] KEY: PROBLEM``,
    ``FILE line N: PROBLEM`` or ``FILE: PROBLEM``.  The parts are also
    attributes, for callers that want them separately.
    """

    def __init__(
        self,
        file: str,
        problem: str,
        *,
        section: str | None = None,
        key: str | None = None,
        line: int | None = None,
    ) -> None:
        self.file = file
        self.problem = " ".join(problem.split())
        self.section = section
        self.key = key
        self.line = line
        super().__init__(self._render())

    def _render(self) -> str:
        where = self.file
        if self.section is not None:
            where += f" [{self.section}]"
        if self.key is not None:
            where += f" {self.key}"
        elif self.line is not None:
            where += f" line {self.line}"
        return f"{where}: {self.problem}"


def _display(path: Path) -> str:
    """The name used for ``path`` in messages: relative to the working
    directory when it lies below it (``config/outbound.ini``), else as given."""
    if path.is_absolute():
        try:
            return str(path.relative_to(Path.cwd()))
        except (ValueError, OSError):
            return str(path)
    return str(path)


# --------------------------------------------------------------------------
# Values


def parse_bool(text: str) -> bool:
    """A Haraka boolean word (``true yes ok enabled on 1`` / ``false no off
    disabled 0``, any case); :class:`ValueError` for anything else."""
    word = text.strip().lower()
    if word in BOOLEAN_TRUE:
        return True
    if word in BOOLEAN_FALSE:
        return False
    raise ValueError(
        f"{_shown(text)} is not a boolean (true, yes, ok, enabled, on, 1 "
        "or false, no, off, disabled, 0)"
    )


_LABEL: Final = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
_HOSTNAME_RE: Final = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")


def _is_hostname(text: str) -> bool:
    """A DNS host name in LDH form (single labels allowed, like ``localhost``);
    an all-numeric last label is not a name but a mistyped address."""
    return (
        len(text) <= 253
        and _HOSTNAME_RE.fullmatch(text) is not None
        and not text.rsplit(".", 1)[-1].isdigit()
    )


def _parse_port(text: str) -> int:
    if not text.isdigit():
        raise ValueError(f"port {text!r} is not a number")
    port = int(text)
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} is not between 1 and 65535")
    return port


@dataclass(frozen=True, slots=True)
class HostPort:
    """A host (IP address or name) and a port.

    ``str()`` gives ``host:port``, or ``[v6]:port`` for an IPv6 address, the
    same form :meth:`parse` reads.  IP addresses are kept in their canonical
    text form, names in lower case.
    """

    host: str
    port: int

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"

    @classmethod
    def parse(
        cls, text: str, default_port: int | None = None, *, require_ip: bool = False
    ) -> HostPort:
        """Read ``127.0.0.1:2525``, ``[::1]:25``, ``::1``, ``mail.example`` or
        ``mail.example:25``; a missing port is ``default_port``.

        Raises :class:`ValueError` saying what is wrong (without repeating
        the text, which the caller shows).  ``require_ip`` rejects names.
        """
        spec = text.strip()
        port: int | None = default_port
        if not spec:
            raise ValueError("the address is empty")
        if spec.startswith("["):
            host, bracket, rest = spec[1:].partition("]")
            if not bracket:
                raise ValueError("'[' without ']'")
            try:
                host = str(ipaddress.IPv6Address(host))
            except ValueError:
                raise ValueError(f"{host!r} in brackets is not an IPv6 address") from None
            if rest.startswith(":"):
                port = _parse_port(rest[1:])
            elif rest:
                raise ValueError(f"unexpected {rest!r} after ']'")
        elif spec.count(":") > 1:
            try:
                host = str(ipaddress.IPv6Address(spec))
            except ValueError:
                raise ValueError(
                    "not an IPv6 address (write an IPv6 address with a port as [addr]:port)"
                ) from None
        else:
            host, colon, port_text = spec.partition(":")
            if colon:
                port = _parse_port(port_text)
            try:
                host = str(ipaddress.IPv4Address(host))
            except ValueError:
                if require_ip:
                    raise ValueError(f"{host!r} is not an IP address") from None
                if not _is_hostname(host):
                    raise ValueError(f"{host!r} is not an IP address or host name") from None
                host = host.lower()
        if port is None:
            raise ValueError("no port given (write host:port)")
        return cls(host, port)


# --------------------------------------------------------------------------
# temp_fail_intervals


_INTERVAL_RE: Final = re.compile(r"(\d+(?:\.\d+)?)([smhd])(?:\*(\d+))?")
_UNIT_SECONDS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_temp_fail_intervals(text: str) -> tuple[float, ...]:
    """Haraka's retry schedule grammar, expanded to seconds.

    ``<n><s|m|h|d>[*count]``, comma separated, whitespace ignored, any case:
    ``10s, 1m*2`` is ``(10.0, 60.0, 60.0)``.  ``none`` is the empty schedule
    (the first temporary failure bounces).  After the n-th temporary failure
    a recipient waits ``intervals[n-1]``; when the schedule is exhausted it
    bounces.

    Stricter than Haraka, which logs and falls back to its default on a bad
    string: every delay must be at least 5 s and at most a year, a count at
    least 1, the whole schedule at most 1000 entries, and anything else
    raises :class:`ValueError` naming the offending element.
    """
    compact = re.sub(r"\s+", "", text).lower()
    if not compact:
        raise ValueError("the schedule is empty (write 'none' for no retries)")
    if compact == "none":
        return ()
    intervals: list[float] = []
    for number, element in enumerate(compact.split(","), start=1):
        if not element:
            raise ValueError(f"element {number} is empty")
        match = _INTERVAL_RE.fullmatch(element)
        if match is None:
            raise ValueError(f"element {number} {element!r} is not <n><s|m|h|d>[*count]")
        amount, unit, count_text = match.groups()
        delay = float(amount) * _UNIT_SECONDS[unit]
        if delay < MIN_TEMP_FAIL_INTERVAL:
            raise ValueError(
                f"element {number} {element!r} is shorter than {MIN_TEMP_FAIL_INTERVAL:g} seconds"
            )
        if delay > MAX_TEMP_FAIL_INTERVAL:
            raise ValueError(f"element {number} {element!r} is longer than 365 days")
        count = 1 if count_text is None else int(count_text)
        if count < 1:
            raise ValueError(f"element {number} {element!r} repeats fewer than once")
        if len(intervals) + count > MAX_TEMP_FAIL_ENTRIES:
            raise ValueError(f"the schedule has more than {MAX_TEMP_FAIL_ENTRIES} retries")
        intervals.extend([delay] * count)
    return tuple(intervals)


def default_temp_fail_intervals(max_temp_failures: int) -> tuple[float, ...]:
    """Haraka's schedule when ``temp_fail_intervals`` is unset: ``2**(i+5)``
    seconds for i in 1..maxTempFailures-1, so the ``maxTempFailures``-th
    temporary failure bounces (13 → 64, 128, … 131072 s; 1 → none)."""
    if max_temp_failures < 1:
        raise ValueError("maxTempFailures must be at least 1")
    return tuple(float(2 ** (i + 5)) for i in range(1, max_temp_failures))


# --------------------------------------------------------------------------
# The ini reader


@dataclass(frozen=True, slots=True)
class IniEntry:
    """One key of an ini section.

    ``value`` is the text after ``=`` (stripped; ``None`` for a bare key with
    no ``=``) or, for ``key[]=`` lines, the list of their values.  ``line``
    is where it was (last) set.
    """

    value: str | list[str] | None
    line: int


@dataclass(frozen=True, slots=True)
class IniFile:
    """An ini file as haraka-config reads it: ``sections[name][key]``.

    Keys before any ``[section]`` are in ``main``.  ``section_lines`` says
    where each section first appears; ``repeated`` lists ``(section, key,
    line)`` for scalar keys set more than once (the last wins).
    """

    sections: dict[str, dict[str, IniEntry]]
    section_lines: dict[str, int]
    repeated: list[tuple[str, str, int]] = field(default_factory=list)


_SECTION_RE: Final = re.compile(r"\s*\[([^\]]*)\]\s*")
_PARAM_RE: Final = re.compile(r"\s*([^\s=\[\]]+(?:\[\])?)\s*(?:=\s*(.*?)\s*)?")
_CONTINUATION_RE: Final = re.compile(r"\\[ \t]*$")


def parse_ini(text: str, name: str = "<ini>", *, continuation: bool = True) -> IniFile:
    """Parse Haraka-style ini text.

    ``[section]`` headers; ``key=value`` lines (key and value stripped, the
    value taken literally, no quoting); whole-line ``;`` and ``#`` comments;
    keys before any section belong to ``[main]``; ``key[]=v`` appends ``v``
    to the list ``key`` (a later plain ``key=v`` replaces it, as in Haraka);
    a line ending in ``\\`` continues on the next one.  Section and key names
    are case-sensitive, as in Haraka.

    Haraka logs and skips a line that is none of these; here it raises
    :class:`ConfigError` naming ``name`` and the line number, because such a
    line is always a typo that would otherwise silently change nothing.
    """
    sections: dict[str, dict[str, IniEntry]] = {"main": {}}
    section_lines: dict[str, int] = {"main": 0}
    repeated: list[tuple[str, str, int]] = []
    current = "main"
    pending = ""
    pending_line = 0
    lines = text.removeprefix("\ufeff").splitlines()
    for number, raw in enumerate(lines, start=1):
        stripped = raw.strip()
        if not stripped or stripped[0] in ";#":
            continue
        header = _SECTION_RE.fullmatch(raw)
        if header is not None:
            current = header.group(1).strip()
            if not current:
                raise ConfigError(name, "empty section name '[]'", line=number)
            sections.setdefault(current, {})
            section_lines.setdefault(current, number)
            continue
        if continuation and _CONTINUATION_RE.search(raw):
            if not pending:
                pending_line = number
            pending += _CONTINUATION_RE.sub("", raw)
            continue
        logical = pending + raw
        line = pending_line if pending else number
        pending = ""
        _add_param(sections[current], current, logical, line, name, repeated)
    if pending:
        _add_param(sections[current], current, pending, pending_line, name, repeated)
    return IniFile(sections, section_lines, repeated)


def _add_param(
    section: dict[str, IniEntry],
    section_name: str,
    text: str,
    line: int,
    name: str,
    repeated: list[tuple[str, str, int]],
) -> None:
    match = _PARAM_RE.fullmatch(text)
    if match is None:
        raise ConfigError(
            name, f"{_shown(text.strip())} is not a 'key = value' line or a [section]", line=line
        )
    key, value = match.group(1), match.group(2)
    if key.endswith("[]"):
        base = key[:-2]
        previous = section.get(base)
        items = list(previous.value) if previous and isinstance(previous.value, list) else []
        items.append(value or "")
        section[base] = IniEntry(items, line)
        return
    if key in section:
        repeated.append((section_name, key, line))
    section[key] = IniEntry(value, line)


# --------------------------------------------------------------------------
# Models

_FROZEN: Final = ConfigDict(frozen=True, extra="forbid")


def _loopback_listen() -> list[HostPort]:
    return [HostPort("127.0.0.1", 2525)]


class SmtpConfig(BaseModel):
    """``smtp.ini [main]``: the submission listeners and their limits."""

    model_config = _FROZEN

    listen: list[HostPort] = Field(default_factory=_loopback_listen)
    listen_tls: list[HostPort] = Field(default_factory=list)
    max_message_size: int = 26214400
    max_recipients: int = 1000
    auth_require_tls: bool = True
    inactivity_timeout: float = 300.0
    max_line_length: int = 4096
    auth_max_failures: int = 3
    auth_failure_delay: float = 2.0
    auth_disconnect_after: int = 10
    auth_block_seconds: float = 300.0
    constrain_sender: bool = False


class OutboundConfig(BaseModel):
    """``outbound.ini [main]``: delivery.  Re-read on change (hot reload).

    ``temp_fail_intervals`` is always the effective schedule, and
    ``max_temp_failures`` is ``len(temp_fail_intervals) + 1`` whenever the
    schedule was written explicitly (Haraka then ignores maxTempFailures).
    """

    model_config = _FROZEN

    disabled: bool = False
    delivery_process: bool = True
    concurrency_max: int = 100
    domain_concurrency_max: int = 10
    enable_tls: bool = True
    max_temp_failures: int = 13
    temp_fail_intervals: tuple[float, ...] = default_temp_fail_intervals(13)
    always_split: bool = False
    received_header: str | None = "outboundd"
    connect_timeout: float = 30.0
    local_mx_ok: bool = False
    inet_prefer: InetPrefer = "default"
    queue_dir: Path
    nameservers: list[HostPort] = Field(default_factory=list)
    mx_port: int = 25
    greeting_timeout: float = 300.0
    mail_timeout: float = 300.0
    rcpt_timeout: float = 300.0
    data_timeout: float = 120.0
    data_end_timeout: float = 600.0
    pool_max_per_host: int = 10
    pool_idle_timeout: float = 10.0
    delay_warning_time: float = 14400.0
    bounce_max_original_size: int = 10485760
    double_bounce_recipient: str | None = None
    lease_seconds: float = 120.0


class TlsMain(BaseModel):
    """``tls.ini [main]`` settings for TLS we serve (STARTTLS, implicit TLS)."""

    model_config = _FROZEN

    min_version: str | None = None
    ciphers: str | None = None


class TlsOutbound(BaseModel):
    """``tls.ini [outbound]``: TLS towards remote MX hosts.  ``min_version``,
    ``ciphers`` and ``reject_unauthorized`` fall back to ``[main]``, as in Haraka."""

    model_config = _FROZEN

    min_version: str | None = None
    ciphers: str | None = None
    reject_unauthorized: bool = False
    force_tls: bool = False
    force_tls_hosts: list[str] = Field(default_factory=list)
    no_tls_hosts: list[str] = Field(default_factory=list)


class TlsConfig(BaseModel):
    """``tls.ini`` and the key pair.  ``key``/``cert`` are absolute, and both
    ``None`` when no usable pair is configured (then no TLS is offered)."""

    model_config = _FROZEN

    key: Path | None = None
    cert: Path | None = None
    main: TlsMain = Field(default_factory=TlsMain)
    outbound: TlsOutbound = Field(default_factory=TlsOutbound)


class LogConfig(BaseModel):
    """``log.ini [main]`` (or ``loglevel``/``log_timestamps``).  ``level`` is
    Haraka's number: 9 DATA … 6 INFO … 0 EMERG."""

    model_config = _FROZEN

    level: int = int(Level.INFO)
    timestamps: bool = False
    format: LogFormat = "default"


class BounceTemplates(BaseModel):
    """The DSN templates; ``None`` where the file is absent (built-in text)."""

    model_config = _FROZEN

    text: str | None = None
    html: str | None = None
    image: bytes | None = None


class Config(BaseModel):
    """The whole configuration directory.  ``warnings`` holds one line per
    ignored key, section or file, for the daemon to log at start-up."""

    model_config = _FROZEN

    config_dir: Path
    base_dir: Path
    plugins_dir: Path
    me: str
    smtp: SmtpConfig = Field(default_factory=SmtpConfig)
    outbound: OutboundConfig
    tls: TlsConfig = Field(default_factory=TlsConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    plugins: list[str] = Field(default_factory=list)
    relay_acl_allow: list[IPv4Network | IPv6Network] = Field(default_factory=list)
    auth_users: dict[str, str] = Field(default_factory=dict)
    bounce: BounceTemplates = Field(default_factory=BounceTemplates)
    warnings: tuple[str, ...] = ()


# --------------------------------------------------------------------------
# Reading files

_T = TypeVar("_T")


def _read_bytes(path: Path, name: str) -> bytes | None:
    """The file's bytes; ``None`` when it does not exist."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        raise ConfigError(name, "is a directory, expected a file") from None
    except OSError as exc:
        raise ConfigError(name, f"cannot be read: {exc.strerror or exc}") from None


def _read_text(path: Path, name: str) -> str | None:
    """The file as UTF-8 text; ``None`` when it does not exist."""
    data = _read_bytes(path, name)
    if data is None:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(name, "is not valid UTF-8 text", line=line) from None


def _list_lines(text: str) -> Iterable[tuple[int, str]]:
    """Meaningful lines of a flat list file: ``#`` comments (whole-line or
    trailing) and blank lines dropped, the rest stripped."""
    for number, raw in enumerate(text.removeprefix("\ufeff").splitlines(), start=1):
        content = raw.split("#", 1)[0].strip()
        if content:
            yield number, content


def _suggest(word: str, known: Iterable[str]) -> str:
    choices = list(known)
    lowered = {c.lower(): c for c in choices}
    match = lowered.get(word.lower()) or next(
        iter(difflib.get_close_matches(word, choices, n=1, cutoff=0.75)), None
    )
    return f" (did you mean {match}?)" if match else ""


class _Section:
    """Typed access to one section of one ini file.

    Every getter validates and raises :class:`ConfigError` naming the file,
    section and key.  Keys read are remembered, so :meth:`finish` can warn
    about the rest.
    """

    def __init__(self, name: str, ini: IniFile, section: str, warnings: list[str]) -> None:
        self.name = name
        self.section = section
        self.entries = ini.sections.get(section, {})
        self.warnings = warnings
        self.used: set[str] = set()

    def error(self, key: str, problem: str) -> ConfigError:
        return ConfigError(self.name, problem, section=self.section, key=key)

    def has(self, key: str) -> bool:
        return self.raw(key) is not None

    def raw(self, key: str) -> str | None:
        """The value as written, or ``None`` when unset or empty (the default)."""
        self.used.add(key)
        entry = self.entries.get(key)
        if entry is None:
            return None
        if isinstance(entry.value, list):
            raise self.error(key, f"is a single value, not a list (write {key}=..., not {key}[]=)")
        if entry.value is None:
            raise self.error(key, f"has no value (write {key}=VALUE)")
        return entry.value or None

    def items(self, key: str) -> list[str] | None:
        """A list key: ``key[]=`` lines and/or commas; ``None`` when unset."""
        self.used.add(key)
        entry = self.entries.get(key)
        if entry is None:
            return None
        if entry.value is None:
            raise self.error(key, f"has no value (write {key}=VALUE)")
        values = entry.value if isinstance(entry.value, list) else [entry.value]
        return [part.strip() for value in values for part in value.split(",") if part.strip()]

    def convert(self, key: str, default: _T, convert: Callable[[str], _T]) -> _T:
        text = self.raw(key)
        if text is None:
            return default
        try:
            return convert(text)
        except ValueError as exc:
            raise self.error(key, str(exc)) from None

    def integer(self, key: str, default: int, *, minimum: int, maximum: int | None = None) -> int:
        def parse(text: str) -> int:
            if not re.fullmatch(r"[+-]?\d+", text):
                raise ValueError(f"{_shown(text)} is not an integer")
            return _in_range(int(text), text, minimum, maximum)

        return self.convert(key, default, parse)

    def seconds(self, key: str, default: float, *, zero_ok: bool) -> float:
        def parse(text: str) -> float:
            if not re.fullmatch(r"\+?(\d+(\.\d*)?|\.\d+)", text):
                raise ValueError(f"{_shown(text)} is not a number of seconds")
            value = float(text)
            if not math.isfinite(value):
                raise ValueError(f"{_shown(text)} is not a number of seconds")
            if value == 0 and zero_ok:
                return value
            if value <= 0:
                raise ValueError(f"{_shown(text)} must be greater than 0")
            if value > MAX_SECONDS:
                raise ValueError(f"{_shown(text)} is more than {int(MAX_SECONDS)} seconds (a year)")
            return value

        return self.convert(key, default, parse)

    def boolean(self, key: str, default: bool) -> bool:
        return self.convert(key, default, parse_bool)

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        def parse(text: str) -> str:
            for choice in choices:
                if text.lower() == choice.lower():
                    return choice
            raise ValueError(f"{_shown(text)} is not one of {', '.join(choices)}")

        return self.convert(key, default, parse)

    def finish(self, haraka_keys: Mapping[str, str] | None = None) -> None:
        """Warn about every key of the section that was not read."""
        haraka = haraka_keys or {}
        for key, entry in self.entries.items():
            if key in self.used:
                continue
            where = f"{self.name} [{self.section}] {key} (line {entry.line})"
            if key in haraka:
                self.warnings.append(f"{where}: {haraka[key]}; ignored")
            else:
                known = self.used | set(haraka)
                self.warnings.append(f"{where}: unknown setting, ignored{_suggest(key, known)}")


def _in_range(value: int, text: str, minimum: int, maximum: int | None) -> int:
    if maximum is not None and not minimum <= value <= maximum:
        raise ValueError(f"{_shown(text)} is not between {minimum} and {maximum}")
    if value < minimum:
        raise ValueError(f"{_shown(text)} must be at least {minimum}")
    return value


def _load_ini(path: Path, warnings: list[str]) -> tuple[str, IniFile]:
    name = _display(path)
    text = _read_text(path, name)
    ini = parse_ini(text or "", name)
    for section, key, line in ini.repeated:
        warnings.append(
            f"{name} [{section}] {key} (line {line}): set more than once; the last wins"
        )
    return name, ini


def _warn_sections(
    name: str,
    ini: IniFile,
    known: Iterable[str],
    warnings: list[str],
    haraka: Mapping[str, str] | None = None,
) -> None:
    known_set = set(known)
    for section, line in ini.section_lines.items():
        if section in known_set:
            continue
        if haraka and section in haraka:
            warnings.append(f"{name} [{section}] (line {line}): {haraka[section]}; ignored")
        else:
            warnings.append(
                f"{name} [{section}] (line {line}): unknown section, ignored"
                f"{_suggest(section, known_set)}"
            )


# --------------------------------------------------------------------------
# outbound.ini

_HARAKA_OUTBOUND: Final = {
    "ipv6_enabled": "a Haraka setting replaced by inet_prefer",
    "pool_timeout": "a Haraka setting; outboundd's is pool_idle_timeout",
    "pool_concurrency_max": "a Haraka setting; outboundd's is pool_max_per_host",
}


def _address(text: str) -> str:
    local, at, domain = text.rpartition("@")
    if not at or not local or not domain or any(c.isspace() or c in "<>," for c in text):
        raise ValueError(f"{_shown(text)} is not a mail address (user@domain)")
    return text


def _header_text(text: str) -> str:
    if any(not c.isprintable() for c in text):
        raise ValueError(f"{_shown(text)} contains control characters (it becomes a header)")
    return text


def _resolve(base_dir: Path, text: str) -> Path:
    path = Path(text).expanduser()
    return Path(os.path.normpath(path if path.is_absolute() else base_dir / path))


def _host_ports(
    section: _Section, key: str, default: list[HostPort], default_port: int, *, require_ip: bool
) -> list[HostPort]:
    items = section.items(key)
    if items is None:
        return default
    result: list[HostPort] = []
    for item in items:
        try:
            address = HostPort.parse(item, default_port, require_ip=require_ip)
        except ValueError as exc:
            raise section.error(key, f"{_shown(item)} is not a valid address: {exc}") from None
        if address in result:
            raise section.error(key, f"lists {address} more than once")
        result.append(address)
    return result


def _read_outbound(
    config_dir: Path, base_dir: Path, warnings: list[str]
) -> tuple[OutboundConfig, list[str]]:
    name, ini = _load_ini(config_dir / "outbound.ini", warnings)
    _warn_sections(name, ini, ["main"], warnings)
    main = _Section(name, ini, "main", warnings)

    max_failures_set = main.has("maxTempFailures")
    max_failures = main.integer("maxTempFailures", 13, minimum=1, maximum=MAX_TEMP_FAIL_ENTRIES)
    schedule = main.raw("temp_fail_intervals")
    if schedule is None:
        intervals = default_temp_fail_intervals(max_failures)
    else:
        try:
            intervals = parse_temp_fail_intervals(schedule)
        except ValueError as exc:
            raise main.error(
                "temp_fail_intervals",
                f"{_shown(schedule)} is not a retry schedule (<n><s|m|h|d>[*count], ...): {exc}",
            ) from None
        if max_failures_set and max_failures != len(intervals) + 1:
            warnings.append(
                f"{name} [main] maxTempFailures: ignored because temp_fail_intervals is set "
                f"(its {len(intervals)} retries mean failure {len(intervals) + 1} bounces)"
            )
        max_failures = len(intervals) + 1

    inet_prefer = cast(InetPrefer, main.choice("inet_prefer", "default", get_args(InetPrefer)))
    if not main.has("inet_prefer") and main.has("ipv6_enabled"):
        # Haraka's older switch: true meant "try AAAA first".
        if main.boolean("ipv6_enabled", False):
            inet_prefer = "v6"
        warnings.append(
            f"{name} [main] ipv6_enabled: deprecated in Haraka; "
            f"read as inet_prefer={inet_prefer}, write that instead"
        )

    received_text = main.convert("received_header", "outboundd", _header_text)
    received = None if received_text.lower() == "disabled" else received_text
    queue_dir = main.convert("queue_dir", "queue", str)
    double_bounce: str | None = main.convert("double_bounce_recipient", None, _address)

    domain_concurrency = main.integer("domain_concurrency_max", 10, minimum=1)
    outbound = OutboundConfig(
        disabled=main.boolean("disabled", False),
        delivery_process=main.boolean("delivery_process", True),
        concurrency_max=main.integer("concurrency_max", 100, minimum=1),
        domain_concurrency_max=domain_concurrency,
        enable_tls=main.boolean("enable_tls", True),
        max_temp_failures=max_failures,
        temp_fail_intervals=intervals,
        always_split=main.boolean("always_split", False),
        received_header=received,
        connect_timeout=main.seconds("connect_timeout", 30.0, zero_ok=False),
        local_mx_ok=main.boolean("local_mx_ok", False),
        inet_prefer=inet_prefer,
        queue_dir=_resolve(base_dir, queue_dir),
        nameservers=_host_ports(main, "nameservers", [], 53, require_ip=True),
        mx_port=main.integer("mx_port", 25, minimum=1, maximum=65535),
        greeting_timeout=main.seconds("greeting_timeout", 300.0, zero_ok=False),
        mail_timeout=main.seconds("mail_timeout", 300.0, zero_ok=False),
        rcpt_timeout=main.seconds("rcpt_timeout", 300.0, zero_ok=False),
        data_timeout=main.seconds("data_timeout", 120.0, zero_ok=False),
        data_end_timeout=main.seconds("data_end_timeout", 600.0, zero_ok=False),
        # Unset: as many as may run to one domain at once, so a busy
        # destination's connections are reused rather than churned.
        pool_max_per_host=main.integer("pool_max_per_host", domain_concurrency, minimum=1),
        pool_idle_timeout=main.seconds("pool_idle_timeout", 10.0, zero_ok=True),
        delay_warning_time=main.seconds("delay_warning_time", 14400.0, zero_ok=True),
        bounce_max_original_size=main.integer("bounce_max_original_size", 10485760, minimum=0),
        double_bounce_recipient=double_bounce,
        lease_seconds=main.seconds("lease_seconds", 120.0, zero_ok=False),
    )
    main.finish(_HARAKA_OUTBOUND)
    return outbound, warnings


def load_outbound(config_dir: Path, base_dir: Path) -> OutboundConfig:
    """Read ``outbound.ini`` alone (hot reload of ``disabled``,
    ``concurrency_max``, ``temp_fail_intervals`` and the rest).

    Same rules and errors as :func:`load_config`; warnings are dropped (they
    were logged at start-up).
    """
    directory = Path(os.path.abspath(config_dir))
    outbound, _ = _read_outbound(directory, Path(os.path.abspath(base_dir)), [])
    return outbound


# --------------------------------------------------------------------------
# smtp.ini

_HARAKA_SMTP: Final = {
    key: "a Haraka setting outboundd does not use"
    for key in (
        "port",
        "listen_host",
        "public_ip",
        "nodes",
        "user",
        "group",
        "ignore_bad_plugins",
        "daemonize",
        "daemon_log_file",
        "daemon_pid_file",
        "spool_dir",
        "spool_after",
        "graceful_shutdown",
        "force_shutdown_timeout",
        "strict_rfc1869",
        "smtputf8",
        "max_mime_parts",
        "max_received_count",
    )
}
_HARAKA_SMTP_SECTIONS: Final = {"headers": "a Haraka section outboundd does not use"}


def _read_smtp(config_dir: Path, warnings: list[str]) -> SmtpConfig:
    name, ini = _load_ini(config_dir / "smtp.ini", warnings)
    _warn_sections(name, ini, ["main"], warnings, _HARAKA_SMTP_SECTIONS)
    main = _Section(name, ini, "main", warnings)
    listen = _host_ports(main, "listen", _loopback_listen(), 25, require_ip=False)
    listen_tls = _host_ports(main, "listen_tls", [], 465, require_ip=False)
    for address in listen_tls:
        if address in listen:
            raise main.error("listen_tls", f"{address} is also in listen")
    smtp = SmtpConfig(
        listen=listen,
        listen_tls=listen_tls,
        max_message_size=main.integer("max_message_size", 26214400, minimum=0),
        max_recipients=main.integer("max_recipients", 1000, minimum=1),
        auth_require_tls=main.boolean("auth_require_tls", True),
        inactivity_timeout=main.seconds("inactivity_timeout", 300.0, zero_ok=False),
        max_line_length=main.integer("max_line_length", 4096, minimum=1000),
        auth_max_failures=main.integer("auth_max_failures", 3, minimum=0),
        auth_failure_delay=main.seconds("auth_failure_delay", 2.0, zero_ok=True),
        auth_disconnect_after=main.integer("auth_disconnect_after", 10, minimum=1),
        auth_block_seconds=main.seconds("auth_block_seconds", 300.0, zero_ok=True),
        constrain_sender=main.boolean("constrain_sender", False),
    )
    main.finish(_HARAKA_SMTP)
    return smtp


# --------------------------------------------------------------------------
# tls.ini

_UNUSED: Final = "a Haraka setting outboundd does not use"
_HARAKA_TLS_MAIN: Final = {
    key: _UNUSED
    for key in (
        "dhparam",
        "honorCipherOrder",
        "requestCert",
        "requestOCSP",
        "requireAuthorized",
        "enableOCSPStapling",
        "mutual_tls",
        "sessionIdContext",
        "ecdhCurve",
    )
}
_HARAKA_TLS_OUTBOUND: Final = {
    **_HARAKA_TLS_MAIN,
    "key": "a client certificate for outbound TLS is not supported",
    "cert": "a client certificate for outbound TLS is not supported",
}
_HARAKA_TLS_SECTIONS: Final = {
    section: "a Haraka section outboundd does not use"
    for section in ("redis", "no_tls_hosts", "mutual_auth_hosts", "mutual_auth_hosts_exclude")
}


def _tls_version(text: str) -> str:
    for version in _TLS_VERSIONS:
        if text.lower() == version.lower():
            return version
    raise ValueError(f"{_shown(text)} is not one of {', '.join(_TLS_VERSIONS)}")


def _ciphers(text: str) -> str:
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).set_ciphers(text)
    except ssl.SSLError:
        raise ValueError(f"{_shown(text)} is not a cipher list OpenSSL accepts") from None
    return text


def _tls_file(
    section: _Section, key: str, config_dir: Path, base_dir: Path
) -> tuple[Path | None, bool]:
    """The resolved ``key``/``cert`` file and whether it was set explicitly.

    Unset: ``CONFIG_DIR/tls_KEY.pem`` if it exists.  Set: the path against
    ``base_dir``, then (Haraka resolves these inside the config directory)
    against ``config_dir``; an explicitly named file that exists in neither
    place is an error rather than TLS silently switched off.
    """
    text = section.raw(key)
    if text is None:
        default = config_dir / f"tls_{key}.pem"
        return (default if default.is_file() else None), False
    candidates = [_resolve(base_dir, text)]
    if not Path(text).expanduser().is_absolute():
        candidates.append(_resolve(config_dir, text))
    for candidate in candidates:
        if candidate.is_file():
            return candidate, True
    looked = " or ".join(_display(c) for c in candidates)
    raise section.error(key, f"{_shown(text)}: no such file ({looked})")


def _read_tls(config_dir: Path, base_dir: Path, warnings: list[str]) -> TlsConfig:
    name, ini = _load_ini(config_dir / "tls.ini", warnings)
    _warn_sections(name, ini, ["main", "outbound"], warnings, _HARAKA_TLS_SECTIONS)
    main = _Section(name, ini, "main", warnings)
    out = _Section(name, ini, "outbound", warnings)

    key, key_set = _tls_file(main, "key", config_dir, base_dir)
    cert, cert_set = _tls_file(main, "cert", config_dir, base_dir)
    if (key is None) != (cert is None):
        present, missing = ("key", "cert") if key is not None else ("cert", "key")
        if key_set or cert_set:
            raise main.error(present, f"is set but no {missing} file was found; set both")
        warnings.append(
            f"{name}: found tls_{present}.pem but no tls_{missing}.pem in "
            f"{_display(config_dir)}; TLS is not offered"
        )
        key = cert = None
    if key is not None and cert is not None:
        _check_key_pair(main, key, cert)

    tls_main = TlsMain(
        min_version=main.convert("minVersion", None, _tls_version),
        ciphers=main.convert("ciphers", None, _ciphers),
    )
    main_reject = main.boolean("rejectUnauthorized", False)
    hosts: dict[str, list[str]] = {}
    for list_key in ("force_tls_hosts", "no_tls_hosts"):
        hosts[list_key] = [h.lower() for h in out.items(list_key) or []]
    tls_outbound = TlsOutbound(
        min_version=out.convert("minVersion", tls_main.min_version, _tls_version),
        ciphers=out.convert("ciphers", tls_main.ciphers, _ciphers),
        reject_unauthorized=out.boolean("rejectUnauthorized", main_reject),
        force_tls=out.boolean("force_tls", False),
        force_tls_hosts=hosts["force_tls_hosts"],
        no_tls_hosts=hosts["no_tls_hosts"],
    )
    main.finish(_HARAKA_TLS_MAIN)
    out.finish(_HARAKA_TLS_OUTBOUND)
    return TlsConfig(key=key, cert=cert, main=tls_main, outbound=tls_outbound)


def _check_key_pair(section: _Section, key: Path, cert: Path) -> None:
    """Load the pair once now, so a broken or mismatched PEM stops start-up
    with its file names instead of failing the first STARTTLS."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        # A passphrase cannot be typed into a daemon; an empty one makes an
        # encrypted key fail here instead of prompting on the terminal.
        context.load_cert_chain(str(cert), str(key), password=lambda: b"")
    except (ssl.SSLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or exc.strerror or str(exc)
        raise section.error(
            "cert",
            f"{_display(cert)} with key {_display(key)} cannot be loaded "
            f"({reason}; an unencrypted PEM key and its certificate are expected)",
        ) from None


# --------------------------------------------------------------------------
# Logging


def _level(text: str) -> int:
    try:
        return int(level_from_name(text))
    except ValueError:
        names = ", ".join(level.name for level in sorted(Level, reverse=True))
        raise ValueError(f"{_shown(text)} is not a log level ({names} or 9-0)") from None


def _one_line_file(path: Path) -> tuple[str, str | None]:
    """A Haraka 'value' file: its first non-comment line, or None."""
    name = _display(path)
    text = _read_text(path, name)
    if text is None:
        return name, None
    return name, next((content for _, content in _list_lines(text)), None)


def _read_log(config_dir: Path, warnings: list[str]) -> LogConfig:
    name, ini = _load_ini(config_dir / "log.ini", warnings)
    _warn_sections(name, ini, ["main"], warnings)
    main = _Section(name, ini, "main", warnings)

    level = int(Level.INFO)
    level_name, level_text = _one_line_file(config_dir / "loglevel")
    if level_text is not None:
        try:
            level = _level(level_text)
        except ValueError as exc:
            raise ConfigError(level_name, str(exc)) from None
    stamps = False
    stamps_name, stamps_text = _one_line_file(config_dir / "log_timestamps")
    if stamps_text is not None:
        try:
            stamps = parse_bool(stamps_text)
        except ValueError as exc:
            raise ConfigError(stamps_name, str(exc)) from None
    log = LogConfig(
        level=main.convert("level", level, _level),
        timestamps=main.boolean("timestamps", stamps),
        format=cast(LogFormat, main.choice("format", "default", get_args(LogFormat))),
    )
    main.finish()
    return log


# --------------------------------------------------------------------------
# Flat files


def _read_me(config_dir: Path) -> str:
    path = config_dir / "me"
    name = _display(path)
    text = _read_text(path, name)
    for number, first in _list_lines(text or ""):
        if not _is_hostname(first):
            raise ConfigError(
                name,
                f"{_shown(first)} is not a host name (letters, digits, '-' and '.')",
                line=number,
            )
        return first
    fqdn = socket.getfqdn()
    if not _is_hostname(fqdn):
        raise ConfigError(
            name,
            f"is missing and this host's name {_shown(fqdn)} is not a usable host name; "
            "write this server's name into it",
        )
    return fqdn


_PLUGIN_NAME_RE: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")


def _read_plugins(config_dir: Path, warnings: list[str]) -> list[str]:
    path = config_dir / "plugins"
    name = _display(path)
    text = _read_text(path, name)
    plugins: list[str] = []
    for number, entry in _list_lines(text or ""):
        if not _PLUGIN_NAME_RE.fullmatch(entry):
            hint = f" (did you mean {entry.replace('/', '_')}?)" if "/" in entry else ""
            raise ConfigError(
                name,
                f"{_shown(entry)} is not a plugin name (letters, digits, '_', '-', '.'){hint}",
                line=number,
            )
        if entry in plugins:
            warnings.append(f"{name} line {number}: {entry} is listed twice; loaded once")
            continue
        plugins.append(entry)
    return plugins


def _read_relay_acl(config_dir: Path, warnings: list[str]) -> list[IPv4Network | IPv6Network]:
    path = config_dir / "relay_acl_allow"
    name = _display(path)
    text = _read_text(path, name)
    networks: list[IPv4Network | IPv6Network] = []
    for number, entry in _list_lines(text or ""):
        try:
            network = ipaddress.ip_network(entry)
        except ValueError:
            try:
                loose = ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ConfigError(
                    name,
                    f"{_shown(entry)} is not an IP address or CIDR network (like 192.0.2.0/24)",
                    line=number,
                ) from None
            raise ConfigError(
                name, f"{_shown(entry)} has host bits set (did you mean {loose}?)", line=number
            ) from None
        if network.prefixlen == 0:
            warnings.append(
                f"{name} line {number}: {network} lets every IPv{network.version} client relay "
                "without AUTH (an open relay)"
            )
        networks.append(network)
    return networks


def _read_auth_users(config_dir: Path, warnings: list[str]) -> dict[str, str]:
    """``[users]`` of ``auth_flat_file.ini``, read by the auth plugin's own
    reader so that the daemon sees exactly what ``outboundctl user`` writes."""
    path = config_dir / "auth_flat_file.ini"
    name = _display(path)
    try:
        users = read_users(path)
    except UnicodeDecodeError:
        raise ConfigError(name, "is not valid UTF-8 text") from None
    except IsADirectoryError:
        raise ConfigError(name, "is a directory, expected a file") from None
    except OSError as exc:
        raise ConfigError(name, f"cannot be read: {exc.strerror or exc}") from None
    for user, stored in users.items():
        if not stored:
            warnings.append(f"{name} [users] {user}: no password; this user cannot log in")
        elif is_plaintext(stored):
            warnings.append(
                f"{name} [users] {user}: plaintext password; store a hash with "
                f"`outboundctl user add {user} --password-stdin`"
            )
    return users


def _read_bounce(config_dir: Path) -> BounceTemplates:
    def text(file: str) -> str | None:
        path = config_dir / file
        return _read_text(path, _display(path))

    image_path = config_dir / "outbound.bounce_message_image"
    return BounceTemplates(
        text=text("outbound.bounce_message"),
        html=text("outbound.bounce_message_html"),
        image=_read_bytes(image_path, _display(image_path)),
    )


_HARAKA_LEGACY_FILES: Final = {
    "outbound.disabled": "disabled",
    "outbound.enable_tls": "enable_tls",
    "outbound.maxTempFailures": "maxTempFailures",
    "outbound.concurrency_max": "concurrency_max",
    "outbound.temp_fail_intervals": "temp_fail_intervals",
    "outbound.received_header": "received_header",
    "outbound.ipv6_enabled": "inet_prefer",
}


def _warn_legacy_files(config_dir: Path, warnings: list[str]) -> None:
    for file, key in _HARAKA_LEGACY_FILES.items():
        if (config_dir / file).exists():
            warnings.append(
                f"{_display(config_dir / file)}: Haraka's legacy file is not read; "
                f"set {key} in outbound.ini"
            )
    if (config_dir / "databytes").exists():
        warnings.append(
            f"{_display(config_dir / 'databytes')}: not read; "
            "set max_message_size in smtp.ini [main]"
        )


# --------------------------------------------------------------------------
# The whole directory


def load_config(config_dir: Path) -> Config:
    """Read the configuration directory; :class:`ConfigError` on any bad value.

    A missing directory gives the defaults (with a warning, since it is
    usually a mistyped ``-c``).  ``base_dir`` is the directory that contains
    ``config_dir``: ``queue_dir`` and TLS paths resolve against it, and
    ``plugins_dir`` is ``base_dir / "plugins"``.
    """
    given = Path(config_dir)
    absolute = Path(os.path.abspath(given))
    base_dir = absolute.parent
    warnings: list[str] = []
    if absolute.exists() and not absolute.is_dir():
        raise ConfigError(_display(given), "is not a directory")
    if not absolute.exists():
        warnings.append(f"{_display(given)}: no such configuration directory; using defaults")
    # Files are read by absolute path (the daemon's later reloads must not
    # depend on the working directory); messages still say config/... .
    me = _read_me(absolute)
    smtp = _read_smtp(absolute, warnings)
    outbound, _ = _read_outbound(absolute, base_dir, warnings)
    tls = _read_tls(absolute, base_dir, warnings)
    if smtp.listen_tls and tls.key is None:
        # Implicit TLS without a certificate cannot serve a single client;
        # failing now beats a listener that resets every connection.
        raise ConfigError(
            _display(absolute / "smtp.ini"),
            f"needs a TLS key pair ({_display(absolute / 'tls_key.pem')} and "
            f"{_display(absolute / 'tls_cert.pem')}, or key/cert in tls.ini)",
            section="main",
            key="listen_tls",
        )
    log = _read_log(absolute, warnings)
    plugins = _read_plugins(absolute, warnings)
    relay_acl_allow = _read_relay_acl(absolute, warnings)
    auth_users = _read_auth_users(absolute, warnings)
    bounce = _read_bounce(absolute)
    _warn_legacy_files(absolute, warnings)
    return Config(
        config_dir=absolute,
        base_dir=base_dir,
        plugins_dir=base_dir / "plugins",
        me=me,
        smtp=smtp,
        outbound=outbound,
        tls=tls,
        log=log,
        plugins=plugins,
        relay_acl_allow=relay_acl_allow,
        auth_users=auth_users,
        bounce=bounce,
        warnings=tuple(warnings),
    )
