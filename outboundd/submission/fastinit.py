"""Per-class caching of aiosmtpd's per-connection introspection.

Installed by importing this module (``outboundd.submission.handler`` does).

``aiosmtpd.smtp.SMTP.__init__`` calls ``inspect.getmembers`` on the new
session object and on its handler for every connection, only to find the
``auth_*`` methods; ``getmembers`` evaluates every attribute, properties
included, and it costs ~0.4 ms per connection — more than a tenth of a core
at a few hundred connections a second.  The answer depends only on the
classes, so we compute the member *names* once per class and hand aiosmtpd
the bound members; likewise its two ``dir()`` scans and the
``inspect.signature`` of the EHLO hook.  Only aiosmtpd's module globals
``inspect``, ``dir`` and ``sanitized_log`` (which now first asks whether
the logger wants the line) are replaced; every other ``inspect`` function is
passed through.  A test checks that a session built with the caches has the
same method tables as one built without them.
"""

from __future__ import annotations

import inspect
import logging
from types import ModuleType
from typing import Any

import aiosmtpd.smtp

AUTH_PREFIX = "auth_"
_names_by_class: dict[type, tuple[str, ...]] = {}


def cached_getmembers(obj: object, predicate: Any = None) -> list[tuple[str, Any]]:
    """The ``auth_*`` members of ``obj`` — all aiosmtpd asks ``getmembers`` for.

    The names are cached per class (aiosmtpd sessions and handlers have a
    class-fixed attribute set); a caller with a ``predicate`` gets the real
    function.
    """
    if predicate is not None:
        return inspect.getmembers(obj, predicate)
    cls = type(obj)
    names = _names_by_class.get(cls)
    if names is None:
        # aiosmtpd keeps only the auth_* members; fetching the others (and
        # evaluating properties) is the cost we are avoiding.
        names = tuple(name for name in dir(obj) if name.startswith(AUTH_PREFIX))
        _names_by_class[cls] = names
    members = []
    for name in names:
        try:
            members.append((name, getattr(obj, name)))
        except AttributeError:
            continue
    return members


_dir_by_class: dict[type, list[str]] = {}
_signatures: dict[object, inspect.Signature] = {}


#: The only names aiosmtpd looks for in its two ``dir()`` scans.
DIR_PREFIXES = ("handle_", "smtp_")


def cached_dir(obj: object) -> list[str]:
    """The ``handle_*``/``smtp_*`` names of ``dir(obj)``, per class.

    aiosmtpd's two ``dir()`` scans keep only those names; handing it just
    them saves filtering some 250 attribute names per connection.
    """
    cls = type(obj)
    names = _dir_by_class.get(cls)
    if names is None:
        names = _dir_by_class[cls] = [n for n in dir(obj) if n.startswith(DIR_PREFIXES)]
    return list(names)


def cached_signature(fn: Any) -> inspect.Signature:
    """``inspect.signature`` of a bound method, cached per underlying function."""
    key = (getattr(fn, "__func__", fn), hasattr(fn, "__self__"))
    sig = _signatures.get(key)
    if sig is None:
        sig = _signatures[key] = inspect.signature(fn)
    return sig


class _InspectShim(ModuleType):
    """``inspect`` as aiosmtpd sees it: ``getmembers`` cached, the rest unchanged."""

    def __getattr__(self, name: str) -> Any:
        return getattr(inspect, name)


_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}
_sanitized_log = aiosmtpd.smtp.sanitized_log
#: aiosmtpd's module logger, the only one it passes to ``sanitized_log``.
_LIBRARY_LOG = logging.getLogger("mail.log")


def quiet_sanitized_log(func: Any, msg: Any, *args: Any, **kwargs: Any) -> None:
    """aiosmtpd's ``sanitized_log``, skipped when the logger would drop the line.

    aiosmtpd logs every command line twice (debug and info) and sanitizes
    the arguments before the logger decides to discard them; we log its
    chatter only at PROTOCOL level, so that work was waste on every command.
    """
    logger = getattr(func, "__self__", None)
    if logger is _LIBRARY_LOG and not logger.isEnabledFor(logging.INFO):
        return  # aiosmtpd logs these at DEBUG and INFO only: neither is wanted
    level = _LEVELS.get(getattr(func, "__name__", ""))
    if isinstance(logger, logging.Logger) and level is not None and not logger.isEnabledFor(level):
        return
    _sanitized_log(func, msg, *args, **kwargs)


def install() -> None:
    """Point aiosmtpd's ``inspect`` global at the shim (idempotent)."""
    if isinstance(getattr(aiosmtpd.smtp, "inspect", None), _InspectShim):
        return
    aiosmtpd.smtp.sanitized_log = quiet_sanitized_log
    shim = _InspectShim("inspect")
    shim.getmembers = cached_getmembers  # type: ignore[attr-defined]
    shim.signature = cached_signature  # type: ignore[attr-defined]
    aiosmtpd.smtp.inspect = shim  # type: ignore[attr-defined]
    # A module global shadows the builtin for code in that module only.
    aiosmtpd.smtp.dir = cached_dir  # type: ignore[attr-defined]


install()
