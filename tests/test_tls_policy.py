"""The TLS policy rules as pure functions: MTA-STS records and files, TLSA matching, DANE checks.

Certificates are real (trustme); nothing here opens a socket.  The same
rules are driven end to end over loopback in test_tls_policy_delivery.py.
"""

from __future__ import annotations

import datetime
import hashlib

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from outboundd.delivery.tlspolicy import (
    STS_MAX_AGE_MAX,
    DaneLookup,
    PolicyError,
    StsPolicy,
    Tlsa,
    dane_verify,
    mx_pattern_matches,
    parse_sts_policy,
    sts_record_id,
    target_policy,
    tlsa_matches,
    usable_tlsa,
)

NOW = datetime.datetime.now(datetime.UTC)


def _der(pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER)


def _chain(leaf: trustme.LeafCert) -> list[bytes]:
    return [_der(blob.bytes()) for blob in leaf.cert_chain_pems]


def _spki(der: bytes) -> bytes:
    cert = x509.load_der_x509_certificate(der)
    return cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def ee(der: bytes, selector: int = 1, mtype: int = 1) -> Tlsa:
    data = der if selector == 0 else _spki(der)
    digest = {0: data, 1: hashlib.sha256(data).digest(), 2: hashlib.sha512(data).digest()}
    return Tlsa(3, selector, mtype, digest[mtype])


def ta(der: bytes, selector: int = 0, mtype: int = 1) -> Tlsa:
    return Tlsa(2, selector, mtype, ee(der, selector, mtype).data)


# ------------------------------------------------------------------ MTA-STS


@pytest.mark.parametrize(
    ("texts", "expected"),
    [
        (["v=STSv1; id=20240101T0000"], "20240101T0000"),
        (["v=STSv1;id=abc"], "abc"),
        (["v=spf1 -all", "v=STSv1; id=abc; "], "abc"),
        (["v=STSv1; id=abc", "v=STSv1; id=def"], None),  # two records: no policy
        (["v=STSv1"], None),
        (["v=STSv1; id=has-dash"], None),
        (["v=STSv1; id=" + "a" * 33], None),
        (["v=STSv10; id=abc"], None),
        ([], None),
    ],
)
def test_the_mta_sts_txt_record_gives_the_policy_id(texts: list[str], expected: str | None) -> None:
    assert sts_record_id(texts) == expected


def test_a_policy_file_is_parsed() -> None:
    text = "version: STSv1\r\nmode: enforce\r\nmx: MX1.Example.com.\r\nmx: *.example.net\r\n"
    text += "max_age: 86400\r\nextension: ignored\r\n"
    assert parse_sts_policy(text) == StsPolicy(
        "enforce", ("mx1.example.com", "*.example.net"), 86400
    )


def test_max_age_is_capped_at_a_year_and_mode_none_needs_no_mx() -> None:
    policy = parse_sts_policy("version: STSv1\nmode: none\nmax_age: 999999999\n")
    assert policy == StsPolicy("none", (), STS_MAX_AGE_MAX)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("version: STSv2\nmode: enforce\nmx: a.test\nmax_age: 1\n", "version"),
        ("version: STSv1\nmode: strict\nmx: a.test\nmax_age: 1\n", "mode"),
        ("version: STSv1\nmode: enforce\nmax_age: 1\n", "mx pattern"),
        ("version: STSv1\nmode: enforce\nmx: a.test\nmax_age: soon\n", "max_age"),
        ("version: STSv1\nmode: enforce\nmx: a.test\n", "max_age"),
        ("version: STSv1\nmode: enforce\nmx: a..test\nmax_age: 1\n", "mx pattern"),
        ("<html>not a policy</html>\n", "key: value"),
    ],
)
def test_a_bad_policy_file_is_refused_with_the_reason(text: str, problem: str) -> None:
    with pytest.raises(PolicyError, match=problem):
        parse_sts_policy(text)


@pytest.mark.parametrize(
    ("pattern", "host", "matches"),
    [
        ("mx.example.com", "mx.example.com", True),
        ("mx.example.com", "MX.Example.COM.", True),
        ("*.example.com", "mx1.example.com", True),
        ("*.example.com", "example.com", False),
        ("*.example.com", "a.b.example.com", False),  # one label only (RFC 8461 §4.1)
        ("mx.example.com", "mx.example.com.evil.test", False),
    ],
)
def test_mx_patterns_match_as_rfc_8461_says(pattern: str, host: str, matches: bool) -> None:
    assert mx_pattern_matches(pattern, host) is matches


# --------------------------------------------------------------------- DANE


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.mark.parametrize(("selector", "mtype"), [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)])
def test_tlsa_matches_the_full_certificate_or_its_public_key(
    ca: trustme.CA, selector: int, mtype: int
) -> None:
    mine, other = (_chain(ca.issue_cert(n))[0] for n in ("mx.dest.test", "mx.dest.test"))
    record = ee(mine, selector, mtype)
    assert tlsa_matches(record, mine)
    assert not tlsa_matches(record, other)


def test_dane_ee_ignores_the_name_and_the_dates(ca: trustme.CA) -> None:
    """RFC 7672 §3.1.1: the key is pinned; an expired, wrongly named cert is fine."""
    old = ca.issue_cert(
        "elsewhere.test",
        not_before=NOW - datetime.timedelta(days=30),
        not_after=NOW - datetime.timedelta(days=1),
    )
    chain = _chain(old)
    assert dane_verify([ee(chain[0])], chain, "mx.dest.test", NOW) is None
    other = _chain(ca.issue_cert("mx.dest.test"))[0]
    reason = dane_verify([ee(other)], chain, "mx.dest.test", NOW)
    assert reason is not None and "DANE-EE" in reason


def test_dane_ta_needs_a_chain_to_the_anchor_and_the_name() -> None:
    root = trustme.CA()
    intermediate = root.create_child_ca()
    chain = _chain(intermediate.issue_cert("mx.dest.test"))
    anchor = ta(_der(intermediate.cert_pem.bytes()))
    assert len(chain) == 2
    assert dane_verify([anchor], chain, "mx.dest.test", NOW) is None
    assert (
        dane_verify([ta(_der(intermediate.cert_pem.bytes()), 1, 2)], chain, "MX.dest.test", NOW)
        is None
    )
    wrong_name = dane_verify([anchor], chain, "mx.other.test", NOW)
    assert wrong_name is not None and "not valid for that name" in wrong_name
    # A leaf of another CA presented with the anchor's certificate: the signature fails.
    forged = [_chain(trustme.CA().issue_cert("mx.dest.test"))[0], chain[1]]
    reason = dane_verify([anchor], forged, "mx.dest.test", NOW)
    assert reason is not None and "does not lead" in reason
    # An anchor that is not in the presented chain cannot be checked.
    missing = dane_verify([ta(_der(root.cert_pem.bytes()))], chain, "mx.dest.test", NOW)
    assert missing is not None and "matches its DANE-TA" in missing


def test_dane_ta_checks_the_dates() -> None:
    root = trustme.CA()
    intermediate = root.create_child_ca()
    expired = intermediate.issue_cert(
        "mx.dest.test",
        not_before=NOW - datetime.timedelta(days=30),
        not_after=NOW - datetime.timedelta(days=1),
    )
    chain = _chain(expired)
    reason = dane_verify([ta(_der(intermediate.cert_pem.bytes()))], chain, "mx.dest.test", NOW)
    assert reason is not None and "not valid now" in reason


def test_only_dane_ta_and_dane_ee_records_are_usable(ca: trustme.CA) -> None:
    der = _chain(ca.issue_cert("mx.dest.test"))[0]
    pkix = [Tlsa(1, 1, 1, ee(der).data), Tlsa(0, 0, 1, ee(der, 0).data), Tlsa(3, 2, 1, b"x")]
    assert usable_tlsa(pkix) == ()
    assert dane_verify(pkix, [der], "mx.dest.test", NOW) == "no usable TLSA record for mx.dest.test"
    assert (
        dane_verify([ee(der)], [], "mx.dest.test", NOW) == "mx.dest.test presented no certificate"
    )


# ------------------------------------------------------- the policy per host

STS = StsPolicy("enforce", ("mx.dest.test",), 86400)


def test_dane_wins_over_mta_sts_and_insecure_tlsa_leaves_mta_sts() -> None:
    record = Tlsa(3, 1, 1, b"\x00" * 32)
    secure = DaneLookup("secure", (record,))
    policy = target_policy("mx.dest.test", domain="dest.test", dane=secure, sts=STS)
    assert policy is not None and (policy.kind, policy.enforce, policy.tlsa) == (
        "dane",
        True,
        (record,),
    )
    for lookup in (DaneLookup("insecure"), DaneLookup("secure"), None):
        policy = target_policy("mx.dest.test", domain="dest.test", dane=lookup, sts=STS)
        assert policy is not None and (policy.kind, policy.refusal) == ("mta-sts", None)
    assert (
        target_policy("mx.dest.test", domain="dest.test", dane=DaneLookup("insecure"), sts=None)
        is None
    )


def test_hosts_that_cannot_meet_the_policy_are_refused_with_the_reason() -> None:
    bogus = target_policy(
        "mx.dest.test", domain="dest.test", dane=DaneLookup("bogus", error="SERVFAIL"), sts=None
    )
    assert bogus is not None and bogus.enforce and "SERVFAIL" in (bogus.refusal or "")
    unusable = target_policy(
        "mx.dest.test",
        domain="dest.test",
        dane=DaneLookup("secure", (Tlsa(1, 1, 1, b"x"),)),
        sts=None,
    )
    assert unusable is not None and "no usable TLSA record" in (unusable.refusal or "")
    outside = target_policy("mx.evil.test", domain="dest.test", dane=None, sts=STS)
    assert outside is not None and outside.enforce
    assert "does not match the MTA-STS policy of dest.test" in (outside.refusal or "")
    testing = StsPolicy("testing", ("mx.dest.test",), 60)
    trial = target_policy("mx.evil.test", domain="dest.test", dane=None, sts=testing)
    assert trial is not None and not trial.enforce and trial.refusal is not None
    off = StsPolicy("none", (), 60)
    assert target_policy("mx.evil.test", domain="dest.test", dane=None, sts=off) is None
