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

from outboundd.config.errors import ConfigError
from outboundd.config.ini import IniEntry, IniFile, parse_ini
from outboundd.config.loader import load_config, load_outbound
from outboundd.config.models import (
    BounceTemplates,
    Config,
    DkimConfig,
    LogConfig,
    OutboundConfig,
    SmtpConfig,
    TlsConfig,
    TlsMain,
    TlsOutbound,
)
from outboundd.config.values import (
    BOOLEAN_FALSE,
    BOOLEAN_TRUE,
    MAX_SECONDS,
    MIN_TEMP_FAIL_INTERVAL,
    HostPort,
    default_temp_fail_intervals,
    parse_bool,
    parse_temp_fail_intervals,
)

__all__ = [
    "BOOLEAN_FALSE",
    "BOOLEAN_TRUE",
    "MAX_SECONDS",
    "MIN_TEMP_FAIL_INTERVAL",
    "BounceTemplates",
    "Config",
    "ConfigError",
    "DkimConfig",
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
