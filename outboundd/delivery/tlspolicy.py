"""Outbound TLS policy decisions: MTA-STS (RFC 8461) and DANE (RFC 7672).

Pure functions over values — TXT and TLSA records as DNS gave them, a
policy file as the web server gave it, the certificate chain as the TLS
handshake saw it — so every rule is tested without sockets.  The lookups
themselves (DNS with the AD bit, the HTTPS fetch, the spool's cache) live in
:mod:`outboundd.delivery.tlslookup`; the session only asks a
:class:`TargetPolicy` what it requires and hands back what it saw.

Which policy applies to one MX host (:func:`target_policy`):

1. DANE, when the host's TLSA RRset at ``_25._tcp.<mx>`` is DNSSEC-secure
   (the validating resolver set AD) and not empty.  DANE wins over MTA-STS
   (RFC 8461 §2).  Usable records are DANE-TA(2) and DANE-EE(3) with
   selector 0/1 and matching type 0/1/2; a secure RRset with none usable,
   or a lookup that failed in a signed zone, refuses the host (``4.7.5``).
2. MTA-STS, when the recipient domain has a policy in mode ``enforce`` or
   ``testing``: the MX must match one of the policy's ``mx`` patterns and
   present a certificate valid for its name.  ``enforce`` defers when it
   does not; ``testing`` delivers anyway and records the failure.
3. Otherwise none: the session's own opportunistic STARTTLS applies.
"""

from __future__ import annotations

import datetime
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, TypeAlias

# cryptography (~16 MB with x509) is imported inside the functions that read a
# certificate, so only a process that meets a TLSA record pays for it.
if TYPE_CHECKING:
    from cryptography import x509

__all__ = [
    "STS_MAX_AGE_MAX",
    "STS_POLICY_MAX_BYTES",
    "DaneLookup",
    "PolicyError",
    "PolicyKind",
    "StsMode",
    "StsPolicy",
    "TargetPolicy",
    "Tlsa",
    "dane_verify",
    "mx_allowed",
    "mx_pattern_matches",
    "name_matches",
    "parse_sts_policy",
    "sts_record_id",
    "target_policy",
    "tlsa_matches",
    "usable_tlsa",
]

#: What the ``attempts`` view's ``tls_policy`` column says.
PolicyKind: TypeAlias = Literal["none", "opportunistic", "mta-sts", "dane"]
StsMode: TypeAlias = Literal["enforce", "testing", "none"]

#: RFC 8461 §3.2: max_age is at most 31557600 seconds (about a year).
STS_MAX_AGE_MAX = 31_557_600
#: RFC 8461 §3.3: senders may refuse policy bodies larger than 64 KiB.
STS_POLICY_MAX_BYTES = 64 * 1024

_STS_ID = re.compile(r"^[A-Za-z0-9]{1,32}$")
_LABEL = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")


class PolicyError(ValueError):
    """A policy record or file that cannot be used; the text says why."""


# --------------------------------------------------------------------------
# MTA-STS


def sts_record_id(texts: Sequence[str]) -> str | None:
    """The policy ``id`` of the domain's ``_mta-sts`` TXT records (RFC 8461 §3.1).

    Records that do not start with ``v=STSv1`` are ignored; no such record,
    more than one, or one without a valid ``id`` means the domain has no
    policy (None).
    """
    found = [t for t in texts if re.match(r"^v=STSv1\s*(;|$)", t)]
    if len(found) != 1:
        return None
    fields = [f.strip() for f in found[0].split(";")]
    for field in fields[1:]:
        key, sep, value = field.partition("=")
        if sep and key.strip() == "id":
            value = value.strip()
            return value if _STS_ID.match(value) else None
    return None


@dataclass(frozen=True, slots=True)
class StsPolicy:
    """A parsed MTA-STS policy file (RFC 8461 §3.2)."""

    mode: StsMode
    mx: tuple[str, ...]
    max_age: int


def parse_sts_policy(text: str) -> StsPolicy:
    """Parse a policy file; raises :class:`PolicyError` for one that cannot be used.

    ``version: STSv1``, ``mode`` and ``max_age`` are required; ``mx`` is
    required (at least one) unless the mode is ``none``.  Unknown keys are
    ignored, as §3.2 asks; a repeated single-valued key uses the first.
    """
    values: dict[str, str] = {}
    mx: list[str] = []
    for raw in re.split(r"\r?\n", text):
        line = raw.strip()
        if not line:
            continue
        key, sep, value = line.partition(":")
        if not sep:
            raise PolicyError(f"policy line {line[:80]!r} is not 'key: value'")
        key, value = key.strip(), value.strip()
        if key == "mx":
            pattern = value.lower().rstrip(".")
            if not _valid_pattern(pattern):
                raise PolicyError(f"mx pattern {value[:80]!r} is not a host name or *.domain")
            mx.append(pattern)
        else:
            values.setdefault(key, value)
    if values.get("version") != "STSv1":
        raise PolicyError(f"version is {values.get('version')!r}, not 'STSv1'")
    mode: StsMode
    match values.get("mode"):
        case "enforce":
            mode = "enforce"
        case "testing":
            mode = "testing"
        case "none":
            mode = "none"
        case other:
            raise PolicyError(f"mode is {other!r}, not enforce, testing or none")
    age = values.get("max_age", "")
    if not age.isdigit() or len(age) > 10:
        raise PolicyError(f"max_age {age!r} is not a number of seconds")
    if mode != "none" and not mx:
        raise PolicyError(f"mode {mode} needs at least one mx pattern")
    return StsPolicy(mode, tuple(mx), min(int(age), STS_MAX_AGE_MAX))


def _valid_pattern(pattern: str) -> bool:
    labels = pattern.split(".")
    if labels[0] == "*":
        labels = labels[1:]
    return len(labels) >= 1 and all(_LABEL.match(label) for label in labels)


def mx_pattern_matches(pattern: str, host: str) -> bool:
    """RFC 8461 §4.1: ``*.example.com`` matches exactly one more label on the left."""
    host = host.lower().rstrip(".")
    pattern = pattern.lower().rstrip(".")
    if pattern.startswith("*."):
        head, sep, rest = host.partition(".")
        return bool(head) and bool(sep) and rest == pattern[2:]
    return host == pattern


def mx_allowed(policy: StsPolicy, host: str) -> bool:
    """True when ``host`` matches one of the policy's ``mx`` patterns."""
    return any(mx_pattern_matches(p, host) for p in policy.mx)


# --------------------------------------------------------------------------
# DANE


@dataclass(frozen=True, slots=True)
class Tlsa:
    """One TLSA record (RFC 6698 §2.1): usage, selector, matching type, data."""

    usage: int
    selector: int
    mtype: int
    data: bytes

    def __str__(self) -> str:
        return f"{self.usage} {self.selector} {self.mtype}"


@dataclass(frozen=True, slots=True)
class DaneLookup:
    """What the TLSA lookup for one MX host found.

    ``state``: ``secure`` (AD set: ``records`` is the validated RRset,
    possibly empty when the name has no TLSA records), ``insecure`` (no AD:
    the zone is not signed, DANE does not apply), or ``bogus`` (the lookup
    failed in a signed zone; ``error`` says how).
    """

    state: Literal["secure", "insecure", "bogus"]
    records: tuple[Tlsa, ...] = ()
    error: str | None = None


def usable_tlsa(records: Sequence[Tlsa]) -> tuple[Tlsa, ...]:
    """RFC 7672 §3.1: only DANE-TA(2) and DANE-EE(3), with known selector and type."""
    return tuple(
        r for r in records if r.usage in (2, 3) and r.selector in (0, 1) and r.mtype in (0, 1, 2)
    )


def _selected(cert: x509.Certificate, der: bytes, selector: int) -> bytes:
    if selector == 0:
        return der
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def _digest(data: bytes, mtype: int) -> bytes:
    if mtype == 1:
        return hashlib.sha256(data).digest()
    if mtype == 2:
        return hashlib.sha512(data).digest()
    return data


def tlsa_matches(record: Tlsa, der: bytes) -> bool:
    """True when ``record`` matches the certificate ``der`` (full cert or SPKI)."""
    from cryptography import x509

    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError:
        return False
    return _digest(_selected(cert, der, record.selector), record.mtype) == record.data


def name_matches(cert: x509.Certificate, name: str) -> bool:
    """RFC 6125 host name check: a DNS subjectAltName (``*`` only as the whole
    leftmost label), or the common name when there is no DNS subjectAltName."""
    from cryptography import x509

    host = name.lower().rstrip(".")
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names = [n.lower().rstrip(".") for n in san.value.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        names = []
    if not names:
        names = [
            str(a.value).lower().rstrip(".")
            for a in cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        ]
    for pattern in names:
        if pattern.startswith("*."):
            head, sep, rest = host.partition(".")
            if head and sep and rest == pattern[2:]:
                return True
        elif pattern == host:
            return True
    return False


def _valid_at(cert: x509.Certificate, now: datetime.datetime) -> bool:
    return cert.not_valid_before_utc <= now <= cert.not_valid_after_utc


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    from cryptography.exceptions import InvalidSignature

    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def dane_verify(
    records: Sequence[Tlsa],
    chain: Sequence[bytes],
    host: str,
    now: datetime.datetime,
) -> str | None:
    """Check the chain the server presented against its TLSA records.

    Returns None when it is authenticated, else the reason it is not.
    ``chain`` is DER, leaf first, as the handshake saw it.

    * DANE-EE(3): the leaf certificate (or its public key) matches; its
      names and dates are not checked (RFC 7672 §3.1.1).
    * DANE-TA(2): some certificate of the chain matches; every certificate
      from the leaf up to it is signed by the next and valid now, and the
      leaf is valid for ``host`` (RFC 7672 §3.1.2, §3.2.2).  The trust
      anchor must be in the presented chain (RFC 7671 §5.2.2 asks servers
      to send it).
    """
    if not chain:
        return f"{host} presented no certificate"
    usable = usable_tlsa(records)
    if not usable:
        return f"no usable TLSA record for {host}"
    if any(r.usage == 3 and tlsa_matches(r, chain[0]) for r in usable):
        return None
    ta_records = [r for r in usable if r.usage == 2]
    if not ta_records:
        return f"the certificate of {host} matches none of its DANE-EE TLSA records"
    from cryptography import x509

    try:
        certs = [x509.load_der_x509_certificate(der) for der in chain]
    except ValueError as exc:
        return f"{host} presented a certificate that cannot be read: {exc}"
    anchor = next(
        (i for i, der in enumerate(chain) if any(tlsa_matches(r, der) for r in ta_records)),
        None,
    )
    if anchor is None:
        return f"no certificate presented by {host} matches its DANE-TA TLSA records"
    for i in range(anchor):
        if not _issued_by(certs[i], certs[i + 1]):
            return f"the certificate chain of {host} does not lead to its DANE-TA trust anchor"
    for cert in certs[: anchor + 1]:
        if not _valid_at(cert, now):
            return (
                f"a certificate in the chain of {host} is not valid now "
                f"({cert.not_valid_before_utc:%Y-%m-%d} to {cert.not_valid_after_utc:%Y-%m-%d})"
            )
    if not name_matches(certs[0], host):
        return f"the certificate of {host} is not valid for that name"
    return None


# --------------------------------------------------------------------------
# The policy for one MX host


@dataclass(frozen=True, slots=True)
class TargetPolicy:
    """The TLS policy one MX host must meet, as :func:`target_policy` decided.

    ``kind`` is ``dane`` or ``mta-sts``.  ``enforce``: a connection that
    does not meet the policy is not used (the attempt defers ``4.7.5``);
    otherwise (MTA-STS ``testing``) mail goes anyway and the attempt records
    that the policy was not met.  ``refusal`` says why the host cannot meet
    the policy whatever it presents (an MX outside the MTA-STS policy, no
    usable TLSA record, a failed TLSA lookup): it is not connected to when
    enforcing.  ``tlsa``: the usable records to check the chain against.
    """

    kind: PolicyKind
    enforce: bool
    tlsa: tuple[Tlsa, ...] = ()
    refusal: str | None = None


def target_policy(
    host: str,
    *,
    domain: str,
    dane: DaneLookup | None,
    sts: StsPolicy | None,
) -> TargetPolicy | None:
    """The policy for MX ``host`` of ``domain`` (module doc); None = opportunistic."""
    if dane is not None:
        if dane.state == "bogus":
            return TargetPolicy(
                "dane",
                True,
                refusal=f"TLSA lookup for {host} failed in a signed zone: {dane.error}",
            )
        if dane.state == "secure" and dane.records:
            usable = usable_tlsa(dane.records)
            if not usable:
                shown = ", ".join(str(r) for r in dane.records)
                return TargetPolicy(
                    "dane", True, refusal=f"no usable TLSA record for {host} ({shown})"
                )
            return TargetPolicy("dane", True, tlsa=usable)
    if sts is not None and sts.mode != "none":
        enforce = sts.mode == "enforce"
        if not mx_allowed(sts, host):
            refusal = (
                f"MX host {host} does not match the MTA-STS policy of {domain} "
                f"(mx: {', '.join(sts.mx)})"
            )
            return TargetPolicy("mta-sts", enforce, refusal=refusal)
        return TargetPolicy("mta-sts", enforce)
    return None
