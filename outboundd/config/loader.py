"""Reading the configuration directory into the models; every error is one line."""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
import socket
import ssl
import tempfile
from collections.abc import Callable, Iterable, Mapping
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import Final, Literal, TypeVar, cast, get_args

from outboundd import idn
from outboundd.config.errors import ConfigError, _display, _shown
from outboundd.config.ini import IniFile, parse_ini
from outboundd.config.models import (
    _TLS_VERSIONS,
    BounceTemplates,
    Config,
    DkimConfig,
    InetPrefer,
    LogConfig,
    LogFormat,
    OutboundConfig,
    SmtpConfig,
    TlsConfig,
    TlsMain,
    TlsOutbound,
    _loopback_listen,
)
from outboundd.config.ranges import MAX_BYTES, MAX_COUNT, NumericSetting, declare, declared
from outboundd.config.values import (
    MAX_SECONDS,
    MAX_TEMP_FAIL_ENTRIES,
    HostPort,
    _is_hostname,
    default_temp_fail_intervals,
    parse_bool,
    parse_temp_fail_intervals,
)
from outboundd.dkimkeys import DkimKeyError, check_domain, check_selector, load_keys
from outboundd.log import Level, level_from_name
from outboundd.plugins.auth_flat_file import (
    AUTH_DISCONNECT_AFTER_RANGE,
    AUTH_MAX_FAILURES_RANGE,
    is_plaintext,
    read_users,
)

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

    def declare(
        self, key: str, kind: Literal["integer", "seconds"], minimum: float, maximum: float,
        *, zero_ok: bool = True,
    ) -> None:  # fmt: skip
        """Record the key's accepted range (see :mod:`outboundd.config.ranges`)."""
        name = self.name.replace("\\", "/").rsplit("/", 1)[-1]
        declare(NumericSetting(name, self.section, key, kind, minimum, maximum, zero_ok))

    def integer(self, key: str, default: int, *, minimum: int, maximum: int) -> int:
        self.declare(key, "integer", minimum, maximum)

        def parse(text: str) -> int:
            if not re.fullmatch(r"[+-]?\d+", text):
                raise ValueError(f"{_shown(text)} is not an integer")
            return _in_range(int(text), text, minimum, maximum)

        return self.convert(key, default, parse)

    def seconds(self, key: str, default: float, *, zero_ok: bool, minimum: float = 0.0) -> float:
        """A duration in seconds, at most a year; at least ``minimum`` when that
        is set, else greater than 0 (or 0 itself, with ``zero_ok``)."""
        self.declare(key, "seconds", minimum, MAX_SECONDS, zero_ok=zero_ok)

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
            if value < minimum:
                raise ValueError(f"{_shown(text)} must be at least {minimum:g}")
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

#: The most deliveries (or kept connections) a process may run at once.
MAX_CONCURRENCY: Final = 10_000
#: The shortest lease: it is renewed every third of it while a delivery
#: runs, and a lease that lapses between renewals lets another process take
#: work that is still being delivered.
MIN_LEASE_SECONDS: Final = 10.0

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


def _queue_url(text: str) -> str | None:
    """``queue_url``: empty means SQLite in ``queue_dir``; else a ``postgresql://`` URL."""
    text = text.strip()
    if not text or text.lower() == "sqlite":
        return None
    if not text.startswith(("postgresql://", "postgres://")):
        raise ValueError(
            f"{_shown(text)} is not a queue URL (postgresql://USER@HOST/DB, or empty for "
            "SQLite in queue_dir)"
        )
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
    queue_url = main.convert("queue_url", None, _queue_url)
    double_bounce: str | None = main.convert("double_bounce_recipient", None, _address)

    domain_concurrency = main.integer(
        "domain_concurrency_max", 10, minimum=1, maximum=MAX_CONCURRENCY
    )
    outbound = OutboundConfig(
        disabled=main.boolean("disabled", False),
        delivery_processes=main.integer("delivery_processes", 1, minimum=0, maximum=64),
        concurrency_max=main.integer("concurrency_max", 100, minimum=1, maximum=MAX_CONCURRENCY),
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
        queue_url=queue_url,
        nameservers=_host_ports(main, "nameservers", [], 53, require_ip=True),
        mx_port=main.integer("mx_port", 25, minimum=1, maximum=65535),
        greeting_timeout=main.seconds("greeting_timeout", 300.0, zero_ok=False),
        ehlo_timeout=main.seconds("ehlo_timeout", 300.0, zero_ok=False),
        starttls_timeout=main.seconds("starttls_timeout", 300.0, zero_ok=False),
        auth_timeout=main.seconds("auth_timeout", 120.0, zero_ok=False),
        mail_timeout=main.seconds("mail_timeout", 300.0, zero_ok=False),
        rcpt_timeout=main.seconds("rcpt_timeout", 300.0, zero_ok=False),
        data_timeout=main.seconds("data_timeout", 120.0, zero_ok=False),
        data_block_timeout=main.seconds("data_block_timeout", 180.0, zero_ok=False),
        data_end_timeout=main.seconds("data_end_timeout", 600.0, zero_ok=False),
        rset_timeout=main.seconds("rset_timeout", 20.0, zero_ok=False),
        quit_timeout=main.seconds("quit_timeout", 5.0, zero_ok=False),
        # Unset: as many as may run to one domain at once, so a busy
        # destination's connections are reused rather than churned.
        pool_max_per_host=main.integer(
            "pool_max_per_host", domain_concurrency, minimum=1, maximum=MAX_CONCURRENCY
        ),
        pool_idle_timeout=main.seconds("pool_idle_timeout", 10.0, zero_ok=True),
        delay_warning_time=main.seconds("delay_warning_time", 14400.0, zero_ok=True),
        bounce_max_original_size=main.integer(
            "bounce_max_original_size", 10485760, minimum=0, maximum=MAX_BYTES
        ),
        double_bounce_recipient=double_bounce,
        lease_seconds=main.seconds(
            "lease_seconds", 120.0, zero_ok=False, minimum=MIN_LEASE_SECONDS
        ),
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


#: Most SMTP processes ``nodes`` may ask for.
MAX_NODES: Final = 64
#: The longest line ``max_line_length`` may allow (1 MiB).
MAX_LINE_LENGTH: Final = 1024 * 1024


def _nodes(main: _Section) -> int:
    """``nodes``: how many processes accept SMTP; Haraka's ``cpus`` means one per CPU."""

    main.declare("nodes", "integer", 1, MAX_NODES)

    def parse(text: str) -> int:
        if text.lower() == "cpus":
            return max(1, min(os.cpu_count() or 1, MAX_NODES))
        if not re.fullmatch(r"\+?\d+", text):
            raise ValueError(f"{_shown(text)} is neither a number of processes nor 'cpus'")
        return _in_range(int(text), text, 1, MAX_NODES)

    return main.convert("nodes", 1, parse)


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
        max_message_size=main.integer("max_message_size", 26214400, minimum=0, maximum=MAX_BYTES),
        max_recipients=main.integer("max_recipients", 1000, minimum=1, maximum=MAX_COUNT),
        auth_require_tls=main.boolean("auth_require_tls", True),
        inactivity_timeout=main.seconds("inactivity_timeout", 300.0, zero_ok=False),
        max_line_length=main.integer(
            "max_line_length", 4096, minimum=1000, maximum=MAX_LINE_LENGTH
        ),
        # The throttle's own ranges (check_throttle_settings): a config that
        # loads always makes a working throttle.
        auth_max_failures=main.integer(
            "auth_max_failures",
            3,
            minimum=AUTH_MAX_FAILURES_RANGE[0],
            maximum=AUTH_MAX_FAILURES_RANGE[1],
        ),
        auth_failure_delay=main.seconds("auth_failure_delay", 2.0, zero_ok=True),
        auth_disconnect_after=main.integer(
            "auth_disconnect_after",
            10,
            minimum=AUTH_DISCONNECT_AFTER_RANGE[0],
            maximum=AUTH_DISCONNECT_AFTER_RANGE[1],
        ),
        auth_block_seconds=main.seconds("auth_block_seconds", 300.0, zero_ok=True),
        constrain_sender=main.boolean("constrain_sender", False),
        nodes=_nodes(main),
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
        try:
            hosts[list_key] = [_tls_host(h) for h in out.items(list_key) or []]
        except idn.InvalidDomain as exc:
            raise out.error(list_key, str(exc)) from None
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


def _tls_host(entry: str) -> str:
    """A ``force_tls_hosts``/``no_tls_hosts`` entry in the form delivery compares.

    MX host names are compared in A-label form (that is what DNS gives and
    what delivery connects to), so a U-label entry (``mx.bücher.test``) is
    converted; IPs, CIDRs and ASCII names are only lower-cased.
    """
    return entry.lower() if entry.isascii() else idn.to_ascii(entry)


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
    main.declare("level", "integer", min(Level), max(Level))  # or a level's name
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
# dkim.ini and config/dkim/<domain>/

_HARAKA_DKIM: Final = {
    "canon": "a Haraka setting; outboundd always signs relaxed/relaxed",
    "verify": "a Haraka setting; outboundd signs and does not verify",
}


def _dkim_headers(text: str) -> tuple[str, ...]:
    """Haraka's header list: names separated by commas, colons, semicolons or spaces."""
    names = tuple(n for n in re.split(r"[\s,:;]+", text) if n)
    for name in names:
        if not re.fullmatch(r"[!-9;-~]+", name):
            raise ValueError(f"{_shown(name)} is not a header field name")
    lowered = {n.lower() for n in names}
    forbidden = lowered & {"received", "return-path", "dkim-signature", "bcc"}
    if forbidden:
        raise ValueError(f"{', '.join(sorted(forbidden))} must not be signed (RFC 6376 §5.4)")
    return names if "from" in lowered else ("From", *names)


def _read_dkim(config_dir: Path, warnings: list[str]) -> DkimConfig:
    name, ini = _load_ini(config_dir / "dkim.ini", warnings)
    _warn_sections(name, ini, ["main", "sign"], warnings, _HARAKA_DKIM)
    sign = _Section(name, ini, "sign", warnings)
    enabled = sign.boolean("enabled", False)
    headers = sign.items("headers")
    if headers is None:
        headers = sign.items("headers_to_sign")
    else:
        sign.used.add("headers_to_sign")
    try:
        names = _dkim_headers(" ".join(headers)) if headers else ()
    except ValueError as exc:
        raise sign.error("headers", str(exc)) from None

    def selector(text: str) -> str:
        try:
            return check_selector(text)
        except DkimKeyError as exc:
            raise ValueError(str(exc)) from None

    def domain(text: str) -> str:
        try:
            return check_domain(text)
        except DkimKeyError as exc:
            raise ValueError(str(exc)) from None

    default_selector = sign.convert("selector", None, selector)
    default_domain = sign.convert("domain", None, domain)
    key_domain = sign.choice("key_domain", "from", ("from", "auth_user"))
    sign.finish()
    if (config_dir / "dkim.private.key").exists():
        warnings.append(
            f"{_display(config_dir / 'dkim.private.key')}: Haraka's single-domain key file is "
            "not read; move it to dkim/<domain>/private (see docs/dkim.md)"
        )
    keys = {}
    if enabled:
        try:
            keys = dict(load_keys(config_dir / "dkim", default_selector))
        except DkimKeyError as exc:
            # "config/dkim: example.com/private: ..." rather than the absolute path twice.
            problem = str(exc).replace(f"{config_dir / 'dkim'}/", "")
            raise ConfigError(_display(config_dir / "dkim"), problem) from None
        if default_domain is not None and default_domain not in keys:
            raise sign.error(
                "domain", f"{default_domain} has no key in {_display(config_dir / 'dkim')}"
            )
    return DkimConfig(
        enabled=enabled,
        headers=names,
        selector=default_selector,
        domain=default_domain,
        key_domain="auth_user" if key_domain == "auth_user" else "from",
        keys=keys,
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
    dkim = _read_dkim(absolute, warnings)
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
        dkim=dkim,
        warnings=tuple(warnings),
    )


def numeric_settings() -> tuple[NumericSetting, ...]:
    """Every numeric key of every file and its accepted range.

    Loads an empty configuration, which reads (and so declares) every key;
    see :mod:`outboundd.config.ranges`.
    """
    with tempfile.TemporaryDirectory() as tmp:
        config_dir = Path(tmp) / "config"
        config_dir.mkdir()
        (config_dir / "me").write_text("ranges.invalid\n")
        load_config(config_dir)
    return declared()
