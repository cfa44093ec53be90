"""DKIM signing, checked by verifiers that did not sign: OpenDKIM and dkimpy.

Keys are made by ``dkimkeys.generate_key`` (what ``outboundctl dkim keygen``
runs) once per module: RSA-2048 generation is slow.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from outboundd import log as logmod
from outboundd.dkimkeys import DkimKey, generate_key
from outboundd.log import Level, get_logger
from outboundd.submission.dkim import (
    DEFAULT_HEADERS,
    DkimSigner,
    DkimSignError,
    canonical_body,
    domain_of_address,
    relaxed_header,
    sign_message,
    signature_fields,
)
from tests.dkimcheck import OpenDkim, dkimpy_verify, opendkim, single_signatures

__all__ = ["opendkim"]

DOMAIN = "mail.example"
NOW = 1_767_225_600.0  # 2026-01-01
WANTED = tuple(h.lower().encode() for h in DEFAULT_HEADERS)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[DkimKey, DkimKey]:
    base = tmp_path_factory.mktemp("dkim")
    return (
        generate_key(base, DOMAIN, "rsa1", "rsa"),
        generate_key(base, DOMAIN, "ed1", "ed25519"),
    )


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    logmod.configure(Level.INFO, fmt="logfmt", stream=stream)
    try:
        yield stream
    finally:
        logmod.configure(Level.INFO)


HEAD = (
    b"From: Alice <alice@mail.example>\r\n"
    b"To: Bob <bob@dest.test>\r\n"
    b"Subject: test\r\n"
    b"Date: Thu, 01 Jan 2026 00:00:00 +0000\r\n"
    b"Message-ID: <1@mail.example>\r\n"
)

MESSAGES = {
    "plain": HEAD + b"\r\nHello,\r\nthis is plain text.\r\n",
    "8bit": (
        HEAD + b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n\r\n"
        + "Grüße aus Köln — ünïcödé  with  double  spaces \r\n".encode()
    ),
    "multipart": (
        HEAD + b"MIME-Version: 1.0\r\n"
        b'Content-Type: multipart/alternative; boundary="b1"\r\n\r\n'
        b"--b1\r\nContent-Type: text/plain\r\n\r\nplain part\r\n"
        b"--b1\r\nContent-Type: text/html\r\n\r\n<p>html part</p>\r\n--b1--\r\n"
    ),
    "dot-leading": HEAD + b"\r\n.\r\n..two dots\r\n.one dot\r\nend\r\n",
    "long-folded-headers": (
        b"From: Alice <alice@mail.example>\r\n"
        b"To: Bob <bob@dest.test>,\r\n\tCarol <carol@dest.test>,\r\n"
        b"    Dave <dave@dest.test>\r\n"
        b"Subject: a subject that is long enough to be folded over several lines\r\n"
        b"\tby the submitting client,   with   runs   of   spaces\r\n"
        b" and a third line\r\n"
        b"Message-ID: <2@mail.example>\r\n"
        b"\r\nbody\r\n"
    ),
    "crlf-at-end": HEAD + b"\r\nbody with empty lines after it\r\n\r\n\r\n\r\n",
}


@pytest.mark.parametrize("name", sorted(MESSAGES))
async def test_dual_signature_verifies_with_opendkim_and_dkimpy(
    name: str, keys: tuple[DkimKey, DkimKey], opendkim: OpenDkim
) -> None:
    message = MESSAGES[name]
    for key in keys:
        opendkim.publish(key)
    signed = sign_message(message, keys, WANTED, NOW) + message
    copies = single_signatures(signed)
    assert len(copies) == 2
    assert b"a=rsa-sha256" in copies[0] and b"a=ed25519-sha256" in copies[1]
    for copy in copies:
        results = await opendkim.verify(copy)
        assert [r for _, _, r in results] == ["succeeded"], (name, results)
        assert dkimpy_verify(copy, list(keys)), name


async def test_opendkim_rejects_a_changed_body_or_a_second_from(
    keys: tuple[DkimKey, DkimKey], opendkim: OpenDkim
) -> None:
    """The checker can fail: a body edit, and a From added after signing (oversigning)."""
    for key in keys:
        opendkim.publish(key)
    message = MESSAGES["plain"]
    signed = sign_message(message, keys, WANTED, NOW) + message
    assert await opendkim.passes(signed)
    assert not await opendkim.passes(signed.replace(b"plain text", b"plain test"))
    extra_from = signed + b""
    head, _, body = extra_from.partition(b"\r\n\r\n")
    forged = head + b"\r\nFrom: Mallory <m@mail.example>\r\n\r\n" + body
    assert not await opendkim.passes(forged)
    assert not dkimpy_verify(single_signatures(forged)[0], list(keys))


def test_signature_tags(keys: tuple[DkimKey, DkimKey]) -> None:
    field = sign_message(MESSAGES["multipart"], keys[:1], WANTED, NOW).decode()
    unfolded = " ".join(field.split())
    tags = dict(
        part.strip().split("=", 1) for part in unfolded.split(":", 1)[1].split(";") if part.strip()
    )
    assert tags["c"] == "relaxed/relaxed" and tags["d"] == DOMAIN and tags["s"] == "rsa1"
    assert tags["t"] == str(int(NOW)) and "l" not in tags
    names = tags["h"].replace(" ", "")
    assert names == "from:to:subject:date:message-id:mime-version:content-type:from"
    raw_h = field.split(" h=", 1)[1].split(";", 1)[0]  # as folded: FWS only around colons
    assert [part.strip() for part in raw_h.split(":")] == names.split(":")
    assert field.endswith("\r\n") and all(len(line) <= 78 for line in field.split("\r\n"))


def test_signature_fields_oversign_from_and_skip_absent_and_forbidden() -> None:
    names = [b"Received", b"From", b"To", b"X-Custom", b"To", b"Bcc"]
    wanted = (b"to", b"bcc", b"x-other", b"received")
    assert signature_fields(names, wanted) == (b"from", b"to", b"to", b"from")


@pytest.mark.parametrize(
    ("text", "domain"),
    [
        ("Alice <alice@Mail.Example>", "mail.example"),
        ("bob@b.example, carol@c.example", "b.example"),
        ('"x@y" <real@d.example>', "d.example"),
        ("undisclosed-recipients:;", None),
        ("Grüße <a@bücher.example>", "xn--bcher-kva.example"),
        ("plain@Plain.Example.", "plain.example"),
        ("(comment) c@e.example", "e.example"),
        ("Broken <x@y.example", "y.example"),
        ("nobody", None),
    ],
)
def test_domain_of_address(text: str, domain: str | None) -> None:
    assert domain_of_address(text) == domain


def test_signer_chooses_from_domain_auth_domain_or_default(
    keys: tuple[DkimKey, DkimKey], log_stream: io.StringIO
) -> None:
    other = b"From: x@other.example\r\nSubject: s\r\n\r\nbody\r\n"
    signer = DkimSigner({DOMAIN: keys}, log=get_logger("dkim"), clock=lambda: NOW)
    assert signer.sign(other) == other  # no key: unsigned
    assert signer.sign(MESSAGES["plain"]).count(b"DKIM-Signature:") == 2
    by_auth = DkimSigner({DOMAIN: keys}, key_domain="auth_user", log=get_logger("dkim"))
    assert by_auth.domain_for(other, "user@mail.example") == DOMAIN
    assert by_auth.domain_for(other, "user") == "other.example"  # not an address: From
    assert by_auth.sign(other, auth_user="user@mail.example").count(b"d=mail.example") == 2
    fallback = DkimSigner({DOMAIN: keys}, default_domain=DOMAIN, log=get_logger("dkim"))
    assert fallback.sign(other).startswith(b"DKIM-Signature:")


def test_domain_without_key_is_logged_once(
    keys: tuple[DkimKey, DkimKey], log_stream: io.StringIO
) -> None:
    signer = DkimSigner({DOMAIN: keys}, log=get_logger("dkim"))
    message = b"From: x@other.example\r\n\r\nbody\r\n"
    for qid in ("Q1", "Q2", "Q3"):
        signer.sign(message, queue_id=qid)
    signer.sign(b"From: y@third.example\r\n\r\nbody\r\n", queue_id="Q4")
    lines = [line for line in log_stream.getvalue().splitlines() if "no DKIM key" in line]
    assert len(lines) == 2
    assert "domain=other.example" in lines[0] and "Q1" in lines[0]
    assert "domain=third.example" in lines[1]


@pytest.mark.parametrize(
    ("message", "why"),
    [
        (b"Subject: no from here\r\n\r\nbody\r\n", "no From field"),
        (b"From: a@mail.example\r\nnot a header line\r\n", "blank line"),
    ],
)
def test_unsignable_message_raises(keys: tuple[DkimKey, DkimKey], message: bytes, why: str) -> None:
    signer = DkimSigner(
        {DOMAIN: keys}, key_domain="auth_user", log=get_logger("dkim"), clock=lambda: NOW
    )
    with pytest.raises(DkimSignError, match=why):
        signer.sign(message, auth_user="user@mail.example")


def test_me_domain_signs_notices_through_parent_domain(keys: tuple[DkimKey, DkimKey]) -> None:
    signer = DkimSigner({DOMAIN: keys}, log=get_logger("dkim"))
    notice = b"From: MAILER-DAEMON@relay.mail.example\r\nSubject: x\r\n\r\nbody\r\n"
    assert signer.sign_as("relay.mail.example", notice).count(b"d=mail.example;") == 2
    assert signer.sign_as("relay.other.example", notice) == notice
    assert signer.sign_as("example", notice) == notice  # never a bare top-level label


def test_signing_from_a_path(tmp_path: Path) -> None:
    """A key file read back from disk signs like the generated one."""
    from outboundd.dkimkeys import load_keys

    generate_key(tmp_path, DOMAIN, "ed1", "ed25519")
    loaded = load_keys(tmp_path, None)
    [key] = loaded[DOMAIN]
    message = MESSAGES["plain"]
    assert dkimpy_verify(sign_message(message, [key], WANTED, NOW) + message, [key])


_TEXT = st.lists(
    st.sampled_from(
        [b"a", b"Z", b" ", b"  ", b"\t", b"\r\n", b"\r\n ", b"\r\n\t", b":", b"\xc3\xa9"]
    ),
    max_size=40,
).map(b"".join)


@settings(max_examples=300, deadline=None)
@given(value=_TEXT)
def test_relaxed_header_matches_dkimpy(value: bytes) -> None:
    """Our fast path gives byte for byte what dkimpy's relaxed canonicalisation gives."""
    import dkim

    raw = value + b"\r\n"
    [(name, expected)] = dkim.canonicalization.Relaxed.canonicalize_headers([(b"Sub-Ject ", raw)])
    assert relaxed_header(b"Sub-Ject ", raw) == (name, expected)


@settings(max_examples=300, deadline=None)
@given(body=_TEXT)
def test_canonical_body_matches_dkimpy(body: bytes) -> None:
    import dkim

    assert canonical_body(body) == dkim.canonicalization.Relaxed.canonicalize_body(body)
