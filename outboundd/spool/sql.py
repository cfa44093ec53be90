"""Named SQL statements, loaded once from ``queries.sql``."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

_QUERIES_FILE = Path(__file__).with_name("queries.sql")
_NAME = re.compile(r"^--\s*name:\s*(\w+)\s*$", re.MULTILINE)


def parse_queries(text: str) -> dict[str, str]:
    """Split a file of ``-- name: X`` blocks into ``{X: statement}``."""
    parts = _NAME.split(text)
    queries: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        statement = "\n".join(
            line for line in body.splitlines() if not line.lstrip().startswith("--")
        ).strip()
        if not statement:
            raise ValueError(f"query {name} is empty")
        if name in queries:
            raise ValueError(f"query {name} is defined twice")
        queries[name] = statement
    return queries


@cache
def queries() -> dict[str, str]:
    return parse_queries(_QUERIES_FILE.read_text(encoding="utf-8"))


def q(name: str) -> str:
    """The statement called ``name``."""
    return queries()[name]
