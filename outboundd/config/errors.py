"""ConfigError: one line naming file, section, key, value and what was expected."""

from __future__ import annotations

from pathlib import Path
from typing import Final

_MAX_SHOWN_VALUE: Final = 120


# --------------------------------------------------------------------------
# Errors


def _shown(value: str) -> str:
    """A value quoted for an error line: repr (so control characters and
    newlines are escaped and the message stays one line), long values cut."""
    if len(value) > _MAX_SHOWN_VALUE:
        value = value[:_MAX_SHOWN_VALUE] + "..."
    return repr(value)


class ConfigError(Exception):
    """A configuration file holds something outboundd cannot use.

    ``str()`` is always one line: ``FILE [SECTION] KEY: PROBLEM``,
    ``FILE line N: PROBLEM`` or ``FILE: PROBLEM``.  The parts are also
    attributes, for callers that want them separately.
    """

    def __init__(
        self,
        file: str,
        problem: str,
        *,
        section: str | None = None,
        key: str | None = None,
        line: int | None = None,
    ) -> None:
        self.file = file
        self.problem = " ".join(problem.split())
        self.section = section
        self.key = key
        self.line = line
        super().__init__(self._render())

    def _render(self) -> str:
        where = self.file
        if self.section is not None:
            where += f" [{self.section}]"
        if self.key is not None:
            where += f" {self.key}"
        elif self.line is not None:
            where += f" line {self.line}"
        return f"{where}: {self.problem}"


def _display(path: Path) -> str:
    """The name used for ``path`` in messages: relative to the working
    directory when it lies below it (``config/outbound.ini``), else as given."""
    if path.is_absolute():
        try:
            return str(path.relative_to(Path.cwd()))
        except (ValueError, OSError):
            return str(path)
    return str(path)
