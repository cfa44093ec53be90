"""Build hook: ship the top-level ``migrations/`` inside the wheel.

The repository keeps its numbered migration files at the top level
(``migrations/``, part of the documented layout), outside the package.  A
wheel carries only packages, so ``build_py`` copies the ``.sql`` files to
``outboundd/migrations/`` in the build; at run time
:func:`outboundd.spool.migrations.default_migrations_dir` looks there first
and falls back to the source tree (an editable install or a checkout).
Everything else about the package is declared in ``pyproject.toml``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


class BuildWithMigrations(build_py):
    """``build_py`` that also copies ``migrations/`` into the package."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install reads the source tree's migrations/
        target = Path(self.build_lib) / "outboundd" / "migrations"
        shutil.copytree(
            MIGRATIONS, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__")
        )


setup(cmdclass={"build_py": BuildWithMigrations})
