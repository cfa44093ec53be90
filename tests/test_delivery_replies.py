"""parse_reply's plain-line path against its general one (delivery/replies.py).

A reply with nothing to clean (one line, printable, single spaces) skips
the line splitting and cleaning; these tests hold it to the general path's
results on generated replies, and check which replies take it.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from outboundd.delivery import replies
from outboundd.delivery.replies import MAX_TEXT_LENGTH, parse_reply

#: Status codes, digits of other scripts (``\d`` matches them), every kind
#: of whitespace the cleaning knows, control characters, CR and LF.
_PIECES = [
    "2.0.0",
    "2.1.5",
    "4.7.1",
    "5.1.1",
    "5.7.26",
    "2.0.0ok",
    "\u0662.0.0",
    " ",
    "  ",
    "\t",
    "\r",
    "\n",
    "\r\n",
    "\x00",
    "\x1b",
    "\x7f",
    "\xa0",
    "\u2028",
    "\u3000",
    "Ok:",
    "queued as 4Lq3X",
    "caf\xe9",
    ".",
    "x" * 700,
]


def _shape(reply: replies.Reply) -> tuple[object, ...]:
    return (reply.code, reply.status, reply.text, reply.sent, reply.context)


@settings(max_examples=1500, deadline=None)
@given(
    code=st.sampled_from([-1, 0, 220, 250, 251, 354, 421, 450, 451, 452, 550, 552, 554, 600]),
    pieces=st.lists(st.sampled_from(_PIECES), max_size=8),
    status=st.sampled_from([None, "4.4.2"]),
)
def test_plain_line_path_agrees_with_the_general_one(
    code: int, pieces: list[str], status: str | None
) -> None:
    message = "".join(pieces)
    assert _shape(parse_reply(code, message, status=status)) == _shape(
        replies._parse_lines(code, message, status)
    )


def test_usual_replies_take_the_plain_line_path() -> None:
    # The last reply of every delivered message: status taken out, rest kept.
    for code, message, expected in [
        (250, "2.0.0 Ok: queued as 4Lq3X", ("2.0.0", "Ok: queued as 4Lq3X")),
        (250, "2.0.0", ("2.0.0", "")),
        (250, "Ok", ("2.0.0", "Ok")),
        (550, "5.1.1 <bob@dest.test>: Recipient address rejected", ("5.1.1", None)),
        (450, "5.1.1 odd", ("4.0.0", "5.1.1 odd")),
    ]:
        plain = replies._parse_plain_line(code, message, None)
        assert _shape(plain) == _shape(replies._parse_lines(code, message, None))
        assert plain.status == expected[0] and plain.sent == message
        if expected[1] is not None:
            assert plain.text == expected[1]


def test_replies_with_something_to_clean_are_cleaned() -> None:
    assert parse_reply(250, "2.0.0  Ok\t queued ").text == "Ok queued"
    assert parse_reply(250, " 2.0.0 Ok").sent == "2.0.0 Ok"
    long = parse_reply(250, "y" * (MAX_TEXT_LENGTH + 1))
    assert len(long.text) == MAX_TEXT_LENGTH and long.text.endswith("\u2026")
    assert parse_reply(550, "5.1.1 no\x00body").text == "no body"
