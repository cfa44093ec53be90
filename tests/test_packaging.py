"""The installed package finds its SQL: migrations and named queries.

A wheel has no top-level ``migrations/``; ``setup.py`` copies it into the
package and :func:`default_migrations_dir` looks there first.  Building a
whole wheel and a venv is slow (``.ci/run`` does it and starts the daemon
from it); here ``build_py`` alone lays the package out as a wheel would, and
a fresh interpreter that sees only that build must find every migration.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from outboundd.spool.migrations import SOURCE_MIGRATIONS_DIR, default_migrations_dir, discover

ROOT = Path(__file__).resolve().parents[1]


def test_a_checkout_reads_the_top_level_migrations() -> None:
    assert default_migrations_dir() == ROOT / "migrations" == SOURCE_MIGRATIONS_DIR


def test_the_built_package_carries_its_migrations_and_queries(tmp_path: Path) -> None:
    build = tmp_path / "lib"
    subprocess.run(
        [sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(build)],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=60,
    )
    probe = (
        "import json; from outboundd.spool import migrations, sql;"
        "d = migrations.default_migrations_dir();"
        "print(json.dumps({'dir': str(d), 'versions': [m.version for m in migrations.discover(d)],"
        " 'queries': len(sql.queries())}))"
    )
    # -I: isolated, so neither the checkout nor the editable install is on the path.
    out = subprocess.run(
        [sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(build)!r}); {probe}"],
        cwd=tmp_path,
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    found = json.loads(out.stdout)
    assert found["dir"] == str(build / "outboundd" / "migrations")
    assert found["versions"] == [m.version for m in discover(ROOT / "migrations")]
    assert found["queries"] > 0
