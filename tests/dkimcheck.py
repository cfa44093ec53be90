"""Checking DKIM signatures with implementations that did not make them.

:class:`OpenDkim` runs OpenDKIM's verifier (Debian's ``opendkim`` in its
test mode, ``opendkim -t -``) against a loopback DNS server that publishes
the public keys.  OpenDKIM's resolver (libunbound) takes a name server
address but no port, so the DNS server listens on port 53 of a random
``127.x.y.z`` address (we are root; nothing else there).  ``.test`` names
are answered NXDOMAIN by unbound itself (RFC 6761 local zones), so signing
domains in these tests live under ``.example``.

``opendkim-testmsg`` from opendkim-tools would be the obvious tool, but the
Debian 12 build (2.11.0~beta2) fails every message with "dkim_chunk():
Syntax error", signed or not; the milter's test mode uses the same library
through ``dkim_header``/``dkim_body`` and works.

:func:`dkimpy_verify` is the second opinion (dkimpy's verifier, with the
record handed over directly instead of DNS).
"""

from __future__ import annotations

import asyncio
import random
import re
from collections.abc import AsyncIterator
from pathlib import Path

import dkim
import pytest

from outboundd.dkimkeys import DkimKey, dns_value
from outboundd.submission import prepare
from tests.dnsserver import DNSServer

_RESULT = re.compile(r"verification \(s=(?P<s>[^ ,]+),? d=(?P<d>[^ ,]+),[^)]*\) (?P<r>.*)")


def txt_rdata(value: str) -> str:
    """A TXT value as zone text: quoted strings of at most 255 octets."""
    return " ".join(f'"{value[i : i + 255]}"' for i in range(0, len(value), 255))


def single_signatures(message: bytes) -> list[bytes]:
    """One copy of ``message`` per DKIM-Signature field, holding only that one."""
    head_end = prepare.header_end(message)
    fields = list(re.finditer(rb"(?im)^DKIM-Signature:.*\r\n(?:[ \t].*\r\n)*", message[:head_end]))
    copies = []
    for keep in fields:
        out = message
        for other in reversed(fields):
            if other is not keep:
                out = out[: other.start()] + out[other.end() :]
        copies.append(out)
    return copies


def dkimpy_verify(message: bytes, keys: list[DkimKey]) -> bool:
    """dkimpy's verdict on the first signature, the keys' records served in memory."""
    records = {f"{k.selector}._domainkey.{k.domain}.".encode(): dns_value(k) for k in keys}

    def lookup(name: bytes, timeout: int = 5) -> bytes | None:
        value = records.get(name if name.endswith(b".") else name + b".")
        return value.encode() if value is not None else None

    return bool(dkim.verify(message, dnsfunc=lookup))


class OpenDkim:
    """OpenDKIM's verifier with its own loopback DNS server."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.dns: DNSServer | None = None

    async def start(self) -> None:
        last: OSError | None = None
        for _ in range(20):
            host = f"127.{random.randint(1, 254)}.{random.randint(1, 254)}.{random.randint(2, 254)}"
            server = DNSServer(host=host, port=53)
            try:
                await server.start()
            except OSError as exc:
                last = exc
                continue
            self.dns = server
            break
        else:
            raise RuntimeError(f"no free loopback address for port 53: {last}")
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "opendkim.conf").write_text(
            f"Mode v\nSyslog no\nNameservers {host}\nDNSTimeout 5\n"
        )

    async def stop(self) -> None:
        if self.dns is not None:
            await self.dns.stop()
            self.dns = None

    def publish(self, key: DkimKey) -> None:
        assert self.dns is not None
        self.dns.zones[f"{key.selector}._domainkey.{key.domain}"] = {
            "TXT": [txt_rdata(dns_value(key))]
        }

    async def verify(self, message: bytes) -> list[tuple[str, str, str]]:
        """``(selector, domain, result)`` for each signature OpenDKIM reported."""
        proc = await asyncio.create_subprocess_exec(
            "opendkim", "-x", str(self.workdir / "opendkim.conf"), "-t", "-",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            out, err = await asyncio.wait_for(proc.communicate(message), 30)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        text = (out + err).decode("utf-8", "replace")
        assert proc.returncode == 0, text
        found = [(m["s"], m["d"], m["r"]) for m in _RESULT.finditer(text)]
        assert found, f"no verification result from opendkim: {text!r}"
        return found

    async def passes(self, message: bytes) -> bool:
        """True when every signature of ``message`` verifies, each on its own."""
        copies = single_signatures(message)
        assert copies, "the message has no DKIM-Signature"
        for copy in copies:
            results = await self.verify(copy)
            if any(result != "succeeded" for _, _, result in results):
                return False
        return True


@pytest.fixture
async def opendkim(tmp_path: Path) -> AsyncIterator[OpenDkim]:
    checker = OpenDkim(tmp_path / "opendkim")
    await checker.start()
    try:
        yield checker
    finally:
        await checker.stop()
