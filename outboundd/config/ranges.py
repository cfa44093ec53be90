"""The accepted range of every numeric setting, as the loader declares it.

Each numeric getter of the loader (``integer``, ``seconds``) declares the
key's range here as it reads it, so the loader is the single source of what
a key accepts: ``docs/configuration.md`` ("Accepted ranges") and the tests
that drive every key to and past its bounds read this table rather than a
copy of it.  :func:`outboundd.config.loader.numeric_settings` fills it by
loading an empty configuration.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

#: The largest size in bytes a size setting accepts (1 TiB).
MAX_BYTES: Final = 2**40
#: The largest count a count setting accepts unless it says otherwise.
MAX_COUNT: Final = 1_000_000


@dataclass(frozen=True, slots=True)
class NumericSetting:
    """One numeric key and the values the loader accepts for it.

    ``integer``: whole numbers from ``minimum`` to ``maximum``.
    ``seconds``: decimal numbers up to ``maximum``; from ``minimum``
    inclusive, except that a ``minimum`` of 0 with ``zero_ok`` false means
    "greater than 0".
    """

    file: str
    section: str
    key: str
    kind: Literal["integer", "seconds"]
    minimum: float
    maximum: float
    zero_ok: bool = True

    @property
    def range_text(self) -> str:
        """The range as the documentation writes it."""
        high = _number(self.maximum)
        if self.kind == "integer":
            return f"{_number(self.minimum)} to {high}"
        low = _number(self.minimum) if self.zero_ok or self.minimum > 0 else "more than 0"
        return f"{low} to {high} s"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


_DECLARED: dict[tuple[str, str, str], NumericSetting] = {}


def declare(setting: NumericSetting) -> None:
    """Record ``setting`` (called by the loader each time it reads the key)."""
    _DECLARED[(setting.file, setting.section, setting.key)] = setting


def declared() -> tuple[NumericSetting, ...]:
    """Every setting declared so far, by file, section and key."""
    return tuple(_DECLARED[k] for k in sorted(_DECLARED))
