"""Build hook: ship ``migrations/`` in the wheel; compile the hot pure modules.

Two jobs, everything else about the package is declared in ``pyproject.toml``:

* The repository keeps its numbered migration files at the top level
  (``migrations/``, part of the documented layout), outside the package.  A
  wheel carries only packages, so ``build_py`` copies the ``.sql`` files to
  ``outboundd/migrations/`` in the build; at run time
  :func:`outboundd.spool.migrations.default_migrations_dir` looks there first
  and falls back to the source tree (an editable install or a checkout).

* The pure, typed modules listed in :data:`COMPILED_MODULES` are compiled to
  C extensions with mypyc when mypyc, a C compiler and Python's headers are
  there and ``OUTBOUNDD_PURE`` is not set to ``1``.  Otherwise nothing is
  compiled and the same ``.py`` files run as they are: the compiled form is
  a speed-up, never a requirement.  The build prints one line saying which
  form it built.  An extension sits beside its ``.py`` (Python's importer
  tries extensions first), in the wheel and, for an editable install
  (``make install``), in the source tree itself; ``make`` rebuilds it there
  whenever one of those sources changed, and ``tests/conftest.py`` refuses
  to test an extension older than its source.  See docs/performance.md.
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
from pathlib import Path
from typing import Any

from setuptools import setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
MIGRATIONS = ROOT / "migrations"

#: The modules compiled with mypyc, and why each is worth it.  Each is pure
#: (values in, values out, no I/O), fully typed, runs for every message,
#: delivery or bounce, and measured faster compiled (docs/performance.md);
#: keep this list to such modules, since a compiled module cannot be
#: monkeypatched and the build re-checks it with mypyc's rules.  The
#: Makefile reads the paths from here (one quoted path a line).
COMPILED_MODULES: tuple[str, ...] = (
    # DATA judging: every message's octets (end, size, line length, bare CR/LF, unstuffing).
    "outboundd/submission/data.py",
    # MAIL FROM / RCPT TO parsing and the relay decision: every envelope address.
    "outboundd/submission/policy.py",
    # Every reply line the listener sends goes through with_enhanced_code().
    "outboundd/submission/replies.py",
    # The Received, Message-ID and Date headers added to every message.
    "outboundd/submission/prepare.py",
    # IDNA checks of every envelope domain (policy) and of MX names.
    "outboundd/idn.py",
    # Classifying every reply of a delivery session into an outcome.
    "outboundd/delivery/replies.py",
    # Rendering every bounce and delay notice (RFC 3464 DSN).
    "outboundd/dsn.py",
)

#: Set to 1 to build and run the pure-Python form even where mypyc could compile.
PURE_ENV = "OUTBOUNDD_PURE"

#: Names every compiled module shares a runtime library under (in the package,
#: so an editable install's import finder sees it like any other submodule).
GROUP = "outboundd._compiled"


def _say(line: str) -> None:
    # pip shows a build backend's output only with -v; stderr keeps it apart
    # from anything a caller parses.
    print(f"outboundd build: {line}", file=sys.stderr, flush=True)


def _why_pure() -> str | None:
    """Why this build cannot or must not compile; None when it compiles."""
    if os.environ.get(PURE_ENV, "") == "1":
        return f"{PURE_ENV}=1"
    try:
        import mypyc.build  # noqa: F401
    except ImportError:
        return "mypyc is not installed"
    compiler = (os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(compiler) is None:
        return f"no C compiler ({compiler})"
    include = sysconfig.get_paths().get("include", "")
    if not (Path(include) / "Python.h").is_file():
        return f"no Python headers ({include}/Python.h; Debian: python3-dev)"
    return None


#: The commands that build extensions; metadata and sdist runs skip mypyc's
#: type-check pass (pip evaluates this file once per build hook).
_BUILD_COMMANDS = frozenset(
    {"build", "build_ext", "bdist_wheel", "editable_wheel", "develop", "install"}
)


def _extensions(why_pure: str | None) -> list[Any]:
    if why_pure is not None or _BUILD_COMMANDS.isdisjoint(sys.argv[1:]):
        return []
    from mypyc.build import mypycify

    # mypyc reads the type information of everything they import; run it
    # from the project root so it finds the package and its pyproject.toml.
    # A wheel's isolated build has none of the runtime dependencies: their
    # types are then Any (the compiled code checks what it gets at run time),
    # and the strictness that only `make lint` needs (run with them all
    # installed) must not stop the build.
    os.chdir(ROOT)
    relaxed = [
        "--ignore-missing-imports",
        "--follow-imports=silent",
        "--no-warn-return-any",
        "--allow-subclassing-any",
        "--allow-untyped-calls",
    ]
    return list(mypycify([*relaxed, *COMPILED_MODULES], opt_level="3", group_name=GROUP))


def _built_files() -> list[Path]:
    """The extension files a compiled in-place build leaves in the source tree."""
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    names = [ROOT / (module[: -len(".py")] + suffix) for module in COMPILED_MODULES]
    names.append(ROOT / (GROUP.replace(".", "/") + "__mypyc" + suffix))
    return names


def _settle_form(inplace: bool) -> None:
    """Say once which form this build makes; a pure in-place build clears old extensions.

    A pure in-place build (an editable install, ``make`` with
    ``OUTBOUNDD_PURE=1``) removes the extensions an earlier compiled build
    left in the source tree, which would otherwise shadow the ``.py`` files.
    """
    global _SETTLED
    if _SETTLED:
        return
    _SETTLED = True
    if not EXTENSIONS and WHY_PURE is None:
        return  # a command that builds no extensions (build_py alone, say)
    if inplace:
        # The package has no extensions but these: any other one in the tree
        # is left from a build with another list (or form) and would shadow
        # its .py file.
        keep = set(_built_files()) if EXTENSIONS else set()
        for path in (ROOT / "outboundd").rglob("*"):
            if path.suffix in (".so", ".pyd") and path not in keep:
                path.unlink()
    if EXTENSIONS:
        _say(f"compiled form: {len(COMPILED_MODULES)} modules built with mypyc")
    else:
        _say(f"pure-Python form ({WHY_PURE})")


_SETTLED = False


class BuildWithMigrations(build_py):
    """``build_py`` that also copies ``migrations/`` into the package."""

    def run(self) -> None:
        editable = bool(getattr(self, "editable_mode", False))
        _settle_form(inplace=editable)
        super().run()
        if editable:
            return  # an editable install reads the source tree's migrations/
        target = Path(self.build_lib) / "outboundd" / "migrations"
        shutil.copytree(
            MIGRATIONS, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__")
        )


class BuildHotModules(build_ext):
    """``build_ext`` that says which form it builds (also run alone by ``make``)."""

    def run(self) -> None:
        _settle_form(inplace=bool(self.inplace))
        super().run()
        if EXTENSIONS and self.inplace:
            # build_ext skips an extension whose generated C did not change
            # (an edit that changed no code); it is current all the same,
            # and its time says so to tests/conftest.py's staleness check.
            for path in _built_files():
                path.touch()


WHY_PURE = _why_pure()
EXTENSIONS = _extensions(WHY_PURE)

setup(
    cmdclass={"build_py": BuildWithMigrations, "build_ext": BuildHotModules},
    ext_modules=EXTENSIONS,
)
