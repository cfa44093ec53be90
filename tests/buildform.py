"""Which form of the hot modules runs: compiled by mypyc or pure Python (setup.py).

setup.py's ``COMPILED_MODULES`` is the one list of them; it is read here
with :mod:`ast` (setup.py runs a build when imported).  An extension sits
beside its ``.py`` and wins the import, so a source edited after the last
build would silently keep running the old compiled code: :func:`stale`
names such modules, and ``tests/conftest.py`` refuses to run tests then.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
EXTENSION_SUFFIXES = (".so", ".pyd")


def compiled_module_sources() -> list[str]:
    """setup.py's ``COMPILED_MODULES``: source paths relative to the repository."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.AnnAssign | ast.Assign):
            targets = [node.target] if isinstance(node, ast.AnnAssign) else node.targets
            if any(isinstance(t, ast.Name) and t.id == "COMPILED_MODULES" for t in targets):
                assert node.value is not None
                value = ast.literal_eval(node.value)
                assert isinstance(value, tuple)
                return [str(item) for item in value]
    raise LookupError("setup.py has no COMPILED_MODULES")


def module_name(source: str) -> str:
    """``outboundd/submission/data.py`` → ``outboundd.submission.data``."""
    return source.removesuffix(".py").replace("/", ".")


def loaded() -> dict[str, ModuleType]:
    """Every compiled-list module, imported."""
    return {
        module_name(src): importlib.import_module(module_name(src))
        for src in compiled_module_sources()
    }


def is_compiled(module: ModuleType) -> bool:
    return str(module.__file__).endswith(EXTENSION_SUFFIXES)


def stale() -> list[str]:
    """Modules running from an extension older than their ``.py`` source."""
    out = []
    for name, module in loaded().items():
        if not is_compiled(module):
            continue
        extension = Path(str(module.__file__))
        source = extension.parent / (name.rpartition(".")[2] + ".py")
        if source.exists() and source.stat().st_mtime > extension.stat().st_mtime:
            out.append(name)
    return out
