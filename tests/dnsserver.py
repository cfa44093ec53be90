"""A small authoritative DNS server on loopback, for tests.

It answers real DNS over UDP and TCP on ``127.0.0.1`` (an ephemeral port,
the same number for both), so code under test uses dnspython's real
resolver against it — no mocks.

Usage::

    from tests.dnsserver import NXDOMAIN, SERVFAIL, TIMEOUT, DNSServer

    async with DNSServer({"example.test": {"MX": [(10, "mx1.example.test")]}}) as dns:
        resolver = MXResolver([dns.nameserver], local_mx_ok=True)
        ...
        assert dns.count("example.test", "MX") == 1

or the pytest fixture ``dns_server`` (empty zones; fill ``dns_server.zones``
in the test — it is a plain dict read on every query, so tests may change
answers at any time)::

    async def test_x(dns_server: DNSServer) -> None:
        dns_server.zones["example.test"] = {"A": ["127.0.0.2"]}

Zone data — ``zones`` maps a name (any case, final dot optional, Unicode
names are converted with IDNA 2008) to either a *behaviour* for every query
of that name, or a dict from record type to records::

    {
        "example.test": {"MX": [(10, "mx1.example.test"), (20, "mx2.example.test", 60)]},
        "mx1.example.test": {"A": ["127.0.0.2", ("127.0.0.3", 30)], "AAAA": ["::1"],
                             "TTL": 600},
        "alias.example.test": {"CNAME": "mx1.example.test"},
        "nxd.test": NXDOMAIN,          # also the answer for any name not in zones
        "broken.test": SERVFAIL,       # REFUSED works the same way
        "slow.test": TIMEOUT,          # no answer at all
        "nullmx.test": {"MX": [(0, ".")]},
        "half.test": {"A": ["127.0.0.2"], "AAAA": SERVFAIL},   # per-type behaviour
    }

* ``MX``: ``(preference, exchange)`` or ``(preference, exchange, ttl)``.
* ``A``/``AAAA``/``TXT``/other types: ``"rdata text"`` or ``("rdata text", ttl)``.
* ``CNAME``: ``"target"`` or ``("target", ttl)``; followed inside ``zones``.
* ``TTL``: the default TTL for the name's records (else ``default_ttl``,
  300).  An RRset's TTL is the smallest of its records'.
* A name present without the queried type answers NODATA; a name absent
  answers NXDOMAIN.  Both carry an SOA (owner: the name's last label, TTL
  and minimum ``negative_ttl``, default 60) in the authority section, so
  negative caching can be tested.

Counters: ``queries`` is a ``Counter`` of ``(name, type)`` (lower-case
A-label name without final dot, type mnemonic) over UDP and TCP together;
``count(name, type)`` reads it with the same normalisation, and
``reset_counts()`` clears it.  ``truncate_udp = True`` answers every UDP
query with TC set and no records, so resolvers must retry over TCP.
Records go out in the order the zone lists them (deterministic tests);
``shuffle = True`` sends each RRset in random order, as round-robin servers do.

Only loopback: the server binds ``127.0.0.1`` (or the loopback ``host``
given, with a fixed ``port`` for clients that only ask port 53); keep zone
data to 127.0.0.0/8 and ``::1``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import struct
from collections import Counter
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any, cast

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest_asyncio

__all__ = [
    "NXDOMAIN",
    "REFUSED",
    "SERVFAIL",
    "TIMEOUT",
    "Behaviour",
    "DNSServer",
    "dns_server",
]

HOST = "127.0.0.1"


class Behaviour(enum.Enum):
    """How the server treats a name (or one type of it) instead of answering."""

    NXDOMAIN = "NXDOMAIN"
    SERVFAIL = "SERVFAIL"
    REFUSED = "REFUSED"
    TIMEOUT = "TIMEOUT"


NXDOMAIN = Behaviour.NXDOMAIN
SERVFAIL = Behaviour.SERVFAIL
REFUSED = Behaviour.REFUSED
TIMEOUT = Behaviour.TIMEOUT

_IDNA = dns.name.IDNA_2008_Practical
_MAX_CNAME_CHAIN = 8


def _name(text: str) -> dns.name.Name:
    return dns.name.from_text(text, idna_codec=_IDNA)


def _key(name: dns.name.Name) -> str:
    return name.to_text(omit_final_dot=True).lower()


class _UDPProtocol(asyncio.DatagramProtocol):
    def __init__(self, server: DNSServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        reply = self.server.handle(data, tcp=False)
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)


class DNSServer:
    """An authoritative server for ``zones`` on 127.0.0.1 (see module docstring)."""

    def __init__(
        self,
        zones: dict[str, Any] | None = None,
        *,
        default_ttl: int = 300,
        negative_ttl: int = 60,
        host: str = HOST,
        port: int = 0,
    ) -> None:
        # ``host``/``port``: another loopback address and a fixed port, for a
        # client that only asks port 53 (libresolv, as OpenDKIM's tools do).
        self.host = host
        self.fixed_port = port
        self.zones: dict[str, Any] = zones if zones is not None else {}
        self.default_ttl = default_ttl
        self.negative_ttl = negative_ttl
        self.truncate_udp = False
        self.shuffle = False
        self.queries: Counter[tuple[str, str]] = Counter()
        self.port = 0
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._tcp_tasks: set[asyncio.Task[None]] = set()

    # ---- lifecycle

    @property
    def nameserver(self) -> tuple[str, int]:
        """``(ip, port)`` to hand to a resolver."""
        return (self.host, self.port)

    async def start(self) -> None:
        """Bind UDP on an ephemeral port, then TCP on the same port number."""
        loop = asyncio.get_running_loop()
        last_error: OSError | None = None
        for _ in range(50):
            transport, _protocol = await loop.create_datagram_endpoint(
                lambda: _UDPProtocol(self), local_addr=(self.host, self.fixed_port)
            )
            port = int(transport.get_extra_info("sockname")[1])
            try:
                self._tcp = await asyncio.start_server(self._serve_tcp, self.host, port)
            except OSError as exc:
                transport.close()
                last_error = exc
                if self.fixed_port:
                    break
                continue
            self._udp = transport
            self.port = port
            return
        raise RuntimeError(f"could not bind UDP and TCP on one loopback port: {last_error}")

    async def stop(self) -> None:
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._tcp is not None:
            self._tcp.close()
            for task in list(self._tcp_tasks):
                task.cancel()
            for task in list(self._tcp_tasks):
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await self._tcp.wait_closed()
            self._tcp = None

    async def __aenter__(self) -> DNSServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # ---- counters

    def count(self, name: str, rdtype: str) -> int:
        """Queries received for ``(name, rdtype)`` (name normalised like zone keys)."""
        return self.queries[(_key(_name(name)), rdtype.upper())]

    def total_queries(self) -> int:
        return sum(self.queries.values())

    def reset_counts(self) -> None:
        self.queries.clear()

    # ---- answering

    def handle(self, wire: bytes, *, tcp: bool) -> bytes | None:
        """The reply to one query in wire format, or None to stay silent."""
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if len(query.question) != 1:
            response.set_rcode(dns.rcode.FORMERR)
            return response.to_wire()
        question = query.question[0]
        qname, rdtype = question.name, question.rdtype
        self.queries[(_key(qname), dns.rdatatype.to_text(rdtype))] += 1
        if not tcp and self.truncate_udp:
            response.flags |= dns.flags.TC
            return response.to_wire()
        if not self._fill(response, qname, rdtype):
            return None
        max_size = 65535 if tcp else (query.payload if query.edns >= 0 else 512)
        try:
            return response.to_wire(max_size=max_size, want_shuffle=self.shuffle)
        except dns.exception.TooBig:
            truncated = dns.message.make_response(query)
            truncated.flags |= dns.flags.AA | dns.flags.TC
            return truncated.to_wire()

    def _zones(self) -> dict[dns.name.Name, Any]:
        return {_name(key): value for key, value in self.zones.items()}

    def _fill(
        self, response: dns.message.Message, qname: dns.name.Name, rdtype: dns.rdatatype.RdataType
    ) -> bool:
        """Put the answer into ``response``; False means do not answer (TIMEOUT)."""
        zones = self._zones()
        name = qname
        for _ in range(_MAX_CNAME_CHAIN):
            entry = zones.get(name, NXDOMAIN)
            if isinstance(entry, Behaviour):
                return self._behave(response, name, entry)
            default_ttl = int(entry.get("TTL", self.default_ttl))
            wanted = dns.rdatatype.to_text(rdtype)
            records = entry.get(wanted)
            if records is None and wanted != "CNAME" and "CNAME" in entry:
                rrset = self._rrset(name, "CNAME", entry["CNAME"], default_ttl)
                response.answer.append(rrset)
                name = rrset[0].target
                continue
            if isinstance(records, Behaviour):
                return self._behave(response, name, records)
            if not records:
                self._add_soa(response, name)
                return True
            response.answer.append(self._rrset(name, wanted, records, default_ttl))
            return True
        response.set_rcode(dns.rcode.SERVFAIL)
        return True

    def _behave(self, response: dns.message.Message, name: dns.name.Name, how: Behaviour) -> bool:
        if how is TIMEOUT:
            return False
        if how is NXDOMAIN:
            response.set_rcode(dns.rcode.NXDOMAIN)
            self._add_soa(response, name)
        elif how is SERVFAIL:
            response.set_rcode(dns.rcode.SERVFAIL)
        else:
            response.set_rcode(dns.rcode.REFUSED)
        return True

    def _add_soa(self, response: dns.message.Message, name: dns.name.Name) -> None:
        owner = name.split(2)[1] if len(name) > 1 else name
        ttl = self.negative_ttl
        soa = dns.rdata.from_text(
            dns.rdataclass.IN,
            dns.rdatatype.SOA,
            f"ns.{owner} hostmaster.{owner} 1 3600 600 86400 {ttl}",
        )
        response.authority.append(dns.rrset.from_rdata(owner, ttl, soa))

    def _rrset(self, name: dns.name.Name, rdtype: str, records: Any, default_ttl: int) -> Any:
        if not isinstance(records, list):
            records = [records]
        rdatas: list[dns.rdata.Rdata] = []
        ttl: int | None = None
        for record in records:
            text, record_ttl = self._record_text(rdtype, record, default_ttl)
            rdatas.append(dns.rdata.from_text(dns.rdataclass.IN, rdtype, text, origin=None))
            ttl = record_ttl if ttl is None else min(ttl, record_ttl)
        return dns.rrset.from_rdata_list(name, ttl if ttl is not None else default_ttl, rdatas)

    @staticmethod
    def _absolute(host: str) -> str:
        return _name(host).to_text()

    def _record_text(self, rdtype: str, record: Any, default_ttl: int) -> tuple[str, int]:
        if rdtype == "MX":
            if len(record) == 3:
                preference, exchange, ttl = record
            else:
                (preference, exchange), ttl = record, default_ttl
            return f"{int(preference)} {self._absolute(exchange)}", int(ttl)
        if isinstance(record, tuple):
            text, ttl = record
        else:
            text, ttl = record, default_ttl
        if rdtype in ("CNAME", "NS", "PTR"):
            text = self._absolute(text)
        elif rdtype == "TXT" and not str(text).startswith('"'):
            text = '"' + str(text).replace('"', '\\"') + '"'
        return str(text), int(ttl)

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tcp_tasks.add(task)
        try:
            while True:
                header = await reader.readexactly(2)
                (length,) = struct.unpack("!H", header)
                wire = await reader.readexactly(length)
                reply = self.handle(wire, tcp=True)
                if reply is None:
                    continue
                writer.write(struct.pack("!H", len(reply)) + reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            return  # the client closed the connection: nothing more to answer
        finally:
            if task is not None:
                self._tcp_tasks.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


@pytest_asyncio.fixture
async def dns_server() -> AsyncIterator[DNSServer]:
    """A running :class:`DNSServer` with empty zones; stopped after the test."""
    async with DNSServer() as server:
        yield server
