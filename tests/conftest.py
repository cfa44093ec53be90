"""Shared fixtures.  Component-specific peers live in their own modules:
``tests/dnsserver.py`` (loopback DNS), ``tests/mxserver.py`` (scripted MX),
``tests/certs.py`` (test PKI)."""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import buildform
from tests.certs import TestPKI, make_pki
from tests.pgcluster import PgCluster, PgUnavailable


def pytest_configure(config: pytest.Config) -> None:
    """Refuse to test compiled hot modules older than their sources (setup.py)."""
    old = buildform.stale()
    if old:
        raise pytest.UsageError(
            f"compiled modules older than their .py source: {', '.join(old)}; "
            "rebuild with `make install` (or `.venv/bin/python setup.py build_ext --inplace`)"
        )


@pytest.fixture
def pki(tmp_path: Path) -> TestPKI:
    return make_pki(tmp_path / "pki")


# The loopback DNS server (tests/dnsserver.py) as a fixture for every test module.
from tests.dnsserver import dns_server  # noqa: E402, F401

# ------------------------------------------------------------- PostgreSQL

_databases = itertools.count(1)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """One throwaway PostgreSQL cluster for the test session (tests/pgcluster.py).

    Skipped where the server is not installed, but never under CI=true: CI
    must run the PostgreSQL tests, so there a missing server fails them.
    """
    base = Path(tempfile.mkdtemp(prefix="outboundd-pg-"))
    try:
        cluster = PgCluster.start(base / "cluster")
    except PgUnavailable as exc:
        base.rmdir()
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL tests must run in CI: {exc}")
        pytest.skip(str(exc))
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def pg_url(pg_cluster: PgCluster) -> str:
    """A fresh, empty database in the session's cluster."""
    return pg_cluster.create_database(f"t{os.getpid()}_{next(_databases)}")


@pytest.fixture(params=["sqlite", "postgresql"])
def queue_location(request: pytest.FixtureRequest, tmp_path: Path) -> str | Path:
    """Where a test's queue lives, once per backend: a queue directory, or a PostgreSQL URL."""
    if request.param == "sqlite":
        return tmp_path / "queue"
    url: str = request.getfixturevalue("pg_url")
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def queue_url(request: pytest.FixtureRequest) -> str | None:
    """``outbound.ini queue_url`` for an end-to-end test, once per backend: None
    (SQLite in the config's queue directory), or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return None
    url: str = request.getfixturevalue("pg_url")
    return url
