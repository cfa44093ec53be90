"""The frozen pydantic models the configuration is read into."""

from __future__ import annotations

from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import Final, Literal, TypeAlias

from pydantic import BaseModel, ConfigDict, Field, InstanceOf

from outboundd.config.values import HostPort, default_temp_fail_intervals
from outboundd.dkimkeys import DkimKey
from outboundd.log import Level

_TLS_VERSIONS: Final = ("TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3")

InetPrefer: TypeAlias = Literal["default", "v4", "v6"]
LogFormat: TypeAlias = Literal["default", "logfmt", "json"]

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
    nodes: int = 1


class OutboundConfig(BaseModel):
    """``outbound.ini [main]``: delivery.  Re-read on change (hot reload).

    ``temp_fail_intervals`` is always the effective schedule, and
    ``max_temp_failures`` is ``len(temp_fail_intervals) + 1`` whenever the
    schedule was written explicitly (Haraka then ignores maxTempFailures).
    """

    model_config = _FROZEN

    disabled: bool = False
    delivery_processes: int = 1
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
    #: None: SQLite in ``queue_dir``; else the PostgreSQL queue's URL (restart to change).
    queue_url: str | None = None

    @property
    def queue_location(self) -> str | Path:
        """What ``outboundd.spool.open`` takes: the queue URL, else the queue directory."""
        return self.queue_url or self.queue_dir

    nameservers: list[HostPort] = Field(default_factory=list)
    mx_port: int = 25
    greeting_timeout: float = 300.0
    ehlo_timeout: float = 300.0
    starttls_timeout: float = 300.0
    auth_timeout: float = 120.0
    mail_timeout: float = 300.0
    rcpt_timeout: float = 300.0
    data_timeout: float = 120.0
    data_block_timeout: float = 180.0
    data_end_timeout: float = 600.0
    rset_timeout: float = 20.0
    quit_timeout: float = 5.0
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


class DkimConfig(BaseModel):
    """``dkim.ini [sign]`` and the keys under ``config/dkim/`` (loaded only when enabled).

    ``key_domain``: ``from`` signs with the From domain's key, ``auth_user``
    with the domain of an AUTH user named ``user@domain`` (else From's).
    ``domain``: the domain whose key signs mail whose own domain has none.
    """

    model_config = _FROZEN

    enabled: bool = False
    headers: tuple[str, ...] = ()
    selector: str | None = None
    domain: str | None = None
    key_domain: Literal["from", "auth_user"] = "from"
    keys: dict[str, tuple[InstanceOf[DkimKey], ...]] = Field(default_factory=dict)


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
    dkim: DkimConfig = Field(default_factory=DkimConfig)
    warnings: tuple[str, ...] = ()
