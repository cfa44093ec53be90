"""Shared fixtures.  Component-specific peers live in their own modules:
``tests/dnsserver.py`` (loopback DNS), ``tests/mxserver.py`` (scripted MX),
``tests/certs.py`` (test PKI)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.certs import TestPKI, make_pki


@pytest.fixture
def pki(tmp_path: Path) -> TestPKI:
    return make_pki(tmp_path / "pki")


# The loopback DNS server (tests/dnsserver.py) as a fixture for every test module.
from tests.dnsserver import dns_server  # noqa: E402, F401
