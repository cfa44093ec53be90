"""The PostgreSQL backend's named statements, loaded once from ``queries.sql``.

They are written with ``:name`` parameters like SQLite's; asyncpg wants
``$1, $2 ...``, so each statement is rewritten once at load, and
:func:`bind` orders a dict of values to match.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from outboundd.spool.sql import parse_queries

_QUERIES_FILE = Path(__file__).with_name("queries.sql")
#: ``:name`` but not the ``::type`` of a cast.
_PARAM = re.compile(r"(?<![:\w]):([a-z_][a-z0-9_]*)")


@dataclass(frozen=True, slots=True)
class Statement:
    """One statement in asyncpg's form and the parameter names in ``$n`` order."""

    text: str
    names: tuple[str, ...]


def to_positional(statement: str) -> Statement:
    """``:a ... :b ... :a`` becomes ``$1 ... $2 ... $1`` with names ``(a, b)``."""
    names: list[str] = []

    def number(match: re.Match[str]) -> str:
        name = match[1]
        if name not in names:
            names.append(name)
        return f"${names.index(name) + 1}"

    return Statement(_PARAM.sub(number, statement), tuple(names))


@cache
def statements() -> dict[str, Statement]:
    text = _QUERIES_FILE.read_text(encoding="utf-8")
    return {name: to_positional(sql) for name, sql in parse_queries(text).items()}


def pq(name: str) -> Statement:
    """The statement called ``name``."""
    return statements()[name]


def bind(statement: Statement, params: Mapping[str, Any]) -> list[Any]:
    """``params`` in the statement's ``$n`` order; a missing name is a KeyError."""
    return [params[name] for name in statement.names]
