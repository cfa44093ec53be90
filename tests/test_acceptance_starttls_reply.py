"""Acceptance: every reply after the greeting carries an enhanced status code.

With ENHANCEDSTATUSCODES advertised, RFC 2034 exempts only the greeting and
the answers to HELO/EHLO; the real daemon answered STARTTLS with a bare
``220 Ready to start TLS`` (Postfix: ``220 2.0.0 Ready to start TLS``).
"""

from __future__ import annotations

from pathlib import Path

from tests import certs
from tests.harness import running, write_config
from tests.submission_fixtures import LineClient

MX_PORT = 9  # nothing is delivered in this test


async def test_the_starttls_reply_has_an_enhanced_code(tmp_path: Path) -> None:
    pki = certs.make_pki(tmp_path / "pki", "localhost", "127.0.0.1")
    config = write_config(
        tmp_path / "config", dns_port=53, mx_port=MX_PORT, outbound={"delivery_processes": 0},
        extra_files={"tls_cert.pem": pki.cert_pem.read_text(),
                     "tls_key.pem": pki.key_pem.read_text()},
    )  # fmt: skip
    async with running(config) as d:
        client = await LineClient.connect(d.smtp_port)  # the greeting: no code (RFC 2034)
        try:
            assert "250-ENHANCEDSTATUSCODES" in await client.cmd("EHLO client.test")
            assert await client.cmd("STARTTLS") == "220 2.0.0 Ready to start TLS"
        finally:
            await client.close()
