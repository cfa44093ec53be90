"""Internationalised domain names: the one conversion from a U-label to DNS.

A recipient domain may arrive as Unicode (``bob@bücher.test`` under
SMTPUTF8, RFC 6531) or already as A-labels (``bob@xn--bcher-kva.test``).
Both name the same host, so both must be judged and converted by the same
rules in every place that looks at them: submission refuses at RCPT a
domain that these rules reject (the client learns at once, nothing is
queued that could only bounce), and delivery turns the domain into the DNS
name it asks for.  The rules are IDNA 2008 with the UTS #46 mapping
(dnspython's ``IDNA_2008_Practical``: case folded, ``ß`` kept, no
transitional processing), which needs the ``idna`` package — declared as
``dnspython[idna]`` in the project's dependencies.

Messages are printable ASCII: other characters are written ``<U+XXXX>``,
so an error can go into an SMTP reply (RFC 5321 §4.2) or a log line as it is.
"""

from __future__ import annotations

import functools

import dns.exception
import dns.name

__all__ = ["IDNA_CODEC", "InvalidDomain", "ascii_text", "to_ascii", "to_name"]

#: The codec every conversion uses (IDNA 2008, UTS #46 mapping, non-transitional).
IDNA_CODEC = dns.name.IDNA_2008_Practical


class InvalidDomain(ValueError):
    """A domain that is not a valid DNS name after IDNA 2008 processing.

    ``str(exc)`` is one printable-ASCII sentence that names the domain.
    """


def ascii_text(text: str) -> str:
    """``text`` with every character outside printable ASCII written ``<U+XXXX>``."""
    return "".join(ch if " " <= ch <= "~" else f"<U+{ord(ch):04X}>" for ch in text)


@functools.lru_cache(maxsize=4096)
def to_name(domain: str) -> dns.name.Name:
    """The absolute DNS name of ``domain`` (Unicode or ASCII; a final dot is allowed).

    Raises :class:`InvalidDomain` when IDNA 2008 processing refuses a label
    (a disallowed code point, a joiner out of context, a bad bidi label …)
    or the name is too long.  Cached: a relay sees the same few domains.
    """
    try:
        return dns.name.from_text(domain, idna_codec=IDNA_CODEC)
    except (dns.exception.DNSException, UnicodeError) as exc:
        detail = str(exc) or type(exc).__name__
        raise InvalidDomain(
            f"invalid domain name '{ascii_text(domain)}': {ascii_text(detail)}"
        ) from None


def to_ascii(domain: str) -> str:
    """The A-label form of ``domain``, lower case, without the final dot."""
    return to_name(domain).to_text(omit_final_dot=True).lower()
