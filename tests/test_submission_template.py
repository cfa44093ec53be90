"""A session built from its listener's template is the session aiosmtpd would build.

``SubmissionSMTP.__init__`` does not call aiosmtpd's ``SMTP.__init__`` (it
rebuilt per-listener tables for every connection); these tests build the
same session both ways and compare every attribute aiosmtpd sets.
"""

from __future__ import annotations

import asyncio
import collections
import types
import weakref
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, _AuthMechAttr

from outboundd.submission.handler import (
    IDENT,
    SubmissionContext,
    SubmissionHandler,
    SubmissionSMTP,
    make_session_factory,
)
from outboundd.submission.template import MethodTable, command_functions
from tests import certs
from tests.submission_fixtures import LineClient, make_config, running_relay


class _Reference(SubmissionSMTP):
    """A session whose attributes come from aiosmtpd's own ``__init__``."""

    _auth_methods = None  # type: ignore[assignment]  # a plain attribute again, as in aiosmtpd

    def __init__(self, ctx: SubmissionContext, *, implicit_tls: bool = False) -> None:
        smtp = ctx.config.smtp
        self.line_length_limit = smtp.max_line_length + 1
        SMTP.__init__(
            self,
            SubmissionHandler(),
            data_size_limit=None,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=ctx.config.me,
            ident=IDENT,
            tls_context=None if implicit_tls else ctx.starttls_context,
            require_starttls=False,
            timeout=smtp.inactivity_timeout,
            auth_required=False,
            auth_require_tls=False,
            auth_exclude_mechanism=None if ctx.auth_enabled else ["PLAIN", "LOGIN"],
            loop=asyncio.get_running_loop(),
        )
        limits: collections.defaultdict[str, int] = collections.defaultdict(lambda: 512)
        for command in ("MAIL", "RCPT", "AUTH"):
            limits[command] = smtp.max_line_length
        self.command_size_limits = limits


def _comparable(value: Any, owner: SMTP) -> Any:
    """``value`` of session ``owner``, reduced to what must be equal between the two."""
    if isinstance(value, types.MethodType):
        bound_to = "session" if value.__self__ is owner else type(value.__self__).__name__
        return ("method", value.__func__, bound_to)
    if isinstance(value, _AuthMechAttr):
        return ("auth", _comparable(value.method, owner), value.is_builtin)
    if isinstance(value, weakref.ref):
        return ("weakref", type(value()))
    if isinstance(value, asyncio.StreamReader):
        return ("reader", value._limit)  # type: ignore[attr-defined]
    if isinstance(value, asyncio.Future):
        return ("future", value.done())
    if isinstance(value, collections.deque):
        return ("deque", list(value))
    if isinstance(value, collections.defaultdict):
        factory = value.default_factory
        return ("defaultdict", factory() if factory else None, _comparable(dict(value), owner))
    if isinstance(value, Mapping):
        return {key: _comparable(item, owner) for key, item in value.items()}
    if isinstance(value, SubmissionHandler):
        return ("handler",)
    if value is None or bool(value) is False:
        return ("falsy", value if isinstance(value, int | float | str) else None)
    return value


#: What StreamReaderProtocol.__init__ sets from its stream reader.
_MADE_WITH_THE_READER = {"_closed", "_source_traceback", "_strong_reader"}


def _attributes(session: SMTP, also: Iterable[str] = ()) -> dict[str, Any]:
    """The session's attributes, and those of ``also`` it has, as its code reads them
    (ours start as class attributes until a session sets its own)."""
    names = [*vars(session), *(name for name in also if hasattr(session, name))]
    found = {name: _comparable(getattr(session, name), session) for name in names}
    found["_auth_methods"] = _comparable(session._auth_methods, session)
    return found


@pytest.mark.parametrize("auth", [True, False])
@pytest.mark.parametrize("implicit_tls", [False, True])
async def test_template_session_has_every_attribute_aiosmtpd_sets(
    tmp_path: Path, pki: certs.TestPKI, auth: bool, implicit_tls: bool
) -> None:
    config = make_config(
        tmp_path, pki=pki, plugins=("auth_flat_file",) if auth else (), max_line_length=2000
    )
    async with running_relay(config) as relay:
        ctx = relay.listeners.context
        lean = make_session_factory(ctx, implicit_tls=implicit_tls)()
        reference = _Reference(ctx, implicit_tls=implicit_tls)
        theirs = _attributes(reference)
        # The stream reader's part of StreamReaderProtocol.__init__ waits for
        # the first command that needs the reader (_open_streams); asyncio's
        # class has a _source_traceback of None until then.
        before = set(theirs) - set(_attributes(lean, theirs))
        assert sorted(before) == sorted(_MADE_WITH_THE_READER - {"_source_traceback"})
        lean._new_reader()
        ours = _attributes(lean, theirs)
        missing = sorted(set(theirs) - set(ours))
        assert missing == []
        differing = [
            (name, ours[name], theirs[name]) for name in theirs if ours[name] != theirs[name]
        ]
        assert differing == []
        assert ("PLAIN" in ours["_auth_methods"]) is auth
        assert ours["_smtp_methods"]["DATA"] == ("method", SubmissionSMTP.smtp_DATA, "session")
        assert lean.tls_context is (None if implicit_tls else ctx.starttls_context)


def test_what_sessions_start_with_on_their_class_cannot_be_shared_and_changed() -> None:
    """The attributes every session starts with are class attributes until a
    session sets its own; a mutable one would be shared by every session."""
    immutable = (type(None), bool, int, float, str, bytes, frozenset)
    starting = {
        name: value
        for name, value in vars(SubmissionSMTP).items()
        if not name.startswith("__") and not callable(value)
        and not isinstance(value, property | staticmethod | classmethod)
    }  # fmt: skip
    assert {"session", "envelope", "_pending", "_fast", "_collector"} <= set(starting)
    assert {name for name, value in starting.items() if not isinstance(value, immutable)} == set()


async def test_method_table_binds_on_demand() -> None:
    class Session:
        async def smtp_NOOP(self, arg: str) -> str:
            return f"noop {arg} {id(self)}"

    first, second = Session(), Session()
    table = MethodTable(first, command_functions(Session))
    other = MethodTable(second, command_functions(Session))
    assert list(table) == ["NOOP"] and len(table) == 1
    assert await table.get("NOOP")("x") == f"noop x {id(first)}"
    assert await other["NOOP"]("y") == f"noop y {id(second)}"
    assert table.get("DATA") is None and table.get("DATA", 5) == 5
    with pytest.raises(KeyError):
        table["DATA"]
    assert [name for name, _ in table.items()] == ["NOOP"]


async def test_sessions_of_a_listener_share_no_per_session_state(tmp_path: Path) -> None:
    config = make_config(tmp_path, relay_acl=["127.0.0.0/8"])
    async with running_relay(config) as relay:
        factory = make_session_factory(relay.listeners.context, implicit_tls=False)
        one, two = factory(), factory()
        assert one.command_size_limits is not two.command_size_limits
        one.command_size_limits["MAIL"] += 10  # what aiosmtpd's EHLO does
        assert two.command_size_limits["MAIL"] == one.command_size_limits["MAIL"] - 10
        assert one._auth_methods is not two._auth_methods
        # A full session still works with the shared tables (HELP walks them).
        client = await LineClient.connect(relay.port())
        assert (await client.cmd("HELP")).startswith("250 ")
        assert (await client.cmd("HELP NOOP")).startswith("250 ")
        assert (await client.cmd("EHLO client.test")).startswith("250-")
        assert (await client.cmd("QUIT")).startswith("221 ")
        await client.close()


class _CountingTransport:
    """The session's real transport, counting the writes that reach it."""

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))
        self.transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


async def test_ehlo_reply_is_one_write_prepared_per_listener(
    tmp_path: Path, pki: certs.TestPKI
) -> None:
    config = make_config(tmp_path, pki=pki, max_message_size=5000)
    async with running_relay(config) as relay:
        client = await LineClient.connect(relay.port())
        (session,) = relay.listeners.context.sessions
        spy = _CountingTransport(session.transport)
        session.transport = spy  # type: ignore[assignment]
        reply = await client.cmd("EHLO client.test")
        assert reply.splitlines() == [
            "250-" + config.me, "250-PIPELINING", "250-SIZE 5000", "250-8BITMIME",
            "250-SMTPUTF8", "250-ENHANCEDSTATUSCODES", "250-DSN", "250-STARTTLS",
            "250 AUTH PLAIN LOGIN",
        ]  # fmt: skip
        assert (
            len(spy.writes) == 1 and spy.writes[0] == reply.replace("\n", "\r\n").encode() + b"\r\n"
        )
        before = session.command_size_limits["MAIL"]
        assert (await client.cmd("EHLO again.test")).endswith("250 AUTH PLAIN LOGIN")
        assert session.command_size_limits["MAIL"] == before + 10  # as aiosmtpd's EHLO
        assert session.session is not None and session.session.host_name == "again.test"
        assert (await client.cmd("EHLO")).startswith("501 Syntax: EHLO hostname")
        assert (await client.cmd("MAIL FROM:<a@example.com>")).startswith("250 2.1.0")
        assert len(spy.writes) == 4
        await client.close()
