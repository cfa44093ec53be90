"""outboundd: an outbound mail delivery engine.

``outboundd.send_email`` is the API for plugins and scripts; it is imported
lazily so that ``import outboundd`` stays cheap and free of import cycles.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from outboundd.submission.api import send_email

__all__ = ["send_email"]


def __getattr__(name: str) -> Any:
    if name == "send_email":
        from outboundd.submission.api import send_email

        return send_email
    raise AttributeError(f"module 'outboundd' has no attribute {name!r}")
