"""Test certificates: a throwaway CA and leaf certificates made per test run.

trustme builds a real CA and leaf certificates in memory, so TLS tests use a
genuine handshake without committing key material to the repository.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import trustme


@dataclass(frozen=True)
class TestPKI:
    ca: trustme.CA
    cert_pem: Path
    key_pem: Path
    ca_pem: Path

    def client_context(self) -> ssl.SSLContext:
        """A client context that trusts this CA (for tests acting as clients)."""
        ctx = ssl.create_default_context()
        self.ca.configure_trust(ctx)
        return ctx

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(self.cert_pem), str(self.key_pem))
        return ctx


def make_pki(directory: Path, *names: str) -> TestPKI:
    """Write ``tls_cert.pem``/``tls_key.pem`` for ``names`` (default localhost,
    127.0.0.1 and mx.test names) and ``ca.pem`` into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    leaf = ca.issue_cert(*(names or ("localhost", "127.0.0.1", "::1", "mx.test", "*.test")))
    cert_pem = directory / "tls_cert.pem"
    key_pem = directory / "tls_key.pem"
    ca_pem = directory / "ca.pem"
    leaf.private_key_pem.write_to_path(str(key_pem))
    with cert_pem.open("wb") as fh:
        for blob in leaf.cert_chain_pems:
            fh.write(blob.bytes())
    ca.cert_pem.write_to_path(str(ca_pem))
    return TestPKI(ca, cert_pem, key_pem, ca_pem)
