"""AUTH users from ``auth_flat_file.ini``: password hashes, verification, throttling.

The file keeps Haraka's layout, one user per line in ``[users]``::

    [core]
    methods = PLAIN,LOGIN

    [users]
    alice = scrypt$16384$8$1$<salt base64>$<hash base64>
    bob@example.com = pbkdf2_sha256$600000$<salt>$<hash base64>

Stored value schemes (:func:`verify_password`):

* ``scrypt$N$r$p$SALT$HASH`` — what :func:`hash_password` writes
  (N=16384, r=8, p=1, a 16-byte random salt, a 32-byte key; salt and key in
  standard base64).
* ``pbkdf2_sha256$ITERATIONS$SALT$HASH`` — Django's format: PBKDF2-HMAC-SHA256
  with the salt *text* (UTF-8) as salt and the key in standard base64, so
  hashes from Django user tables can be imported as they are.
* A value without any ``$`` is a plaintext password, as Haraka's flat_file
  stores them.  It still works (compared in constant time) but
  :func:`is_plaintext` lets the daemon warn.  A value that contains ``$`` but
  is none of the schemes above never matches: otherwise a hash pasted from
  another system would become a password equal to the hash text.

Empty passwords never authenticate and cannot be stored.  Passwords never
appear in an exception message, a ``repr`` or a log line.

File maintenance (``outboundctl user add|del|list``) rewrites the file
atomically (temporary file, fsync, rename, fsync of the directory) with mode
0600, keeping comments, blank lines and other sections as they were.
Concurrent writers are serialised with ``flock`` on the directory.

:class:`AuthThrottle` is the per-client-IP failure policy: pure decisions over
a :class:`ThrottleEntry` with an injected clock, kept in a
:class:`ThrottleStore` (the spool, shared by every process); the SMTP session
asks it before checking a credential, how long to wait after a failure and
when to hang up.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import enum
import fcntl
import hashlib
import hmac
import ipaddress
import math
import os
import re
import secrets
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol, TypeVar, runtime_checkable

from outboundd.spool.types import ThrottleEntry

_T = TypeVar("_T")

__all__ = [
    "AUTH_DISCONNECT_AFTER_RANGE",
    "AUTH_MAX_FAILURES_RANGE",
    "SCRYPT_N",
    "SCRYPT_P",
    "SCRYPT_R",
    "Admission",
    "AuthThrottle",
    "InvalidPassword",
    "InvalidUserName",
    "MemoryThrottleStore",
    "ThrottleEntry",
    "ThrottleStore",
    "ThrottleVerdict",
    "UserStore",
    "add_user",
    "check_throttle_settings",
    "delete_user",
    "hash_password",
    "is_plaintext",
    "list_users",
    "read_users",
    "stored_problem",
    "validate_user_name",
    "verify_password",
]

SCRYPT_N: Final = 2**14
SCRYPT_R: Final = 8
SCRYPT_P: Final = 1
_SALT_BYTES: Final = 16
_KEY_BYTES: Final = 32

# Bounds on parameters read from the file: a typo (or a hostile edit) must
# not make one AUTH attempt take minutes or gigabytes.
_SCRYPT_MAX_N: Final = 2**20
_SCRYPT_MAX_R: Final = 32
_SCRYPT_MAX_P: Final = 16
_SCRYPT_MAX_MEM: Final = 1 << 30
_PBKDF2_MAX_ITERATIONS: Final = 10_000_000
_MAX_KEY_BYTES: Final = 128

USERS_SECTION: Final = "users"
_MAX_NAME_LENGTH: Final = 256


class InvalidUserName(ValueError):
    """A user name that cannot be stored in the file (says why, shows the name)."""


class InvalidPassword(ValueError):
    """A password that cannot be stored (empty, or containing NUL).  Never shows it."""


# --------------------------------------------------------------------------
# Hashing


def _b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _b64decode(text: str) -> bytes:
    """Standard base64, padding optional; raises ValueError on anything else."""
    padded = text + "=" * (-len(text) % 4)
    try:
        return base64.b64decode(padded.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise ValueError("not base64") from exc


def _check_password(password: str) -> None:
    if not isinstance(password, str):
        raise InvalidPassword("the password must be text")
    if not password:
        raise InvalidPassword("the password is empty")
    if "\x00" in password:
        raise InvalidPassword("the password contains a NUL character")


def _scrypt(password: bytes, salt: bytes, n: int, r: int, p: int, dklen: int) -> bytes:
    # OpenSSL needs 128*r*(N + p + 2) bytes; give it that plus slack.
    maxmem = 128 * r * (n + p + 2) + (1 << 20)
    return hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, dklen=dklen, maxmem=maxmem)


def hash_password(password: str) -> str:
    """A new ``scrypt$16384$8$1$SALT$HASH`` value for ``password``, random salt.

    Takes about 50 ms of CPU on purpose: that is what makes a stolen file
    expensive to attack.  Raises :class:`InvalidPassword` for an empty
    password or one containing NUL (SASL PLAIN cannot carry it).
    """
    _check_password(password)
    salt = secrets.token_bytes(_SALT_BYTES)
    key = _scrypt(password.encode("utf-8"), salt, SCRYPT_N, SCRYPT_R, SCRYPT_P, _KEY_BYTES)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64encode(salt)}${_b64encode(key)}"


@dataclass(frozen=True, slots=True)
class _Scrypt:
    n: int
    r: int
    p: int
    salt: bytes
    key: bytes


@dataclass(frozen=True, slots=True)
class _Pbkdf2:
    iterations: int
    salt: bytes
    key: bytes


@dataclass(frozen=True, slots=True)
class _Plain:
    password: bytes


_DIGITS: Final = re.compile(r"[1-9][0-9]{0,9}")


def _int_field(text: str, low: int, high: int, what: str) -> int:
    if not _DIGITS.fullmatch(text):
        raise ValueError(f"{what} is not a positive integer")
    value = int(text)
    if not low <= value <= high:
        raise ValueError(f"{what} {value} is outside {low}..{high}")
    return value


def _key_field(text: str) -> bytes:
    key = _b64decode(text)
    if not 16 <= len(key) <= _MAX_KEY_BYTES:
        raise ValueError("the hash has an unusual length")
    return key


def _parse(stored: str) -> _Scrypt | _Pbkdf2 | _Plain:
    """Decode a stored value; ValueError (naming no secret) when it is unusable."""
    if not isinstance(stored, str):
        raise ValueError("the stored value is not text")
    if not stored:
        raise ValueError("the stored value is empty")
    if "$" not in stored:
        return _Plain(stored.encode("utf-8"))
    scheme, _, rest = stored.partition("$")
    parts = rest.split("$")
    if scheme == "scrypt":
        if len(parts) != 5:
            raise ValueError("a scrypt hash has the form scrypt$N$r$p$salt$hash")
        n = _int_field(parts[0], 2, _SCRYPT_MAX_N, "scrypt N")
        if n & (n - 1):
            raise ValueError("scrypt N is not a power of two")
        r = _int_field(parts[1], 1, _SCRYPT_MAX_R, "scrypt r")
        p = _int_field(parts[2], 1, _SCRYPT_MAX_P, "scrypt p")
        if 128 * r * (n + p + 2) > _SCRYPT_MAX_MEM:
            raise ValueError("scrypt parameters need more than 1 GiB of memory")
        salt = _b64decode(parts[3])
        if not salt:
            raise ValueError("the scrypt salt is empty")
        return _Scrypt(n, r, p, salt, _key_field(parts[4]))
    if scheme == "pbkdf2_sha256":
        if len(parts) != 3:
            raise ValueError("a PBKDF2 hash has the form pbkdf2_sha256$iterations$salt$hash")
        iterations = _int_field(parts[0], 1, _PBKDF2_MAX_ITERATIONS, "PBKDF2 iterations")
        if not parts[1]:
            raise ValueError("the PBKDF2 salt is empty")
        return _Pbkdf2(iterations, parts[1].encode("utf-8"), _key_field(parts[2]))
    if re.fullmatch(r"[A-Za-z0-9_-]{1,32}", scheme):
        raise ValueError(f"unknown password scheme {scheme!r}")
    raise ValueError("unknown password scheme")


def _derive(parsed: _Scrypt | _Pbkdf2, password: bytes) -> bytes:
    if isinstance(parsed, _Scrypt):
        return _scrypt(password, parsed.salt, parsed.n, parsed.r, parsed.p, len(parsed.key))
    return hashlib.pbkdf2_hmac("sha256", password, parsed.salt, parsed.iterations, len(parsed.key))


def verify_password(stored: str, password: str) -> bool:
    """True when ``password`` matches ``stored``; compared in constant time.

    Never raises: a malformed value, an unknown scheme, an empty password or
    a password that is not valid text all give False.
    """
    try:
        parsed = _parse(stored)
        if not isinstance(password, str) or not password:
            return False
        secret = password.encode("utf-8")
        if isinstance(parsed, _Plain):
            # Compare digests so the time does not depend on where the
            # strings differ, nor on their lengths.
            return hmac.compare_digest(
                hashlib.sha256(parsed.password).digest(), hashlib.sha256(secret).digest()
            )
        return hmac.compare_digest(_derive(parsed, secret), parsed.key)
    except Exception:
        return False


def is_plaintext(stored: str) -> bool:
    """True for a Haraka-style plaintext entry (no ``$`` at all)."""
    return isinstance(stored, str) and bool(stored) and "$" not in stored


def stored_problem(stored: str) -> str | None:
    """Why a stored value is unsafe or unusable, in words for a log line; None when fine.

    The daemon logs this per user at start-up.  The text never contains the
    stored value or any part of it.
    """
    try:
        parsed = _parse(stored)
    except ValueError as exc:
        return f"unusable password entry: {exc}; this user cannot log in"
    if isinstance(parsed, _Plain):
        return "plaintext password; replace it with `outboundctl user add`"
    return None


# A hash to spend time on for unknown users, made on first use.
_dummy_hash: str | None = None


def _dummy() -> str:
    global _dummy_hash
    if _dummy_hash is None:
        _dummy_hash = hash_password(secrets.token_urlsafe(16))
    return _dummy_hash


# --------------------------------------------------------------------------
# The file


def validate_user_name(name: str) -> str:
    """Return ``name`` when it can be a key in ``[users]``, else raise :class:`InvalidUserName`.

    Allowed: any printable characters but whitespace, ``=``, ``[``, ``]``,
    and not starting with ``;`` or ``#`` (which would make the line a
    comment).  ``user@example.com`` is fine.
    """
    if not isinstance(name, str) or not name:
        raise InvalidUserName("the user name is empty")
    if len(name) > _MAX_NAME_LENGTH:
        raise InvalidUserName(f"the user name is longer than {_MAX_NAME_LENGTH} characters")
    for char in name:
        if char.isspace() or not char.isprintable():
            raise InvalidUserName(f"user name {name!r} contains whitespace or a control character")
        if char in "=[]":
            raise InvalidUserName(f"user name {name!r} contains {char!r}")
    if name[0] in ";#":
        raise InvalidUserName(f"user name {name!r} starts with {name[0]!r} (a comment)")
    return name


@dataclass(frozen=True, slots=True)
class _Line:
    """One physical line of the file, with what it means."""

    text: str  # as read, line end included
    section: str | None  # the section it belongs to (None before any header)
    user: str | None  # the key when it is a ``[users]`` entry


_SECTION: Final = re.compile(r"^\s*\[\s*([^\]]*?)\s*\]\s*$")


def _parse_lines(text: str) -> list[_Line]:
    lines: list[_Line] = []
    section: str | None = None
    for raw in text.splitlines(keepends=True):
        body = raw.strip()
        header = _SECTION.match(body)
        if header:
            section = header.group(1).lower()
            lines.append(_Line(raw, section, None))
        elif section == USERS_SECTION and body and body[0] not in ";#" and "=" in body:
            lines.append(_Line(raw, section, body.split("=", 1)[0].strip()))
        else:
            lines.append(_Line(raw, section, None))
    return lines


def _users_of(text: str) -> dict[str, str]:
    users: dict[str, str] = {}
    for line in _parse_lines(text):
        if line.user:
            # A later duplicate wins, as with Haraka's ini reader.
            users[line.user] = line.text.split("=", 1)[1].strip()
    return users


def _read_text(path: Path) -> str:
    try:
        # newline="": keep CRLF files CRLF when we write them back.
        with path.open(encoding="utf-8", newline="") as handle:
            return handle.read()
    except FileNotFoundError:
        return ""


def read_users(path: Path) -> dict[str, str]:
    """``{name: stored value}`` from the file's ``[users]`` section; {} when it is absent.

    User names are case-sensitive, kept exactly as written.
    """
    return _users_of(_read_text(path))


def list_users(path: Path) -> list[str]:
    """User names in file order (each once); [] when the file does not exist."""
    return list(read_users(path))


class _DirectoryLock:
    """``flock`` on the file's directory: the file itself is replaced by rename."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self._fd = -1

    def __enter__(self) -> None:
        self._fd = os.open(self._directory, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        os.close(self._fd)  # closing releases the lock


def _write_atomic(path: Path, text: str) -> None:
    directory = path.parent
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o600)
        try:
            # Keep the owner, so root running outboundctl does not lock the
            # daemon's user out of its own file.
            st = path.stat()
            os.fchown(fd, st.st_uid, st.st_gid)
        except (FileNotFoundError, PermissionError):
            pass
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _line_end(lines: Iterable[_Line]) -> str:
    for line in lines:
        if line.text.endswith("\r\n"):
            return "\r\n"
        if line.text.endswith("\n"):
            return "\n"
    return "\n"


def _set_entry(text: str, name: str, stored: str) -> tuple[str, bool]:
    """The file text with ``name = stored`` in ``[users]``; True when the user is new."""
    lines = _parse_lines(text)
    eol = _line_end(lines)
    entry = f"{name} = {stored}{eol}"
    out: list[str] = []
    replaced = False
    for line in lines:
        if line.user == name:
            if not replaced:
                out.append(entry)
                replaced = True
            continue  # drop later duplicates: they would win on reading
        out.append(line.text)
    if replaced:
        return "".join(out), False
    # Append after the last non-blank line of the last [users] section.
    last_users = max(
        (i for i, line in enumerate(lines) if line.section == USERS_SECTION), default=-1
    )
    if last_users < 0:
        if out and not out[-1].endswith(("\n", "\r")):
            out[-1] += eol
        if out and out[-1].strip():
            out.append(eol)
        out.extend([f"[{USERS_SECTION}]{eol}", entry])
        return "".join(out), True
    insert_at = last_users
    while insert_at > 0 and not lines[insert_at].text.strip():
        insert_at -= 1
    if not out[insert_at].endswith(("\n", "\r")):
        out[insert_at] += eol
    out.insert(insert_at + 1, entry)
    return "".join(out), True


def add_user(path: Path, name: str, password: str) -> bool:
    """Store ``name`` with a fresh scrypt hash of ``password``; True when the user is new.

    An existing user's line is replaced where it stands.  Creates the file
    (and the ``[users]`` section) when missing.  Raises
    :class:`InvalidUserName`, :class:`InvalidPassword`, or :class:`OSError`
    when the file cannot be written.
    """
    validate_user_name(name)
    stored = hash_password(password)
    path = Path(path)
    with _DirectoryLock(path.parent):
        text, created = _set_entry(_read_text(path), name, stored)
        _write_atomic(path, text)
    return created


def delete_user(path: Path, name: str) -> bool:
    """Remove ``name`` from ``[users]``; False when it was not there (file unchanged)."""
    path = Path(path)
    if not path.parent.is_dir():
        return False
    with _DirectoryLock(path.parent):
        lines = _parse_lines(_read_text(path))
        kept = [line.text for line in lines if line.user != name]
        if len(kept) == len(lines):
            return False
        _write_atomic(path, "".join(kept))
    return True


# --------------------------------------------------------------------------
# Verification for the SMTP session


class UserStore:
    """The users the daemon accepts (``UserStore.load`` or the config dict).

    Built with ``path``, it follows the file: each check first looks at the
    file's mtime and size (one ``stat``) and re-reads it when they changed,
    so ``outboundctl user add`` takes effect on a running daemon.  A file
    that no longer parses keeps the previous users and is reported in
    :attr:`reload_error`.

    :meth:`verify` costs one KDF run whether or not the user exists, so the
    reply time does not tell a client which names are real.  From the event
    loop use :meth:`averify`, which runs that work in a thread.
    """

    __slots__ = ("_lock", "_path", "_stamp", "_users", "reload_error")

    def __init__(self, users: Mapping[str, str], *, path: Path | None = None) -> None:
        self._users = dict(users)
        self._path = path
        self._stamp = _file_stamp(path) if path is not None else None
        self._lock = threading.Lock()
        self.reload_error: str | None = None

    @classmethod
    def load(cls, path: Path) -> UserStore:
        """Read ``path`` (``auth_flat_file.ini``) and follow its changes."""
        return cls(read_users(Path(path)), path=Path(path))

    def refresh(self) -> bool:
        """Re-read the file if it changed since the last look; True if reloaded."""
        if self._path is None:
            return False
        with self._lock:
            stamp = _file_stamp(self._path)
            if stamp == self._stamp:
                return False
            self._stamp = stamp
            try:
                self._users = read_users(self._path) if stamp is not None else {}
            except (OSError, ValueError) as exc:
                self.reload_error = f"{self._path}: {exc}"
                return False
            self.reload_error = None
            return True

    def __repr__(self) -> str:
        return f"UserStore({len(self._users)} users)"

    def __len__(self) -> int:
        return len(self._users)

    def __contains__(self, name: object) -> bool:
        return name in self._users

    def names(self) -> list[str]:
        """The user names, in file order."""
        return list(self._users)

    def problems(self) -> dict[str, str]:
        """``{user: problem}`` for plaintext or unusable entries, for start-up warnings."""
        found: dict[str, str] = {}
        for name, stored in self._users.items():
            problem = stored_problem(stored)
            if problem is not None:
                found[name] = problem
        return found

    def verify(self, user: str, password: str) -> bool:
        """True when ``user`` exists and ``password`` matches.  Blocks for one KDF run."""
        self.refresh()
        stored = self._users.get(user) if isinstance(user, str) else None
        if stored is None:
            verify_password(_dummy(), password if isinstance(password, str) else "")
            return False
        return verify_password(stored, password)

    async def averify(self, user: str, password: str) -> bool:
        """:meth:`verify` in a worker thread, so the event loop keeps serving."""
        return await asyncio.to_thread(self.verify, user, password)


def _file_stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size)


# --------------------------------------------------------------------------
# Failure throttling


class Admission(enum.Enum):
    """The throttle's answer before a credential is checked."""

    #: Check it now (the attempt is counted as in flight).
    CHECK = "check"
    #: The client's remaining allowance is taken by attempts still being
    #: checked: ask again shortly (a burst waits instead of being checked).
    WAIT = "wait"
    #: Blocked: do not check it, say 421 and hang up.
    REFUSE = "refuse"


@dataclass(frozen=True, slots=True)
class ThrottleVerdict:
    """What the session does after a failed AUTH: wait ``delay`` s, then maybe hang up."""

    failures: int
    delay: float
    disconnect: bool


@runtime_checkable
class ThrottleStore(Protocol):
    """Where the per-client counts live, shared by every process that uses it.

    ``throttle_update(key, update)`` reads ``key``'s entry, calls
    ``update(entry)`` and stores the entry it returns (None deletes it),
    atomically with respect to every other caller in every process; it
    returns ``update``'s second value.  With ``write=False`` nothing is
    stored.  ``throttle_prune`` drops entries :class:`AuthThrottle` no
    longer needs.  :class:`outboundd.spool.Spool` is the shared store.
    """

    async def throttle_update(
        self,
        key: str,
        update: Callable[[ThrottleEntry | None], tuple[ThrottleEntry | None, _T]],
        *,
        write: bool = True,
    ) -> _T: ...

    async def throttle_prune(self, now: float, forget_before: float, keep: int) -> int: ...


class MemoryThrottleStore:
    """A :class:`ThrottleStore` in this process's memory (tests, a process without a spool)."""

    def __init__(self) -> None:
        self.entries: dict[str, ThrottleEntry] = {}

    async def throttle_update(
        self,
        key: str,
        update: Callable[[ThrottleEntry | None], tuple[ThrottleEntry | None, _T]],
        *,
        write: bool = True,
    ) -> _T:
        # No await between the read and the write: atomic on the event loop.
        new, result = update(self.entries.get(key))
        if write:
            if new is None:
                self.entries.pop(key, None)
            else:
                self.entries[key] = new
        return result

    async def throttle_prune(self, now: float, forget_before: float, keep: int) -> int:
        stale = [k for k, entry in self.entries.items() if not entry.live(now, forget_before)]
        for key in stale:
            del self.entries[key]
        oldest_first = sorted(self.entries, key=lambda k: self.entries[k].last_seen)
        dropped = oldest_first[: max(0, len(oldest_first) - keep)]
        for key in dropped:
            del self.entries[key]
        return len(stale) + len(dropped)


class AuthThrottle:
    """Slows down, then disconnects and blocks, a client that keeps failing AUTH.

    Per client key (the IP; an IPv6 address counts as its /64, since one
    host usually owns the whole prefix), counted in a :class:`ThrottleStore`
    that every process of the daemon shares, so one client spread over
    several SMTP processes is one client:

    * an attempt is admitted (:meth:`admit`) before its credential is
      checked, and counted as in flight until it is decided; the failures
      so far plus the attempts in flight never exceed ``disconnect_after``,
      so a burst of parallel connections gets no more checks than a
      patient client — the rest wait their turn (``Admission.WAIT``), and
      are refused unchecked once the client is blocked;
    * failure number ``n`` waits ``failure_delay * (n - max_failures)``
      seconds (at most ``max_delay``) before its 535 when
      ``n > max_failures``, none otherwise;
    * the failure that reaches ``disconnect_after`` hangs up with 421 and
      blocks the client for ``block_seconds``; when the block ends the
      client starts again from zero;
    * failures are forgotten ``forget_after`` seconds after the client was
      last seen, and a success clears them (but never lifts a block).

    An attempt in flight for longer than ``stale_after`` seconds (its
    process died while checking) no longer counts.  At most
    ``max_entries`` clients are kept (pruned at most once a minute, least
    recently seen first).  The decisions (``decide_*``) are pure functions
    of an entry and the time; the time comes from ``clock`` (wall time:
    entries are shared between processes).
    """

    def __init__(
        self,
        max_failures: int = 3,
        failure_delay: float = 2.0,
        disconnect_after: int = 10,
        block_seconds: float = 300.0,
        *,
        store: ThrottleStore | None = None,
        max_delay: float = 30.0,
        forget_after: float = 3600.0,
        stale_after: float = 120.0,
        max_entries: int = 10_000,
        ipv6_prefix: int = 64,
        clock: Callable[[], float] = time.time,
    ) -> None:
        check_throttle_settings(max_failures, failure_delay, disconnect_after, block_seconds)
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        if max_delay < 0 or forget_after <= 0 or stale_after <= 0:
            raise ValueError("max_delay must not be negative; forget_after, stale_after positive")
        if not 0 <= ipv6_prefix <= 128:
            raise ValueError("ipv6_prefix must be between 0 and 128")
        self.max_failures = max_failures
        self.failure_delay = failure_delay
        self.disconnect_after = disconnect_after
        self.block_seconds = block_seconds
        self.max_delay = max_delay
        self.forget_after = forget_after
        self.stale_after = stale_after
        self.max_entries = max_entries
        self.ipv6_prefix = ipv6_prefix
        self.store: ThrottleStore = store if store is not None else MemoryThrottleStore()
        self._clock = clock
        self._next_prune = 0.0

    def key_for(self, ip: str) -> str:
        """The key failures are counted under: the address, or its IPv6 prefix."""
        try:
            address = ipaddress.ip_address(ip.split("%", 1)[0])
        except ValueError:
            return ip  # not an IP (a Unix socket peer): count it as given
        if isinstance(address, ipaddress.IPv6Address):
            if address.ipv4_mapped is not None:
                return str(address.ipv4_mapped)
            network = ipaddress.IPv6Network((address, self.ipv6_prefix), strict=False)
            return str(network)
        return str(address)

    # ------------------------------------------------------------ decisions

    def delay(self, failures: int) -> float:
        """Seconds failure number ``failures`` waits before its 535."""
        if failures <= self.max_failures:
            return 0.0
        return min(self.failure_delay * (failures - self.max_failures), self.max_delay)

    def _live(self, entry: ThrottleEntry | None, now: float) -> ThrottleEntry | None:
        """``entry`` as it stands at ``now``: None once forgotten, stale checks dropped."""
        if entry is None or not entry.live(now, now - self.forget_after):
            return None
        if entry.in_flight and now - entry.last_seen > self.stale_after:
            entry = ThrottleEntry(entry.failures, 0, entry.last_seen, entry.blocked_until)
        return entry

    def decide_admission(
        self, entry: ThrottleEntry | None, now: float
    ) -> tuple[ThrottleEntry | None, Admission]:
        """Admit one attempt (counted in flight), make it wait, or refuse it."""
        live = self._live(entry, now) or ThrottleEntry(0, 0, now, None)
        if live.blocked_until is not None or live.failures >= self.disconnect_after:
            return entry, Admission.REFUSE
        if live.failures + live.in_flight >= self.disconnect_after:
            return entry, Admission.WAIT
        admitted = ThrottleEntry(live.failures, live.in_flight + 1, now, None)
        return admitted, Admission.CHECK

    def decide_failure(
        self, entry: ThrottleEntry | None, now: float
    ) -> tuple[ThrottleEntry | None, ThrottleVerdict]:
        """An admitted attempt failed: count it; the block starts at the limit."""
        live = self._live(entry, now) or ThrottleEntry(0, 1, now, None)
        failures = live.failures + 1
        blocked_until = live.blocked_until
        disconnect = failures >= self.disconnect_after
        if disconnect and blocked_until is None:
            blocked_until = now + self.block_seconds
        new = ThrottleEntry(failures, max(0, live.in_flight - 1), now, blocked_until)
        return new, ThrottleVerdict(failures, self.delay(failures), disconnect)

    def decide_success(self, entry: ThrottleEntry | None, now: float) -> ThrottleEntry | None:
        """An admitted attempt succeeded: failures cleared, unless the client is blocked."""
        live = self._live(entry, now)
        if live is None:
            return None
        in_flight = max(0, live.in_flight - 1)
        if live.blocked_until is not None:
            return ThrottleEntry(live.failures, in_flight, live.last_seen, live.blocked_until)
        if in_flight == 0:
            return None
        return ThrottleEntry(0, in_flight, live.last_seen, None)

    # ----------------------------------------------------------- the store

    async def admit(self, ip: str) -> Admission:
        """Ask before checking a credential from ``ip`` (see :class:`Admission`)."""
        now = self._clock()
        await self._maybe_prune(now)

        def update(entry: ThrottleEntry | None) -> tuple[ThrottleEntry | None, Admission]:
            return self.decide_admission(entry, now)

        return await self.store.throttle_update(self.key_for(ip), update)

    async def failed(self, ip: str) -> ThrottleVerdict:
        """The admitted attempt failed: the verdict for this failure."""
        now = self._clock()

        def update(entry: ThrottleEntry | None) -> tuple[ThrottleEntry | None, ThrottleVerdict]:
            return self.decide_failure(entry, now)

        return await self.store.throttle_update(self.key_for(ip), update)

    async def succeeded(self, ip: str) -> None:
        """The admitted attempt succeeded: forget ``ip``'s failures unless it is blocked."""
        now = self._clock()

        def update(entry: ThrottleEntry | None) -> tuple[ThrottleEntry | None, None]:
            return self.decide_success(entry, now), None

        await self.store.throttle_update(self.key_for(ip), update)

    async def is_blocked(self, ip: str) -> bool:
        """True while ``ip`` must not be served AUTH (read only)."""
        now = self._clock()

        def look(entry: ThrottleEntry | None) -> tuple[ThrottleEntry | None, bool]:
            live = self._live(entry, now)
            return entry, live is not None and live.blocked_until is not None

        return await self.store.throttle_update(self.key_for(ip), look, write=False)

    async def failures(self, ip: str) -> int:
        """Failures currently counted for ``ip`` (read only)."""
        now = self._clock()

        def look(entry: ThrottleEntry | None) -> tuple[ThrottleEntry | None, int]:
            live = self._live(entry, now)
            return entry, 0 if live is None else live.failures

        return await self.store.throttle_update(self.key_for(ip), look, write=False)

    async def _maybe_prune(self, now: float) -> None:
        if now < self._next_prune:
            return
        self._next_prune = now + _PRUNE_INTERVAL
        await self.store.throttle_prune(now, now - self.forget_after, self.max_entries)


#: Seconds between two prunings of the throttle's store by one process.
_PRUNE_INTERVAL: Final = 60.0

#: The accepted ranges of the smtp.ini throttle keys (the config reader uses them).
AUTH_MAX_FAILURES_RANGE: Final = (0, 1_000_000)
AUTH_DISCONNECT_AFTER_RANGE: Final = (1, 1_000_000)


def check_throttle_settings(
    max_failures: int, failure_delay: float, disconnect_after: int, block_seconds: float
) -> None:
    """Raise ValueError unless the four ``smtp.ini`` throttle values are usable.

    The same ranges the config reader enforces, so a config that loads
    always makes a throttle.
    """
    low, high = AUTH_MAX_FAILURES_RANGE
    if not low <= max_failures <= high:
        raise ValueError(f"max_failures must be between {low} and {high}")
    low, high = AUTH_DISCONNECT_AFTER_RANGE
    if not low <= disconnect_after <= high:
        raise ValueError(f"disconnect_after must be between {low} and {high}")
    for name, value in (("failure_delay", failure_delay), ("block_seconds", block_seconds)):
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number of seconds, at least 0")
