"""Reading ini files as haraka-config does (sections, key[] arrays, comments)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Final

from outboundd.config.errors import ConfigError, _shown

# --------------------------------------------------------------------------
# The ini reader


@dataclass(frozen=True, slots=True)
class IniEntry:
    """One key of an ini section.

    ``value`` is the text after ``=`` (stripped; ``None`` for a bare key with
    no ``=``) or, for ``key[]=`` lines, the list of their values.  ``line``
    is where it was (last) set.
    """

    value: str | list[str] | None
    line: int


@dataclass(frozen=True, slots=True)
class IniFile:
    """An ini file as haraka-config reads it: ``sections[name][key]``.

    Keys before any ``[section]`` are in ``main``.  ``section_lines`` says
    where each section first appears; ``repeated`` lists ``(section, key,
    line)`` for scalar keys set more than once (the last wins).
    """

    sections: dict[str, dict[str, IniEntry]]
    section_lines: dict[str, int]
    repeated: list[tuple[str, str, int]] = field(default_factory=list)


_SECTION_RE: Final = re.compile(r"\s*\[([^\]]*)\]\s*")
_PARAM_RE: Final = re.compile(r"\s*([^\s=\[\]]+(?:\[\])?)\s*(?:=\s*(.*?)\s*)?")
_CONTINUATION_RE: Final = re.compile(r"\\[ \t]*$")


def parse_ini(text: str, name: str = "<ini>", *, continuation: bool = True) -> IniFile:
    """Parse Haraka-style ini text.

    ``[section]`` headers; ``key=value`` lines (key and value stripped, the
    value taken literally, no quoting); whole-line ``;`` and ``#`` comments;
    keys before any section belong to ``[main]``; ``key[]=v`` appends ``v``
    to the list ``key`` (a later plain ``key=v`` replaces it, as in Haraka);
    a line ending in ``\\`` continues on the next one.  Section and key names
    are case-sensitive, as in Haraka.

    Haraka logs and skips a line that is none of these; here it raises
    :class:`ConfigError` naming ``name`` and the line number, because such a
    line is always a typo that would otherwise silently change nothing.
    """
    sections: dict[str, dict[str, IniEntry]] = {"main": {}}
    section_lines: dict[str, int] = {"main": 0}
    repeated: list[tuple[str, str, int]] = []
    current = "main"
    pending = ""
    pending_line = 0
    lines = text.removeprefix("\ufeff").splitlines()
    for number, raw in enumerate(lines, start=1):
        stripped = raw.strip()
        if not stripped or stripped[0] in ";#":
            continue
        header = _SECTION_RE.fullmatch(raw)
        if header is not None:
            current = header.group(1).strip()
            if not current:
                raise ConfigError(name, "empty section name '[]'", line=number)
            sections.setdefault(current, {})
            section_lines.setdefault(current, number)
            continue
        if continuation and _CONTINUATION_RE.search(raw):
            if not pending:
                pending_line = number
            pending += _CONTINUATION_RE.sub("", raw)
            continue
        logical = pending + raw
        line = pending_line if pending else number
        pending = ""
        _add_param(sections[current], current, logical, line, name, repeated)
    if pending:
        _add_param(sections[current], current, pending, pending_line, name, repeated)
    return IniFile(sections, section_lines, repeated)


def _add_param(
    section: dict[str, IniEntry],
    section_name: str,
    text: str,
    line: int,
    name: str,
    repeated: list[tuple[str, str, int]],
) -> None:
    match = _PARAM_RE.fullmatch(text)
    if match is None:
        raise ConfigError(
            name, f"{_shown(text.strip())} is not a 'key = value' line or a [section]", line=line
        )
    key, value = match.group(1), match.group(2)
    if key.endswith("[]"):
        base = key[:-2]
        previous = section.get(base)
        items = list(previous.value) if previous and isinstance(previous.value, list) else []
        items.append(value or "")
        section[base] = IniEntry(items, line)
        return
    if key in section:
        repeated.append((section_name, key, line))
    section[key] = IniEntry(value, line)
