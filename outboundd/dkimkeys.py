"""DKIM keys on disk: Haraka's layout, loading, generating, the DNS record.

Shared by the daemon (which loads every key once, at start-up, through the
configuration) and ``outboundctl dkim keygen|show``.  The layout is Haraka's
dkim plugin's, with a second pair of files for an Ed25519 key so a domain can
hold one key of each type (RFC 8463 §3, dual signing)::

    config/dkim/<domain>/private            PEM private key (RSA, or Ed25519)
    config/dkim/<domain>/selector           its selector (one line)
    config/dkim/<domain>/ed25519.private    PEM Ed25519 private key
    config/dkim/<domain>/ed25519.selector   its selector

A missing ``selector`` file means ``dkim.ini [sign] selector``.  Private keys
are parsed with ``cryptography`` (OpenSSL), which also does the signing, so a
bad key is found at start-up and named, never at the first message.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal, TypeAlias

# cryptography (and the OpenSSL bindings) is imported inside the functions
# that parse, make or serialise a key: the configuration loader imports this
# module in every process, and most run with DKIM signing off.
if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    PrivateKey: TypeAlias = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey

__all__ = [
    "KEY_TYPES",
    "DkimKey",
    "DkimKeyError",
    "KeyType",
    "dns_record",
    "dns_value",
    "generate_key",
    "key_files",
    "load_domain_keys",
    "load_keys",
    "public_key_text",
]

KeyType = Literal["rsa", "ed25519"]
KEY_TYPES: Final[tuple[KeyType, ...]] = ("rsa", "ed25519")

#: RSA keys shorter than this are refused (RFC 8301 §3.2: verifiers ignore
#: signatures by keys under 1024 bits; 2048 is what keygen makes).
MIN_RSA_BITS: Final = 1024
RSA_KEYGEN_BITS: Final = 2048

_SELECTOR_RE: Final = re.compile(
    r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)
_DOMAIN_RE: Final = re.compile(
    r"(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
)


class DkimKeyError(ValueError):
    """A key file is missing, unreadable or not a usable DKIM key; one line."""


@dataclass(frozen=True, slots=True)
class DkimKey:
    """One signing key: ``d=domain``, ``s=selector``, its type and the key."""

    domain: str
    selector: str
    type: KeyType
    private_key: PrivateKey
    path: Path

    def __reduce__(self) -> tuple[object, tuple[str, str, KeyType, bytes, Path]]:
        """Pickled as PEM: the daemon hands its whole configuration to its child
        processes by pickle, and OpenSSL key objects cannot be pickled."""
        from cryptography.hazmat.primitives import serialization

        pem = self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return (_unpickle_key, (self.domain, self.selector, self.type, pem, self.path))

    @property
    def algorithm(self) -> bytes:
        """The ``a=`` tag: ``rsa-sha256`` (RFC 8301) or ``ed25519-sha256`` (RFC 8463)."""
        return b"rsa-sha256" if self.type == "rsa" else b"ed25519-sha256"


def _unpickle_key(domain: str, selector: str, key_type: KeyType, pem: bytes, path: Path) -> DkimKey:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey):
        raise TypeError(f"a pickled DKIM key for {domain} is not RSA or Ed25519")
    return DkimKey(domain, selector, key_type, key, path)


def key_files(key_type: KeyType) -> tuple[str, str]:
    """``(private key file, selector file)`` names for a key of ``key_type``.

    The RSA key keeps Haraka's names; the Ed25519 key's files carry a prefix
    so both live in one domain directory.
    """
    return ("private", "selector") if key_type == "rsa" else ("ed25519.private", "ed25519.selector")


def check_domain(domain: str) -> str:
    """``domain`` lower-cased, or :class:`DkimKeyError` when it is not a domain name."""
    name = domain.strip().rstrip(".").lower()
    if not _DOMAIN_RE.fullmatch(name) or len(name) > 253:
        raise DkimKeyError(f"{domain!r} is not a domain name (letters, digits, '-' and '.')")
    return name


def check_selector(selector: str) -> str:
    """``selector`` as given, or :class:`DkimKeyError` when it is not a DNS label list."""
    if not _SELECTOR_RE.fullmatch(selector) or len(selector) > 63:
        raise DkimKeyError(f"{selector!r} is not a selector (letters, digits, '-' and '.')")
    return selector


def _read_selector(path: Path, default: str | None) -> str:
    try:
        text = path.read_text("utf-8")
    except FileNotFoundError:
        if default is None:
            raise DkimKeyError(
                f"{path}: missing (write the selector into it, or set dkim.ini [sign] selector)"
            ) from None
        return default
    except (OSError, UnicodeDecodeError) as exc:
        raise DkimKeyError(f"{path}: cannot be read: {exc}") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        if default is None:
            raise DkimKeyError(f"{path}: is empty (write the selector into it)")
        return default
    try:
        return check_selector(lines[0])
    except DkimKeyError as exc:
        raise DkimKeyError(f"{path}: {exc}") from None


def _read_private(path: Path) -> PrivateKey:
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DkimKeyError(f"{path}: cannot be read: {exc.strerror or exc}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        reason = "it is encrypted" if isinstance(exc, TypeError) else "not a PEM private key"
        raise DkimKeyError(f"{path}: {reason} (DKIM needs an unencrypted PEM key)") from None
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise DkimKeyError(
                f"{path}: an RSA key of {key.key_size} bits is too short "
                f"(RFC 8301: at least {MIN_RSA_BITS}; make a 2048-bit one)"
            )
        return key
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key
    raise DkimKeyError(f"{path}: not an RSA or Ed25519 key (the two kinds DKIM signs with)")


def load_domain_keys(
    domain_dir: Path, domain: str, default_selector: str | None
) -> tuple[DkimKey, ...]:
    """The keys in ``domain_dir`` (RSA first), at most one of each type.

    Raises :class:`DkimKeyError` for a key file that cannot be used, or two
    keys of the same type.
    """
    from cryptography.hazmat.primitives.asymmetric import rsa

    keys: list[DkimKey] = []
    for key_type in KEY_TYPES:
        private_name, selector_name = key_files(key_type)
        path = domain_dir / private_name
        if not path.exists():
            continue
        private_key = _read_private(path)
        found: KeyType = "rsa" if isinstance(private_key, rsa.RSAPrivateKey) else "ed25519"
        if key_type == "ed25519" and found != "ed25519":
            raise DkimKeyError(f"{path}: holds an RSA key; this file is for the Ed25519 key")
        if any(k.type == found for k in keys):
            raise DkimKeyError(
                f"{path}: {domain} already has an {found} key in {keys[0].path.name}; "
                "a domain holds at most one key of each type"
            )
        selector = _read_selector(domain_dir / selector_name, default_selector)
        keys.append(DkimKey(domain, selector, found, private_key, path))
    keys.sort(key=lambda k: KEY_TYPES.index(k.type))
    return tuple(keys)


def load_keys(dkim_dir: Path, default_selector: str | None) -> Mapping[str, tuple[DkimKey, ...]]:
    """Every domain directory under ``dkim_dir`` that holds a key, by lower-case domain.

    Directories without a key file are skipped (Haraka keeps the ``dns`` and
    ``public`` files there too).  A missing ``dkim_dir`` means no keys.
    """
    try:
        entries = sorted(dkim_dir.iterdir())
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise DkimKeyError(f"{dkim_dir}: cannot be read: {exc.strerror or exc}") from None
    keys: dict[str, tuple[DkimKey, ...]] = {}
    for entry in entries:
        if not entry.is_dir():
            continue
        try:
            domain = check_domain(entry.name)
        except DkimKeyError as exc:
            raise DkimKeyError(f"{entry}: {exc}") from None
        found = load_domain_keys(entry, domain, default_selector)
        if found:
            keys[domain] = found
    return keys


def public_key_text(key: DkimKey) -> str:
    """The ``p=`` value: SubjectPublicKeyInfo for RSA (RFC 6376), the raw
    32-byte key for Ed25519 (RFC 8463)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    public = key.private_key.public_key()
    if isinstance(public, ed25519.Ed25519PublicKey):
        raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    else:
        raw = public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    return base64.b64encode(raw).decode("ascii")


def dns_value(key: DkimKey) -> str:
    """The TXT record's text: ``v=DKIM1; k=rsa; p=...``."""
    return f"v=DKIM1; k={key.type}; p={public_key_text(key)}"


def dns_record(key: DkimKey) -> str:
    """The record as a zone-file line, the text split into strings of at most 255 octets."""
    value = dns_value(key)
    chunks = " ".join(f'"{value[i : i + 255]}"' for i in range(0, len(value), 255))
    return f"{key.selector}._domainkey.{key.domain}. IN TXT ( {chunks} )"


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file of mode 0600, durably; never over an existing one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)  # fails if a key appeared meanwhile: never replaced
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def generate_key(dkim_dir: Path, domain: str, selector: str, key_type: KeyType) -> DkimKey:
    """Make a key of ``key_type`` for ``domain`` and write its files.

    An existing key of that type is never replaced (the published record
    would stop matching): :class:`DkimKeyError` says which file to remove.
    """
    domain = check_domain(domain)
    selector = check_selector(selector)
    domain_dir = dkim_dir / domain
    private_name, selector_name = key_files(key_type)
    path = domain_dir / private_name
    existing = load_domain_keys(domain_dir, domain, selector) if domain_dir.is_dir() else ()
    for key in existing:
        if key.type == key_type:
            raise DkimKeyError(
                f"{domain} already has an {key_type} key ({key.path}); "
                "remove it first to replace it (and publish the new record)"
            )
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    private_key: PrivateKey
    if key_type == "rsa":
        private_key = rsa.generate_private_key(public_exponent=65537, key_size=RSA_KEYGEN_BITS)
    else:
        private_key = ed25519.Ed25519PrivateKey.generate()
    pem = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    try:
        domain_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        _write_private(path, pem)
        (domain_dir / selector_name).write_text(selector + "\n", "utf-8")
    except FileExistsError:
        raise DkimKeyError(f"{path}: already exists; remove it first to replace it") from None
    except OSError as exc:
        raise DkimKeyError(f"{path}: cannot be written: {exc.strerror or exc}") from None
    return DkimKey(domain, selector, key_type, private_key, path)
