"""The lookups behind outbound TLS policy: DNSSEC-aware DNS, the MTA-STS fetch, the cache.

:class:`TlsPolicySource` gives each MX target of a DNS-routed delivery its
:class:`~outboundd.delivery.tlspolicy.TargetPolicy` (the rules themselves
are the pure functions of :mod:`outboundd.delivery.tlspolicy`):

* DANE: the TLSA RRset at ``_<port>._tcp.<mx>`` (``_25._tcp`` for the
  usual port) is asked of ``outbound.ini nameservers`` with the EDNS DO bit
  and the AD bit set in the query.  The relay does not validate DNSSEC
  itself: it trusts the AD bit of the answer, so the configured resolver
  must validate and the path to it must be trusted (a resolver on the same
  host), as Postfix's ``smtp_dns_support_level = dnssec`` does.  An answer
  without AD is insecure: DANE does not apply.  A failed TLSA lookup (for
  instance SERVFAIL for a bogus signature) counts as bogus when the MX
  host's own address records are signed (AD), else as insecure.
* MTA-STS: the ``_mta-sts.<domain>`` TXT record's ``id`` is compared with
  the cached policy's; a new id, or a cached policy past its ``max_age``,
  fetches ``https://mta-sts.<domain>/.well-known/mta-sts.txt`` (httpx; the
  name resolved through the same nameservers, the certificate verified
  against the system CAs or ``mta_sts_ca_file``; no redirects; 200 and
  ``text/plain`` only; at most 64 KiB; the whole fetch bounded by
  ``mta_sts_timeout``).  Policies are cached in the spool
  (``Spool.get_sts_policy`` / ``put_sts_policy``) so every process shares
  them and they survive restarts; a fetch that fails keeps using a cached
  policy that has not expired, and is not retried for a minute.

DNS answers are cached in-process for their TTL (negative answers for
their SOA's negative TTL, failures and both at most a minute), so a busy domain costs no lookups per
message.  Nothing here raises for what DNS or a web server does.
"""

from __future__ import annotations

import asyncio
import ipaddress
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Literal, TypeVar

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.message
import dns.nameserver
import dns.rdata
import dns.rdtypes.ANY.SOA
import dns.rdtypes.ANY.TLSA
import dns.rdtypes.ANY.TXT
import dns.rdtypes.IN.A
import dns.rdtypes.IN.AAAA
import dns.resolver

from outboundd import log
from outboundd.delivery.mx import MXTarget
from outboundd.delivery.tlspolicy import (
    STS_POLICY_MAX_BYTES,
    DaneLookup,
    PolicyError,
    StsMode,
    StsPolicy,
    Tlsa,
    parse_sts_policy,
    sts_record_id,
    target_policy,
)
from outboundd.spool import Spool, SpoolError, StoredStsPolicy

if TYPE_CHECKING:
    import httpx

__all__ = ["PolicyFetchError", "TlsPolicyOptions", "TlsPolicySource"]

LOG = log.get_logger("delivery")

_K = TypeVar("_K")
_V = TypeVar("_V")

#: Longest time a negative or failed DNS answer is kept, in seconds.
NEGATIVE_TTL = 60.0
#: How long a failed policy fetch is not retried (a cached policy still applies).
FETCH_RETRY_AFTER = 60.0
#: How long a spool read of a domain's cached policy is reused in-process.
MEMO_SECONDS = 300.0
_MAX_ENTRIES = 10_000


def _httpx() -> ModuleType:
    """httpx, imported on the first MTA-STS policy fetch: it costs every
    process ~12 MB, and most never fetch a policy (no ``_mta-sts`` record)."""
    import httpx

    return httpx


class PolicyFetchError(Exception):
    """The MTA-STS policy could not be fetched or read; the text says why."""


@dataclass(frozen=True, slots=True)
class TlsPolicyOptions:
    """``outbound.ini``'s TLS policy keys (re-read on reload)."""

    mta_sts: bool = True
    dane: bool = True
    fetch_timeout: float = 10.0
    https_port: int = 443
    ca_file: Path | None = None


@dataclass(frozen=True, slots=True)
class _Answer:
    kind: Literal["answer", "nodata", "nxdomain", "failure"]
    records: tuple[dns.rdata.Rdata, ...] = ()
    secure: bool = False
    error: str | None = None


class TlsPolicySource:
    """Gives DNS-routed targets their DANE / MTA-STS policy (module doc).

    ``nameservers``: ``(ip, port)`` pairs; empty or None uses the system
    resolver.  ``clock`` is POSIX seconds (policy ages, cache expiry).
    """

    def __init__(
        self,
        spool: Spool,
        nameservers: Sequence[tuple[str, int]] | None = None,
        *,
        dns_timeout: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.spool = spool
        self.clock = clock
        self._resolver: dns.asyncresolver.Resolver | None = None
        self._config_error: str | None = None
        try:
            if nameservers:
                self._resolver = dns.asyncresolver.Resolver(configure=False)
                self._resolver.nameservers = [
                    dns.nameserver.Do53Nameserver(host.strip("[]"), port)
                    for host, port in nameservers
                ]
            else:
                self._resolver = dns.asyncresolver.Resolver(configure=True)
        except (dns.exception.DNSException, OSError, ValueError) as exc:
            self._config_error = f"no usable resolver configuration ({exc})"
        if self._resolver is not None:
            self._resolver.lifetime = dns_timeout
            self._resolver.timeout = min(dns_timeout, 2.0)
            self._resolver.cache = None
            # DO asks for DNSSEC records, AD for the resolver's verdict (RFC 6840 §5.7).
            self._resolver.use_edns(0, dns.flags.DO, 1232)
            self._resolver.flags = dns.flags.RD | dns.flags.AD
        self._dns_cache: dict[tuple[str, str], tuple[float, _Answer]] = {}
        self._memo: dict[str, tuple[float, StoredStsPolicy | None]] = {}
        self._failed: dict[str, float] = {}
        # domain -> (until, policy): the MTA-STS answer while nothing it rests
        # on (the TXT answer, the memo, the policy's age, a fetch pause) changes.
        self._sts_decided: dict[str, tuple[float, StsPolicy | None]] = {}
        self._inflight: dict[str, asyncio.Task[StsPolicy | None]] = {}
        self._http: tuple[Path | None, httpx.AsyncClient] | None = None
        self._retired: list[httpx.AsyncClient] = []  # made for an older mta_sts_ca_file

    async def close(self) -> None:
        """Close the HTTP client (its kept-alive connections)."""
        clients = self._retired + ([self._http[1]] if self._http is not None else [])
        self._http = None
        self._retired = []
        for client in clients:
            await client.aclose()

    # ------------------------------------------------------------- targets

    async def apply(
        self, domain: str, targets: Sequence[MXTarget], options: TlsPolicyOptions
    ) -> list[MXTarget]:
        """``targets`` with the policy each must meet (unchanged when none applies)."""
        if not targets or not (options.mta_sts or options.dane):
            return list(targets)
        domain = domain.lower().rstrip(".")
        # Usually every answer is cached: decide without a task or an await.
        now = self.clock()
        sts: StsPolicy | None = None
        sts_known = not options.mta_sts
        if options.mta_sts:
            decided = self._sts_decided.get(domain)
            if decided is not None and decided[0] > now:
                sts, sts_known = decided[1], True
        dane: dict[tuple[str, int], DaneLookup | None] = {}
        if options.dane:
            for t in targets:
                key = (t.hostname, t.port)
                if key not in dane and not _is_ip(t.hostname):
                    dane[key] = self._dane_cached(*key, now)
        if not sts_known or None in dane.values():
            sts, dane = await self._look_up(domain, sts_known, sts, dane, options)
        policies = [
            target_policy(t.hostname, domain=domain, dane=dane.get((t.hostname, t.port)), sts=sts)
            for t in targets
        ]
        if not any(policies):
            return list(targets)
        return [replace(t, tls_policy=p) for t, p in zip(targets, policies, strict=True)]

    async def _look_up(
        self,
        domain: str,
        sts_known: bool,
        sts: StsPolicy | None,
        dane: dict[tuple[str, int], DaneLookup | None],
        options: TlsPolicyOptions,
    ) -> tuple[StsPolicy | None, dict[tuple[str, int], DaneLookup | None]]:
        """The answers :meth:`apply` did not find cached, looked up concurrently."""
        sts_task = None if sts_known else asyncio.ensure_future(self.sts_policy(domain, options))
        try:
            missing = [key for key, found in dane.items() if found is None]
            looked = await asyncio.gather(*(self.dane_lookup(h, p) for h, p in missing))
            dane = {**dane, **dict(zip(missing, looked, strict=True))}
            if sts_task is not None:
                sts = await sts_task
        finally:
            if sts_task is not None and not sts_task.done():
                sts_task.cancel()
        return sts, dane

    # ---------------------------------------------------------------- DANE

    async def dane_lookup(self, host: str, port: int) -> DaneLookup:
        """The TLSA records of ``host``'s ``port`` and whether DNSSEC vouches for them."""
        answer = await self._dns(f"_{port}._tcp.{host}", "TLSA")
        if answer.kind == "failure":
            probe = await self._dns(host, "A")
            if probe.kind != "failure" and probe.secure:
                return DaneLookup("bogus", error=answer.error)
            return DaneLookup("insecure")
        return _dane_of(answer)

    def _dane_cached(self, host: str, port: int, now: float) -> DaneLookup | None:
        """The DANE lookup from the cache alone; None when it needs DNS."""
        hit = self._dns_cache.get((f"_{port}._tcp.{host}".lower(), "TLSA"))
        if hit is None or hit[0] <= now or hit[1].kind == "failure":
            return None
        return _dane_of(hit[1])

    # ------------------------------------------------------------- MTA-STS

    async def sts_policy(self, domain: str, options: TlsPolicyOptions) -> StsPolicy | None:
        """The MTA-STS policy that applies to ``domain`` now, or None."""
        decided = self._sts_decided.get(domain)
        if decided is not None and decided[0] > self.clock():
            return decided[1]
        task = self._inflight.get(domain)
        if task is None:
            task = asyncio.ensure_future(self._sts_policy(domain, options))
            self._inflight[domain] = task
            task.add_done_callback(lambda _t: self._inflight.pop(domain, None))
        return await asyncio.shield(task)

    async def _sts_policy(self, domain: str, options: TlsPolicyOptions) -> StsPolicy | None:
        now = self.clock()
        policy, until = await self._sts_resolve(domain, options, now)
        txt = self._dns_cache.get((f"_mta-sts.{domain}".lower(), "TXT"))
        until = min(until, txt[0] if txt is not None else now, now + MEMO_SECONDS)
        if until > now:
            self._sts_decided[domain] = (until, policy)
            _bound(self._sts_decided)
        return policy

    async def _sts_resolve(
        self, domain: str, options: TlsPolicyOptions, now: float
    ) -> tuple[StsPolicy | None, float]:
        """The policy for ``domain`` and until when that answer holds at most."""
        forever = now + MEMO_SECONDS
        txt = await self._dns(f"_mta-sts.{domain}", "TXT")
        policy_id = None
        if txt.kind == "answer":
            policy_id = sts_record_id(
                [
                    b"".join(r.strings).decode("utf-8", "replace")
                    for r in txt.records
                    if isinstance(r, dns.rdtypes.ANY.TXT.TXT)
                ]
            )
        cached = await self._cached(domain, now)
        fresh = cached if cached is not None and cached.expires_at > now else None
        holds = min(forever, fresh.expires_at) if fresh is not None else forever
        if policy_id is None or (fresh is not None and fresh.policy_id == policy_id):
            # RFC 8461 §5.1: without a TXT record (or with the same id) a
            # cached policy that has not expired still applies.
            return _policy_of(fresh), holds
        if self._failed.get(domain, 0.0) > now:
            return _policy_of(fresh), min(holds, self._failed[domain])
        try:
            policy = await self._fetch(domain, options)
        except PolicyFetchError as exc:
            self._failed[domain] = now + FETCH_RETRY_AFTER
            _bound(self._failed)
            LOG.warn(
                "MTA-STS policy fetch failed",
                domain=domain,
                error=str(exc),
                cached=fresh is not None,
            )
            return _policy_of(fresh), min(holds, self._failed[domain])
        self._failed.pop(domain, None)
        stored = StoredStsPolicy(
            domain, policy_id, policy.mode, policy.mx, policy.max_age, now, now + policy.max_age
        )
        self._memo[domain] = (now, stored)
        _bound(self._memo)
        try:
            await self.spool.put_sts_policy(stored)
        except SpoolError as exc:
            LOG.warn("cannot cache the MTA-STS policy", domain=domain, error=str(exc))
        LOG.info("MTA-STS policy fetched", domain=domain, mode=policy.mode, id=policy_id)
        return policy, min(forever, stored.expires_at)

    async def _cached(self, domain: str, now: float) -> StoredStsPolicy | None:
        memo = self._memo.get(domain)
        if memo is not None and now - memo[0] < MEMO_SECONDS:
            return memo[1]
        try:
            stored = await self.spool.get_sts_policy(domain)
        except SpoolError as exc:
            LOG.warn("cannot read the cached MTA-STS policy", domain=domain, error=str(exc))
            return memo[1] if memo is not None else None
        self._memo[domain] = (now, stored)
        _bound(self._memo)
        return stored

    async def _fetch(self, domain: str, options: TlsPolicyOptions) -> StsPolicy:
        host = f"mta-sts.{domain}"
        try:
            async with asyncio.timeout(options.fetch_timeout):
                addresses: list[str] = []
                for rdtype in ("A", "AAAA"):
                    answer = await self._dns(host, rdtype)
                    addresses += [r.to_text() for r in answer.records]
                if not addresses:
                    raise PolicyFetchError(f"{host} has no address")
                http = _httpx()
                errors: list[str] = []
                for address in addresses:
                    try:
                        return await self._get(host, address, options)
                    except (http.HTTPError, ssl.SSLError, OSError) as exc:
                        errors.append(f"{address}: {exc or type(exc).__name__}")
                where = f"https://{host}/.well-known/mta-sts.txt"
                raise PolicyFetchError(f"{where}: {'; '.join(errors)}")
        except TimeoutError:
            raise PolicyFetchError(
                f"fetching the policy from {host} took more than {options.fetch_timeout:g}s"
            ) from None

    async def _get(self, host: str, address: str, options: TlsPolicyOptions) -> StsPolicy:
        literal = f"[{address}]" if ":" in address else address
        port = options.https_port
        url = f"https://{literal}:{port}/.well-known/mta-sts.txt"
        headers = {"Host": host if port == 443 else f"{host}:{port}"}
        client = self._client(options.ca_file)
        where = f"https://{host}/.well-known/mta-sts.txt"
        async with client.stream(
            "GET", url, headers=headers, extensions={"sni_hostname": host}
        ) as response:
            if response.status_code != 200:
                raise PolicyFetchError(f"{where} answered HTTP {response.status_code}")
            media = response.headers.get("content-type", "").split(";")[0].strip().lower()
            if media != "text/plain":
                raise PolicyFetchError(f"{where} is {media or 'untyped'}, not text/plain")
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > STS_POLICY_MAX_BYTES:
                    raise PolicyFetchError(f"{where} is larger than {STS_POLICY_MAX_BYTES} bytes")
        try:
            return parse_sts_policy(body.decode("utf-8"))
        except (UnicodeDecodeError, PolicyError) as exc:
            raise PolicyFetchError(f"{where}: {exc}") from None

    def _client(self, ca_file: Path | None) -> httpx.AsyncClient:
        """One client (and TLS context) per CA setting, kept for reuse."""
        if self._http is not None and self._http[0] == ca_file:
            return self._http[1]
        if self._http is not None:
            self._retired.append(self._http[1])
        context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        client: httpx.AsyncClient = _httpx().AsyncClient(
            verify=context, follow_redirects=False, trust_env=False
        )
        self._http = (ca_file, client)
        return client

    # ----------------------------------------------------------------- DNS

    async def _dns(self, name: str, rdtype: str) -> _Answer:
        key = (name.lower(), rdtype)
        now = self.clock()
        hit = self._dns_cache.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        answer, ttl = await self._query(name, rdtype)
        if ttl > 0:
            self._dns_cache[key] = (now + ttl, answer)
            _bound(self._dns_cache)
        return answer

    async def _query(self, name: str, rdtype: str) -> tuple[_Answer, float]:
        if self._resolver is None:
            return _Answer("failure", error=self._config_error), NEGATIVE_TTL
        try:
            result = await self._resolver.resolve(
                name, rdtype, raise_on_no_answer=False, search=False
            )
        except dns.resolver.NXDOMAIN as exc:
            responses = list((exc.kwargs.get("responses") or {}).values())
            secure = any(r.flags & dns.flags.AD for r in responses)
            return _Answer("nxdomain", secure=secure), _negative_ttl(responses)
        except dns.resolver.LifetimeTimeout:
            return _Answer("failure", error="timed out"), NEGATIVE_TTL
        except dns.resolver.NoNameservers as exc:
            return _Answer("failure", error=_rcodes(exc)), NEGATIVE_TTL
        except dns.exception.DNSException as exc:
            return _Answer("failure", error=f"{type(exc).__name__}: {exc}"), NEGATIVE_TTL
        secure = bool(result.response.flags & dns.flags.AD)
        if result.rrset is None:
            return _Answer("nodata", secure=secure), _negative_ttl([result.response])
        ttl = float(result.rrset.ttl)
        return _Answer("answer", tuple(result.rrset), secure), ttl


_MODES: dict[str, StsMode] = {"enforce": "enforce", "testing": "testing", "none": "none"}


def _dane_of(answer: _Answer) -> DaneLookup:
    """A TLSA answer (not a failure) as DANE sees it: secure records, or insecure."""
    if not answer.secure:
        return DaneLookup("insecure")
    records = tuple(
        Tlsa(r.usage, r.selector, r.mtype, bytes(r.cert))
        for r in answer.records
        if isinstance(r, dns.rdtypes.ANY.TLSA.TLSA)
    )
    return DaneLookup("secure", records)


def _negative_ttl(responses: Sequence[dns.message.Message]) -> float:
    """RFC 2308: the SOA's TTL or minimum, whichever is less, at most NEGATIVE_TTL; no SOA: 0."""
    ttls = [
        min(rrset.ttl, rdata.minimum)
        for response in responses
        for rrset in response.authority
        for rdata in rrset
        if isinstance(rdata, dns.rdtypes.ANY.SOA.SOA)
    ]
    return min([NEGATIVE_TTL, *ttls]) if ttls else 0.0


def _policy_of(stored: StoredStsPolicy | None) -> StsPolicy | None:
    mode = _MODES.get(stored.mode) if stored is not None else None
    if stored is None or mode is None:
        return None
    return StsPolicy(mode, stored.mx, stored.max_age)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _rcodes(exc: dns.resolver.NoNameservers) -> str:
    reasons: list[str] = []
    for error in exc.kwargs.get("errors") or []:
        reason = error[3] if len(error) > 3 else None
        text = reason if isinstance(reason, str) else type(reason).__name__
        if text not in reasons:
            reasons.append(text)
    return ", ".join(reasons) or "no nameserver answered"


def _bound(table: dict[_K, _V]) -> None:
    """Keep a cache from growing without limit (the oldest entries go first)."""
    while len(table) > _MAX_ENTRIES:
        table.pop(next(iter(table)))
