"""The hot modules run in the form the build meant, and both forms behave alike.

setup.py compiles its ``COMPILED_MODULES`` with mypyc where it can and leaves
them pure Python otherwise (or with ``OUTBOUNDD_PURE=1``).  CI runs the suite
once per form and says which it expects in ``OUTBOUNDD_EXPECT_FORM``
(``compiled`` or ``pure``), so a build that silently fell back, or a stale
extension, fails here instead of testing the wrong code.  The comparisons
load the ``.py`` sources beside the loaded modules under other names: with
the compiled form loaded they check the compiled code against its source.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Iterator
from types import ModuleType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from outboundd import dsn
from outboundd.delivery import replies as delivery_replies
from outboundd.submission import data, policy
from outboundd.submission import replies as submission_replies
from tests import buildform


def expected_form() -> str | None:
    """``compiled`` / ``pure`` as the environment states it; None when it does not."""
    stated = os.environ.get("OUTBOUNDD_EXPECT_FORM")
    if stated:
        assert stated in ("compiled", "pure"), f"OUTBOUNDD_EXPECT_FORM={stated!r}"
        return stated
    return "pure" if os.environ.get("OUTBOUNDD_PURE") == "1" else None


def test_every_hot_module_runs_in_one_form_the_one_expected() -> None:
    modules = buildform.loaded()
    forms = {
        name: "compiled" if buildform.is_compiled(m) else "pure" for name, m in modules.items()
    }
    print("hot modules:", ", ".join(f"{name} {form}" for name, form in forms.items()))
    assert len(modules) >= 1
    assert len(set(forms.values())) == 1, f"a mix of forms: {forms}"
    want = expected_form()
    if want is not None:
        assert set(forms.values()) == {want}, f"expected {want}: {forms}"
    assert buildform.stale() == []


def test_the_list_names_existing_sources() -> None:
    for source in buildform.compiled_module_sources():
        assert (buildform.ROOT / source).is_file(), source


@pytest.fixture(scope="module")
def pure() -> Iterator[dict[str, ModuleType]]:
    """The ``.py`` source of some hot modules, loaded as plain Python under other names."""
    loaded: dict[str, ModuleType] = {}
    for module in (data, policy, submission_replies, delivery_replies, dsn):
        name = module.__name__
        source = buildform.ROOT / (name.replace(".", "/") + ".py")
        alias = "pure_" + name.replace(".", "_")
        loader = importlib.machinery.SourceFileLoader(alias, str(source))
        spec = importlib.util.spec_from_loader(alias, loader)
        assert spec is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules[alias] = mod  # dataclasses look their module up while it runs
        loader.exec_module(mod)
        loaded[name] = mod
    try:
        yield loaded
    finally:
        for mod in loaded.values():
            sys.modules.pop(mod.__name__, None)


def test_the_pure_copies_are_pure(pure: dict[str, ModuleType]) -> None:
    for mod in pure.values():
        assert str(mod.__file__).endswith(".py")


def _judge(module: ModuleType, wire: bytes, max_size: int, max_line: int) -> object:
    collector = module.DataCollector(max_size=max_size, max_line=max_line)
    ended = collector.feed(wire)
    body, problem = collector.result()
    return ended, collector.size, body, None if problem is None else problem.value


@settings(max_examples=300, deadline=None)
@given(
    body=st.lists(
        st.sampled_from([b"a", b".", b"\r\n", b"\r", b"\n", b"x" * 30, b"\r\n.", b"\xff"]),
        max_size=60,
    ),
    max_size=st.sampled_from([0, 10, 100]),
    max_line=st.sampled_from([5, 40, 1000]),
)
def test_data_judging_agrees(
    pure: dict[str, ModuleType], body: list[bytes], max_size: int, max_line: int
) -> None:
    wire = b"".join(body) + b"\r\n.\r\n"
    assert _judge(data, wire, max_size, max_line) == _judge(
        pure[data.__name__], wire, max_size, max_line
    )


_REPLY_LINES = st.text(
    alphabet=st.sampled_from(list("0123459 -.abc\x1b\r\n")), min_size=0, max_size=24
)


@settings(max_examples=300, deadline=None)
@given(line=_REPLY_LINES)
def test_enhanced_codes_agree(pure: dict[str, ModuleType], line: str) -> None:
    other = pure[submission_replies.__name__]
    assert submission_replies.with_enhanced_code(line) == other.with_enhanced_code(line)
    assert submission_replies.printable_ascii(line) == other.printable_ascii(line)


@settings(max_examples=300, deadline=None)
@given(code=st.integers(100, 699), message=_REPLY_LINES)
def test_delivery_reply_parsing_agrees(
    pure: dict[str, ModuleType], code: int, message: str
) -> None:
    mine = delivery_replies.parse_reply(code, message)
    theirs = pure[delivery_replies.__name__].parse_reply(code, message)
    assert (mine.code, mine.status, mine.text, mine.sent) == (
        theirs.code,
        theirs.status,
        theirs.text,
        theirs.sent,
    )
    assert str(delivery_replies.classify(code)) == str(
        pure[delivery_replies.__name__].classify(code)
    )


@pytest.mark.parametrize(
    "arg",
    [
        "FROM:<a@example.com>",
        "FROM:<a@example.com> SIZE=100 BODY=8BITMIME",
        "FROM:<>",
        "FROM:<@relay.example:a@example.com>",
        "FROM:<\u00e9@b\u00fccher.example> SMTPUTF8",
        "FROM:<a@\udcff.example>",
        "FROM:<a@[127.0.0.1]>",
        "FROM:<a@[IPv6:::1]>",
        "FROM:<a b@example.com>",
        "FROM:<a@example.com> SIZE=99999999999",
        "FROM:<a@-bad-.example>",
        "FROM:a@example.com",
    ],
)
def test_mail_parsing_agrees(pure: dict[str, ModuleType], arg: str) -> None:
    def outcome(module: ModuleType) -> object:
        try:
            address, params = module.parse_mail(arg, extended=True, max_size=10_000)
        except Exception as exc:  # PolicyError of either copy: compare its reply
            return type(exc).__name__, str(getattr(exc, "reply", exc))
        return str(address), repr(params)

    assert outcome(policy) == outcome(pure[policy.__name__])


_ORIGINAL = (
    b"From: Alice <alice@example.com>\r\nTo: bob@example.org\r\n"
    b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\nMessage-ID: <m-1@example.com>\r\n\r\n"
    b"Hello\r\n.leading dot\r\n"
)


@pytest.mark.parametrize("ret", [None, "HDRS", "FULL"])
@pytest.mark.parametrize("action", ["failed", "delayed"])
def test_dsn_rendering_agrees(pure: dict[str, ModuleType], ret: str | None, action: str) -> None:
    def render(module: ModuleType) -> bytes:
        recipients = tuple(
            module.DsnRecipient(
                address=address,
                action=action,
                status="5.1.1" if action == "failed" else "4.4.1",
                original_recipient=f"rfc822;{address}",
                remote_mta="mx1.example.org",
                diagnostic_code=550 if action == "failed" else 451,
                diagnostic_text="user unknown \u00e9",
                last_attempt_at=1_700_000_000.0,
            )
            for address in ("bob@example.org", "\u00e9ve@b\u00fccher.example")
        )
        report = module.DsnReport(
            reporting_mta="mx.outbound.test",
            arrival_date=1_699_990_000.0,
            original_sender="alice@example.com",
            original_message=_ORIGINAL,
            recipients=recipients,
            reason="550 5.1.1 user unknown",
            extended_reason="bob@example.org: 550 5.1.1 user unknown",
            original_envelope_id="ENV-42",
            ret=ret,
        )
        rendered: bytes = module.render_dsn(
            report,
            module.DsnTemplates(),
            me="mx.outbound.test",
            now=1_700_000_100.0,
            message_id="dsn-1@mx.outbound.test",
            pid=4242,
        )
        return rendered

    assert render(dsn) == render(pure[dsn.__name__])
