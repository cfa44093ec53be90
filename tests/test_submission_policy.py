"""Pure submission decisions: addresses, ESMTP/DSN parameters, relaying, replies."""

from __future__ import annotations

import ipaddress

import pytest

from outboundd.submission import policy, replies
from outboundd.submission.policy import Address, PolicyError, RelayVerdict


def mail(
    arg: str, *, extended: bool = True, max_size: int = 1000
) -> tuple[Address, policy.MailParams]:
    return policy.parse_mail(arg, extended=extended, max_size=max_size)


def rcpt(arg: str, *, utf8: bool = False) -> tuple[Address, policy.RcptParams]:
    return policy.parse_rcpt(arg, extended=True, utf8=utf8)


def refused(fn: object, *args: object, **kwargs: object) -> replies.Reply:
    with pytest.raises(PolicyError) as info:
        fn(*args, **kwargs)  # type: ignore[operator]
    return info.value.reply


# --------------------------------------------------------------- addresses


@pytest.mark.parametrize(
    ("arg", "expected"),
    [
        ("FROM:<alice@example.com>", "alice@example.com"),
        ("from:<alice@example.com>", "alice@example.com"),
        ("FROM: <alice@example.com>", "alice@example.com"),
        ("FROM:<>", ""),
        ("FROM:<@relay.example,@b.example:alice@example.com>", "alice@example.com"),
        ('FROM:<"a b>c"@example.com>', '"a b>c"@example.com'),
        ("FROM:<user@[192.0.2.1]>", "user@[192.0.2.1]"),
        ("FROM:<user@[IPv6:2001:db8::1]>", "user@[IPv6:2001:db8::1]"),
        ("FROM:<first.last+tag@sub.example.co.uk>", "first.last+tag@sub.example.co.uk"),
    ],
)
def test_valid_senders(arg: str, expected: str) -> None:
    address, _ = mail(arg)
    assert str(address) == expected


@pytest.mark.parametrize(
    "arg",
    [
        "FROM:<alice>",
        "FROM:<alice@>",
        "FROM:<@example.com>",
        "FROM:<a..b@example.com>",
        "FROM:<.a@example.com>",
        "FROM:<a b@example.com>",
        "FROM:<a@-example.com>",
        "FROM:<a@exa_mple.com>",
        "FROM:<a@[999.1.1.1]>",
        "FROM:<a@[IPv6:zz::1]>",
        "FROM:<" + "a" * 250 + "@example.com>",
        "FROM:<a@" + "b" * 64 + ".com>",
    ],
)
def test_malformed_senders_are_501_5_1_7(arg: str) -> None:
    assert refused(mail, arg).code == 501
    assert refused(mail, arg).status == "5.1.7"


@pytest.mark.parametrize(
    "arg", ["alice@example.com", "FROM alice@example.com", "FROM:alice@example.com", "FROM:<a@b.c"]
)
def test_mail_syntax_errors_are_501_5_5_2(arg: str) -> None:
    reply = refused(mail, arg)
    assert (reply.code, reply.status) == (501, "5.5.2")


def test_malformed_recipient_is_501_5_1_3() -> None:
    reply = refused(rcpt, "TO:<bob@@example.com>")
    assert (reply.code, reply.status) == (501, "5.1.3")
    assert refused(rcpt, "TO:<>").status == "5.1.3"
    assert refused(rcpt, "TO:<postmaster>").status == "5.1.3"


def test_non_ascii_needs_smtputf8() -> None:
    reply = refused(mail, "FROM:<jörg@example.com>")
    assert (reply.code, reply.status) == (553, "5.6.7")
    address, params = mail("FROM:<jörg@exämple.com> SMTPUTF8")
    assert params.smtputf8 and str(address) == "jörg@exämple.com"
    assert refused(rcpt, "TO:<用户@例子.广告>").code == 553
    assert str(rcpt("TO:<用户@例子.广告>", utf8=True)[0]) == "用户@例子.广告"


def test_invalid_utf8_is_a_syntax_error() -> None:
    arg = b"FROM:<j\xffrg@example.com> SMTPUTF8".decode("utf-8", "surrogateescape")
    assert refused(mail, arg).code == 501


def test_the_path_limit_counts_octets_not_characters() -> None:
    """256 octets with the brackets (RFC 5321 §4.5.3.1.3): a UTF-8 local part
    of 126 two-octet characters is over it, 126 ASCII ones are not."""
    assert str(mail("FROM:<" + "a" * 126 + "@example.com>")[0]).startswith("a" * 126)
    long_utf8 = "FROM:<" + "é" * 126 + "@example.com> SMTPUTF8"
    reply = refused(mail, long_utf8)
    assert (reply.code, reply.status) == (501, "5.1.7") and "too long" in reply.text
    assert str(mail("FROM:<" + "é" * 100 + "@example.com> SMTPUTF8")[0]).startswith("é")


def test_commands_without_parameters_get_the_defaults() -> None:
    assert mail("FROM:<a@example.com>")[1] == policy.MailParams()
    assert rcpt("TO:<b@example.com>")[1] == policy.RcptParams()
    assert rcpt("TO:<b@example.com> NOTIFY=NEVER")[1] == policy.RcptParams(notify="NEVER")
    assert mail("FROM:<a@example.com> SMTPUTF8")[1] == policy.MailParams(smtputf8=True)


def test_address_key_ignores_domain_case_only() -> None:
    assert Address("Bob", "Example.COM").key() == Address("Bob", "example.com").key()
    assert Address("Bob", "x").key() != Address("bob", "x").key()


# -------------------------------------------------------------- parameters


def test_size_over_limit_is_552_5_3_4() -> None:
    reply = refused(mail, "FROM:<a@b.example> SIZE=1001", max_size=1000)
    assert (reply.code, reply.status) == (552, "5.3.4")
    assert mail("FROM:<a@b.example> SIZE=1000", max_size=1000)[1].size == 1000
    assert mail("FROM:<a@b.example> SIZE=99999999", max_size=0)[1].size == 99999999
    assert refused(mail, "FROM:<a@b.example> SIZE=ten").code == 501


def test_mail_dsn_params() -> None:
    _, params = mail("FROM:<a@b.example> RET=hdrs ENVID=QQ+2B314+3DX BODY=8bitmime")
    assert params.ret == "HDRS"
    assert params.env_id == "QQ+314=X"
    assert params.body == "8BITMIME"


@pytest.mark.parametrize(
    "param",
    ["RET=ALL", "RET", "ENVID=a+2", "ENVID=a+ZZb", "ENVID=" + "x" * 101, "BODY=BINARYMIME",
     "SMTPUTF8=yes", "SIZE", "SIZE=1 SIZE=2"],
)  # fmt: skip
def test_bad_mail_params_are_501(param: str) -> None:
    reply = refused(mail, f"FROM:<a@b.example> {param}")
    assert (reply.code, reply.status) == (501, "5.5.4"), reply


def test_unknown_params_are_555() -> None:
    assert refused(mail, "FROM:<a@b.example> XFOO=1").code == 555
    assert refused(rcpt, "TO:<a@b.example> XFOO").code == 555


def test_params_after_helo_are_refused() -> None:
    assert refused(mail, "FROM:<a@b.example> SIZE=10", extended=False).code == 501
    address, _ = mail("FROM:<a@b.example>", extended=False)
    assert str(address) == "a@b.example"


def test_auth_mail_param_is_accepted_and_ignored() -> None:
    _, params = mail("FROM:<a@b.example> AUTH=<>")
    assert params.env_id is None


@pytest.mark.parametrize(
    ("value", "stored"),
    [
        ("NEVER", "NEVER"),
        ("never", "NEVER"),
        ("SUCCESS,FAILURE", "SUCCESS,FAILURE"),
        ("delay,failure,success", "DELAY,FAILURE,SUCCESS"),
    ],
)
def test_notify_values(value: str, stored: str) -> None:
    assert rcpt(f"TO:<b@c.example> NOTIFY={value}")[1].notify == stored


@pytest.mark.parametrize("value", ["NEVER,SUCCESS", "SUCCESS,SUCCESS", "SOMETIMES", ""])
def test_bad_notify_is_501(value: str) -> None:
    assert refused(rcpt, f"TO:<b@c.example> NOTIFY={value}").code == 501


def test_orcpt_is_decoded_and_typed() -> None:
    _, params = rcpt("TO:<b@c.example> ORCPT=rfc822;Bob+2Bx@C.example")
    assert params.orcpt == "rfc822;Bob+x@C.example"
    _, params = rcpt("TO:<b@c.example> ORCPT=UTF-8;j\\x{F6}rg@c.example")
    assert params.orcpt == "utf-8;jörg@c.example"
    for bad in ("rfc822", "rfc822;", ";a@b", "rfc822;a+4", "rfc822;" + "a" * 600):
        assert refused(rcpt, f"TO:<b@c.example> ORCPT={bad}").code == 501


def test_orcpt_xtext_is_octets_read_as_utf8() -> None:
    # What Postfix sends for jänedoe: the UTF-8 octets, each +XX (RFC 3461 §4).
    _, params = rcpt("TO:<j@dest.test> ORCPT=rfc822;j+C3+A4nedoe@dest.test")
    assert params.orcpt == "rfc822;jänedoe@dest.test"  # not Latin-1 "jÃ¤nedoe"
    _, params = rcpt("TO:<j@dest.test> ORCPT=utf-8;j\\x{FC}rgen@dest.test")
    assert params.orcpt == "utf-8;jürgen@dest.test"
    # Octets that are not UTF-8 are a clear 501, not mojibake in the queue.
    assert refused(rcpt, "TO:<j@dest.test> ORCPT=rfc822;j+E4nedoe@dest.test").code == 501
    assert policy.xtext_decode("caf+C3+A9") == "café"


def test_xtext_round_trip() -> None:
    text = "id+with=plus and space"
    encoded = policy.xtext_encode(text)
    assert " " not in encoded and "=" not in encoded
    assert policy.xtext_decode(encoded) == text
    with pytest.raises(ValueError):
        policy.xtext_decode("a=b")


# ------------------------------------------------------------------ relay

LOOPBACK = [ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")]
OFFICE = [ipaddress.ip_network("192.0.2.0/24"), ipaddress.ip_network("2001:db8::/32")]


def test_relay_allowed_for_authenticated_or_acl() -> None:
    assert (
        policy.relay_verdict(
            authenticated=True, client_ip="203.0.113.9", relay_acl=[], auth_possible=True
        )
        is RelayVerdict.ALLOW
    )
    for ip in ("192.0.2.44", "2001:db8::5", "::ffff:192.0.2.44"):
        assert (
            policy.relay_verdict(
                authenticated=False, client_ip=ip, relay_acl=OFFICE, auth_possible=False
            )
            is RelayVerdict.ALLOW
        )


def test_relay_refused_otherwise_never_open() -> None:
    kwargs = {"authenticated": False, "client_ip": "203.0.113.9", "relay_acl": OFFICE}
    assert policy.relay_verdict(**kwargs, auth_possible=True) is RelayVerdict.AUTH_REQUIRED  # type: ignore[arg-type]
    assert policy.relay_verdict(**kwargs, auth_possible=False) is RelayVerdict.DENIED  # type: ignore[arg-type]
    assert (
        policy.relay_verdict(
            authenticated=False, client_ip=None, relay_acl=LOOPBACK, auth_possible=False
        )
        is RelayVerdict.DENIED
    )
    assert (
        policy.relay_verdict(
            authenticated=False, client_ip="not-an-ip", relay_acl=LOOPBACK, auth_possible=False
        )
        is RelayVerdict.DENIED
    )


def test_auth_allowed_only_encrypted_loopback_or_when_configured() -> None:
    assert policy.auth_allowed(encrypted=True, client_ip="203.0.113.9", require_tls=True)
    assert policy.auth_allowed(encrypted=False, client_ip="127.0.0.1", require_tls=True)
    assert policy.auth_allowed(encrypted=False, client_ip="::1", require_tls=True)
    assert not policy.auth_allowed(encrypted=False, client_ip="203.0.113.9", require_tls=True)
    assert policy.auth_allowed(encrypted=False, client_ip="203.0.113.9", require_tls=False)


def test_constrain_sender_like_haraka() -> None:
    sender = Address("news", "example.com")
    assert policy.sender_matches_auth("bob@Example.com", sender)
    assert not policy.sender_matches_auth("bob@other.example", sender)
    assert policy.sender_matches_auth("bob", sender)  # no domain: not constrained
    assert policy.sender_matches_auth("bob@other.example", Address("", ""))
    assert policy.sender_matches_auth(None, sender)


# ---------------------------------------------------------------- replies


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('500 Error: "FOO" not recognized', '500 5.5.2 Error: "FOO" not recognized'),
        ("250 OK", "250 2.0.0 OK"),
        ("221 Bye", "221 2.0.0 Bye"),
        ("535 5.7.8 Credentials invalid", "535 5.7.8 Credentials invalid"),
        ("220 relay.test outboundd ESMTP", "220 relay.test outboundd ESMTP"),
        ("220 Ready to start TLS", "220 2.0.0 Ready to start TLS"),  # not the greeting
        ("354 End data", "354 End data"),
        ("334 VXNlcm5hbWU6", "334 VXNlcm5hbWU6"),
    ],
)  # fmt: skip
def test_enhanced_codes_are_added_where_missing(line: str, expected: str) -> None:
    assert replies.with_enhanced_code(line) == expected


def test_clean_text_cannot_forge_reply_lines() -> None:
    assert replies.clean_text("no\r\n250 fake") == "no  250 fake"
    assert replies.clean_text("\r\n") == "-"


@pytest.mark.parametrize(
    "literal",
    [
        "[192.0.2.1]",
        "[0.0.0.0]",
        "[255.255.255.255]",
        "[IPv6:2001:db8::1]",
        "[ipv6:2001:DB8::1]",
        "[IPv6:::1]",
        "[IPv6:2001:db8:0:0:0:0:0:1]",
        "[IPv6:1:2:3:4:5:6::]",
        "[IPv6:::ffff:192.0.2.1]",
        "[IPv6:1:2:3:4:5:6:192.0.2.1]",
    ],
)
def test_rfc5321_address_literals_are_accepted(literal: str) -> None:
    """Item 23, the neighbours that must keep working: IPv4 and IPv6 literals."""
    assert str(rcpt(f"TO:<bob@{literal}>")[0]) == f"bob@{literal}"
    assert str(mail(f"FROM:<a@{literal}>")[0]) == f"a@{literal}"


@pytest.mark.parametrize(
    "literal",
    [
        "[IPv6:fe80::1%eth0]",  # a zone ID: the sender's interface, not an address
        "[IPv6:fe80::1%25eth0]",
        "[fe80::1]",  # an IPv6 address without its tag
        "[IPv6:1:2:3:4:5:6:7::]",  # "::" must stand for at least two groups
        "[IPv6:1::2::3]",
        "[IPv6:]",
        "[IPv6:192.0.2.1]",
        "[IPv6: ::1]",
        "[256.1.1.1]",
        "[1.2.3]",
        "[1.2.3.4.5]",
        "[01234.1.1.1]",
        "[x-tag:whatever]",  # a General-address-literal with an unregistered tag
        "[]",
        "[garbage]",
    ],
)
def test_address_literals_outside_the_grammar_are_refused(literal: str) -> None:
    bad_rcpt = refused(rcpt, f"TO:<bob@{literal}>")
    assert (bad_rcpt.code, bad_rcpt.status) == (501, "5.1.3")
    bad_mail = refused(mail, f"FROM:<a@{literal}>")
    assert (bad_mail.code, bad_mail.status) == (501, "5.1.7")


def test_named_replies_and_equal_copies_go_out_as_the_same_octets() -> None:
    from outboundd.submission.handler import _reply_wire

    assert len(replies.WIRE_BY_ID) == len(replies.WIRE) > 20
    for reply, data in replies.WIRE.items():
        copy = replies.Reply(reply.code, reply.status, reply.text)
        assert copy is not reply
        assert _reply_wire(reply) == _reply_wire(copy) == data
    queued = replies.Reply(250, "2.0.0", "Ok: queued as ABC")
    assert _reply_wire(queued) == b"250 2.0.0 Ok: queued as ABC\r\n"
