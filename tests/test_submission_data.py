"""DataCollector: the pure judge of a DATA transfer, fed pieces as the reader cuts them."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from outboundd.submission.data import DataCollector, DataProblem


def stuff(body: bytes) -> bytes:
    """What a client sends for ``body`` (CRLF lines): dot-stuffed, then the end line."""
    lines = body.split(b"\r\n")[:-1] if body else []
    wire = [(b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines]
    return b"".join(wire) + b".\r\n"


def pieces_as_reader_cuts(wire: bytes, limit: int) -> list[bytes]:
    """Cut ``wire`` the way the session does: at each ``.<CRLF>``, or at ``limit`` octets."""
    out: list[bytes] = []
    rest = wire
    while rest:
        end = rest.find(b".\r\n")
        if end == -1 or end > limit:
            cut = min(limit, len(rest))
            out.append(rest[:cut])
            rest = rest[cut:]
        else:
            out.append(rest[: end + 3])
            rest = rest[end + 3 :]
    return out


def collect(wire: bytes, *, max_size: int = 0, max_line: int = 1000, limit: int = 1000) -> tuple:
    collector = DataCollector(max_size=max_size, max_line=max_line)
    pieces = pieces_as_reader_cuts(wire, limit)
    for index, piece in enumerate(pieces):
        if collector.feed(piece):
            assert index == len(pieces) - 1, "ended before the end line"
            return collector.result()
    raise AssertionError("the end line was not recognised")


lines = st.lists(
    st.binary(max_size=60).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
    max_size=30,
)


@given(lines, st.integers(min_value=4, max_value=200))
def test_any_stuffed_message_comes_back_exactly(body_lines: list[bytes], limit: int) -> None:
    body = b"".join(line + b"\r\n" for line in body_lines)
    assert collect(stuff(body), limit=limit) == (body, None)


def test_empty_message_and_dot_lines() -> None:
    assert collect(b".\r\n") == (b"", None)
    assert collect(b"..\r\n.\r\n") == (b".\r\n", None)
    assert collect(b"a.\r\n.b\r\n..\r\n.\r\n") == (b"a.\r\nb\r\n.\r\n", None)


def test_a_dot_line_not_at_line_start_does_not_end_the_data() -> None:
    collector = DataCollector(max_size=0, max_line=1000)
    assert not collector.feed(b"abc")  # cut by the reader's limit mid-line
    assert not collector.feed(b".\r\n")  # "abc.\r\n": a line, not the end
    assert collector.feed(b".\r\n")
    assert collector.result() == (b"abc.\r\n", None)


def test_size_limit_counts_the_unstuffed_message() -> None:
    body = b"..\r\n" * 10  # 40 octets on the wire, 30 unstuffed
    assert collect(body + b".\r\n", max_size=30) == (b".\r\n" * 10, None)
    assert collect(body + b".\r\n", max_size=29) == (None, DataProblem.TOO_BIG)


def test_an_oversized_message_is_not_kept() -> None:
    collector = DataCollector(max_size=100, max_line=1000)
    for _ in range(100):
        assert not collector.feed(b"x" * 98 + b"\r\n")
    assert collector._kept <= 100 * 4 // 3 + 200  # stopped keeping near the limit
    assert collector.feed(b".\r\n")
    assert collector.result() == (None, DataProblem.TOO_BIG)


def test_long_line_and_bare_line_ends_are_refused() -> None:
    assert collect(b"z" * 1001 + b"\r\n.\r\n", max_line=1000) == (
        None,
        DataProblem.LINE_TOO_LONG,
    )
    assert collect(b"z" * 1000 + b"\r\n.\r\n", max_line=1000)[1] is None
    for smuggled in (b"a\n.\nb\r\n", b"a\r.\r\nb\r\n", b"bare\rCR\r\n", b"x\n.\r\n"):
        assert collect(smuggled + b"\r\n.\r\n") == (None, DataProblem.BARE_LINE_END), smuggled


def test_too_big_is_reported_before_other_problems() -> None:
    wire = b"z" * 2000 + b"\n\r\n.\r\n"
    assert collect(wire, max_size=100, max_line=1000) == (None, DataProblem.TOO_BIG)


def test_line_limit_is_exact_and_the_dot_allowance_only_for_stuffed_lines() -> None:
    """max_line counts the message's line: 1000 fits, 1001 does not, stuffed or not."""
    assert collect(b"z" * 1000 + b"\r\n.\r\n", max_line=1000)[1] is None
    assert collect(b"z" * 1001 + b"\r\n.\r\n", max_line=1000)[1] is DataProblem.LINE_TOO_LONG
    # A message line of 1000 octets starting with a dot is 1001 on the wire.
    body, problem = collect(b"." + b"." + b"z" * 999 + b"\r\n.\r\n", max_line=1000)
    assert problem is None and body == b"." + b"z" * 999 + b"\r\n"
    # One more octet is a 1001-octet message line, dot or no dot.
    stuffed = b".." + b"z" * 1000 + b"\r\n.\r\n"
    assert collect(stuffed, max_line=1000)[1] is DataProblem.LINE_TOO_LONG
    # A long line among short ones, not first and not last, is found.
    wire = b"a\r\n" + b"y" * 1001 + b"\r\nb\r\n.\r\n"
    assert collect(wire, max_line=1000)[1] is DataProblem.LINE_TOO_LONG
