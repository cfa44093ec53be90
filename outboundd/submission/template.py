"""What every session of one listener shares, built once per listener.

aiosmtpd's ``SMTP.__init__`` builds, for every connection, tables that
depend only on the classes and the listener's settings: the ``smtp_*``
command table (a bound method per command), the handler's hook table, the
AUTH mechanism table and a log line naming the mechanisms.  At a few
hundred connections a second that was the largest per-connection cost of
the SMTP process.  :class:`SessionTemplate` holds the parts that depend
only on the listener, computed once; :class:`MethodTable` hands aiosmtpd a
bound command method only when a command asks for it; and the AUTH table
is built by the session the first time a command needs it (most
connections never say AUTH).

``tests/test_submission_template.py`` checks that a session built this way
has every attribute aiosmtpd's own ``__init__`` would give it, with the
same values.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from outboundd.submission.replies import wire

__all__ = [
    "COMMAND_PREFIX",
    "MethodTable",
    "SessionTemplate",
    "command_functions",
    "ehlo_reply_lines",
]

#: aiosmtpd finds a command ``X`` as the method ``smtp_X``.
COMMAND_PREFIX = "smtp_"

_functions_by_class: dict[type, dict[str, Callable[..., Any]]] = {}


def command_functions(cls: type) -> dict[str, Callable[..., Any]]:
    """``{command: function}`` of every ``smtp_*`` method of ``cls``, once per class.

    The values are what ``getattr(instance, "smtp_X")`` would bind, so
    :class:`MethodTable` binds them to an instance on demand.
    """
    table = _functions_by_class.get(cls)
    if table is None:
        table = {}
        for name in dir(cls):
            if name.startswith(COMMAND_PREFIX):
                table[name[len(COMMAND_PREFIX) :]] = getattr(cls, name)
        _functions_by_class[cls] = table
    return table


class MethodTable(Mapping[str, Any]):
    """aiosmtpd's ``_smtp_methods`` without a bound method per command per connection.

    aiosmtpd builds ``{command: bound method}`` for every session; this
    mapping binds the one method a command line asks for (``get``) and
    behaves as that dict for everything else it does (``items`` for HELP).
    """

    __slots__ = ("_functions", "_owner")

    def __init__(self, owner: object, functions: dict[str, Callable[..., Any]]) -> None:
        self._owner = owner
        self._functions = functions

    def get(self, key: str, default: Any = None) -> Any:
        function = self._functions.get(key)
        if function is None:
            return default
        return function.__get__(self._owner, type(self._owner))

    def __getitem__(self, key: str) -> Any:
        return self._functions[key].__get__(self._owner, type(self._owner))

    def __iter__(self) -> Iterator[str]:
        return iter(self._functions)

    def __len__(self) -> int:
        return len(self._functions)


@dataclass(frozen=True, eq=False)
class SessionTemplate:
    """The settings and tables every session of one listener starts from.

    ``handler`` is shared by the sessions (it holds no state), so its hook
    table ``handle_hooks`` is too: aiosmtpd only reads it.
    ``command_size_limits`` is copied into each session, which may change
    its copy (aiosmtpd widens the MAIL limit on EHLO).
    """

    handler: object
    handle_hooks: dict[str, Callable[..., Any]]
    hostname: str
    ident: str
    tls_context: ssl.SSLContext | None
    #: The listener's connections start over TLS (``listen_tls``).
    implicit_tls: bool
    timeout: float
    line_length_limit: int
    command_size_limits: dict[str, int]
    auth_exclude: frozenset[str]
    #: The EHLO reply's octets for each (STARTTLS offered, AUTH offered):
    #: one write per EHLO.
    ehlo_wire: Mapping[tuple[bool, bool], bytes]
    #: The greeting (``220 host ident``) and the HELO reply (``250 host``),
    #: as sent: both name the listener's host, so both are made once.
    greeting_wire: bytes
    helo_wire: bytes

    def ehlo_reply(self, *, starttls: bool, auth: bool) -> bytes:
        """The EHLO reply when STARTTLS and AUTH are (or are not) offered."""
        return self.ehlo_wire[starttls, auth]

    @classmethod
    def build(
        cls,
        handler: object,
        *,
        hostname: str,
        ident: str,
        tls_context: ssl.SSLContext | None,
        implicit_tls: bool,
        timeout: float,
        line_length_limit: int,
        command_size_limits: dict[str, int],
        auth_exclude: frozenset[str],
        ehlo_keywords: tuple[str, ...],
    ) -> SessionTemplate:
        """The template; the handler's ``handle_*`` hooks are looked up here, once.

        ``ehlo_keywords`` are the extensions always offered; ``STARTTLS``
        and ``AUTH PLAIN LOGIN`` follow when the session's state allows.
        """
        hooks = {
            name[len("handle_") :]: getattr(handler, name)
            for name in dir(handler)
            if name.startswith("handle_")
        }
        return cls(
            handler=handler,
            handle_hooks=hooks,
            hostname=hostname,
            ident=ident,
            tls_context=tls_context,
            implicit_tls=implicit_tls,
            timeout=timeout,
            line_length_limit=line_length_limit,
            command_size_limits=dict(command_size_limits),
            auth_exclude=auth_exclude,
            ehlo_wire={
                (starttls, auth): b"".join(
                    wire(line, raw=True)
                    for line in ehlo_reply_lines(hostname, ehlo_keywords, starttls, auth)
                )
                for starttls in (False, True)
                for auth in (False, True)
            },
            greeting_wire=wire(f"220 {hostname} {ident}"),
            helo_wire=wire(f"250 {hostname}", raw=True),
        )


def ehlo_reply_lines(
    hostname: str, keywords: tuple[str, ...], starttls: bool, auth: bool
) -> tuple[str, ...]:
    """``250-hostname``, a ``250-`` line per extension, ``250 `` before the last."""
    words = [
        *keywords,
        *(["STARTTLS"] if starttls else []),
        *(["AUTH PLAIN LOGIN"] if auth else []),
    ]
    return (f"250-{hostname}", *(f"250-{word}" for word in words[:-1]), f"250 {words[-1]}")
