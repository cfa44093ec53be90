"""DSN rendering and decisions (outboundd.dsn): pure functions, no I/O.

Every DSN produced here is parsed back with the stdlib ``email`` package
(policy ``default``) and must carry no defects in any part or header; the
fields are then checked one by one.
"""

from __future__ import annotations

import email
import email.policy
import re
from email.message import EmailMessage, Message
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from outboundd import dsn
from outboundd.dsn import DsnRecipient, DsnReport, DsnTemplates

ME = "mx.outbound.test"
NOW = 1_700_086_400.0  # Wed, 15 Nov 2023 22:13:20 +0000
ARRIVAL = 1_700_000_000.0
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 3

ORIGINAL = (
    b"From: Alice <alice@example.com>\r\n"
    b"To: Bob <bob@example.org>\r\n"
    b"Subject: Quarterly numbers\r\n"
    b"Message-ID: <orig-1@example.com>\r\n"
    b"Date: Tue, 14 Nov 2023 22:13:20 +0000\r\n"
    b"\r\n"
    b"Hello Bob,\r\n"
    b"the numbers are attached.\r\n"
)
ORIGINAL_HEADERS = ORIGINAL.split(b"\r\n\r\n")[0] + b"\r\n"


def failed(address: str = "bob@example.org", **kw: Any) -> DsnRecipient:
    values: dict[str, Any] = {
        "action": "failed",
        "status": "5.1.1",
        "original_recipient": f"rfc822;{address}",
        "remote_mta": "mx1.example.org",
        "diagnostic_code": 550,
        "diagnostic_text": "5.1.1 <bob@example.org>: user unknown",
        "last_attempt_at": NOW - 60,
    }
    values.update(kw)
    return DsnRecipient(address=address, **values)


def report(*recipients: DsnRecipient, **kw: Any) -> DsnReport:
    values: dict[str, Any] = {
        "reporting_mta": ME,
        "arrival_date": ARRIVAL,
        "original_sender": "alice@example.com",
        "original_message": ORIGINAL,
        "recipients": recipients or (failed(),),
        "reason": "550 5.1.1 <bob@example.org>: user unknown",
        "extended_reason": "bob@example.org: 550 5.1.1 user unknown",
        "original_envelope_id": "ENV-42",
        "ret": None,
    }
    values.update(kw)
    return DsnReport(**values)


def render(rep: DsnReport | None = None, templates: DsnTemplates | None = None, **kw: Any) -> bytes:
    args: dict[str, Any] = {
        "me": ME,
        "now": NOW,
        "message_id": "dsn-1@mx.outbound.test",
        "pid": 4242,
    }
    args.update(kw)
    return dsn.render_dsn(rep or report(), templates or DsnTemplates(), **args)


def assert_wire_format(raw: bytes) -> None:
    """CRLF only, every line within 998 octets."""
    assert raw.endswith(b"\r\n")
    for line in raw.split(b"\r\n"):
        assert b"\n" not in line and b"\r" not in line, line[:80]
        assert len(line) <= 998


def assert_no_defects(msg: Message) -> None:
    for part in msg.walk():
        assert part.defects == [], (part.get_content_type(), part.defects)
        for name, value in part.items():
            defects = getattr(value, "defects", ())
            assert defects == (), (name, defects)


def parse(raw: bytes) -> EmailMessage:
    assert_wire_format(raw)
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    assert_no_defects(msg)
    return msg


def parts(msg: Message) -> list[Message]:
    payload = msg.get_payload()
    assert isinstance(payload, list)
    messages = [p for p in payload if isinstance(p, Message)]
    assert len(messages) == len(payload)
    return messages


def status_groups(msg: Message) -> list[Message]:
    """The per-message group followed by the per-recipient groups."""
    report_parts = parts(msg)
    assert report_parts[1].get_content_type() == "message/delivery-status"
    return parts(report_parts[1])


def content(part: Message) -> str:
    """A text part's decoded content with line ends normalised to LF."""
    assert isinstance(part, EmailMessage)
    text = part.get_content()
    assert isinstance(text, str)
    return text.replace("\r\n", "\n")


def human_text(msg: Message) -> str:
    first = parts(msg)[0]
    if first.is_multipart():
        first = parts(first)[0]
    assert first.get_content_type() == "text/plain"
    return content(first)


def unfold(value: str) -> str:
    return re.sub(r"\r\n(?=[ \t])", "", value)


# --------------------------------------------------------------------------
# Structure


def test_failure_single_recipient_top_level_headers() -> None:
    msg = parse(render())
    assert msg["MIME-Version"] == "1.0"
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg["From"] == "Mail Delivery System <MAILER-DAEMON@mx.outbound.test>"
    assert msg["From"].addresses[0].addr_spec == "MAILER-DAEMON@mx.outbound.test"
    assert msg["To"].addresses[0].addr_spec == "alice@example.com"
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert msg["Date"] == "Wed, 15 Nov 2023 22:13:20 +0000"
    assert msg["Message-ID"] == "<dsn-1@mx.outbound.test>"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["In-Reply-To"] == "<orig-1@example.com>"
    assert msg["References"] == "<orig-1@example.com>"
    assert [p.get_content_type() for p in parts(msg)] == [
        "text/plain",
        "message/delivery-status",
        "message/rfc822",
    ]


def test_failure_single_recipient_delivery_status_fields() -> None:
    per_message, rcpt = status_groups(parse(render()))
    assert per_message["Reporting-MTA"] == "dns; mx.outbound.test"
    assert per_message["Original-Envelope-Id"] == "ENV-42"
    assert per_message["Arrival-Date"] == "Tue, 14 Nov 2023 22:13:20 +0000"
    assert rcpt["Original-Recipient"] == "rfc822; bob@example.org"
    assert rcpt["Final-Recipient"] == "rfc822; bob@example.org"
    assert rcpt["Action"] == "failed"
    assert rcpt["Status"] == "5.1.1"
    assert rcpt["Remote-MTA"] == "dns; mx1.example.org"
    assert rcpt["Diagnostic-Code"] == "smtp; 550 5.1.1 <bob@example.org>: user unknown"
    assert rcpt["Last-Attempt-Date"] == "Wed, 15 Nov 2023 22:12:20 +0000"
    assert rcpt["Will-Retry-Until"] is None


def test_failure_multiple_recipients_one_group_each() -> None:
    carol = failed(
        "carol@example.net",
        status="5.7.26",
        original_recipient=None,
        remote_mta=None,
        diagnostic_code=None,
        diagnostic_text=None,
        last_attempt_at=None,
    )
    msg = parse(render(report(failed(), carol)))
    _, bob_group, carol_group = status_groups(msg)
    assert bob_group["Final-Recipient"] == "rfc822; bob@example.org"
    assert carol_group["Final-Recipient"] == "rfc822; carol@example.net"
    assert carol_group["Status"] == "5.7.26"
    for absent in ("Original-Recipient", "Remote-MTA", "Diagnostic-Code", "Last-Attempt-Date"):
        assert carol_group[absent] is None
    assert "bob@example.org, carol@example.net" in human_text(msg)


def test_delay_notice_has_will_retry_until_and_headers_only() -> None:
    rcpt = failed(
        action="delayed",
        status="4.4.1",
        diagnostic_code=451,
        diagnostic_text="4.4.1 try again later",
        will_retry_until=NOW + 4 * 86400,
    )
    msg = parse(render(report(rcpt, ret="FULL", reason="451 4.4.1 try again later")))
    assert msg["Subject"] == "Delayed Mail (still being retried)"
    _, group = status_groups(msg)
    assert group["Action"] == "delayed"
    assert group["Status"] == "4.4.1"
    assert group["Will-Retry-Until"] == "Sun, 19 Nov 2023 22:13:20 +0000"
    assert group["Diagnostic-Code"] == "smtp; 451 4.4.1 try again later"
    assert parts(msg)[2].get_content_type() == "text/rfc822-headers"
    assert "will be retried" in human_text(msg)


@pytest.mark.parametrize("action", ["delivered", "relayed"])
def test_success_notice(action: str) -> None:
    rcpt = DsnRecipient(
        address="bob@example.org",
        action=action,  # type: ignore[arg-type]
        status="2.0.0",
        remote_mta="mx1.example.org",
        diagnostic_code=250,
        diagnostic_text="2.0.0 Ok: queued as 4SbXyz",
        last_attempt_at=NOW,
        will_retry_until=NOW + 100,  # ignored: only delay notices carry it
    )
    msg = parse(render(report(rcpt, ret="FULL", reason="delivered")))
    assert msg["Subject"] == "Successful Mail Delivery Report"
    _, group = status_groups(msg)
    assert group["Action"] == action
    assert group["Status"] == "2.0.0"
    assert group["Will-Retry-Until"] is None
    assert parts(msg)[2].get_content_type() == "text/rfc822-headers"


def test_mixed_event_is_reported_as_failure() -> None:
    delayed = failed("carol@example.net", action="delayed", status="4.2.2")
    msg = parse(render(report(delayed, failed())))
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"


def test_empty_report_is_refused() -> None:
    with pytest.raises(ValueError):
        render(report(recipients=()))


def test_rendering_is_deterministic() -> None:
    assert render() == render()


# --------------------------------------------------------------------------
# RET and the returned content


def test_ret_full_under_cap_returns_whole_message() -> None:
    msg = parse(render(report(ret="FULL"), bounce_max_original_size=len(ORIGINAL)))
    returned = parts(msg)[2]
    assert returned.get_content_type() == "message/rfc822"
    inner = parts(returned)[0]
    assert inner["Subject"] == "Quarterly numbers"
    assert inner["Message-ID"] == "<orig-1@example.com>"
    # byte-exact: the original sits between the part's blank line and the
    # CRLF that belongs to the closing delimiter
    raw = render(report(ret="FULL"))
    assert b"Content-Description: Undelivered Message\r\n\r\n" + ORIGINAL + b"\r\n--" in raw


def test_ret_absent_means_full() -> None:
    assert parts(parse(render(report(ret=None))))[2].get_content_type() == "message/rfc822"


def test_ret_full_over_cap_returns_headers() -> None:
    raw = render(report(ret="FULL"), bounce_max_original_size=len(ORIGINAL) - 1)
    returned = parts(parse(raw))[2]
    assert returned.get_content_type() == "text/rfc822-headers"
    assert returned.get_payload(decode=True) == ORIGINAL_HEADERS
    assert b"the numbers are attached" not in raw


def test_ret_hdrs_returns_headers() -> None:
    raw = render(report(ret="HDRS"))
    returned = parts(parse(raw))[2]
    assert returned.get_content_type() == "text/rfc822-headers"
    assert returned.get_payload(decode=True) == ORIGINAL_HEADERS
    assert b"the numbers are attached" not in raw


@pytest.mark.parametrize(
    ("ret", "event", "size", "expected"),
    [
        ("FULL", "failure", 10, "full"),
        (None, "failure", 10, "full"),
        ("full", "failure", 10, "full"),
        ("HDRS", "failure", 10, "headers"),
        ("FULL", "failure", 11, "headers"),
        ("FULL", "delay", 10, "headers"),
        ("FULL", "success", 10, "headers"),
    ],
)
def test_return_content(ret: str | None, event: dsn.DsnEvent, size: int, expected: str) -> None:
    assert dsn.return_content(ret, event, size, 10) == expected


def test_unclean_original_is_cut_to_base64_headers() -> None:
    original = b"Subject: bare\nX-Long: " + b"y" * 1200 + b"\n\nbody with bare LF\n"
    raw = render(report(original_message=original, ret="FULL"))
    returned = parts(parse(raw))[2]
    assert returned.get_content_type() == "text/rfc822-headers"
    assert returned["Content-Transfer-Encoding"] == "base64"
    decoded = returned.get_payload(decode=True)
    assert isinstance(decoded, bytes)
    assert decoded.startswith(b"Subject: bare\r\nX-Long: yyy")
    assert b"body with bare LF" not in decoded


def test_eight_bit_original_is_declared_and_needs_8bitmime() -> None:
    original = ORIGINAL.replace(b"Hello Bob", "Grüß dich Bob".encode())
    raw = render(report(original_message=original))
    returned = parts(parse(raw))[2]
    assert returned.get_content_type() == "message/rfc822"
    assert returned["Content-Transfer-Encoding"] == "8bit"
    assert dsn.dsn_transport(raw) == dsn.DsnTransport(smtputf8=False, body_8bit=True)
    assert dsn.dsn_transport(render()) == dsn.DsnTransport(smtputf8=False, body_8bit=False)


def test_original_without_message_id_has_no_references() -> None:
    original = b"Subject: no id\r\n\r\nbody\r\n"
    msg = parse(render(report(original_message=original)))
    assert msg["References"] is None
    assert msg["In-Reply-To"] is None


# --------------------------------------------------------------------------
# ENVID, ORCPT, status, addresses


def test_envid_absent_means_no_field() -> None:
    per_message, _ = status_groups(parse(render(report(original_envelope_id=None))))
    assert per_message["Original-Envelope-Id"] is None
    assert per_message["Reporting-MTA"] == "dns; mx.outbound.test"


def test_orcpt_present_and_absent() -> None:
    with_orcpt = failed(original_recipient="rfc822;Bob.Alias@example.org")
    without = failed("carol@example.net", original_recipient=None)
    _, a, b = status_groups(parse(render(report(with_orcpt, without))))
    assert a["Original-Recipient"] == "rfc822; Bob.Alias@example.org"
    assert b["Original-Recipient"] is None


@pytest.mark.parametrize(
    ("given", "expected"),
    [("5.7.26", "5.7.26"), ("5.1.10", "5.1.10"), ("5.1", "5.0.0"), ("", "5.0.0"), ("x", "5.0.0")],
)
def test_status_multi_digit_kept_invalid_replaced(given: str, expected: str) -> None:
    _, group = status_groups(parse(render(report(failed(status=given)))))
    assert group["Status"] == expected


@pytest.mark.parametrize(
    ("orcpt", "expected"),
    [
        ("bob@example.org", "rfc822; bob@example.org"),  # type missing
        ("RFC822;bob@example.org", "rfc822; bob@example.org"),
        ("\x80;bob@example.org", "rfc822; bob@example.org"),  # mangled type
        ("rfc822;", None),  # nothing to report
        ("", None),
    ],
)
def test_orcpt_normalised(orcpt: str, expected: str | None) -> None:
    _, group = status_groups(parse(render(report(failed(original_recipient=orcpt)))))
    assert group["Original-Recipient"] == expected


def test_utf8_recipient_uses_utf8_address_type() -> None:
    rcpt = failed("jürgen@exämple.de", original_recipient="utf-8;jürgen@exämple.de")
    raw = render(report(rcpt))
    _, group = status_groups(parse(raw))
    assert group["Final-Recipient"] == "utf-8; j\\x{FC}rgen@ex\\x{E4}mple.de"
    assert group["Original-Recipient"] == "utf-8; j\\x{FC}rgen@ex\\x{E4}mple.de"
    assert dsn.dsn_transport(raw).smtputf8 is False  # the report stays 7-bit


def test_utf8_sender_needs_smtputf8() -> None:
    raw = render(report(original_sender="álice@exämple.com"))
    assert "To: <álice@exämple.com>".encode() in raw
    assert_wire_format(raw)
    assert dsn.dsn_transport(raw).smtputf8 is True


def test_recipient_override_for_double_bounce() -> None:
    rep = report(original_sender="")
    templates = DsnTemplates(text="from={from}\n")
    msg = parse(render(rep, templates, recipient="postmaster@outbound.test"))
    assert msg["To"].addresses[0].addr_spec == "postmaster@outbound.test"
    assert human_text(msg) == "from=<>\n"


def test_non_ascii_diagnostic_text_stays_seven_bit() -> None:
    rcpt = failed(diagnostic_text="5.1.1 Empfänger unbekannt")
    raw = render(report(rcpt))
    _, group = status_groups(parse(raw))
    assert group["Diagnostic-Code"] == "smtp; 550 5.1.1 Empf\\x{E4}nger unbekannt"
    assert parts(parse(raw))[1].get_payload()  # parsed as delivery-status blocks


# --------------------------------------------------------------------------
# Folding


def test_long_diagnostic_text_is_folded_and_round_trips() -> None:
    text = "5.7.1 " + " ".join(f"word{i}" for i in range(400))
    raw = render(report(failed(diagnostic_text=text)))
    _, group = status_groups(parse(raw))
    assert group["Diagnostic-Code"] == f"smtp; 550 {text}"
    field = re.search(rb"Diagnostic-Code:.*?\r\n(?! )", raw, re.S)
    assert field is not None
    lines = field.group(0).split(b"\r\n")
    assert len(lines) > 10
    assert all(len(line) <= 78 for line in lines)
    assert unfold(field.group(0).decode()).rstrip("\r\n") == f"Diagnostic-Code: smtp; 550 {text}"


def test_single_huge_word_is_split_within_998() -> None:
    rcpt = failed(diagnostic_text="x" * 2500)
    parse(render(report(rcpt)))  # assert_wire_format checks every line


def test_multiline_reply_is_one_field() -> None:
    rcpt = failed(diagnostic_text="5.7.1 first line\r\n550-5.7.1 second line\n550 5.7.1 third")
    _, group = status_groups(parse(render(report(rcpt))))
    assert group["Diagnostic-Code"] == (
        "smtp; 550 5.7.1 first line 550-5.7.1 second line 550 5.7.1 third"
    )


# --------------------------------------------------------------------------
# Templates


TEMPLATE_ALL = (
    "pid={pid}\ndate={date}\nme={me}\nfrom={from}\nto={to}\nsubject={subject}\n"
    "recipients={recipients}\nreason={reason}\nextended={extended_reason}\nmsgid={msgid}\n"
)


def test_template_variables_substituted() -> None:
    carol = failed("carol@example.net")
    text = human_text(parse(render(report(failed(), carol), DsnTemplates(text=TEMPLATE_ALL))))
    assert text.splitlines() == [
        "pid=4242",
        "date=Wed, 15 Nov 2023 22:13:20 +0000",
        "me=mx.outbound.test",
        "from=alice@example.com",
        "to=bob@example.org",
        "subject=Quarterly numbers",
        "recipients=bob@example.org, carol@example.net",
        "reason=550 5.1.1 <bob@example.org>: user unknown",
        "extended=bob@example.org: 550 5.1.1 user unknown",
        "msgid=<dsn-1@mx.outbound.test>",
    ]


def test_unknown_and_attribute_access_left_untouched() -> None:
    template = "a {nope} b {0.__class__} c {reason.__class__} d {pid[0]} e {{me}} f {}\n"
    text = human_text(parse(render(templates=DsnTemplates(text=template))))
    assert (
        text
        == "a {nope} b {0.__class__} c {reason.__class__} d {pid[0]} e {mx.outbound.test} f {}\n"
    )
    assert "class" not in text.replace("__class__", "")


def test_render_template_never_evaluates() -> None:
    assert dsn.render_template("{x.__init__.__globals__}", {"x": "v"}) == "{x.__init__.__globals__}"
    assert dsn.render_template("{x!r:>10}", {"x": "v"}) == "{x!r:>10}"
    assert dsn.render_template("{x}{x}", {"x": "{x}"}) == "{x}{x}"


def test_haraka_style_template_header_block() -> None:
    template = (
        "Received: (Haraka {pid} invoked for bounce); {date}\n"
        "From: MAILER-DAEMON@{me}\n"
        "To: {from}\n"
        "Subject: Rückläufer: {subject}\n"
        "\n"
        "Sorry, {recipients}: {reason}\n"
    )
    raw = render(templates=DsnTemplates(text=template))
    msg = parse(raw)
    assert msg["Subject"] == "Rückläufer: Quarterly numbers"
    assert b"Subject: =?utf-8?" in raw  # RFC 2047 encoded on the wire
    assert raw.count(b"\r\nFrom: ") == 1  # the ORIGINAL's From is inside the rfc822 part
    assert b"Received: (Haraka" not in raw
    assert human_text(msg) == "Sorry, bob@example.org: 550 5.1.1 <bob@example.org>: user unknown\n"


def test_non_ascii_original_subject_decoded_in_text_and_encoded_in_subject() -> None:
    original = ORIGINAL.replace(b"Quarterly numbers", b"=?utf-8?q?Gr=C3=BC=C3=9Fe_aus_K=C3=B6ln?=")
    templates = DsnTemplates(text="Subject: Undeliverable: {subject}\n\n{subject}\n")
    raw = render(report(original_message=original), templates)
    msg = parse(raw)
    assert msg["Subject"] == "Undeliverable: Grüße aus Köln"
    assert raw.split(b"\r\n\r\n")[0].isascii()
    assert human_text(msg) == "Grüße aus Köln\n"
    assert dsn.original_subject(original) == "Grüße aus Köln"


def test_raw_utf8_original_subject() -> None:
    original = ORIGINAL.replace(b"Quarterly numbers", "Quartalszahlen für Köln".encode())
    assert dsn.original_subject(original) == "Quartalszahlen für Köln"
    msg = parse(render(report(original_message=original, ret="HDRS")))
    assert "Quartalszahlen für Köln" in human_text(msg)
    # UTF-8 header fields travel as RFC 6532 message/global(-headers)
    assert parts(msg)[2].get_content_type() == "message/global-headers"
    full = parse(render(report(original_message=original, ret="FULL")))
    assert parts(full)[2].get_content_type() == "message/global"
    assert parts(full)[2]["Content-Transfer-Encoding"] == "8bit"


def test_custom_template_only_shapes_failure_notices() -> None:
    delayed = failed(action="delayed", status="4.4.1", will_retry_until=NOW + 10)
    text = human_text(parse(render(report(delayed), DsnTemplates(text="CUSTOM {reason}\n"))))
    assert "CUSTOM" not in text
    assert "warning" in text


def test_default_template_contains_reason_and_details() -> None:
    text = human_text(parse(render()))
    assert "Reason: 550 5.1.1 <bob@example.org>: user unknown" in text
    assert "Subject:    Quarterly numbers" in text
    assert "{" not in text


def test_html_alternative_escapes_values() -> None:
    rep = report(reason='<script>alert("x")</script> & co', extended_reason="a\nb")
    templates = DsnTemplates(html="<p>{reason}</p><pre>{extended_reason}</pre><i>{nope}</i>")
    msg = parse(render(rep, templates))
    alternative = parts(msg)[0]
    assert alternative.get_content_type() == "multipart/alternative"
    plain, html_part = parts(alternative)
    assert plain.get_content_type() == "text/plain"
    assert html_part.get_content_type() == "text/html"
    markup = content(html_part)
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; co" in markup
    assert "<script>" not in markup
    assert "a<br>\nb" in markup
    assert "<i>{nope}</i>" in markup
    assert '<script>alert("x")</script> & co' in content(plain)


def test_html_with_image_nesting_and_content_id() -> None:
    templates = DsnTemplates(
        html='<img src="cid:{image_cid}"><img src="cid:icon.png"><p>{reason}</p>',
        image=PNG,
    )
    msg = parse(render(templates=templates))
    alternative = parts(msg)[0]
    assert alternative.get_content_type() == "multipart/alternative"
    plain, related = parts(alternative)
    assert plain.get_content_type() == "text/plain"
    assert related.get_content_type() == "multipart/related"
    assert related.get_param("type") == "text/html"
    html_part, image = parts(related)
    assert html_part.get_content_type() == "text/html"
    assert image.get_content_type() == "image/png"
    assert image.get_payload(decode=True) == PNG
    assert image.get_content_disposition() == "inline"
    content_id = image["Content-ID"]
    assert content_id == "<bounce-image.png@mx.outbound.test>"
    cids = re.findall(r'src="cid:([^"]+)"', content(html_part))
    assert cids == [content_id.strip("<>")] * 2
    # the report's other parts follow the closed alternative
    assert [p.get_content_type() for p in parts(msg)[1:]] == [
        "message/delivery-status",
        "message/rfc822",
    ]


def test_image_without_html_is_not_attached() -> None:
    msg = parse(render(templates=DsnTemplates(image=PNG)))
    assert parts(msg)[0].get_content_type() == "text/plain"


def test_long_template_lines_are_quoted_printable() -> None:
    msg = parse(render(templates=DsnTemplates(text="x" * 3000 + "\n")))
    first = parts(msg)[0]
    assert first["Content-Transfer-Encoding"] == "quoted-printable"
    assert human_text(msg) == "x" * 3000 + "\n"


def test_reason_is_passed_through_verbatim() -> None:
    # render_dsn adds no text of its own to {reason}: what the caller gives
    # (a remote reply or our clear reason) is what the sender reads.
    rep = report(reason=dsn.reason_null_mx("example.org"))
    text = human_text(parse(render(rep, DsnTemplates(text="{reason}\n"))))
    assert text == "null MX for example.org: the domain does not accept mail (RFC 7505)\n"


# --------------------------------------------------------------------------
# Decisions


@pytest.mark.parametrize(
    ("notify", "failure", "delay", "success"),
    [
        (None, True, True, False),
        ("", True, True, False),
        ("NEVER", False, False, False),
        ("never", False, False, False),
        ("FAILURE", True, False, False),
        ("DELAY", False, True, False),
        ("SUCCESS", False, False, True),
        ("SUCCESS,FAILURE", True, False, True),
        ("success, failure", True, False, True),
        ("SUCCESS,FAILURE,DELAY", True, True, True),
        ("NEVER,SUCCESS", False, False, False),
        ("BOGUS", True, True, False),
    ],
)
def test_notify_wants(notify: str | None, failure: bool, delay: bool, success: bool) -> None:
    assert dsn.notify_wants(notify, "failure") is failure
    assert dsn.notify_wants(notify, "delay") is delay
    assert dsn.notify_wants(notify, "success") is success


@pytest.mark.parametrize("null", ["", "<>", " <> "])
@pytest.mark.parametrize("event", ["failure", "delay", "success"])
def test_null_sender_never_gets_a_dsn(null: str, event: dsn.DsnEvent) -> None:
    assert dsn.is_null_sender(null)
    assert dsn.should_send_dsn(null, "SUCCESS,FAILURE,DELAY", event) is False


def test_should_send_dsn_follows_notify() -> None:
    assert dsn.should_send_dsn("a@x", None, "failure")
    assert not dsn.should_send_dsn("a@x", "NEVER", "failure")
    assert not dsn.should_send_dsn("a@x", None, "success")
    assert dsn.should_send_dsn("a@x", "SUCCESS", "success")


def test_plan_failure_notice() -> None:
    sender = dsn.plan_failure_notice("a@x", None, double_bounce_recipient="pm@me")
    assert (sender.send_to, sender.double_bounce) == ("a@x", False)
    never = dsn.plan_failure_notice("a@x", "NEVER", double_bounce_recipient="pm@me")
    assert never.send_to is None and not never.double_bounce
    assert "NOTIFY=NEVER" in never.reason
    copied = dsn.plan_failure_notice("", None, double_bounce_recipient="pm@me")
    assert (copied.send_to, copied.double_bounce) == ("pm@me", True)
    dropped = dsn.plan_failure_notice("<>", None, double_bounce_recipient=None)
    assert (dropped.send_to, dropped.double_bounce) == (None, True)
    assert "dropped" in dropped.reason
    loop = dsn.plan_failure_notice(
        "", None, double_bounce_recipient="pm@me", is_double_bounce_notice=True
    )
    assert loop.send_to is None and "loop" in loop.reason


def test_success_action() -> None:
    assert dsn.success_action(False) == "relayed"
    assert dsn.success_action(True) is None
    assert dsn.success_action(True, final_delivery=True) == "delivered"
    assert dsn.success_action(False, final_delivery=True) == "delivered"


def test_dsn_event() -> None:
    assert dsn.dsn_event([failed()]) == "failure"
    assert dsn.dsn_event([failed(action="delayed")]) == "delay"
    assert dsn.dsn_event([failed(action="relayed"), failed(action="expanded")]) == "success"


# --------------------------------------------------------------------------
# Reasons and helpers


def test_reason_for_exhaustion() -> None:
    first = NOW - 3 * 86400 - 7200
    assert (
        dsn.reason_for_exhaustion(13, first, "451 4.4.1 connection timed out", NOW)
        == "gave up after 13 attempts over 3 days: 451 4.4.1 connection timed out"
    )
    assert (
        dsn.reason_for_exhaustion(1, NOW - 30, None, NOW)
        == "gave up after 1 attempt over 30 seconds"
    )
    assert (
        dsn.reason_for_exhaustion(2, NOW - 600, "", NOW)
        == "gave up after 2 attempts over 10 minutes"
    )
    assert dsn.reason_for_exhaustion(5, NOW - 5 * 3600, "451\r\n  busy", NOW).endswith(
        "over 5 hours: 451 busy"
    )


def test_reason_builders() -> None:
    assert dsn.reason_no_mx("example.org") == (
        "no MX for example.org: the domain has no MX, A or AAAA records"
    )
    assert dsn.reason_null_mx("example.org").startswith("null MX for example.org")
    assert dsn.reason_nxdomain("nope.test") == "domain nope.test does not exist (NXDOMAIN)"
    assert dsn.reason_operator() == "bounced by the operator"
    assert dsn.reason_operator("spam run") == "bounced by the operator: spam run"
    assert dsn.STATUS_NULL_MX == "5.1.10"


def test_describe_recipients() -> None:
    quiet = failed("carol@example.net", diagnostic_code=None, status="5.1.10")
    assert dsn.describe_recipients([failed(), quiet]) == (
        "bob@example.org: 550 5.1.1 <bob@example.org>: user unknown\n"
        "carol@example.net: failed (5.1.10)"
    )


def test_original_helpers() -> None:
    assert dsn.original_message_id(ORIGINAL) == "<orig-1@example.com>"
    folded = b"Message-ID:\r\n <folded@example.com>\r\n\r\nbody"
    assert dsn.original_message_id(folded) == "<folded@example.com>"
    assert dsn.original_message_id(b"Message-ID: garbage\r\n\r\n") is None
    assert dsn.original_message_id(b"Subject: x\r\n\r\n") is None
    assert dsn.header_block(ORIGINAL) == ORIGINAL_HEADERS
    assert dsn.header_block(b"A: b\nC: d\n\nbody\n") == b"A: b\r\nC: d\r\n"
    assert dsn.header_block(b"\r\nbody only") == b""
    assert dsn.header_block(b"A: b\r\n") == b"A: b\r\n"
    assert dsn.original_header(ORIGINAL, "to") == "Bob <bob@example.org>"
    assert dsn.original_subject(b"X: y\r\n\r\n") == ""
    assert dsn.original_subject(b"Subject: =?bogus?q?x?=\r\n\r\n")  # undecodable, kept


# --------------------------------------------------------------------------
# Property: whatever the remote says, the DSN is well formed


reply_text = st.text(
    st.characters(codec="utf-8"),
    max_size=3000,
)
local_part = st.text(
    st.characters(min_codepoint=0x21, max_codepoint=0x2FF, blacklist_characters='<>()[]\\,;:@" '),
    min_size=1,
    max_size=64,
)


@settings(max_examples=150, deadline=None)
@given(
    text=reply_text,
    code=st.integers(min_value=200, max_value=599),
    local=local_part,
    remote=st.text(max_size=300),
    status=st.text(max_size=12),
    envid=st.none() | st.text(max_size=200),
    orcpt=st.none() | st.text(max_size=300),
    action=st.sampled_from(["failed", "delayed", "delivered", "relayed", "expanded"]),
)
def test_property_always_well_formed(
    text: str,
    code: int,
    local: str,
    remote: str,
    status: str,
    envid: str | None,
    orcpt: str | None,
    action: str,
) -> None:
    rcpt = DsnRecipient(
        address=f"{local}@example.org",
        action=action,  # type: ignore[arg-type]
        status=status,
        original_recipient=orcpt,
        remote_mta=remote or None,
        diagnostic_code=code,
        diagnostic_text=text,
        last_attempt_at=NOW,
        will_retry_until=NOW + 3600,
    )
    rep = report(rcpt, reason=text, extended_reason=text, original_envelope_id=envid)
    templates = DsnTemplates(html="<p>{reason}</p>", image=PNG)
    raw = render(rep, templates)
    msg = parse(raw)
    groups = status_groups(msg)
    assert groups[1]["Action"] == action
    assert re.fullmatch(r"[245]\.\d{1,3}\.\d{1,3}", groups[1]["Status"])
    assert groups[1]["Diagnostic-Code"].startswith(f"smtp; {code}")
    assert parts(msg)[1].as_bytes().isascii()


# --------------------------------------------------------------------------
# The sample in docs/bounces.md is this code's output, not a hand-written one


def sample_dsn() -> bytes:
    """Two recipients of one message fail in one event: a remote 550 and a
    domain with a null MX (our own reason, so no Diagnostic-Code)."""
    nullmx = DsnRecipient(
        address="carol@nomail.example",
        action="failed",
        status=dsn.STATUS_NULL_MX,
        original_recipient=None,
        last_attempt_at=NOW - 60,
    )
    rep = report(
        failed(),
        nullmx,
        reason="550 5.1.1 <bob@example.org>: user unknown",
        extended_reason=dsn.describe_recipients([failed()])
        + "\ncarol@nomail.example: "
        + dsn.reason_null_mx("nomail.example"),
    )
    return render(rep)


def test_docs_sample_is_current() -> None:
    docs = (Path(__file__).parent.parent / "docs" / "bounces.md").read_text(encoding="utf-8")
    match = re.search(r"<!-- sample-dsn -->\n```text\n(.*?)```\n", docs, re.S)
    assert match is not None, "docs/bounces.md lost its sample DSN block"
    assert match.group(1) == sample_dsn().decode().replace("\r\n", "\n")
