"""The logger: exact line formats, escaping, levels, the log hook, the stdlib bridge."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from outboundd import log
from outboundd.hooks import HookResult, HookRunner, ok
from outboundd.log import Level, Logger, LogRecord, get_logger

TS = r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z"


class Exploding:
    """A value that fails the moment anything tries to turn it into text."""

    def __str__(self) -> str:
        raise AssertionError("formatted although the level is off")

    def __repr__(self) -> str:
        raise AssertionError("formatted although the level is off")

    def __format__(self, spec: str) -> str:
        raise AssertionError("formatted although the level is off")


class FlushCounter(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.flushes = 0

    def flush(self) -> None:
        self.flushes += 1
        super().flush()


@pytest.fixture
def out() -> Iterator[FlushCounter]:
    stream = FlushCounter()
    root_level = logging.getLogger().level
    # A listener started earlier in this process quiets aiosmtpd's logger
    # (``mail.log`` at ERROR unless we log at PROTOCOL); these tests see the
    # bridge as a fresh process does.
    library_log = logging.getLogger("mail.log")
    library_level = library_log.level
    library_log.setLevel(logging.NOTSET)
    log._state.reported.clear()
    log.configure(Level.INFO, False, "default", stream)
    yield stream
    log.shutdown()
    log.configure(Level.INFO, False, "default", None)
    log.shutdown()
    logging.getLogger().setLevel(root_level)
    library_log.setLevel(library_level)


def lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


# --------------------------------------------------------------------------
# Formats


def test_default_format_exact(out: FlushCounter) -> None:
    get_logger("delivery").notice(
        "delivered", qid="A1b2.C3-d", host="mx.example.org", code=250, text="2.0.0 Ok queued"
    )
    assert out.getvalue() == (
        "[NOTICE] [A1b2.C3-d] [delivery] delivered host=mx.example.org code=250 "
        'text="2.0.0 Ok queued"\n'
    )


def test_default_format_without_qid_shows_dash(out: FlushCounter) -> None:
    get_logger("core").info("ready")
    assert lines(out) == ["[INFO] [-] [core] ready"]


def test_logfmt_format_exact(out: FlushCounter) -> None:
    log.configure(Level.INFO, False, "logfmt", out)
    get_logger("delivery").info("sent", qid="Q1", host="mx 1", code=250, tls=True)
    get_logger("core").info("ready")
    assert lines(out) == [
        'level=INFO uuid=Q1 source=delivery message="sent" host="mx 1" code=250 tls=true',
        'level=INFO uuid=- source=core message="ready"',
    ]


def test_json_format_exact(out: FlushCounter) -> None:
    log.configure(Level.INFO, False, "json", out)
    get_logger("delivery").info(
        "sent", qid="Q1", host="mx", code=250, tls=False, note=None, ratio=0.5, mx=["a", "b"]
    )
    get_logger("core").info("ready")
    assert lines(out) == [
        '{"level":"INFO","uuid":"Q1","source":"delivery","message":"sent","host":"mx",'
        '"code":250,"tls":false,"note":null,"ratio":0.5,"mx":["a","b"]}',
        '{"level":"INFO","uuid":null,"source":"core","message":"ready"}',
    ]


def test_json_non_native_values_become_strings(out: FlushCounter) -> None:
    log.configure(Level.INFO, False, "json", out)

    @dataclass
    class Point:
        x: int

    get_logger("t").info("m", obj=Point(1), nan=float("nan"), inf=float("inf"), lvl=Level.WARN)
    obj = json.loads(out.getvalue())
    assert obj["obj"] == "test_json_non_native_values_become_strings.<locals>.Point(x=1)"
    assert obj["nan"] == "nan"
    assert obj["inf"] == "inf"
    assert obj["lvl"] == "4"


def test_reserved_field_names_do_not_clobber_fixed_keys(out: FlushCounter) -> None:
    log.configure(Level.INFO, False, "json", out)
    get_logger("t").info("real", level="fake", source="s", uuid="u", message="m", timestamp=1)
    obj = json.loads(out.getvalue())
    assert obj["level"] == "INFO"
    assert obj["message"] == "real"
    assert obj["uuid"] is None
    assert (obj["_level"], obj["_source"], obj["_uuid"], obj["_message"]) == ("fake", "s", "u", "m")
    assert obj["_timestamp"] == 1


def test_all_level_names(out: FlushCounter) -> None:
    log.configure(Level.DATA, False, "default", out)
    logger = get_logger("x")
    for method in (
        logger.data,
        logger.protocol,
        logger.debug,
        logger.info,
        logger.notice,
        logger.warn,
        logger.error,
        logger.crit,
        logger.alert,
        logger.emerg,
    ):
        method("m")
    names = [line.split("]")[0][1:] for line in lines(out)]
    assert names == [
        "DATA",
        "PROTOCOL",
        "DEBUG",
        "INFO",
        "NOTICE",
        "WARN",
        "ERROR",
        "CRIT",
        "ALERT",
        "EMERG",
    ]
    assert [int(level) for level in Level] == list(range(10))


# --------------------------------------------------------------------------
# Escaping


NASTY = 'line1\nline2\r"quoted" back\\slash\ttab\x00nul\x1b[31m\u2028sep\x85nel'


def test_default_escaping_keeps_one_line(out: FlushCounter) -> None:
    get_logger("t").info(NASTY, value=NASTY, empty="", eq="a=b", plain="abc")
    text = out.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n")
    assert len(text.splitlines()) == 1  # also no \u2028, \x85, \r splitting it
    assert text == (
        '[INFO] [-] [t] line1\\nline2\\r"quoted" back\\slash\\ttab\\u0000nul\\u001b[31m'
        "\\u2028sep\\u0085nel "
        'value="line1\\nline2\\r\\"quoted\\" back\\\\slash\\ttab\\u0000nul\\u001b[31m'
        '\\u2028sep\\u0085nel" empty="" eq="a=b" plain=abc\n'
    )


def test_value_cannot_forge_a_field(out: FlushCounter) -> None:
    log.configure(Level.INFO, False, "logfmt", out)
    get_logger("t").info("m", user='bob" admin=true x="')
    assert lines(out) == ['level=INFO uuid=- source=t message="m" user="bob\\" admin=true x=\\""']


def test_logfmt_escaping(out: FlushCounter) -> None:
    log.configure(Level.INFO, False, "logfmt", out)
    get_logger("t").info(NASTY, qid="with space")
    text = out.getvalue()
    assert len(text.splitlines()) == 1
    assert text.startswith('level=INFO uuid="with space" source=t message="line1\\nline2\\r\\"')


def test_json_escaping_round_trips(out: FlushCounter) -> None:
    log.configure(Level.INFO, False, "json", out)
    get_logger("t").info(NASTY, value=NASTY, uni="héllo ✓")
    text = out.getvalue()
    assert len(text.splitlines()) == 1
    obj = json.loads(text)
    assert obj["message"] == NASTY
    assert obj["value"] == NASTY
    assert obj["uni"] == "héllo ✓"
    assert "héllo ✓" in text  # readable, not \u-escaped


def test_odd_field_keys_are_sanitised(out: FlushCounter) -> None:
    get_logger("t").info("m", **{"a b": 1, "x=y": 2, "": 3, "ok.key-1": 4})
    assert lines(out) == ["[INFO] [-] [t] m a_b=1 x_y=2 _=3 ok.key-1=4"]


def test_field_keys_are_remembered_per_format(out: FlushCounter) -> None:
    # Keys are checked once and remembered: the second line must be spelt
    # like the first, and "level" is reserved only where the format has it.
    for _ in range(2):
        get_logger("t").info("m", **{"a b": 1, "level": 2})
    log.configure(Level.INFO, False, "logfmt", out)
    get_logger("t").info("m", **{"a b": 1, "level": 2})
    log.configure(Level.INFO, False, "default", out)
    get_logger("t").info("m", level=2)
    assert lines(out) == [
        "[INFO] [-] [t] m a_b=1 level=2",
        "[INFO] [-] [t] m a_b=1 level=2",
        'level=INFO uuid=- source=t message="m" a_b=1 _level=2',
        "[INFO] [-] [t] m level=2",
    ]


def _quoted_by_the_rule(text: str) -> str:
    """A value as the rule says: quoted (and escaped) when the regex finds a character."""
    if not text or log._NEEDS_QUOTES.search(text):
        return '"' + text.translate(log._QUOTED_TABLE) + '"'
    return text


def test_value_quoting_follows_the_rule_for_every_character() -> None:
    # _text_value takes printable values without the regex; every character
    # of the Basic Multilingual Plane (and a few beyond) alone and inside
    # other text must still come out as the regex and the table say.
    points = [*range(0x10000), 0x1F600, 0xE0001, 0x10FFFF]
    for point in points:
        if 0xD800 <= point <= 0xDFFF:
            continue
        c = chr(point)
        for text in (c, f"ab{c}cd", f"{c} x", f'"{c}'):
            assert log._text_value(text) == _quoted_by_the_rule(text), hex(point)
    assert log._text_value("") == '""'


def test_controls_in_message_source_and_qid_are_escaped(out: FlushCounter) -> None:
    for text in ("\u2028", "a\u2029b", "\x85", "\x00", "\x9f", "tab\there", "\xa0nbsp", "\u200b"):
        get_logger(f"s{text}").info(f"m{text}", qid=f"q{text}")
    expected = []
    for text in ("\u2028", "a\u2029b", "\x85", "\x00", "\x9f", "tab\there", "\xa0nbsp", "\u200b"):
        shown = text.translate(log._MESSAGE_TABLE)
        expected.append(f"[INFO] [q{shown}] [s{shown}] m{shown}")
    assert out.getvalue() == "".join(line + "\n" for line in expected)


def test_field_whose_str_raises_still_logs_a_line(out: FlushCounter) -> None:
    get_logger("t").info("important", value=Exploding())
    assert lines(out) == [
        '[INFO] [-] [t] important log_error="AssertionError while formatting this line"'
    ]


# --------------------------------------------------------------------------
# Many lines sharing their fields (Logger.each)

EACH_VALUES = ["a@dest.test", 'odd "quoted" value', "line\nbreak", "x=y", 7, None, "\u2028"]
EACH_FIELDS: dict[str, object] = {
    "qid": "Q1",
    "domain": "dest.test",
    "code": 250,
    "response": '250 2.0.0 Ok "queued"',
    "delay": 0.412,
    "next_attempt": None,
    "message": "clashes in logfmt and json",
}


def lines_of_one_call_per_value(out: FlushCounter, logger: Logger) -> str:
    """What one ``notice`` call per value of EACH_VALUES writes; ``out`` emptied after."""
    for value in EACH_VALUES:
        logger.notice("delivered", rcpt=value, **EACH_FIELDS)
    written = out.getvalue()
    out.seek(0)
    out.truncate()
    return written


@pytest.mark.parametrize("fmt", log.FORMATS)
@pytest.mark.parametrize("timestamps", [False, True])
def test_each_writes_the_lines_of_one_call_per_value(
    out: FlushCounter, monkeypatch: pytest.MonkeyPatch, fmt: str, timestamps: bool
) -> None:
    monkeypatch.setattr("outboundd.log.time.time", lambda: 1_700_000_000.25)
    log.configure(Level.INFO, timestamps, fmt, out)
    logger = get_logger("delivery")
    expected = lines_of_one_call_per_value(out, logger)
    logger.each(Level.NOTICE, "delivered", "rcpt", EACH_VALUES, **EACH_FIELDS)
    assert out.getvalue() == expected
    assert len(lines(out)) == len(EACH_VALUES)


@pytest.mark.parametrize("fmt", log.FORMATS)
def test_each_with_one_value_writes_the_line_of_one_call(out: FlushCounter, fmt: str) -> None:
    log.configure(Level.INFO, False, fmt, out)
    logger = get_logger("delivery")
    expected = lines_of_one_call_per_value(out, logger)
    for value in EACH_VALUES:
        logger.each(Level.NOTICE, "delivered", "rcpt", [value], **EACH_FIELDS)
    assert out.getvalue() == expected


def test_each_with_one_unprintable_value_still_logs_a_line(out: FlushCounter) -> None:
    get_logger("t").each(Level.INFO, "m", "rcpt", [Exploding()], qid="Q")
    assert lines(out) == ['[INFO] [Q] [t] m log_error="AssertionError while formatting this line"']


def test_each_value_holding_the_placeholder_stays_escaped(out: FlushCounter) -> None:
    hostile = f"x {log._PLACEHOLDER} y"
    get_logger("d").each(Level.INFO, "m", "rcpt", [hostile], reason=log._PLACEHOLDER)
    assert lines(out) == [f'[INFO] [-] [d] m rcpt="{hostile}" reason={log._PLACEHOLDER}']


def test_each_below_the_level_formats_nothing(out: FlushCounter) -> None:
    get_logger("d").each(Level.DEBUG, "m", "rcpt", [Exploding()], code=Exploding())
    assert out.getvalue() == ""


def test_each_with_an_unprintable_field_logs_every_line(out: FlushCounter) -> None:
    get_logger("t").each(Level.INFO, "m", "rcpt", ["a", Exploding(), "b"], qid="Q")
    assert lines(out) == [
        "[INFO] [Q] [t] m rcpt=a",
        '[INFO] [Q] [t] m log_error="AssertionError while formatting this line"',
        "[INFO] [Q] [t] m rcpt=b",
    ]


async def test_each_gives_the_log_hook_one_record_per_value(out: FlushCounter) -> None:
    received = collect_log_records()
    get_logger("delivery").each(Level.NOTICE, "delivered", "rcpt", ["a", "b"], qid="Q", code=250)
    await log.drain_log_hooks()
    assert [(r.qid, dict(r.fields)) for r in received] == [
        ("Q", {"rcpt": "a", "code": 250}),
        ("Q", {"rcpt": "b", "code": 250}),
    ]
    assert lines(out) == [
        "[NOTICE] [Q] [delivery] delivered rcpt=a code=250",
        "[NOTICE] [Q] [delivery] delivered rcpt=b code=250",
    ]


# --------------------------------------------------------------------------
# Timestamps


def test_timestamps_default_logfmt_json(out: FlushCounter) -> None:
    for fmt in log.FORMATS:
        log.configure(Level.INFO, True, fmt, out)
        get_logger("t").info("m", qid="Q")
    default, logfmt, js = lines(out)
    assert re.fullmatch(TS + r" \[INFO\] \[Q\] \[t\] m", default)
    assert re.fullmatch(r"timestamp=" + TS + r' level=INFO uuid=Q source=t message="m"', logfmt)
    obj = json.loads(js)
    assert list(obj) == ["timestamp", "level", "uuid", "source", "message"]
    assert re.fullmatch(TS, obj["timestamp"])


def test_timestamp_value_is_utc(out: FlushCounter, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("outboundd.log.time.time", lambda: 1_700_000_000.25)
    log.configure(Level.INFO, True, "default", out)
    get_logger("t").info("m")
    assert lines(out) == ["2023-11-14T22:13:20.250Z [INFO] [-] [t] m"]


# --------------------------------------------------------------------------
# Levels and cost


def test_level_filtering(out: FlushCounter) -> None:
    log.configure(Level.NOTICE, False, "default", out)
    logger = get_logger("t")
    logger.info("hidden")
    logger.debug("hidden")
    logger.notice("shown")
    logger.error("shown too")
    logger.log(6, "hidden")
    logger.log(Level.WARN, "shown via log()")
    assert [line.split("] ")[-1] for line in lines(out)] == [
        "shown",
        "shown too",
        "shown via log()",
    ]
    assert logger.enabled(Level.NOTICE) and logger.enabled(Level.EMERG)
    assert not logger.enabled(Level.INFO)


def test_log_clamps_out_of_range_levels(out: FlushCounter) -> None:
    log.configure(Level.DATA, False, "default", out)
    get_logger("t").log(42, "high")
    get_logger("t").log(-3, "low")
    assert lines(out) == ["[DATA] [-] [t] high", "[EMERG] [-] [t] low"]


def test_disabled_level_formats_nothing(out: FlushCounter) -> None:
    log.configure(Level.INFO, False, "json", out)
    logger = get_logger("t")
    bomb = Exploding()
    logger.debug(bomb, qid=bomb, value=bomb)  # type: ignore[arg-type]
    logger.protocol(bomb, value=bomb)  # type: ignore[arg-type]
    logger.data(bomb, value=bomb)  # type: ignore[arg-type]
    logger.log(Level.DEBUG, bomb, value=bomb)  # type: ignore[arg-type]
    assert out.getvalue() == ""
    # The same object at an enabled level is converted (so the test above
    # proves something), and the failure is contained.
    logger.info("m", value=bomb)
    assert "log_error" in out.getvalue()


def test_flushes_only_on_warn_and_worse(out: FlushCounter) -> None:
    logger = get_logger("t")
    before = out.flushes
    for _ in range(100):
        logger.info("buffered")
    assert out.flushes == before
    logger.warn("flush now")
    assert out.flushes == before + 1
    log.shutdown()
    assert out.flushes == before + 2


def test_configure_rejects_bad_values_and_changes_nothing(out: FlushCounter) -> None:
    with pytest.raises(ValueError, match="between 0"):
        log.configure(10, False, "default", out)
    with pytest.raises(ValueError, match="between 0"):
        log.configure(True, False, "default", out)
    with pytest.raises(ValueError, match="not one of default, logfmt, json"):
        log.configure(Level.DEBUG, False, "xml", out)
    get_logger("t").debug("still off")
    assert out.getvalue() == ""


@dataclass(frozen=True)
class FakeLogConfig:
    level: int
    timestamps: bool
    format: str


def test_configure_from_config_object(out: FlushCounter) -> None:
    log.configure_from(FakeLogConfig(Level.DEBUG, False, "logfmt"), stream=out)
    get_logger("t").debug("d")
    log.configure(FakeLogConfig(Level.WARN, False, "default"), stream=out)
    get_logger("t").info("hidden")
    get_logger("t").warn("w")
    assert lines(out) == ['level=DEBUG uuid=- source=t message="d"', "[WARN] [-] [t] w"]


def test_loggers_follow_reconfiguration(out: FlushCounter) -> None:
    logger = get_logger("t")
    assert get_logger("t") is logger
    logger.debug("off")
    log.configure(Level.DEBUG, False, "default", out)
    logger.debug("on")
    assert lines(out) == ["[DEBUG] [-] [t] on"]


def test_level_from_name() -> None:
    assert log.level_from_name("debug") == Level.DEBUG
    assert log.level_from_name(" LOGINFO\n") == Level.INFO
    assert log.level_from_name("warning") == Level.WARN
    assert log.level_from_name("9") == Level.DATA
    with pytest.raises(ValueError, match="not a log level"):
        log.level_from_name("loud")
    with pytest.raises(ValueError):
        log.level_from_name("10")


def test_concurrent_threads_never_interleave_lines(out: FlushCounter) -> None:
    def worker(n: int) -> None:
        for i in range(200):
            get_logger(f"w{n}").info("x" * 50, i=i)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    got = lines(out)
    assert len(got) == 1600
    assert all(re.fullmatch(r"\[INFO\] \[-\] \[w\d\] x{50} i=\d+", line) for line in got)


def test_broken_stream_does_not_raise(
    out: FlushCounter, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = io.StringIO()
    broken.close()
    log.configure(Level.INFO, False, "default", broken)
    get_logger("t").error("lost")
    get_logger("t").error("lost again")
    assert capsys.readouterr().err.count("cannot write log lines") == 1


# --------------------------------------------------------------------------
# The log hook


def make_runner() -> HookRunner:
    return HookRunner([], timeout=5)


def collect_log_records() -> list[LogRecord]:
    """Install a ``log`` hook that keeps every record it is given; the list fills as it runs."""
    received: list[LogRecord] = []

    async def hook(record: LogRecord) -> HookResult | None:
        received.append(record)
        return None

    runner = make_runner()
    runner.add("collector", "log", hook)
    log.set_log_hook(runner)
    return received


async def test_log_hook_receives_records(out: FlushCounter) -> None:
    received = collect_log_records()
    get_logger("delivery").notice("delivered", qid="Q9", code=250)
    get_logger("delivery").debug("off: no record")
    assert received == []  # scheduled, never run inside the caller
    await log.drain_log_hooks()
    assert len(received) == 1
    record = received[0]
    assert record.level is Level.NOTICE
    assert (record.source, record.message, record.qid) == ("delivery", "delivered", "Q9")
    assert dict(record.fields) == {"code": 250}
    assert record.time > 1_600_000_000
    with pytest.raises(TypeError):
        record.fields["x"] = 1  # type: ignore[index]


async def test_log_hook_chain_stops_at_ok(out: FlushCounter) -> None:
    calls: list[str] = []

    async def first(record: LogRecord) -> HookResult | None:
        calls.append("first")
        return ok()

    async def second(record: LogRecord) -> HookResult | None:
        calls.append("second")
        return None

    runner = make_runner()
    runner.add("a", "log", first)
    runner.add("b", "log", second)
    log.configure(Level.INFO, False, "default", out, hooks=runner)
    get_logger("t").info("m")
    await log.drain_log_hooks()
    assert calls == ["first"]


async def test_failing_log_hook_is_reported_once(
    out: FlushCounter, capsys: pytest.CaptureFixture[str]
) -> None:
    async def broken(record: LogRecord) -> HookResult | None:
        raise RuntimeError("plugin bug")

    runner = make_runner()
    runner.add("badplugin", "log", broken)
    log.set_log_hook(runner)
    for _ in range(3):
        get_logger("t").info("m")
    await log.drain_log_hooks()
    err = capsys.readouterr().err
    assert err.count("badplugin") == 1
    assert "plugin bug" in err
    assert len(lines(out)) == 3  # the lines themselves were written


async def test_log_hook_that_logs_does_not_recurse(out: FlushCounter) -> None:
    seen: list[str] = []

    async def chatty(record: LogRecord) -> HookResult | None:
        seen.append(record.message)
        get_logger("plugin").info(f"saw {record.message}")
        return None

    runner = make_runner()
    runner.add("chatty", "log", chatty)
    log.set_log_hook(runner)
    get_logger("t").info("one")
    await log.drain_log_hooks()
    await asyncio.sleep(0)
    await log.drain_log_hooks()
    assert seen == ["one"]
    assert lines(out) == ["[INFO] [-] [t] one", "[INFO] [-] [plugin] saw one"]


async def test_log_hook_from_worker_thread(out: FlushCounter) -> None:
    received: list[str] = []

    async def hook(record: LogRecord) -> HookResult | None:
        received.append(record.message)
        return None

    runner = make_runner()
    runner.add("c", "log", hook)
    log.set_log_hook(runner)
    get_logger("t").info("from loop")  # lets the logger learn the loop
    await asyncio.to_thread(get_logger("t").info, "from thread")
    for _ in range(5):
        await asyncio.sleep(0)
    await log.drain_log_hooks()
    assert received == ["from loop", "from thread"]


def test_no_loop_no_hook_and_no_error(out: FlushCounter) -> None:
    async def hook(record: LogRecord) -> HookResult | None:
        raise AssertionError("must not run")

    runner = make_runner()
    runner.add("c", "log", hook)
    log.set_log_hook(runner)
    log._state.hook_loop = None
    get_logger("t").info("sync context")
    assert lines(out) == ["[INFO] [-] [t] sync context"]


# --------------------------------------------------------------------------
# The stdlib bridge


def test_stdlib_records_come_out_in_our_format(out: FlushCounter) -> None:
    logging.getLogger("mail.log").warning("peer %s said %r", "1.2.3.4", "bye")
    logging.getLogger("asyncio").info("info is on at INFO")
    logging.getLogger("asyncio").debug("debug is off")
    assert lines(out) == [
        "[WARN] [-] [mail.log] peer 1.2.3.4 said 'bye'",
        "[INFO] [-] [asyncio] info is on at INFO",
    ]


def test_stdlib_level_mapping_and_root_level(out: FlushCounter) -> None:
    log.configure(Level.DATA, False, "logfmt", out)
    assert logging.getLogger().level == 1
    lib = logging.getLogger("lib")
    lib.critical("c")
    lib.error("e")
    lib.log(5, "below debug")
    got = lines(out)
    assert got[0].startswith("level=CRIT ")
    assert got[1].startswith("level=ERROR ")
    assert got[2].startswith("level=PROTOCOL ")
    log.configure(Level.NOTICE, False, "default", out)
    assert logging.getLogger().level == logging.WARNING
    log.configure(Level.ERROR, False, "default", out)
    assert logging.getLogger().level == logging.ERROR


def test_stdlib_exception_becomes_a_field(out: FlushCounter) -> None:
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        logging.getLogger("lib").exception("failed")
    assert lines(out) == ['[ERROR] [-] [lib] failed error="ValueError: bad\\nthing"']
    out.truncate(0)
    out.seek(0)
    log.configure(Level.DEBUG, False, "default", out)
    try:
        raise ValueError("x")
    except ValueError:
        logging.getLogger("lib").exception("failed")
    (line,) = lines(out)
    assert 'traceback="Traceback (most recent call last):\\n' in line


def test_bridge_installed_once_and_removed_by_shutdown(out: FlushCounter) -> None:
    def bridges() -> list[Any]:
        return [h for h in logging.getLogger().handlers if isinstance(h, log.StdlibBridge)]

    log.configure(Level.INFO, False, "default", out)
    log.configure(Level.INFO, False, "json", out)
    assert len(bridges()) == 1
    log.shutdown()
    assert bridges() == []


def test_writes_to_sys_stdout_by_default(capsys: pytest.CaptureFixture[str]) -> None:
    log.configure(Level.INFO, False, "default")
    try:
        get_logger("t").warn("to stdout")
        assert capsys.readouterr().out == "[WARN] [-] [t] to stdout\n"
    finally:
        log.shutdown()
    assert sys.stdout is not None


def test_aiosmtpd_client_lines_are_logged_without_auth_data() -> None:
    """Item 2: the filter on aiosmtpd's logger keeps commands, never AUTH data."""
    import logging

    from outboundd.submission.liblog import ClientDataFilter, describe_client_line

    assert describe_client_line(b"MAIL FROM:<a@b.test> SIZE=10\r\n") == (
        "MAIL FROM:<a@b.test> SIZE=10"
    )
    assert describe_client_line(b"auth plain AGFsaWNlAHNlY3JldA==") == "AUTH plain ********"
    assert describe_client_line(b"AUTH LOGIN") == "AUTH LOGIN"
    assert describe_client_line(b"s3cret-password") == "<15 octets>"
    assert describe_client_line("c2VjcmV0\r\n") == "<8 octets>"

    def record(msg: str, *args: object) -> logging.LogRecord:
        return logging.LogRecord("mail.log", logging.INFO, __file__, 1, msg, args, None)

    flt = ClientDataFilter()
    line = record("%r >> %r", ("127.0.0.1", 1), b"hunter2hunter2")
    assert flt.filter(line) and "hunter2" not in line.getMessage()
    word = record("%r unrecognised: %s", ("127.0.0.1", 1), "HUNTER2")
    assert flt.filter(word) and "HUNTER2" not in word.getMessage()
    assert not flt.filter(record("%r can't decode base64: %s", ("127.0.0.1", 1), b"hunter2"))
    other = record("%r connection lost", ("127.0.0.1", 1))
    assert flt.filter(other) and other.getMessage() == "('127.0.0.1', 1) connection lost"
