"""DKIM signing at submission (RFC 6376; RFC 8463 Ed25519; RFC 8301 RSA).

A message is signed once, after the plugins have had their say and before
the spool write, so the stored body is what every delivery attempt sends and
a retry never signs again.  DSNs and delay notices are signed the same way
with the key of the ``me`` domain (``delivery/notices.py``).

dkimpy does the canonicalisation (relaxed/relaxed), the header selection and
the signature field's layout; the private-key operation is ``cryptography``'s
(OpenSSL), several times cheaper than dkimpy's own big-integer RSA.  The
body hash and the canonical header fields are computed once per message and
shared by both signatures when a domain has an RSA and an Ed25519 key.

``l=`` is never written; ``From`` is signed once more than it occurs
("oversigned"), so a second From added later breaks the signature.
"""

from __future__ import annotations

import base64
import email.utils
import functools
import hashlib
import importlib
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import ModuleType
from typing import Any, Final, Literal

from outboundd import idn
from outboundd.config import Config
from outboundd.dkimkeys import DkimKey
from outboundd.log import Logger
from outboundd.submission import prepare

__all__ = [
    "DEFAULT_HEADERS",
    "DkimSignError",
    "DkimSigner",
    "KeyDomain",
    "domain_of_address",
    "relaxed_header",
    "sign_message",
    "signature_fields",
    "signer_for",
]

#: Haraka's dkim plugin's default list, plus the MIME and threading fields
#: RFC 6376 §5.4.1 recommends (changing them changes how the body is read).
DEFAULT_HEADERS: Final[tuple[str, ...]] = (
    "From", "Sender", "Reply-To", "Subject", "Date", "Message-ID", "To", "Cc",
    "MIME-Version", "Content-Type", "Content-Transfer-Encoding", "In-Reply-To",
    "References", "List-Unsubscribe", "List-Unsubscribe-Post",
)  # fmt: skip

#: Fields a signer must not cover (RFC 6376 §5.4: they change in transit).
NEVER_SIGNED: Final = frozenset({b"return-path", b"received", b"dkim-signature", b"bcc"})

KeyDomain = Literal["from", "auth_user"]

_NAME: Final = b"DKIM-Signature"
_MAX_LOGGED_DOMAINS: Final = 10_000


@functools.cache
def _dkimpy() -> ModuleType:
    """dkimpy, imported when the first message is signed: with PyNaCl it costs
    every process ~15 MB, and signing is off unless ``dkim.ini`` turns it on."""
    return importlib.import_module("dkim")


@functools.cache
def _canon() -> Any:
    """dkimpy's relaxed/relaxed policy, made once."""
    return _dkimpy().CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")


class DkimSignError(Exception):
    """The message could not be signed; the text says why, for the log."""


_PLAIN_ADDRESS: Final = re.compile(
    r"\s*(?:[^<>\"(),;:@\\]*<)?[^\s<>\"(),;:@\\]+@([A-Za-z0-9][A-Za-z0-9.-]*)>?\s*"
)


def domain_of_address(text: str) -> str | None:
    """The lower-case A-label domain of the first address in a header value.

    ``Name <user@domain>`` and ``user@domain`` are read with one regular
    expression; anything else (quotes, comments, groups, several addresses)
    goes through ``email.utils.getaddresses``.
    """
    match = _PLAIN_ADDRESS.fullmatch(text)
    if match is not None and (">" in text) == ("<" in text):
        candidates = [match[1]]
    else:
        candidates = [a.rpartition("@")[2] for _, a in email.utils.getaddresses([text]) if "@" in a]
    for candidate in candidates:
        domain = candidate.strip().rstrip(".").lower()
        if domain:
            try:
                return idn.to_ascii(domain)
            except ValueError:
                return None
    return None


def _split(message: bytes) -> tuple[bytes, bytes]:
    """``(header section with its final CRLF, body)``; the blank line belongs to neither."""
    end = prepare.header_end(message)
    rest = message[end:]
    if rest.startswith(b"\r\n"):
        return message[:end], rest[2:]
    if rest:
        raise DkimSignError("the header section does not end with a blank line")
    return message[:end], b""


def canonical_body(body: bytes) -> bytes:
    """The relaxed body canonicalisation (RFC 6376 §3.4.4), as dkimpy computes it.

    dkimpy runs two regular expressions over the whole body; most bodies have
    no tab, no double space and no space before a line end, and for those the
    expressions change nothing, so three ``in`` tests (memchr speed) skip
    them — the bulk of the signing cost of a 4 KB message otherwise.
    """
    if b"\t" in body or b"  " in body or b" \r\n" in body:
        return _canon().canonicalize_body(body)  # type: ignore[no-any-return]
    canonicalization = _dkimpy().canonicalization
    return canonicalization.correct_empty_body(  # type: ignore[no-any-return]
        canonicalization.strip_trailing_lines(body)
    )


_UNFOLD: Final = re.compile(rb"\r?\n")
_WSP: Final = re.compile(rb"[\t ]+")


def relaxed_header(name: bytes, value: bytes) -> tuple[bytes, bytes]:
    """One field in relaxed canonical form (RFC 6376 §3.4.2), as dkimpy makes it:
    lower-case name, unfolded, runs of WSP as one space, stripped, CRLF-terminated."""
    if value.endswith(b"\r\n"):
        value = value[:-2]
    if b"\n" in value:
        value = _UNFOLD.sub(b"", value)
    if b"\t" in value or b"  " in value:
        value = _WSP.sub(b" ", value)
    return name.lower().rstrip(), value.strip() + b"\r\n"


def signature_fields(header_names: Iterable[bytes], wanted: Sequence[bytes]) -> tuple[bytes, ...]:
    """The ``h=`` list: each wanted field once per occurrence, From once more.

    ``header_names`` are the message's field names in order; ``wanted`` the
    lower-case names to sign.  Absent fields are left out (only From is
    signed "as absent", the oversigning that stops a second From).
    """
    present = [name.lower() for name in header_names]
    chosen = [
        name for name in present if (name in wanted or name == b"from") and name not in NEVER_SIGNED
    ]
    return (*chosen, b"from")


def _raw_signature(key: DkimKey, digest: bytes) -> bytes:
    # Imported here, not at the top: see _dkimpy (a no-op once loaded).
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ed25519, padding
    from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

    private = key.private_key
    if isinstance(private, ed25519.Ed25519PrivateKey):
        return private.sign(digest)  # RFC 8463: PureEdDSA over the SHA-256 hash
    return private.sign(digest, padding.PKCS1v15(), Prehashed(hashes.SHA256()))


def sign_message(
    message: bytes, keys: Sequence[DkimKey], wanted: Sequence[bytes], now: float
) -> bytes:
    """The ``DKIM-Signature`` fields (CRLF-terminated) for ``message``, one per key.

    Pure apart from the key operation.  Raises :class:`DkimSignError` for a
    message that cannot be signed (no From field, a malformed header section).
    """
    dkim = _dkimpy()
    head, body = _split(message)
    try:
        headers, _ = dkim.rfc822_parse(head + b"\r\n")
    except dkim.MessageFormatError as exc:
        raise DkimSignError(f"malformed header section: {exc}") from None
    names = [name for name, _ in headers]
    if not any(name.lower() == b"from" for name in names):
        raise DkimSignError("the message has no From field (RFC 6376 §5.4 requires signing it)")
    include = signature_fields(names, wanted)
    # Only the fields being signed are canonicalised (dkimpy would do them all).
    signed = b"".join(
        b"%s:%s" % relaxed_header(name, value)
        for name, value in dkim.select_headers(headers, include)
    )
    body_hash = base64.b64encode(hashlib.sha256(canonical_body(body)).digest())
    stamp = str(int(now)).encode("ascii")
    out = []
    for key in keys:
        fields = [
            (b"v", b"1"),
            (b"a", key.algorithm),
            (b"c", b"relaxed/relaxed"),
            (b"d", key.domain.encode("ascii")),
            (b"s", key.selector.encode("ascii")),
            (b"t", stamp),
            # Spaces around the colons (FWS, RFC 6376 §3.5) give the folding
            # places to break that are not inside a field name.
            (b"h", b" : ".join(include)),
            (b"bh", body_hash),
            # A placeholder as long as a signature puts b= on its own line, so
            # folding the real value later moves no whitespace before it.
            (b"b", b"0" * 60),
        ]
        value = dkim.fold(b"; ".join(b"=".join(f) for f in fields), namelen=len(_NAME))
        value = dkim.RE_BTAG.sub(b"\\1", value)
        # RFC 6376 §3.7: the signed fields, then this field with b= empty and
        # without its final CRLF.
        name, canonical_value = relaxed_header(_NAME, b" " + value)
        hasher = hashlib.sha256(signed + name + b":" + canonical_value.rstrip())
        signature = _raw_signature(key, hasher.digest())
        fields[-1] = (b"b", base64.b64encode(signature))
        value = dkim.fold(b"; ".join(b"=".join(f) for f in fields) + b"\r\n", namelen=len(_NAME))
        out.append(_NAME + b": " + value)
    return b"".join(out)


class DkimSigner:
    """Chooses the key for a message and signs it; one per process.

    ``keys`` maps a lower-case domain to its keys (``dkimkeys.load_keys``).
    The signing domain is the From domain, or with ``key_domain="auth_user"``
    the domain of an AUTH user named ``user@domain`` (else the From
    domain); ``default_domain``'s keys sign mail whose domain has none
    (Haraka's single-domain configuration).  A domain without a key is
    logged at INFO once and its mail goes unsigned.
    """

    def __init__(
        self,
        keys: Mapping[str, tuple[DkimKey, ...]],
        *,
        headers: Iterable[str] = DEFAULT_HEADERS,
        key_domain: KeyDomain = "from",
        default_domain: str | None = None,
        log: Logger,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.keys = dict(keys)
        self.wanted = tuple(dict.fromkeys(h.strip().lower().encode("ascii") for h in headers))
        self.key_domain = key_domain
        self.default_domain = default_domain
        self.log = log
        self.clock = clock
        self._unsigned_logged: set[str] = set()

    def keys_for(self, domain: str | None) -> tuple[DkimKey, ...]:
        """The keys that sign mail of ``domain`` (the default domain's when it has none)."""
        found = self.keys.get(domain, ()) if domain else ()
        if not found and self.default_domain is not None:
            found = self.keys.get(self.default_domain, ())
        return found

    def domain_for(self, message: bytes, auth_user: str | None) -> str | None:
        """The domain whose key should sign ``message``."""
        if self.key_domain == "auth_user" and auth_user and "@" in auth_user:
            domain = domain_of_address(auth_user)
            if domain is not None:
                return domain
        sender = prepare.find_header(message, "From")
        return domain_of_address(sender) if sender else None

    def sign(self, message: bytes, *, auth_user: str | None = None, queue_id: str = "") -> bytes:
        """``message`` with its signatures prepended, or unchanged when no key applies.

        Raises :class:`DkimSignError` when a key applies but signing failed:
        the caller refuses the message rather than send it unsigned.
        """
        domain = self.domain_for(message, auth_user)
        keys = self.keys_for(domain)
        if not keys:
            self._note_unsigned(domain, queue_id)
            return message
        try:
            return sign_message(message, keys, self.wanted, self.clock()) + message
        except DkimSignError:
            raise
        except Exception as exc:  # dkimpy or OpenSSL refusing odd input
            raise DkimSignError(f"{type(exc).__name__}: {exc}") from exc

    def sign_as(self, domain: str, message: bytes) -> bytes:
        """``message`` signed with the keys of ``domain`` or its nearest parent that has one.

        For the notices we write ourselves (DSNs, delay notices), signed as
        the ``me`` host.  Unchanged when no such key exists.
        """
        labels = domain.lower().rstrip(".").split(".")
        for i in range(len(labels) - 1):
            keys = self.keys.get(".".join(labels[i:]), ())
            if keys:
                try:
                    return sign_message(message, keys, self.wanted, self.clock()) + message
                except DkimSignError:
                    raise
                except Exception as exc:
                    raise DkimSignError(f"{type(exc).__name__}: {exc}") from exc
        return message

    def _note_unsigned(self, domain: str | None, queue_id: str) -> None:
        key = domain or ""
        if key in self._unsigned_logged or len(self._unsigned_logged) >= _MAX_LOGGED_DOMAINS:
            return
        self._unsigned_logged.add(key)
        self.log.info(
            "no DKIM key for this domain; its mail is sent unsigned (logged once per domain)",
            qid=queue_id,
            domain=domain or "(no From domain)",
        )


def signer_for(config: Config, log: Logger) -> DkimSigner | None:
    """The signer ``dkim.ini`` asks for, or None when signing is off."""
    settings = config.dkim
    if not settings.enabled:
        return None
    return DkimSigner(
        settings.keys,
        headers=settings.headers or DEFAULT_HEADERS,
        key_domain=settings.key_domain,
        default_domain=settings.domain,
        log=log,
    )
