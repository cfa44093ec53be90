"""Pure message preparation: Received, Message-ID, Date, normalisation, the txn helpers."""

from __future__ import annotations

import email
import email.policy

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from outboundd.submission import prepare
from outboundd.submission.policy import RcptParams
from outboundd.submission.transaction import Transaction

NOW = 1_704_189_600.0  # 2024-01-02 10:00:00 UTC


@pytest.mark.parametrize(
    ("esmtp", "tls", "auth", "utf8", "word"),
    [
        (False, False, False, False, "SMTP"),
        (True, False, False, False, "ESMTP"),
        (True, True, False, False, "ESMTPS"),
        (True, False, True, False, "ESMTPA"),
        (True, True, True, False, "ESMTPSA"),
        (True, True, True, True, "UTF8SMTPSA"),
        (True, False, False, True, "UTF8SMTP"),
    ],
)
def test_protocol_word(esmtp: bool, tls: bool, auth: bool, utf8: bool, word: str) -> None:
    assert prepare.protocol_word(esmtp=esmtp, tls=tls, authenticated=auth, smtputf8=utf8) == word


def test_received_header_from_a_session() -> None:
    header = prepare.received_header(
        me="relay.test", text="outboundd", queue_id="QID1", now=NOW,
        helo="client.example", client_ip="192.0.2.1", protocol="ESMTPSA",
        recipient="bob@example.org",
    )  # fmt: skip
    assert header == (
        b"Received: from client.example ([192.0.2.1])\r\n"
        b"\tby relay.test (outboundd) with ESMTPSA id QID1\r\n"
        b"\tfor <bob@example.org>;\r\n"
        b"\tTue, 02 Jan 2024 10:00:00 +0000\r\n"
    )
    parsed = email.message_from_bytes(header + b"\r\n", policy=email.policy.SMTP)
    assert "ESMTPSA" in str(parsed["Received"])


def test_received_header_sanitises_helo_and_shows_ipv6() -> None:
    header = prepare.received_header(
        me="relay.test", text="x", queue_id="Q", now=NOW, helo="evil (x)\\y",
        client_ip="::1", protocol="ESMTP",
    )  # fmt: skip
    assert b"from evil__x__y ([IPv6:::1])" in header
    assert b"for <" not in header


def test_received_header_replaces_every_unsafe_character_of_helo() -> None:
    # Controls, space, DEL, non-ASCII (one "_" per character, astral ones
    # included), the comment delimiters and backslash; printable ASCII stays.
    helo = "a\x00b\tc d\x7fe\u00e9f\U0001f600g(h)i\\j!~k" + "x" * 300
    header = prepare.received_header(
        me="relay.test", text="x", queue_id="Q", now=NOW, helo=helo, client_ip="192.0.2.1"
    )
    cleaned = "a_b_c_d_e_f_g_h_i_j!~k" + "x" * 233  # cut to 255 characters
    assert f"from {cleaned} ([192.0.2.1])".encode() in header


def test_received_header_for_the_api_has_no_from_clause() -> None:
    header = prepare.received_header(me="relay.test", text="outboundd", queue_id="Q", now=NOW)
    assert header.startswith(b"Received: by relay.test (outboundd) id Q;\r\n\t")


def test_message_id_and_date_added_when_missing() -> None:
    out = prepare.add_missing_headers(
        b"Subject: x\r\n\r\nbody\r\n", queue_id="QID", me="relay.test", now=NOW
    )
    assert out == (
        b"Subject: x\r\nMessage-ID: <QID@relay.test>\r\n"
        b"Date: Tue, 02 Jan 2024 10:00:00 +0000\r\n\r\nbody\r\n"
    )


def test_existing_message_id_and_date_kept() -> None:
    message = b"Message-Id: <own@x>\r\nDATE: Mon, 1 Jan 2024 00:00:00 +0000\r\n\r\nb\r\n"
    assert prepare.add_missing_headers(message, queue_id="Q", me="m", now=NOW) == message


def test_headerless_message_gets_a_separator() -> None:
    out = prepare.add_missing_headers(b"just text\r\n", queue_id="Q", me="m", now=NOW)
    assert out.startswith(b"Message-ID: <Q@m>\r\nDate: ")
    assert out.endswith(b"\r\n\r\njust text\r\n")
    assert prepare.find_header(out, "message-id") == "<Q@m>"


def test_folded_headers_are_read_and_removed() -> None:
    message = b"Subject: one\r\n two\r\nX-A: 1\r\nSubject: again\r\n\r\nSubject: body\r\n"
    assert prepare.header_values(message, "subject") == ["one two", "again"]
    assert prepare.remove_headers(message, "Subject") == b"X-A: 1\r\n\r\nSubject: body\r\n"


@pytest.mark.parametrize(
    ("contents", "expected"),
    [
        ("a\nb", b"a\r\nb\r\n"),
        (b"a\r\nb\r\n", b"a\r\nb\r\n"),
        (b"a\rb\r", b"a\r\nb\r\n"),
        ("last line kept", b"last line kept\r\n"),
        ("ü\n", "ü\r\n".encode()),
        ("", b""),
    ],
)
def test_normalize_contents(contents: str | bytes, expected: bytes) -> None:
    assert prepare.normalize_contents(contents) == expected


def test_dot_unstuffing() -> None:
    stuffed = "..hidden\n.\n...x\nnot.a.dot"
    assert (
        prepare.normalize_contents(stuffed, dot_stuffed=True)
        == b".hidden\r\n\r\n..x\r\nnot.a.dot\r\n"
    )


@pytest.mark.parametrize(
    ("data", "bare"),
    [
        (b"a\r\nb\r\n", False),
        (b"a\nb\r\n", True),
        (b"a\r\n.\n", True),
        (b"a\rb\r\n", True),
        (b"a\r\r\n", True),
        (b"", False),
    ],
)
def test_bare_line_ends(data: bytes, bare: bool) -> None:
    assert prepare.has_bare_line_end(data) is bare


def make_txn(body: bytes = b"Subject: s\r\n\r\nbody\r\n") -> Transaction:
    return Transaction(queue_id="Q", mail_from="a@b.example", rcpt_to=["c@d.example"], body=body)


def test_transaction_header_helpers() -> None:
    txn = make_txn()
    txn.add_header("X-Scanned", "yes")
    assert txn.header("x-scanned") == "yes"
    assert txn.body.endswith(b"X-Scanned: yes\r\n\r\nbody\r\n")
    txn.remove_header("Subject")
    assert txn.headers("Subject") == []
    with pytest.raises(ValueError):
        txn.add_header("X-Evil", "a\r\nBcc: x@y")
    with pytest.raises(ValueError):
        txn.add_header("Bad Name", "v")


def test_transaction_to_new_message() -> None:
    txn = make_txn(b"Subject: \xc3\xbc\r\n\r\n")
    txn.rcpt_to = ["c@d.example", "e@f.example", "c@d.example"]
    txn.rcpt_params = {"c@d.example": RcptParams(notify="NEVER", orcpt="rfc822;c@d.example")}
    txn.notes["k"] = 1
    message = txn.to_new_message()
    assert [r.address for r in message.recipients] == ["c@d.example", "e@f.example"]
    assert message.recipients[0].notify == "NEVER"
    assert message.recipients[1].notify is None
    assert message.body_8bit
    assert dict(message.notes) == {"k": 1}


#: Pieces header sections are made of, the awkward ones included: folded
#: lines, bare LFs, names that only start like Date or Message-ID, a field
#: without a line end, non-field lines, the blank line.
_HEADER_PIECES = [
    b"From: a\r\n", b"Date: x\r\n", b"DATE:y\r\n", b"Message-ID: <a>\r\n",
    b"message-id:\r\n", b"Message-IDs: z\r\n", b" folded\r\n", b"\tfolded\n", b"\r\n",
    b"\n", b"body line\r\n", b"X-Date: 1\r\n", b"Dat: 2\r\n", b"Date", b"Date :x\r\n",
    b":x\r\n", b"\r", b"Subject: s", b"Message-ID:x\n", b"Dat\xc3\xa9: 1\r\n",
]  # fmt: skip


@settings(max_examples=3000, deadline=None)
@given(st.lists(st.sampled_from(_HEADER_PIECES), max_size=8))
def test_add_missing_headers_agrees_with_the_header_helpers(pieces: list[bytes]) -> None:
    """The one-pass version adds exactly what the field look-ups say is missing,
    where insert_header_fields puts it."""
    message = b"".join(pieces)
    added = b""
    if not prepare.header_values(message, "Message-ID"):
        added += b"Message-ID: <Q@m>\r\n"
    if not prepare.header_values(message, "Date"):
        added += f"Date: {prepare.rfc5322_date(NOW)}\r\n".encode()
    expected = prepare.insert_header_fields(message, added)
    assert prepare.add_missing_headers(message, queue_id="Q", me="m", now=NOW) == expected


def test_received_header_of_one_session_differs_only_where_messages_differ() -> None:
    """The session's part is made once; queue ID, recipient and date are each message's own."""
    first, second, third = (
        prepare.received_header(
            me="relay.test",
            text="outboundd",
            queue_id=qid,
            now=now,
            helo="client.example",
            client_ip="192.0.2.1",
            protocol="ESMTP",
            recipient=rcpt,
        )
        for qid, now, rcpt in (
            ("Q1", NOW, "a@example.org"),
            ("Q2", NOW + 86_400, None),
            ("Q3", NOW, "b@example.org"),
        )
    )
    assert first == (
        b"Received: from client.example ([192.0.2.1])\r\n"
        b"\tby relay.test (outboundd) with ESMTP id Q1\r\n\tfor <a@example.org>;\r\n"
        b"\tTue, 02 Jan 2024 10:00:00 +0000\r\n"
    )
    assert second == (
        b"Received: from client.example ([192.0.2.1])\r\n"
        b"\tby relay.test (outboundd) with ESMTP id Q2;\r\n"
        b"\tWed, 03 Jan 2024 10:00:00 +0000\r\n"
    )
    assert third == first.replace(b"Q1", b"Q3").replace(b"a@example", b"b@example")
    other = prepare.received_header(
        me="relay.test", text="outboundd", queue_id="Q1", now=NOW, helo="other.example",
        client_ip="192.0.2.1", protocol="ESMTPS", recipient="a@example.org",
    )  # fmt: skip
    assert other == first.replace(b"client.example", b"other.example").replace(
        b"with ESMTP ", b"with ESMTPS "
    )
