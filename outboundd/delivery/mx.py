"""MX resolution: from a recipient domain to the ordered list of addresses to try.

The delivery session needs one thing from DNS: a list of ``(address, port)``
targets in the exact order to try them.  This module produces that list, and
turns every way DNS can fail into an :class:`MXResolutionError` that says
whether the failure is permanent (bounce) or temporary (defer), with an SMTP
code, an enhanced status and a sentence a user can read.  dnspython's
exceptions never leave this module.

The rules (RFC 5321 §5.1, RFC 7505, Haraka's ``outbound.ini``):

* MX records are sorted by preference; hosts of equal preference are shuffled
  uniformly (Fisher-Yates with an injectable ``random.Random``).
* No MX RRset but the domain exists (NODATA): the domain itself is the
  implicit MX, preference 0.
* NXDOMAIN for the domain: permanent ``550 5.1.2``.
* Null MX (RFC 7505: the MX RRset holds only ``0 .``): permanent
  ``556 5.1.10``.  An RRset that mixes ``.`` with real hosts is treated as the
  real hosts (the ``.`` entries are ignored).
* SERVFAIL, REFUSED, timeout, no configured nameserver: temporary
  ``451 4.4.3``.
* Each MX host is resolved to AAAA and A concurrently.  ``inet_prefer`` orders
  the addresses of one preference level by family (``v4``: IPv4 first;
  ``v6`` and ``default``: IPv6 first, which is what Haraka documents for
  ``default`` — "prefer IPv6 at equal MX priority"); it never moves an
  address across preference levels.
* With ``local_mx_ok=False`` addresses of DNS-derived hosts (and of domain
  literals, which come from the untrusted recipient address) that are
  loopback, link-local, unspecified, multicast, reserved or one of this
  host's own addresses are skipped, so that a hostile or broken zone cannot
  make us deliver to ourselves.  Plugin-given MX hosts are used as given.
* When no usable address remains: temporary ``451 4.4.4``, except that when
  *every* MX host of a DNS-derived list does not exist (NXDOMAIN) the
  failure is permanent ``550 5.4.4`` — retrying cannot help a domain whose
  mail exchangers are all names that do not exist (Postfix bounces this
  case too).  When every host failed with a temporary DNS error the result
  is ``451 4.4.3``.
* An MX exchange written as an IP address (a common misconfiguration) is
  used as that address, as Haraka does; it is still subject to the
  ``local_mx_ok`` filter.
* Answers are cached by ``(name, type)`` for their TTL (the minimum over the
  answer, CNAME chain included); NXDOMAIN and NODATA for
  ``min(SOA TTL, SOA minimum, 60 s)`` and not at all without an SOA
  (RFC 2308 §5); failures are never cached.  Concurrent lookups of the same
  ``(name, type)`` share one query.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import ipaddress
import random
import re
import socket
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, TypeAlias, get_args

import dns.asyncresolver
import dns.exception
import dns.message
import dns.name
import dns.nameserver
import dns.rdata
import dns.rdatatype
import dns.rdtypes.ANY.MX
import dns.rdtypes.ANY.SOA
import dns.rdtypes.IN.A
import dns.rdtypes.IN.AAAA
import dns.resolver

from outboundd import idn
from outboundd.hooks import MX

__all__ = [
    "DEFAULT_LMTP_PORT",
    "NEGATIVE_TTL_CAP",
    "InetPrefer",
    "MXResolutionError",
    "MXResolver",
    "MXTarget",
    "gather_local_addresses",
    "is_local_address",
    "normalize_mx_result",
    "order_targets",
]

InetPrefer: TypeAlias = Literal["default", "v4", "v6"]

#: Port for ``lmtp://host`` without a port (LMTP's customary TCP port).
DEFAULT_LMTP_PORT = 24

#: Longest time a negative answer (NXDOMAIN, NODATA) is cached, in seconds.
NEGATIVE_TTL_CAP = 60.0

_LABEL_RE = re.compile(r"^[A-Za-z0-9_](?:[A-Za-z0-9_-]*[A-Za-z0-9_])?$")
_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")
_MAX_REPR = 120


class MXResolutionError(Exception):
    """Resolution failed; ``permanent`` says whether to bounce or defer.

    ``code`` is the SMTP reply code to record (550/556/451), ``status`` the
    RFC 3463 enhanced status, and ``message`` (also ``str(exc)``) a sentence
    for the DSN, the log and ``outboundctl``.
    """

    def __init__(self, message: str, *, permanent: bool, code: int, status: str) -> None:
        super().__init__(message)
        self.message = message
        self.permanent = permanent
        self.code = code
        self.status = status

    def __repr__(self) -> str:
        return (
            f"MXResolutionError({self.message!r}, permanent={self.permanent}, "
            f"code={self.code}, status={self.status!r})"
        )


@dataclass(frozen=True, slots=True)
class MXTarget:
    """One address to connect to, with the MX it came from.

    ``hostname`` is the MX host in ASCII (A-label) form without the final
    dot — the name for SNI and log lines; for an IP-literal MX it is the
    address itself.
    """

    mx: MX
    address: str
    port: int
    hostname: str


class _HostPort(Protocol):
    @property
    def host(self) -> str: ...

    @property
    def port(self) -> int: ...


#: A nameserver as ``(ip, port)`` or any object with ``host`` and ``port``.
NameserverSpec: TypeAlias = "tuple[str, int] | _HostPort"


# --------------------------------------------------------------------------
# Pure helpers


@functools.lru_cache(maxsize=4096)
def _ip_literal(text: str) -> str | None:
    """The canonical form of ``text`` if it is an IPv4/IPv6 address, else None.

    Cached: every delivery asks this of the same few MX names and addresses,
    and ``ipaddress`` parsing was 6% of the delivery process's time.

    An IPv6 address with a zone ID (``fe80::1%eth0``, which ``ipaddress``
    accepts) is not an address here: RFC 5321's ``IPv6-addr`` has no zone,
    and a zone names an interface of whoever wrote it — connecting to one
    from a recipient address, a DNS answer or a plugin would reach a
    link-local neighbour of ours, or hang until the connect timeout.
    """
    if "%" in text:
        return None
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


@functools.lru_cache(maxsize=1024)
def _literal_target(mx: MX, default_port: int) -> MXTarget | None:
    """The target of an MX whose exchange is an IP address (what order_targets gives it)."""
    address = _ip_literal(mx.exchange)
    if address is None:
        return None
    return MXTarget(mx=mx, address=address, port=mx.port or default_port, hostname=address)


def _short_repr(value: object) -> str:
    text = repr(value)
    return text if len(text) <= _MAX_REPR else text[: _MAX_REPR - 3] + "..."


def _to_name(host: str) -> dns.name.Name:
    """Convert a (possibly Unicode) host name to an absolute DNS name.

    Raises ``ValueError`` for anything that is not a plausible mail domain:
    empty, whitespace, the root, or a label outside letters/digits/hyphen
    (underscore tolerated) after IDNA 2008 (UTS #46) conversion — the same
    conversion submission applies at RCPT (:mod:`outboundd.idn`).
    """
    text = host.strip()
    if not text or text == "." or any(ch.isspace() for ch in text):
        raise ValueError(f"invalid domain name {host!r}")
    name = idn.to_name(text)  # InvalidDomain is a ValueError
    labels = name.labels[:-1]
    if not labels:
        raise ValueError(f"invalid domain name {host!r}")
    for label in labels:
        try:
            ascii_label = label.decode("ascii")
        except UnicodeDecodeError:
            raise ValueError(f"invalid domain name {host!r}") from None
        if not _LABEL_RE.match(ascii_label):
            raise ValueError(f"invalid domain name {host!r}: bad label {ascii_label!r}")
    return name


def _ascii_host(exchange: str) -> str:
    """The A-label form of ``exchange`` without the final dot, for SNI and logs."""
    literal = _ip_literal(exchange)
    if literal is not None:
        return literal
    try:
        return _to_name(exchange).to_text(omit_final_dot=True).lower()
    except ValueError:
        return exchange.rstrip(".")


def is_local_address(address: str, local_addresses: frozenset[str] = frozenset()) -> bool:
    """True for an address we must never deliver to when ``local_mx_ok`` is off.

    Loopback, link-local, unspecified (and the rest of 0.0.0.0/8), multicast,
    IPv4 reserved (240/4, including broadcast), and this host's own addresses
    (``local_addresses``, canonical text).  IPv4-mapped IPv6 addresses are
    judged by the IPv4 address they carry.  Anything that is not an address
    at all (a zone ID included) counts as local: refusing is the safe answer.
    """
    if "%" in address:
        return True
    try:
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(address)
    except ValueError:
        return True
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback or ip.is_link_local or ip.is_unspecified or ip.is_multicast:
        return True
    if isinstance(ip, ipaddress.IPv4Address) and (ip.is_reserved or ip in _THIS_NETWORK):
        return True
    return str(ip) in local_addresses


def _family_rank(address: str, inet_prefer: InetPrefer) -> int:
    is_v6 = ":" in address
    if inet_prefer == "v4":
        return 1 if is_v6 else 0
    return 0 if is_v6 else 1


def order_targets(
    mxs: Sequence[MX],
    addresses: Mapping[str, Sequence[str]],
    *,
    default_port: int,
    inet_prefer: InetPrefer = "default",
    local_mx_ok: bool = False,
    local_addresses: frozenset[str] = frozenset(),
    rng: random.Random | None = None,
) -> list[MXTarget]:
    """Order resolved MX hosts into the list of targets to try, without I/O.

    ``addresses`` maps each MX's ``exchange`` (exactly as written in the MX)
    to its addresses in the order DNS gave them; an MX whose exchange is an
    IP literal needs no entry.  Preference levels are visited in ascending
    order; inside a level the hosts are put in a canonical order, shuffled
    with ``rng`` (so a seeded rng is reproducible), and their
    addresses stably sorted by family per ``inet_prefer``.  Addresses of
    ``from_dns`` hosts that :func:`is_local_address` rejects are dropped
    unless ``local_mx_ok``.  An ``(address, port)`` pair appears once, at its
    first (best) position.  The port is ``mx.port or default_port``.
    """
    shuffle = (rng or random.Random()).shuffle
    levels: dict[int, list[MX]] = {}
    for mx in mxs:
        levels.setdefault(mx.priority, []).append(mx)
    seen: set[tuple[str, int]] = set()
    targets: list[MXTarget] = []
    for priority in sorted(levels):
        # Sort first: DNS servers rotate RRsets, and a seeded rng must give
        # the same order whatever order the answer arrived in.
        hosts = sorted(levels[priority], key=lambda mx: (mx.exchange.lower(), mx.port or 0))
        shuffle(hosts)
        level: list[MXTarget] = []
        for mx in hosts:
            port = mx.port or default_port
            literal = _ip_literal(mx.exchange)
            host_addresses = [literal] if literal is not None else addresses.get(mx.exchange, ())
            hostname = _ascii_host(mx.exchange)
            for raw in host_addresses:
                address = _ip_literal(raw)
                if address is None:
                    continue
                if mx.from_dns and not local_mx_ok and is_local_address(address, local_addresses):
                    continue
                level.append(MXTarget(mx=mx, address=address, port=port, hostname=hostname))
        level.sort(key=lambda target: _family_rank(target.address, inet_prefer))
        for target in level:
            key = (target.address, target.port)
            if key not in seen:
                seen.add(key)
                targets.append(target)
    return targets


# --------------------------------------------------------------------------
# get_mx plugin results

_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$", re.DOTALL)
_EXPECTED = (
    "expected an MX, a list of MX, 'host', 'host:port', '[ipv6]:port', "
    "'lmtp://host[:port]' or 'smtp://host[:port]'"
)


def _check_port(port: object, given: object) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"get_mx result {_short_repr(given)}: port {port!r} is not 1-65535")
    return port


def _check_host(host: str, given: object) -> str:
    """Validate a host name or IP literal (brackets and ``IPv6:`` removed)."""
    if host.startswith("[") and host.endswith("]"):
        inner = host[1:-1]
        if inner[:5].lower() == "ipv6:":
            inner = inner[5:]
        literal = _ip_literal(inner)
        if literal is None:
            raise ValueError(f"get_mx result {_short_repr(given)}: {host!r} is not an IP address")
        return literal
    literal = _ip_literal(host)
    if literal is not None:
        return literal
    try:
        _to_name(host)
    except ValueError as exc:
        raise ValueError(f"get_mx result {_short_repr(given)}: {exc}") from None
    return host.strip().rstrip(".")


@functools.lru_cache(maxsize=1024)
def _parse_mx_string(text: str, default_port: int) -> MX:
    # Cached (MX is frozen): a routing plugin returns the same string for
    # every message.  Errors are raised anew each time, never cached.
    given = text
    rest = text.strip()
    if not rest:
        raise ValueError(f"get_mx returned an empty string; {_EXPECTED}")
    using_lmtp = False
    port_default = default_port
    match = _SCHEME_RE.match(rest)
    if match is not None:
        scheme = match.group(1).lower()
        if scheme not in ("smtp", "lmtp"):
            raise ValueError(
                f"get_mx returned {_short_repr(given)}: unknown scheme {scheme!r}; {_EXPECTED}"
            )
        using_lmtp = scheme == "lmtp"
        if using_lmtp:
            port_default = DEFAULT_LMTP_PORT
        rest = match.group(2)
        if rest.endswith("/"):
            rest = rest[:-1]
    port: int | None = None
    if rest.startswith("["):
        close = rest.find("]")
        if close < 0:
            raise ValueError(f"get_mx returned {_short_repr(given)}: missing ']'")
        host = rest[: close + 1]
        after = rest[close + 1 :]
        if after:
            if not after.startswith(":"):
                raise ValueError(
                    f"get_mx returned {_short_repr(given)}: unexpected {after!r} after ']'"
                )
            port_text = after[1:]
            if not port_text.isdigit():
                raise ValueError(f"get_mx returned {_short_repr(given)}: bad port {port_text!r}")
            port = _check_port(int(port_text), given)
    elif rest.count(":") == 1:
        host, port_text = rest.split(":")
        if not port_text.isdigit():
            raise ValueError(f"get_mx returned {_short_repr(given)}: bad port {port_text!r}")
        port = _check_port(int(port_text), given)
    elif rest.count(":") > 1:
        if _ip_literal(rest) is None:
            raise ValueError(
                f"get_mx returned {_short_repr(given)}: not an IPv6 address; "
                "write an IPv6 address with a port as '[addr]:port'"
            )
        host = rest
    else:
        host = rest
    if not host:
        raise ValueError(f"get_mx returned {_short_repr(given)}: no host; {_EXPECTED}")
    exchange = _check_host(host, given)
    return MX(exchange=exchange, port=port or port_default, priority=0, using_lmtp=using_lmtp)


def _check_mx(mx: MX) -> MX:
    if not isinstance(mx.exchange, str) or not mx.exchange.strip():
        raise ValueError(f"get_mx returned {_short_repr(mx)}: exchange must be a host name or IP")
    if mx.port is not None:
        _check_port(mx.port, mx)
    if isinstance(mx.priority, bool) or not isinstance(mx.priority, int) or mx.priority < 0:
        raise ValueError(
            f"get_mx returned {_short_repr(mx)}: priority {mx.priority!r} is not an integer >= 0"
        )
    exchange = _check_host(mx.exchange.strip(), mx)
    return mx if exchange == mx.exchange else dataclasses.replace(mx, exchange=exchange)


def normalize_mx_result(value: object, *, default_port: int) -> list[MX]:
    """Turn a ``get_mx`` plugin's ``ok(value)`` into a list of :class:`MX`.

    Accepts an ``MX``, a non-empty list/tuple of ``MX`` or strings, or one
    string: ``host``, ``host:port``, ``ip``, ``ip:port``, ``[ipv6]``,
    ``[ipv6]:port`` (``[IPv6:addr]`` too), a bare IPv6 address,
    ``smtp://host[:port]`` or ``lmtp://host[:port]`` (``using_lmtp=True``).
    A string without a port gets ``default_port`` (``DEFAULT_LMTP_PORT`` for
    LMTP); an ``MX`` object is kept as given (``port=None`` means the
    resolver's ``mx_port``), except that a bracketed IP exchange is unwrapped.
    Anything else raises ``ValueError`` naming what was given, so the caller
    can defer with a clear log line instead of a traceback.
    """
    if isinstance(value, MX):
        return [_check_mx(value)]
    if isinstance(value, str):
        return [_parse_mx_string(value, default_port)]
    if isinstance(value, list | tuple):
        if not value:
            raise ValueError(f"get_mx returned an empty list; {_EXPECTED}")
        result: list[MX] = []
        for index, item in enumerate(value):
            if isinstance(item, MX):
                result.append(_check_mx(item))
            elif isinstance(item, str):
                result.append(_parse_mx_string(item, default_port))
            else:
                raise ValueError(
                    f"get_mx returned a list whose item {index} is "
                    f"{type(item).__name__} {_short_repr(item)}; {_EXPECTED}"
                )
        return result
    raise ValueError(f"get_mx returned {type(value).__name__} {_short_repr(value)}; {_EXPECTED}")


# --------------------------------------------------------------------------
# This host's addresses


def _proc_ipv4_local() -> set[str]:
    """IPv4 addresses marked ``/32 host LOCAL`` in Linux's /proc/net/fib_trie."""
    found: set[str] = set()
    try:
        lines = Path("/proc/net/fib_trie").read_text().splitlines()
    except OSError:
        return found
    last: str | None = None
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("|--"):
            last = stripped[3:].strip()
        elif last is not None and stripped.startswith("/32 host LOCAL"):
            found.add(last)
    return found


def _proc_ipv6_local() -> set[str]:
    """Interface IPv6 addresses from Linux's /proc/net/if_inet6."""
    found: set[str] = set()
    try:
        lines = Path("/proc/net/if_inet6").read_text().splitlines()
    except OSError:
        return found
    for line in lines:
        fields = line.split()
        if fields and len(fields[0]) == 32:
            hexed = fields[0]
            found.add(":".join(hexed[i : i + 4] for i in range(0, 32, 4)))
    return found


def gather_local_addresses() -> frozenset[str]:
    """This host's own addresses, best effort, in canonical text form.

    Python has no portable interface listing, so this combines the addresses
    the host name resolves to with Linux's /proc tables when present.  Every
    source is optional; loopback and friends are rejected by
    :func:`is_local_address` regardless.  Blocking: call it in a thread.
    """
    raw: set[str] = set()
    try:
        for info in socket.getaddrinfo(socket.gethostname(), None):
            raw.add(str(info[4][0]).split("%", 1)[0])
    except (OSError, UnicodeError):
        pass
    raw |= _proc_ipv4_local()
    raw |= _proc_ipv6_local()
    canonical = {_ip_literal(item) for item in raw}
    return frozenset(item for item in canonical if item is not None)


# --------------------------------------------------------------------------
# DNS with a TTL cache


class _DNSFailure(Exception):
    """A lookup failed temporarily (SERVFAIL, timeout, no nameservers)."""


_Kind = Literal["answer", "nxdomain", "nodata"]


@dataclass(frozen=True, slots=True)
class _Lookup:
    kind: _Kind
    records: tuple[dns.rdata.Rdata, ...] = ()


_CacheKey: TypeAlias = tuple[dns.name.Name, dns.rdatatype.RdataType]


class _TTLCache:
    """An LRU of lookups bounded by entry count, each expiring at its own time."""

    def __init__(self, size: int, clock: Callable[[], float]) -> None:
        self._size = size
        self._clock = clock
        self._entries: OrderedDict[_CacheKey, tuple[float, _Lookup]] = OrderedDict()

    def get(self, key: _CacheKey) -> _Lookup | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires_at, value = entry
        if self._clock() >= expires_at:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return value

    def put(self, key: _CacheKey, value: _Lookup, ttl: float) -> None:
        if self._size <= 0 or ttl <= 0:
            return
        self._entries[key] = (self._clock() + ttl, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


def _negative_ttl(responses: Iterable[dns.message.Message]) -> float | None:
    """RFC 2308 negative TTL from the SOA in the authority section, capped."""
    best: float | None = None
    for response in responses:
        for rrset in response.authority:
            if rrset.rdtype != dns.rdatatype.SOA:
                continue
            for rdata in rrset:
                if isinstance(rdata, dns.rdtypes.ANY.SOA.SOA):
                    ttl = float(min(rrset.ttl, rdata.minimum))
                    best = ttl if best is None else min(best, ttl)
    if best is None:
        return None
    return min(best, NEGATIVE_TTL_CAP)


def _failure_text(exc: dns.resolver.NoNameservers) -> str:
    """The rcodes the nameservers answered, e.g. ``SERVFAIL``, for the log."""
    reasons: list[str] = []
    errors = exc.kwargs.get("errors") or []
    for error in errors:
        reason = error[3] if len(error) > 3 else None
        text = reason if isinstance(reason, str) else type(reason).__name__
        if text not in reasons:
            reasons.append(text)
    return ", ".join(reasons) if reasons else "no nameserver answered"


@dataclass(slots=True)
class _HostResult:
    addresses: list[str]
    nxdomain: bool = False
    temporary: str | None = None
    invalid: str | None = None


def _nameserver(spec: NameserverSpec) -> dns.nameserver.Do53Nameserver:
    if isinstance(spec, tuple):
        host, port = spec
    else:
        host, port = spec.host, spec.port
    host = host.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    address = _ip_literal(host)
    if address is None:
        raise ValueError(f"nameserver {host!r} is not an IP address")
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"nameserver {host}: port {port!r} is not 1-65535")
    return dns.nameserver.Do53Nameserver(address, port)


class MXResolver:
    """Resolves a domain (or a plugin's MX list) to the targets to try.

    ``nameservers``: ``(ip, port)`` pairs (or objects with ``host``/``port``,
    such as the config's ``HostPort``); ``None`` or empty uses the system
    resolver (``/etc/resolv.conf``).  ``timeout``: seconds one lookup may take
    across all retries and servers.  ``local_addresses``: this host's own
    addresses; ``None`` gathers them once, lazily, in a thread.  ``clock``
    (monotonic seconds) and ``rng`` are injectable for tests.
    """

    def __init__(
        self,
        nameservers: Sequence[NameserverSpec] | None = None,
        *,
        timeout: float = 5.0,
        mx_port: int = 25,
        inet_prefer: InetPrefer = "default",
        local_mx_ok: bool = False,
        cache_size: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        local_addresses: frozenset[str] | None = None,
    ) -> None:
        if inet_prefer not in get_args(InetPrefer):
            raise ValueError(f"inet_prefer must be default, v4 or v6, not {inet_prefer!r}")
        if isinstance(mx_port, bool) or not isinstance(mx_port, int) or not 1 <= mx_port <= 65535:
            raise ValueError(f"mx_port {mx_port!r} is not 1-65535")
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, not {timeout!r}")
        if cache_size < 0:
            raise ValueError(f"cache_size must not be negative, not {cache_size!r}")
        self.timeout = float(timeout)
        self.mx_port = mx_port
        self.inet_prefer: InetPrefer = inet_prefer
        self.local_mx_ok = local_mx_ok
        self._rng = rng if rng is not None else random.Random()
        self._cache = _TTLCache(cache_size, clock)
        self._inflight: dict[_CacheKey, asyncio.Task[_Lookup]] = {}
        self._local_addresses: frozenset[str] | None = None
        if local_addresses is not None:
            canonical = (_ip_literal(item) for item in local_addresses)
            self._local_addresses = frozenset(item for item in canonical if item is not None)
        self._resolver: dns.asyncresolver.Resolver | None = None
        self._config_error: str | None = None
        if nameservers:
            servers = [_nameserver(spec) for spec in nameservers]
            self._resolver = dns.asyncresolver.Resolver(configure=False)
            self._resolver.nameservers = servers
        else:
            try:
                self._resolver = dns.asyncresolver.Resolver(configure=True)
            except (dns.exception.DNSException, OSError) as exc:
                self._config_error = f"no usable system resolver configuration ({exc})"
        if self._resolver is not None:
            self._resolver.lifetime = self.timeout
            self._resolver.timeout = min(self.timeout, 2.0)
            self._resolver.cache = None

    # ---- public API

    async def resolve(self, domain: str) -> list[MXTarget]:
        """The targets for ``domain`` in the order to try; raises MXResolutionError."""
        domain = domain.strip()
        if domain.startswith("["):
            return await self._literal_targets(domain)
        try:
            name = _to_name(domain)
        except ValueError as exc:
            raise MXResolutionError(str(exc), permanent=True, code=550, status="5.1.2") from None
        try:
            lookup = await self._lookup(name, dns.rdatatype.MX)
        except _DNSFailure as exc:
            raise MXResolutionError(
                f"DNS lookup for {domain} failed: {exc}", permanent=False, code=451, status="4.4.3"
            ) from None
        if lookup.kind == "nxdomain":
            raise MXResolutionError(
                f"no such domain: {domain} (NXDOMAIN)", permanent=True, code=550, status="5.1.2"
            )
        ascii_domain = name.to_text(omit_final_dot=True).lower()
        if lookup.kind == "nodata":
            mxs = [MX(exchange=ascii_domain, priority=0, from_dns=True)]
        else:
            records = [r for r in lookup.records if isinstance(r, dns.rdtypes.ANY.MX.MX)]
            real = [r for r in records if r.exchange != dns.name.root]
            if not real:
                if records:
                    raise MXResolutionError(
                        f"null MX for {domain}: the domain does not accept mail (RFC 7505)",
                        permanent=True,
                        code=556,
                        status="5.1.10",
                    )
                mxs = [MX(exchange=ascii_domain, priority=0, from_dns=True)]
            else:
                mxs = [
                    MX(
                        exchange=r.exchange.to_text(omit_final_dot=True).lower(),
                        priority=int(r.preference),
                        from_dns=True,
                    )
                    for r in real
                ]
        return await self._targets(mxs, domain, dns_derived=True)

    async def resolve_mxs(self, mxs: Sequence[MX], domain: str) -> list[MXTarget]:
        """Targets for MX hosts a ``get_mx`` plugin gave (see normalize_mx_result).

        Names are resolved to AAAA/A; IP literals are used directly.  No
        local-address filtering unless an MX claims ``from_dns``.  ``domain``
        is the recipient domain, for error messages.  Failures are temporary:
        a plugin's routing is the operator's to fix, not the sender's fault.
        """
        if not mxs:
            raise MXResolutionError(
                f"get_mx for {domain} gave no MX hosts", permanent=False, code=451, status="4.4.4"
            )
        return await self._targets(list(mxs), domain, dns_derived=False)

    def cache_entries(self) -> int:
        """How many (name, type) answers are cached now (for stats and tests)."""
        return len(self._cache)

    # ---- targets

    async def _local(self) -> frozenset[str]:
        if self._local_addresses is None:
            self._local_addresses = await asyncio.to_thread(gather_local_addresses)
        return self._local_addresses

    async def _literal_targets(self, domain: str) -> list[MXTarget]:
        """RFC 5321 §4.1.3 address literals: ``[1.2.3.4]``, ``[IPv6:::1]``."""
        if not domain.endswith("]"):
            raise MXResolutionError(
                f"invalid address literal {domain!r}", permanent=True, code=550, status="5.1.2"
            )
        inner = domain[1:-1]
        tagged_v6 = inner[:5].lower() == "ipv6:"
        if tagged_v6:
            inner = inner[5:]
        address = _ip_literal(inner)
        if address is None or (tagged_v6 and ":" not in address):
            why = " (an IPv6 zone ID is not allowed)" if "%" in inner else ""
            raise MXResolutionError(
                f"invalid address literal {domain!r}{why}",
                permanent=True,
                code=550,
                status="5.1.2",
            )
        if not self.local_mx_ok and is_local_address(address, await self._local()):
            raise MXResolutionError(
                f"address literal {domain} is a local address and local_mx_ok is off",
                permanent=True,
                code=550,
                status="5.4.4",
            )
        if ":" in address and ipaddress.IPv6Address(address).is_link_local:
            # Even with local_mx_ok: fe80::/10 is reachable only through a zone
            # ID, which a literal may not carry, so every connect would fail.
            raise MXResolutionError(
                f"address literal {domain} is IPv6 link-local: no host can be reached "
                "by it without a zone ID",
                permanent=True,
                code=550,
                status="5.4.4",
            )
        mx = MX(exchange=address, priority=0)
        return [MXTarget(mx=mx, address=address, port=self.mx_port, hostname=address)]

    async def _targets(self, mxs: list[MX], domain: str, *, dns_derived: bool) -> list[MXTarget]:
        if len(mxs) == 1 and not mxs[0].from_dns:
            # The common plugin answer, one IP-literal MX: nothing to resolve or order.
            single = _literal_target(mxs[0], self.mx_port)
            if single is not None:
                return [single]
        names = list(dict.fromkeys(mx.exchange for mx in mxs if _ip_literal(mx.exchange) is None))
        results = await asyncio.gather(*(self._host(name) for name in names))
        by_name = dict(zip(names, results, strict=True))
        needs_filter = not self.local_mx_ok and any(mx.from_dns for mx in mxs)
        local = await self._local() if needs_filter else frozenset()
        targets = order_targets(
            mxs,
            {name: result.addresses for name, result in by_name.items()},
            default_port=self.mx_port,
            inet_prefer=self.inet_prefer,
            local_mx_ok=self.local_mx_ok,
            local_addresses=local,
            rng=self._rng,
        )
        if targets:
            return targets
        raise self._no_targets(mxs, by_name, domain, dns_derived=dns_derived)

    def _no_targets(
        self,
        mxs: list[MX],
        by_name: dict[str, _HostResult],
        domain: str,
        *,
        dns_derived: bool,
    ) -> MXResolutionError:
        """Explain why no MX host gave a usable address, as the right error."""
        details: list[str] = []
        for exchange in dict.fromkeys(mx.exchange for mx in mxs):
            result = by_name.get(exchange)
            if result is None:
                details.append(f"{exchange} (local address, local_mx_ok is off)")
            elif result.invalid is not None:
                details.append(f"{exchange} ({result.invalid})")
            elif result.nxdomain:
                details.append(f"{exchange} (NXDOMAIN)")
            elif result.temporary is not None:
                details.append(f"{exchange} (DNS {result.temporary})")
            elif result.addresses:
                shown = ", ".join(result.addresses)
                details.append(f"{exchange} (only local addresses {shown}; local_mx_ok is off)")
            else:
                details.append(f"{exchange} (no A/AAAA records)")
        summary = "; ".join(details)
        results = [by_name.get(mx.exchange) for mx in mxs]
        if dns_derived and results and all(r is not None and r.nxdomain for r in results):
            return MXResolutionError(
                f"no MX host for {domain} exists: {summary}",
                permanent=True,
                code=550,
                status="5.4.4",
            )
        if results and all(r is not None and r.temporary is not None for r in results):
            return MXResolutionError(
                f"DNS lookup for the MX hosts of {domain} failed: {summary}",
                permanent=False,
                code=451,
                status="4.4.3",
            )
        return MXResolutionError(
            f"no usable MX addresses for {domain}: {summary}",
            permanent=False,
            code=451,
            status="4.4.4",
        )

    async def _host(self, exchange: str) -> _HostResult:
        """AAAA and A for one MX host, concurrently; failures become data."""
        try:
            name = _to_name(exchange)
        except ValueError as exc:
            return _HostResult(addresses=[], invalid=str(exc))
        outcomes = await asyncio.gather(
            self._lookup(name, dns.rdatatype.AAAA),
            self._lookup(name, dns.rdatatype.A),
            return_exceptions=True,
        )
        result = _HostResult(addresses=[])
        nxdomain = 0
        for outcome in outcomes:
            if isinstance(outcome, _DNSFailure):
                result.temporary = str(outcome)
            elif isinstance(outcome, BaseException):
                raise outcome
            elif outcome.kind == "nxdomain":
                nxdomain += 1
            else:
                for rdata in outcome.records:
                    if isinstance(rdata, dns.rdtypes.IN.A.A | dns.rdtypes.IN.AAAA.AAAA):
                        address = _ip_literal(str(rdata.address))
                        if address is not None and address not in result.addresses:
                            result.addresses.append(address)
        if result.addresses:
            result.temporary = None
        result.nxdomain = nxdomain == len(outcomes)
        return result

    # ---- DNS

    async def _lookup(self, name: dns.name.Name, rdtype: dns.rdatatype.RdataType) -> _Lookup:
        """A cached or in-flight answer for ``(name, rdtype)``, else one query."""
        key: _CacheKey = (name, rdtype)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.ensure_future(self._query(name, rdtype))
            self._inflight[key] = task
            task.add_done_callback(lambda done: self._finished(key, done))
        return await asyncio.shield(task)

    def _finished(self, key: _CacheKey, task: asyncio.Task[_Lookup]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # retrieved: every waiter may have gone away

    async def _query(self, name: dns.name.Name, rdtype: dns.rdatatype.RdataType) -> _Lookup:
        if self._resolver is None:
            raise _DNSFailure(self._config_error or "no nameservers configured")
        key: _CacheKey = (name, rdtype)
        try:
            answer = await self._resolver.resolve(
                name, rdtype, raise_on_no_answer=False, search=False
            )
        except dns.resolver.NXDOMAIN as exc:
            lookup = _Lookup("nxdomain")
            responses: dict[dns.name.Name, dns.message.Message] = exc.kwargs.get("responses") or {}
            ttl = _negative_ttl(responses.values())
            if ttl is not None:
                self._cache.put(key, lookup, ttl)
            return lookup
        except dns.resolver.LifetimeTimeout:
            raise _DNSFailure(f"timed out after {self.timeout:g}s") from None
        except dns.resolver.NoNameservers as exc:
            raise _DNSFailure(_failure_text(exc)) from None
        except dns.resolver.YXDOMAIN:
            raise _DNSFailure("YXDOMAIN") from None
        except dns.exception.DNSException as exc:
            raise _DNSFailure(f"{type(exc).__name__}: {exc}") from None
        if answer.rrset is None:
            lookup = _Lookup("nodata")
            ttl = _negative_ttl([answer.response])
            if ttl is not None:
                self._cache.put(key, lookup, ttl)
            return lookup
        lookup = _Lookup("answer", tuple(answer.rrset))
        self._cache.put(key, lookup, float(answer.chaining_result.minimum_ttl))
        return lookup
